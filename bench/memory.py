"""Resident bytes per cached user: `python -m bench.memory --users N` prints one JSON object.

A real mailbox on a real (temporary) SQLite store writes one user's image the way the
server would: 10 threads of 20 messages each, from ten friends. The image's snapshot
is then loaded once per cached user (as a cache miss does) into the native LRU snapshot
cache, and the process's resident set is read before and after. Run in its own process
by `bench server`, so nothing else of the benchmark is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

THREADS = 10
MESSAGES_PER_THREAD = 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _one_image_snapshot(folder: Path) -> bytes:
    from pyserver.app.mailbox import Mailbox
    from pyserver.store.sqlite import SQLiteStore
    from pyserver.wire.ops import Op

    store = SQLiteStore(folder / "memory.sqlite", synchronous="OFF")
    await store.open()
    mailbox = Mailbox(store)
    try:
        for n in range(MESSAGES_PER_THREAD):
            for friend in range(2, 2 + THREADS):
                text = f"message {n} from {friend}: about the plan for the quarter, see you then"
                await mailbox.execute(
                    Op.SEND, {"sender": friend, "recipients": [1], "text": text, "channel": "chat"}
                )
        await mailbox.close()  # snapshots the image the server held
        stored = await store.read_snapshot(1)
        assert stored is not None
        return stored[1]
    finally:
        await mailbox.close()
        await store.close()


def measure(users: int) -> dict[str, Any]:
    from pyserver.app.image import UserImage
    from pyserver.snapcache import IMPLEMENTATION, SnapshotCache

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        snapshot = asyncio.run(_one_image_snapshot(Path(folder)))
    cache = SnapshotCache(users, 1 << 62)
    gc.collect()
    before = _resident_bytes()
    for user in range(1, users + 1):
        image = UserImage.from_snapshot(snapshot)
        cache.put(user, image, image.weight)
    gc.collect()
    after = _resident_bytes()
    assert len(cache) == users
    return {
        "users": users,
        "threads_per_user": THREADS,
        "messages_per_thread": MESSAGES_PER_THREAD,
        "snapshot_bytes": len(snapshot),
        "bytes_per_cached_user": round((after - before) / users),
        "cache": IMPLEMENTATION,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.users)))
    return 0


def cached_user_memory(users: int) -> dict[str, Any]:
    """`measure` in a process of its own."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--users", str(users)],
        capture_output=True, text=True, check=True, timeout=1200,
    )  # fmt: skip
    return json.loads(out.stdout)


if __name__ == "__main__":
    sys.exit(main())
