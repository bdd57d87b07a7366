"""Blob garbage collection: unreferenced old blobs go, referenced or recently (re)used
ones stay, and new mail reusing a blob while a collection runs never loses it.

The store is the real disk blob store; the end-to-end tests run a real cell (`pyserver
run`), mail through its SMTP port (smtplib) and `pyserver admin blob-gc` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from pyserver.blobs import disk as disk_module
from pyserver.blobs.disk import DiskBlobStore
from pyserver.blobs.gc import collect_garbage
from pyserver.client import Client
from pyserver.errors import Unavailable
from pyserver.implementation import PURE_FORCED
from tests.support import cli, run, serve_cell

HOUR = 3600.0


def age(store_root: Path, seconds: float, refs: set[str] | None = None) -> None:
    """Make blob files look untouched for `seconds` (all of them, or those of `refs`)."""
    then = time.time() - seconds
    for path in store_root.glob("??/*"):
        if refs is None or path.name in refs:
            os.utime(path, (then, then))


def stored(store_root: Path) -> set[str]:
    return {path.name for path in store_root.glob("??/*")}


async def opened(root: Path) -> DiskBlobStore:
    store = DiskBlobStore(root, durable=False)
    await store.open()
    return store


def test_old_unreferenced_blobs_go_and_the_rest_stay(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await opened(tmp_path / "blobs")
        try:
            contents = [os.urandom(1000 + n) for n in range(3)]
            kept, orphan, recent = [(await store.put(data)).ref for data in contents]
            age(store.root, 2 * HOUR, {kept, orphan})

            async def referenced() -> set[str]:
                return {kept}

            dry = await collect_garbage(store, referenced, grace_s=HOUR, dry_run=True)
            assert (dry.blobs, dry.old, dry.referenced, dry.removed) == (3, 2, 1, 1)
            assert dry.removed_refs == [orphan]
            assert stored(store.root) == {kept, orphan, recent}, "a dry run removed something"
            report = await collect_garbage(store, referenced, grace_s=HOUR)
            assert report.removed_refs == [orphan] and report.removed_bytes > 1000
            assert stored(store.root) == {kept, recent}
            assert await store.stat(orphan) is None
            assert len(await store.get(kept)) == 1000
            # the same bytes come again: stored anew
            assert (await store.put(contents[1])).ref == orphan
            assert await store.get(orphan) == contents[1]
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize("streamed", [False, True], ids=["bytes", "stream"])
def test_a_blob_reused_while_the_references_are_read_is_kept(tmp_path: Path, streamed: bool):
    """The race on purpose: the collection has listed an old blob as a candidate and is
    reading the references; new mail stores the same bytes (deduplicated, so nothing is
    written) and its message commits after the references were read. The blob stays."""

    async def scenario() -> None:
        store = await opened(tmp_path / "blobs")
        data = os.urandom(300_000)
        try:
            ref = (await store.put(data)).ref
            age(store.root, 2 * HOUR)

            async def referenced() -> set[str]:
                source = (data[i : i + 4096] for i in range(0, len(data), 4096))
                info = await store.put(source if streamed else data)  # the new mail's put
                assert info.ref == ref
                return set()  # its message commits after this read

            report = await collect_garbage(store, referenced, grace_s=HOUR)
            assert (report.old, report.removed, report.refreshed) == (1, 0, 1)
            assert await store.get(ref) == data
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize("when", ["before", "after"])
def test_reuse_at_the_moment_of_removal_never_loses_a_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The race on purpose, at the narrowest point: the same bytes are put (on another
    thread, as a put runs) just before or just after the collection renames the old blob
    aside. Before: the re-check sees the fresh time and puts it back. After: the put
    finds no file and writes it anew. Either way the blob is there afterwards."""

    async def scenario() -> None:
        store = await opened(tmp_path / "blobs")
        data = os.urandom(5000)
        try:
            ref = (await store.put(data)).ref
            age(store.root, 2 * HOUR)
            real_rename = os.rename
            other = DiskBlobStore(store.root, durable=False)

            def racing_rename(source: Any, target: Any) -> None:
                if Path(source) == store.path_of(ref):
                    if when == "before":
                        other._put_bytes(data)
                    real_rename(source, target)
                    if when == "after":
                        other._put_bytes(data)
                    return
                real_rename(source, target)

            monkeypatch.setattr(disk_module.os, "rename", racing_rename)
            removed = await store.remove_if_stale(ref, time.time() - HOUR)
            monkeypatch.undo()
            assert removed is (when == "after")  # the old file went; the new one is there
            assert await store.get(ref) == data
            assert not list(store.gc_dir.iterdir()), "a blob was left aside"
        finally:
            await store.close()

    run(scenario)


def test_a_blob_left_aside_by_a_dead_collection_is_put_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await opened(tmp_path / "blobs")
        try:
            ref = (await store.put(b"kept")).ref
            store.gc_dir.mkdir()
            os.rename(store.path_of(ref), store.gc_dir / f"{ref}.123.abcd")

            async def referenced() -> set[str]:
                return {ref}

            report = await collect_garbage(store, referenced, grace_s=HOUR)
            assert report.put_back == 1
            assert await store.get(ref) == b"kept"
        finally:
            await store.close()

    run(scenario)


def test_one_collection_at_a_time(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await opened(tmp_path / "blobs")
        try:
            with store.gc_lock():

                async def referenced() -> set[str]:
                    return set()

                with pytest.raises(Unavailable, match="another blob garbage collection"):
                    await collect_garbage(store, referenced, grace_s=HOUR)
        finally:
            await store.close()

    run(scenario)


# ---- end to end: a served cell, real SMTP, the admin command as a process ----


def _mail(subject: str, attachment: bytes) -> bytes:
    mail = EmailMessage()
    mail["From"] = "alice@example.org"
    mail["To"] = "bob@example.com"
    mail["Subject"] = subject
    mail.set_content(f"{subject}: see the attachment")
    mail.add_attachment(attachment, maintype="application", subtype="octet-stream",
                        filename=f"{subject}.bin")  # fmt: skip
    return mail.as_bytes()


def _smtp(port: int, subject: str, attachment: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("alice@example.org", ["bob@example.com"], _mail(subject, attachment))


async def _mails(client: Client) -> dict[str, dict]:
    """User 2's mails by subject: thread, message id, the attachment's ref, the raw mail's."""
    found = {}
    for thread in (await client.list_threads(2, folder="other", limit=200))["threads"]:
        for message in (await client.get_thread(2, thread["thread_id"]))["messages"]:
            full = await client.get_message(2, message["message_id"])
            (attachment,) = full["extra"]["attachments"]
            found[full["subject"]] = {
                "thread_id": thread["thread_id"],
                "message_id": message["message_id"],
                "ref": attachment["ref"],
                "raw": full["extra"]["raw"]["ref"],
            }
    return found


async def _blob(client: Client, ref: str) -> bytes:
    return b"".join([piece async for piece in client.get_blob(2, ref)])


def _gc(data: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", "admin", "blob-gc", "--data", str(data),
         "--grace-s", str(HOUR), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _report(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_blob_gc_on_a_served_cell_while_mail_reuses_a_blob(tmp_path: Path) -> None:
    data = tmp_path / "cell"
    data.mkdir()
    cli("admin", "add-address", "--data", str(data), "--user", "2", "bob@example.com")
    proc, ready = serve_cell(data)
    smtp_port = ready["smtp"]["port"]
    host, port = ready["server"]["host"], ready["server"]["port"]
    key = (data / "service.key").read_text().strip()
    kept, dropped = os.urandom(150_000), os.urandom(160_000)
    blobs = data / "blobs"
    try:

        async def scenario() -> None:
            client = await Client.connect(host, port, service_key=key)
            try:
                await asyncio.to_thread(_smtp, smtp_port, "kept", kept)
                await asyncio.to_thread(_smtp, smtp_port, "dropped", dropped)
                mails = await _mails(client)
                gone = mails["dropped"]
                await client.delete(2, gone["thread_id"], gone["message_id"])
                age(blobs, 2 * HOUR)
                before = stored(blobs)

                dry = _report(_gc(data, "--dry-run"))
                assert {gone["ref"], gone["raw"]} <= set(dry["removed_refs"])
                assert mails["kept"]["ref"] not in dry["removed_refs"]
                assert stored(blobs) == before

                # The collection runs while new mail carrying the dropped bytes arrives.
                gc = _gc(data)
                for n in range(3):
                    await asyncio.to_thread(_smtp, smtp_port, f"again {n}", dropped)
                report = await asyncio.to_thread(_report, gc)
                assert mails["kept"]["ref"] not in report["removed_refs"]
                # Whatever the interleaving, every message's blob is there.
                mails = await _mails(client)
                assert set(mails) == {"kept", "again 0", "again 1", "again 2"}
                assert await _blob(client, mails["kept"]["ref"]) == kept
                for n in range(3):
                    assert await _blob(client, mails[f"again {n}"]["ref"]) == dropped

                # The deleted mail's raw original is referenced by nothing: it is gone.
                assert gone["raw"] in report["removed_refs"]
                assert gone["raw"] not in stored(blobs)
                # A second collection finds nothing more to remove.
                assert _report(_gc(data))["removed"] == 0
            finally:
                await client.close()

        run(scenario, timeout=180)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_blobgc_bench_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "blobgc", "--json", "--quick"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    assert results["removed"] == results["blobs"] // 2 > 0
    assert results["gc_s"] > 0 and results["gc_vs_ceiling"] > 0
