"""A cell on a full disk: writes refused UNAVAILABLE, nothing acknowledged lost, none corrupt,
and writes served again by themselves once space returns (no restart).

The disk is a real small tmpfs mounted for the test (root only: mounting needs
CAP_SYS_ADMIN; without it the test is skipped and says why). The disk is filled
by a filler file written until the kernel answers ENOSPC, and freed by deleting it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from pyserver.blobs.disk import DiskBlobStore
from pyserver.client import Client
from pyserver.errors import Unavailable
from tests.support import cli, run, serve_cell

DISK_MB = 24
ATTACHMENT = os.urandom(200_000)  # big enough to go to the blob store


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MB MiB mounted at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(disk)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file on `disk` until the kernel answers ENOSPC; return its path."""
    filler = disk / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as out:
        for size in (len(block), 4096, 1):
            try:
                while True:
                    out.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _mail() -> bytes:
    mail = EmailMessage()
    mail["From"] = "alice@example.org"
    mail["To"] = "bob@example.com"
    mail["Subject"] = "the report"
    mail["Message-ID"] = "<full-disk@example.org>"
    mail.set_content("see the attachment")
    mail.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream",
                        filename="report.bin")  # fmt: skip
    return mail.as_bytes()


def _smtp(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("alice@example.org", ["bob@example.com"], _mail())


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_a_full_disk_refuses_sends_loses_nothing_and_heals_by_itself(small_disk: Path) -> None:
    data = small_disk / "cell"
    data.mkdir()
    cli("admin", "add-address", "--data", str(data), "--user", "2", "bob@example.com")
    proc, ready = serve_cell(data)
    try:
        host, port = ready["server"]["host"], ready["server"]["port"]
        smtp_port = ready["smtp"]["port"]
        key = (data / "service.key").read_text().strip()

        async def scenario() -> None:
            client = await Client.connect(host, port, service_key=key)
            try:
                acked = {}
                for n in range(20):
                    reply = await client.send(1, [2], f"before the disk filled {n}", key=f"b{n}")
                    acked[f"b{n}"] = reply["message_id"]
                filler = fill(small_disk)
                # Writes that still fit in space SQLite already holds may succeed; the
                # first that needs more is refused, and so is every one after it.
                refused: Unavailable | None = None
                for n in range(400):
                    try:
                        reply = await client.send(1, [2], f"while full {n}", key=f"f{n}")
                    except Unavailable as exc:
                        refused = exc
                        break
                    acked[f"f{n}"] = reply["message_id"]
                assert refused is not None, "a full disk never refused a SEND"
                assert refused.code == "UNAVAILABLE"
                assert "disk is full" in str(refused), str(refused)
                for _ in range(3):  # still refused, still clearly
                    with pytest.raises(Unavailable, match="disk is full"):
                        await client.send(1, [2], "still full", key="after")
                # Mail with an attachment: the blob cannot be stored; SMTP says retry later.
                with pytest.raises(smtplib.SMTPDataError) as refused_mail:
                    await asyncio.to_thread(_smtp, smtp_port)
                assert refused_mail.value.smtp_code == 451
                # Everything acknowledged is readable while the disk is full.
                for message_id in acked.values():
                    got = await client.get_message(2, message_id)
                    assert got["message_id"] == message_id
                # Space returns: the same cell takes writes again, nothing restarted.
                filler.unlink()
                reply = await asyncio.wait_for(_send_when_served(client), 30)
                assert (await client.get_message(2, reply["message_id"]))["text"] == "still full"
                for message_id in acked.values():
                    assert (await client.get_message(1, message_id))["message_id"] == message_id
                # The sending MTA's retry is taken, attachment and all.
                await asyncio.to_thread(_smtp, smtp_port)
                mail_id = await _mail_id(client)
                extra = (await client.get_message(2, mail_id))["extra"]
                (attachment,) = extra["attachments"]
                got = b"".join([p async for p in client.get_blob(2, attachment["ref"])])
                assert got == ATTACHMENT
            finally:
                await client.close()

        run(scenario, timeout=120)
        assert proc.poll() is None, "the cell exited"
        assert _integrity(data / "store.sqlite3") == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


async def _mail_id(client: Client) -> str:
    """The id of the one mail user 2 received (from a stranger: in "other")."""
    mails = []
    for thread in (await client.list_threads(2, folder="other", limit=200))["threads"]:
        messages = (await client.get_thread(2, thread["thread_id"]))["messages"]
        mails += [m["message_id"] for m in messages if m.get("channel") == "email"]
    (mail_id,) = mails
    return mail_id


async def _send_when_served(client: Client) -> dict:
    while True:
        try:
            return await client.send(1, [2], "still full", key="after")
        except Unavailable:
            await asyncio.sleep(0.2)


def test_the_disk_blob_store_on_a_full_disk(small_disk: Path) -> None:
    async def scenario() -> None:
        store = DiskBlobStore(small_disk / "blobs")
        await store.open()
        try:
            kept = await store.put(os.urandom(300_000))
            filler = fill(small_disk)
            with pytest.raises(Unavailable, match="disk is full"):
                await store.put(os.urandom(300_000))
            assert list(store.tmp_dir.iterdir()) == [], "a half blob was left"
            assert (await store.stat(kept.ref)) == kept
            assert len(await store.get(kept.ref)) == kept.size
            filler.unlink()
            again = await store.put(os.urandom(300_000))
            assert (await store.stat(again.ref)) == again
        finally:
            await store.close()

    run(scenario)
