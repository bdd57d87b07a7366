"""`python -m bench mail`: mail per second through SMTP end to end, with its ceilings, and
beside the same mail fed straight to DELIVER.

Intake (issue 9): a real `pyserver run` (native core, uvloop, durable SQLite store and
blob store) takes mail on its MTA proxy from Postfix's `smtp-source` (C, 32 sessions),
a small mail (300 B body) and a 1 MiB body; in the same run the same driver feeds a bare
aiosmtpd sink on uvloop (the proxy's library doing no work) and Postfix's `smtp-sink`
(C), the ceilings: `smtp_small_per_s`, `aiosmtpd_sink_small_per_s`,
`smtp_sink_small_per_s`, `smtp_1mb_per_s`, `aiosmtpd_sink_1mb_per_s`,
`smtp_sink_1mb_per_s` and the ratios `smtp_small_vs_aiosmtpd_sink`,
`smtp_1mb_vs_smtp_sink`. Targets: at least 1,000 small mails/s and 0.8 of the aiosmtpd
sink; at least 120 1 MiB mails/s and 0.35 of smtp-sink. A mail counts once the proxy
answered 250, that is once every recipient's copy is durable. The cell runs its proxy in
the app server's process; the same rounds also feed the proxy as a tier of its own
(`pyserver mta` in front of the same cell, delivering over a connection; the app server's
work on the other core): `mta_process_small_per_s`, `mta_process_1mb_per_s` and their
ratios.

smtplib (issue 5): the sender is smtplib on persistent connections, 32 at once, a small
text mail and one with a 1 MB attachment (each attachment different, so nothing is
deduplicated): `smtplib_small_per_s`, `smtplib_1mb_per_s`. The same mails' email
objects (what the proxy hands the app server) are then fed straight to DELIVER over the
client library, so `proxy_share_*` says how much of the time is the proxy's own. Rounds
of the four contenders alternate and each keeps its best round (bench.timing's rule).
Targets: at least 500 small mails/s, and a 1 MB attachment costing no more than 3x a
small mail (`mb_cost_ratio`, small mails/s over 1 MB mails/s).

Mail out (issue 15): SENDs to an outside address each, from the client library, until
the relay accepted every one (`smtp_out_per_s`: the last mail's delivery reads `sent`,
then all are checked). The relay is Postfix's `smtp-sink`; its own ceiling in the same
run is Postfix's `smtp-source` (C, 8 sessions) straight into it (`sink_ceiling_per_s`),
and `smtp_out_vs_sink` is the ratio. Target: at least 1,000 mails/s out.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bench.listeners import listening_process, start_cell, stop_process

USERS = 64
MARK_ID = b"<MESSAGE-ID-PLACEHOLDER>"
ATTACHMENT_BYTES = 1 << 20


@contextmanager
def _cell(*extra_args: str) -> Iterator[tuple[Path, int, int, str]]:
    """A `pyserver run` on a fresh folder with USERS addresses: (data, port, smtp port, key)."""
    from pyserver.processes.cell import store_path
    from pyserver.store.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="bench-mail-") as folder:
        data = Path(folder)

        async def addresses() -> None:
            store = SQLiteStore(store_path(data))
            await store.open()
            for user in range(1, USERS + 1):
                await store.add_address(f"user{user}@bench.test", user)
            await store.close()

        asyncio.run(addresses())
        proc, ready = start_cell(data, *extra_args)
        try:
            key = (data / "service.key").read_text().strip()
            yield data, ready["server"]["port"], ready["smtp"]["port"], key
        finally:
            stop_process(proc)


# ---- the mails ----


class MailTemplate:
    """A mail on the wire (CRLF, dot-stuffed) with holes for a Message-ID and, optionally,
    the first line of its attachment, so every mail sent is a different one."""

    def __init__(self, attachment: bool) -> None:
        message = EmailMessage()
        message["From"] = "Bench Sender <sender@bench.test>"
        message["To"] = "user1@bench.test"
        message["Subject"] = "Quarterly figures" if attachment else "Lunch on friday?"
        message["Message-ID"] = MARK_ID.decode()
        message.set_content("Hello,\n\nshall we have lunch on friday at noon?\n\nAlice\n")
        self.line: bytes | None = None
        if attachment:
            blob = random.Random(7).randbytes(ATTACHMENT_BYTES)
            message.add_attachment(blob, maintype="application", subtype="pdf",
                                   filename="figures.pdf")  # fmt: skip
        wire = message.as_bytes(policy=policy.SMTP)
        head, tail = wire.split(MARK_ID)
        self.pieces = [head, b"", tail]
        if attachment:
            # the attachment's first base64 line (76 letters = 57 bytes) becomes a hole
            first = base64.b64encode(random.Random(7).randbytes(ATTACHMENT_BYTES)[:57])
            before, after = tail.split(first, 1)
            self.pieces = [head, b"", before, b"", after]
        if not wire.endswith(b"\r\n"):
            self.pieces[-1] += b"\r\n"
        self.size = len(wire)

    def render(self, n: int, nonce: str) -> list[bytes]:
        pieces = list(self.pieces)
        pieces[1] = f"<bench.{nonce}.{n}@bench.test>".encode()
        if len(pieces) == 5:
            pieces[3] = base64.b64encode(random.Random(f"{nonce}{n}").randbytes(57))
        return pieces


def _send_all(port: int, template: MailTemplate, count: int, connections: int) -> float:
    """Send `count` mails over `connections` smtplib sessions at once; seconds taken."""
    nonce = f"{time.time_ns():x}"
    numbers = iter(range(count))
    lock = threading.Lock()
    errors: list[str] = []

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.ehlo("bench.test")
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                smtp.mail("sender@bench.test")
                smtp.rcpt(f"user{n % USERS + 1}@bench.test")
                # DATA by hand: the mail is stuffed and CRLF already, sent in pieces
                code, _ = smtp.docmd("DATA")
                if code != 354:
                    errors.append(f"DATA {code}")
                    return
                for piece in template.render(n, nonce):
                    smtp.sock.sendall(piece)
                smtp.sock.sendall(b".\r\n")
                code, reply = smtp.getreply()
                if code != 250:
                    errors.append(f"{code} {reply!r}")
                    return

    started = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        for future in [pool.submit(session) for _ in range(connections)]:
            future.result()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"bench: the proxy refused mail: {errors[:3]}")
    return elapsed


async def _deliver_all(port: int, key: str, email: dict[str, Any], count: int, width: int) -> float:
    """Feed `count` copies of a delivered mail's email object to DELIVER, `width` at a time."""
    from pyserver.client import Client

    nonce = f"{time.time_ns():x}"
    async with await Client.connect("127.0.0.1", port, service_key=key) as client:
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                user = n % USERS + 1
                payload = {**email, "user": user, "participants": [user],
                           "key": f"<deliver.{nonce}.{n}@bench.test>"}  # fmt: skip
                await client.request(11, payload)  # DELIVER

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(width)))
        return time.perf_counter() - started


async def _email_object(port: int, key: str, user: int, subject: str) -> dict[str, Any]:
    """The email object the proxy made of a mail, as DELIVER's payload (without user/key)."""
    from pyserver.client import Client

    async with await Client.connect("127.0.0.1", port, service_key=key) as client:
        threads = (await client.list_threads(user, folder="other", limit=200))["threads"]
        for thread in threads:
            reply = await client.get_thread(user, thread["thread_id"], limit=200)
            for shown in reply["messages"]:
                if shown["subject"] != subject:
                    continue
                message = await client.get_message(user, shown["message_id"])
                email = {"sender": 0, "from": message["from"], "text": message["text"],
                         "subject": message["subject"], "channel": "email",
                         "extra": message["extra"]}  # fmt: skip
                raw = message["extra"]["raw"]
                if raw.get("inline"):  # a small mail's bytes go with DELIVER
                    pieces = [piece async for piece in client.get_blob(user, raw["ref"])]
                    email["raw"] = base64.b64encode(b"".join(pieces)).decode()
                return email
    raise RuntimeError(f"bench: no delivered mail with subject {subject!r}")


# ---- mail out ----


def _smtp_sink() -> AbstractContextManager[int]:
    """Postfix's smtp-sink on a loopback port, accepting everything, keeping nothing."""
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return listening_process(lambda port: [sink, *user, f"127.0.0.1:{port}", "256"], "smtp-sink")


def _sink_ceiling(port: int, count: int) -> float:
    """smtp-source straight into the sink: `count` small mails over 8 sessions; seconds."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    started = time.perf_counter()
    subprocess.run([source, "-s", "8", "-m", str(count), "-l", "300", "-f", "a@bench.test",
                    "-t", "b@remote.test", f"127.0.0.1:{port}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


async def _send_out(port: int, key: str, count: int, width: int) -> float:
    """`count` SENDs, each to one outside address, until the relay took them all; seconds."""
    from pyserver.client import Client

    nonce = f"{time.time_ns():x}"
    async with await Client.connect("127.0.0.1", port, service_key=key) as client:
        numbers = iter(range(count))
        sent: list[tuple[int, str]] = []

        async def worker() -> None:
            for n in numbers:
                user = n % USERS + 1
                reply = await client.send(user, [f"friend{n}@remote.test"], "lunch on friday?",
                                          subject="Lunch", key=f"out.{nonce}.{n}")  # fmt: skip
                sent.append((user, reply["thread_id"]))

        def delivered(reply: dict[str, Any]) -> bool:
            states = reply["messages"][-1].get("delivery", {}).values()
            return all(state["state"] == "sent" for state in states)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(width)))
        user, thread = sent[-1]
        while not delivered(await client.get_thread(user, thread)):
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        for user, thread in sent:  # outside the clock: every one of them went out
            while not delivered(await client.get_thread(user, thread)):
                await asyncio.sleep(0.05)
        return elapsed


# ---- intake driven by smtp-source, with its ceilings (issue 9) ----


def _aiosmtpd_sink() -> AbstractContextManager[int]:
    """bench.aiosmtpd_sink in its own process: aiosmtpd on uvloop, answering 250, no work."""
    return listening_process(
        lambda port: [sys.executable, "-m", "bench.aiosmtpd_sink", str(port)], "aiosmtpd sink"
    )


def _source(port: int, count: int, size: int, sessions: int = 32) -> float:
    """Postfix's smtp-source: `count` mails with a `size`-byte body over `sessions`
    sessions, to a registered user; seconds (its exit status says every one got 250)."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    started = time.perf_counter()
    subprocess.run([source, "-s", str(sessions), "-m", str(count), "-l", str(size),
                    "-f", "sender@bench.test", "-t", "user1@bench.test", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    return time.perf_counter() - started


def _mta_process(data: Path) -> AbstractContextManager[int]:
    """`pyserver mta` in its own process in front of the cell in `data` (the proxy as its
    own tier, delivering to the cell's app server over a connection)."""
    argv = [sys.executable, "-m", "pyserver.cli", "mta", "--data", str(data), "--smtp-port"]
    return listening_process(lambda port: [*argv, str(port)], "MTA proxy process")


def run_source(smtp_port: int, data: Path, quick: bool = False) -> dict[str, Any]:
    """The cell's MTA proxy, the proxy in a process of its own in front of the same cell,
    a bare aiosmtpd sink and smtp-sink, each fed by smtp-source (32 sessions) in one run:
    small mails (300 B body) and 1 MB bodies; best of rounds."""
    counts = {"small": 300, "1mb": 10} if quick else {"small": 3_000, "1mb": 100}
    sizes = {"small": 300, "1mb": 1 << 20}
    rounds = 1 if quick else 3
    best: dict[str, float] = {}
    with _smtp_sink() as sink_port, _aiosmtpd_sink() as aio_port, _mta_process(data) as mta_port:
        receivers = {"smtp": smtp_port, "mta_process": mta_port, "aiosmtpd_sink": aio_port,
                     "smtp_sink": sink_port}  # fmt: skip
        for _ in range(rounds):
            for size_name in ("small", "1mb"):
                for receiver, port in receivers.items():
                    count = counts[size_name]
                    rate = count / _source(port, count, sizes[size_name])
                    name = f"{receiver}_{size_name}"
                    best[name] = max(best.get(name, 0.0), rate)
    out: dict[str, Any] = {f"{name}_per_s": round(rate, 1) for name, rate in best.items()}
    small_vs_aio = best["smtp_small"] / best["aiosmtpd_sink_small"]
    mb_vs_sink = best["smtp_1mb"] / best["smtp_sink_1mb"]
    process_vs_aio = best["mta_process_small"] / best["aiosmtpd_sink_small"]
    out["smtp_small_vs_aiosmtpd_sink"] = round(small_vs_aio, 3)
    out["smtp_1mb_vs_smtp_sink"] = round(mb_vs_sink, 3)
    out["mta_process_small_vs_aiosmtpd_sink"] = round(process_vs_aio, 3)
    out["mta_process_1mb_vs_smtp_sink"] = round(best["mta_process_1mb"] / best["smtp_sink_1mb"], 3)
    out["targets"] = {
        "smtp_small_per_s >= 1000": best["smtp_small"] >= 1000,
        "smtp_small_vs_aiosmtpd_sink >= 0.8": small_vs_aio >= 0.8,
        "smtp_1mb_per_s >= 120": best["smtp_1mb"] >= 120,
        "smtp_1mb_vs_smtp_sink >= 0.35": mb_vs_sink >= 0.35,
        "mta_process_small_vs_aiosmtpd_sink >= 0.8": process_vs_aio >= 0.8,
    }
    out["setup"] = {"driver": "smtp-source, 32 sessions", "mails_per_round": counts,
                    "rounds": rounds, "bodies": "300 B and 1 MiB of text",
                    "mta_process": "pyserver mta in front of the cell"}  # fmt: skip
    return out


def run_out(quick: bool = False) -> dict[str, Any]:
    count = 200 if quick else 2_000
    rounds = 1 if quick else 3
    best = {"smtp_out": 0.0, "sink_ceiling": 0.0}
    with _smtp_sink() as sink_port, _cell("--relay", f"127.0.0.1:{sink_port}") as cell:
        _, port, _, key = cell
        asyncio.run(_send_out(port, key, 20, 4))  # warm up
        for _ in range(rounds):
            best["smtp_out"] = max(best["smtp_out"], count / asyncio.run(
                _send_out(port, key, count, 32)))  # fmt: skip
            best["sink_ceiling"] = max(
                best["sink_ceiling"], count / _sink_ceiling(sink_port, count)
            )
    return {
        "smtp_out_per_s": round(best["smtp_out"], 1),
        "sink_ceiling_per_s": round(best["sink_ceiling"], 1),
        "smtp_out_vs_sink": round(best["smtp_out"] / best["sink_ceiling"], 3),
        "targets": {"smtp_out_per_s >= 1000": best["smtp_out"] >= 1000},
        "setup": {
            "mails_per_round": count,
            "rounds": rounds,
            "senders": "32 at once",
            "relay": "smtp-sink",
            "ceiling": "smtp-source, 8 sessions, 300 B",
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    small, big = MailTemplate(attachment=False), MailTemplate(attachment=True)
    counts = {"small": 60, "1mb": 12} if quick else {"small": 600, "1mb": 80}
    rounds = 1 if quick else 3
    connections = 32
    best: dict[str, float] = {}
    with _cell() as (data, port, smtp_port, key):
        # warm up (and get the email objects the proxy makes of each mail)
        _send_all(smtp_port, small, 8, 4)
        _send_all(smtp_port, big, 4, 4)
        emails = {
            "small": asyncio.run(_email_object(port, key, 1, "Lunch on friday?")),
            "1mb": asyncio.run(_email_object(port, key, 1, "Quarterly figures")),
        }
        contenders: dict[str, Callable[[], float]] = {
            "smtplib_small": lambda: _send_all(smtp_port, small, counts["small"], connections),
            "deliver_small": lambda: asyncio.run(
                _deliver_all(port, key, emails["small"], counts["small"], connections)
            ),
            "smtplib_1mb": lambda: _send_all(smtp_port, big, counts["1mb"], connections),
            "deliver_1mb": lambda: asyncio.run(
                _deliver_all(port, key, emails["1mb"], counts["1mb"], connections)
            ),
        }
        for _ in range(rounds):
            for name, contender in contenders.items():
                count = counts["1mb" if name.endswith("1mb") else "small"]
                rate = count / contender()
                best[name] = max(best.get(name, 0.0), rate)
        source = run_source(smtp_port, data, quick)
    # smtp-source's figures (issue 9's names) first, then smtplib's beside DELIVER
    results: dict[str, Any] = dict(source)
    results.update({f"{name}_per_s": round(rate, 1) for name, rate in best.items()})
    results["proxy_share_small"] = round(1 - best["smtplib_small"] / best["deliver_small"], 3)
    results["proxy_share_1mb"] = round(1 - best["smtplib_1mb"] / best["deliver_1mb"], 3)
    results["mb_cost_ratio"] = round(best["smtplib_small"] / best["smtplib_1mb"], 2)
    results["targets"] = {
        **source["targets"],
        "smtplib_small_per_s >= 500": best["smtplib_small"] >= 500,
        "mb_cost_ratio <= 3": best["smtplib_small"] / best["smtplib_1mb"] <= 3,
    }
    results["setup"] = {"source": source["setup"]}
    results["out"] = run_out(quick)
    results["setup"] |= {
        "sender": f"smtplib, {connections} connections at once",
        "mails_per_round": counts,
        "rounds": rounds,
        "small_mail_bytes": small.size,
        "1mb_mail_bytes": big.size,
        "recipients": f"{USERS} users, one per mail",
    }
    return results
