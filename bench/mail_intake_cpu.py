"""`python -m bench.mail_intake_cpu [MAILS] [--profile]`: CPU per 1 MiB mail of the proxy's
own work, in one process, without SMTP peers or an app server.

Each mail is shaped like the ones Postfix's smtp-source sends (`bench.mail_cpu ... 1048576`):
a few headers and a 1 MiB text body of CRLF lines. It is fed to `DataReader` in 64 KiB
blocks, as the SMTP protocol gets it, then stored and parsed by `store_mail_unsynced` on a
durable disk blob store in a temporary folder, its blobs' barrier awaited. Printed: the
process's user and system CPU per mail (os.times, worker threads included); `--profile`
adds cProfile's top functions (the event loop's thread only: the parse and the big blob
writes run on worker threads, so they are profiled by calling them here directly).
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import json
import os
import pstats
import sys
import tempfile

from pyserver.blobs.disk import DiskBlobStore
from pyserver.mta.intake import MtaSettings, _parse_and_decode, store_mail_unsynced
from pyserver.mta.smtpd import DataReader

BODY_BYTES = 1 << 20
BLOCK = 64 << 10


def smtp_source_mail(n: int, size: int = BODY_BYTES) -> bytes:
    """A mail as smtp-source sends it (its Message-Id numbered `n`), CRLF line ends."""
    head = (f"From: <sender@bench.test>\r\nTo: <user1@bench.test>\r\n"
            f"Date: Fri,  4 Dec 2026 21:15:51 +0000 (UTC)\r\n"
            f"Message-Id: <{n:04x}.0003.0000@vm>\r\n\r\n").encode()  # fmt: skip
    return head + _body(size)


@functools.cache
def _body(size: int) -> bytes:
    """smtp-source's body: numbered lines of 80 letters, CRLF ends, `size` bytes in all."""
    lines = []
    left, number = size, 1
    while left > 0:
        line = (str(number % 10) + "X" * 79)[: max(left - 2, 1)]
        lines.append(line.encode())
        left -= len(line) + 2
        number += 1
    return b"\r\n".join(lines) + b"\r\n"


def _wire(raw: bytes) -> list[bytes]:
    """The DATA as it arrives: the message then the terminating line, in blocks."""
    wire = raw + b".\r\n"
    return [wire[low : low + BLOCK] for low in range(0, len(wire), BLOCK)]


async def _run(mails: int, folder: str) -> dict[str, float]:
    blobs = DiskBlobStore(folder, durable=True)
    await blobs.open()
    settings = MtaSettings()
    wires = [_wire(smtp_source_mail(n)) for n in range(mails + 5)]
    try:
        for n in range(mails + 5):
            if n == 5:  # warmed up
                before = os.times()
            reader = DataReader(settings.max_mail_bytes)
            for block in wires[n]:
                reader.feed(block)
            raw = reader.content()
            assert raw is not None
            _, durable = await store_mail_unsynced(raw, "sender@bench.test", blobs, settings)
            await durable
        after = os.times()
    finally:
        await blobs.close()
    cpu = after.user + after.system - before.user - before.system
    return {
        "mails": mails,
        "cpu_ms_per_mail": round(cpu / mails * 1e3, 2),
        "user_ms_per_mail": round((after.user - before.user) / mails * 1e3, 2),
        "sys_ms_per_mail": round((after.system - before.system) / mails * 1e3, 2),
    }


def _profile(mails: int) -> None:
    raws = [smtp_source_mail(n) for n in range(mails)]
    profile = cProfile.Profile()
    profile.enable()
    for raw in raws:
        _parse_and_decode(raw)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    mails = int(args[0]) if args else 200
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as folder:
        print(json.dumps(asyncio.run(_run(mails, folder))), flush=True)
    if "--profile" in sys.argv:
        _profile(mails)


if __name__ == "__main__":
    main()
