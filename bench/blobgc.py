"""`python -m bench blobgc`: blob garbage collection of a cell against the work it cannot skip.

A cell's store on SQLite with U users, each sent M messages carrying an attachment of
its own (1 KiB blobs, `DiskBlobStore`), then half of those messages deleted, so half
the blobs are garbage. Measured in one run, in this order:

* `ceiling_s`: what any collection must do, timed bare: list and stat every blob file,
  and read every user's image (snapshot and log) for its references;
* `gc_s`: `pyserver admin blob-gc`'s work (`collect_cell_blobs`, grace 0) on the same
  folder: the same listing and reading, then each garbage blob renamed aside, its time
  checked again and removed;
* `gc_vs_ceiling` = ceiling_s / gc_s (1.0: the collection costs nothing beyond the
  unavoidable), and `blobs_per_s` (stored blobs examined per second of gc_s).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

USERS, MESSAGES = 500, 10
QUICK_USERS, QUICK_MESSAGES = 50, 4


async def _fill(data: Path, users: int, messages: int) -> int:
    """The cell's store and blobs; returns how many blobs are garbage."""
    from pyserver.app.mailbox import Mailbox
    from pyserver.blobs import BLOB_FOLDER
    from pyserver.blobs.disk import DiskBlobStore
    from pyserver.processes.cell import store_path
    from pyserver.store.sqlite import SQLiteStore
    from pyserver.userindex.local import LocalUserIndex
    from pyserver.wire.ops import Op

    store = SQLiteStore(store_path(data), synchronous="OFF")
    await store.open()
    blobs = DiskBlobStore(data / BLOB_FOLDER, durable=False)
    await blobs.open()
    mailbox = Mailbox(store, LocalUserIndex(store))
    garbage = 0
    try:
        for user in range(1, users + 1):
            sent = []
            for n in range(messages):
                info = await blobs.put(os.urandom(1024))
                attachment = {"ref": info.ref, "name": f"{n}.bin", "type": "", "size": info.size}
                reply = await mailbox.execute(
                    Op.SEND,
                    {"sender": 1_000_000 + user, "recipients": [user], "text": f"m{n}",
                     "channel": "chat", "attachments": [attachment], "key": f"{user}-{n}"},
                )  # fmt: skip
                sent.append(reply)
            for reply in sent[::2]:  # delete half: from the recipient and the sender
                for owner in (user, 1_000_000 + user):
                    await mailbox.execute(
                        Op.DELETE,
                        {"user": owner, "thread_id": reply["thread_id"],
                         "message_id": reply["message_id"]},
                    )  # fmt: skip
                garbage += 1
    finally:
        await mailbox.close()
        await blobs.close()
        await store.close()
    return garbage


async def _ceiling(data: Path) -> tuple[float, int]:
    """Listing and stat of every blob file, and every user's references read."""
    from pyserver.app.mailbox import Mailbox
    from pyserver.blobs import BLOB_FOLDER
    from pyserver.processes.cell import open_store
    from pyserver.userindex.local import LocalUserIndex

    started = time.perf_counter()
    files = 0
    for folder in os.scandir(data / BLOB_FOLDER):
        if len(folder.name) == 2 and folder.is_dir():
            for entry in os.scandir(folder.path):
                entry.stat()
                files += 1
    async with open_store(data) as store:
        mailbox = Mailbox(store, LocalUserIndex(store))
        try:
            for user in await store.user_ids():
                await mailbox.blob_refs(user)
        finally:
            await mailbox.close()
    return time.perf_counter() - started, files


async def _measure(users: int, messages: int) -> dict[str, Any]:
    from pyserver.processes.blob_gc import collect_cell_blobs

    with tempfile.TemporaryDirectory(prefix="bench-blobgc-") as folder:
        data = Path(folder)
        garbage = await _fill(data, users, messages)
        ceiling_s, files = await _ceiling(data)
        started = time.perf_counter()
        report = await collect_cell_blobs(data, grace_s=0.0)
        gc_s = time.perf_counter() - started
    assert report.removed == garbage, (report.removed, garbage)
    return {
        "users": users,
        "blobs": report.blobs,
        "removed": report.removed,
        "ceiling_s": round(ceiling_s, 3),
        "gc_s": round(gc_s, 3),
        "gc_vs_ceiling": round(ceiling_s / gc_s, 3),
        "blobs_per_s": round(report.blobs / gc_s),
        "blob_files_listed": files,
    }


def run(quick: bool = False) -> dict[str, Any]:
    users, messages = (QUICK_USERS, QUICK_MESSAGES) if quick else (USERS, MESSAGES)
    return asyncio.run(_measure(users, messages))
