"""`python -m bench userindex`: relation queries per second, users with 1,000 friends each.

The social graph is a ring of N users, each the friend of the 500 on either side,
so a random (recipient, sender) pair is a friend, a friend of a friend or a
stranger about a third of the time each, and a friend-of-friend answer intersects
two 1,000-friend sets. Measured in one run:

* `relation_service_per_s`: through the wire, `pyserver userindex` in its own
  process and `RemoteUserIndex` calls from this one, `CONCURRENCY` in flight,
  every friend list in the service's cache (the steady state for hot users);
* `relation_local_hot_per_s`: `LocalUserIndex.relation` in-process, cached;
* `relation_local_cold_per_s`: the same with a one-user cache, so every query
  reads both friend lists (1,000 rows each) from the SQLite store.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.listeners import free_port

FRIENDS = 1_000
CONCURRENCY = 64
KEY = "bench-service-key-userindex-0123456789"


async def _make_store(path: Path, users: int, friends: int) -> None:
    """The store's schema, then the ring graph written in bulk (not through add_friend)."""
    from pyserver.store.sqlite import SQLiteStore

    store = SQLiteStore(path)
    await store.open()
    await store.close()
    half = friends // 2
    offsets = [*range(1, half + 1), *range(users - half, users)]
    with sqlite3.connect(path) as db:
        # a bulk load into a scratch file: no journal, a big page cache, the join in SQLite
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        db.execute("CREATE TEMP TABLE ids (id INTEGER PRIMARY KEY, key BLOB)")
        db.execute("CREATE TEMP TABLE offsets (d INTEGER)")
        db.executemany(
            "INSERT INTO ids VALUES (?, ?)",
            [(user, user.to_bytes(8, "big")) for user in range(1, users + 1)],
        )
        db.executemany("INSERT INTO offsets VALUES (?)", [(d,) for d in offsets])
        db.execute(
            "INSERT INTO social (user, friend) "
            "SELECT a.key, b.key FROM ids a, offsets o "
            "JOIN ids b ON b.id = (a.id - 1 + o.d) % ? + 1 ORDER BY a.key, b.key",
            (users,),
        )


def _pairs(users: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(5)
    pairs = []
    while len(pairs) < count:
        recipient, sender = rng.randint(1, users), rng.randint(1, users)
        if recipient != sender:
            pairs.append((recipient, sender))
    return pairs


async def _local(path: Path, pairs: list[tuple[int, int]], cache_users: int) -> dict[str, Any]:
    from pyserver.store.sqlite import SQLiteStore
    from pyserver.userindex.local import LocalUserIndex

    store = SQLiteStore(path)
    await store.open()
    try:
        index = LocalUserIndex(store, cache_users)
        if cache_users > 1:
            for recipient, sender in pairs:  # warm: every list cached
                await index.relation(recipient, sender)
        started = time.perf_counter()
        answers = [await index.relation(r, s) for r, s in pairs]
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    return {"per_s": round(len(pairs) / seconds), "answers": answers}


async def _remote(port: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    from pyserver.userindex.remote import RemoteUserIndex

    index = RemoteUserIndex("127.0.0.1", port, KEY, relation_timeout_s=30)
    try:
        queue = list(pairs)

        async def worker(out: list[str]) -> None:
            while queue:
                recipient, sender = queue.pop()
                out.append(await index.relation(recipient, sender))

        warm: list[str] = []
        queue = list(pairs)
        await asyncio.gather(*(worker(warm) for _ in range(CONCURRENCY)))  # fills the cache
        answers: list[str] = []
        queue = list(pairs)
        started = time.perf_counter()
        await asyncio.gather(*(worker(answers) for _ in range(CONCURRENCY)))
        seconds = time.perf_counter() - started
    finally:
        await index.close()
    return {"per_s": round(len(pairs) / seconds), "answers": answers}


def _service(data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYSERVER_SERVICE_KEY": KEY, "PYSERVER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", "userindex", "--data", str(data),
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("bench: pyserver userindex did not start") from None
            time.sleep(0.05)


def run(quick: bool = False) -> dict[str, Any]:
    from pyserver.app.loop import new_event_loop

    # quick: a smoke run of the same code on a small graph
    users, friends = (300, 100) if quick else (3_000, FRIENDS)
    queries = 2_000 if quick else 20_000
    pairs = _pairs(users, queries)
    with tempfile.TemporaryDirectory(prefix="bench-userindex-") as folder:
        data = Path(folder)
        path = data / "store.sqlite3"
        loop = new_event_loop()
        try:
            started = time.perf_counter()
            loop.run_until_complete(_make_store(path, users, friends))
            build_s = time.perf_counter() - started
            hot = loop.run_until_complete(_local(path, pairs, users))
            cold = loop.run_until_complete(_local(path, pairs[: queries // 10], 1))
            port = free_port()
            proc = _service(data, port)
            try:
                remote = loop.run_until_complete(_remote(port, pairs))
            finally:
                proc.terminate()
                proc.wait(10)
        finally:
            loop.close()
    kinds = {kind: hot["answers"].count(kind) for kind in set(hot["answers"])}
    if sorted(remote["answers"]) != sorted(hot["answers"]):
        raise RuntimeError("bench: the service and the local index disagree")
    return {
        "relation_service_per_s": remote["per_s"],
        "relation_local_hot_per_s": hot["per_s"],
        "relation_local_cold_per_s": cold["per_s"],
        "setup": {
            "users": users,
            "friends_each": friends,
            "queries": queries,
            "concurrency": CONCURRENCY,
            "answers": kinds,
            "graph_build_s": round(build_s, 1),
        },
    }
