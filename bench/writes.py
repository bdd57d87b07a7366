"""`python -m bench writes [--json] [--quick]`: the durable write path, without the network.

Two parts, in one run:

* **The mailbox in one process.** 64 senders SEND to a friend each through
  `Mailbox.execute` on the embedded store (`synchronous=FULL`), as `bench server`'s
  SEND 64x1 does over TCP: SENDs per second, writes per commit of the data file, and
  how busy the store's writer threads and the event loop were (CPU seconds per second).
* **Embedded engines under the same group commit.** 128 writers append one log record
  and one message body per write, with the compare-and-set on the user's last seq, to
  a writer thread that commits every write queued at that moment with one durable
  commit: SQLite through `SQLiteStore` itself, LMDB (`lmdb`, `sync=True`) and RocksDB
  (`rocksdict`, a `WriteBatch` written with `sync=True`). Appends per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SENDERS = 64
WRITERS = 128
BODY = b'{"text": "message number 12 about the quarterly plan", "from": null, "extra": {}}'


# ---- the mailbox in one process ----


def _thread_cpu(prefix: str) -> float:
    """CPU seconds used so far by this process's threads whose name starts with `prefix`."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
    return total


async def _mailbox_sends(folder: Path, seconds: float) -> dict[str, Any]:
    from pyserver.app.mailbox import Mailbox
    from pyserver.store.sqlite import SQLiteStore
    from pyserver.wire.ops import Op

    store = SQLiteStore(folder / "writes.sqlite", synchronous="FULL")
    await store.open()
    mailbox = Mailbox(store)
    sends = 0
    deadline = time.perf_counter() + seconds

    async def sender(user: int) -> None:
        nonlocal sends
        await mailbox.execute(Op.FRIEND_ADD, {"user": user, "friend": user + 1})
        n = 0
        while time.perf_counter() < deadline:
            text = f"message number {n} about the quarterly plan"
            payload = {"sender": user, "recipients": [user + 1], "text": text, "channel": "chat"}
            await mailbox.execute(Op.SEND, payload)
            n += 1
            sends += 1

    try:
        commits, writes = store.commits, store.writes
        loop_cpu, store_cpu = time.thread_time(), _thread_cpu("sqlite-")
        started = time.perf_counter()
        await asyncio.gather(*(sender(1_000_000 + 2 * k) for k in range(SENDERS)))
        elapsed = time.perf_counter() - started
        loop_cpu, store_cpu = time.thread_time() - loop_cpu, _thread_cpu("sqlite-") - store_cpu
        return {
            "sends_per_s": round(sends / elapsed),
            "writes_per_commit": round(
                (store.writes - writes) / max(store.commits - commits, 1), 1
            ),
            "event_loop_cpu_share": round(loop_cpu / elapsed, 2),
            "store_threads_cpu_share": round(store_cpu / elapsed, 2),
        }
    finally:
        await mailbox.close()
        await store.close()


# ---- embedded engines under one group-commit harness ----


class _Engine:
    """One engine's durable batch: CAS-checked appends of (record, body), one commit."""

    name = "?"

    def commit(self, batch: list[tuple[int, int, bytes, str]]) -> list[bool]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _key(user: int, tag: bytes, rest: bytes = b"") -> bytes:
    return user.to_bytes(8, "big") + tag + rest


class _LMDB(_Engine):
    name = "lmdb"

    def __init__(self, folder: Path) -> None:
        import lmdb

        self._env = lmdb.open(str(folder / "lmdb"), map_size=8 << 30, sync=True, metasync=True)

    def commit(self, batch: list[tuple[int, int, bytes, str]]) -> list[bool]:
        outcomes = []
        with self._env.begin(write=True) as txn:
            for user, expected, record, message_id in batch:
                head = txn.get(_key(user, b"h"))
                if (int.from_bytes(head, "big") if head else 0) != expected:
                    outcomes.append(False)
                    continue
                seq = (expected + 1).to_bytes(8, "big")
                txn.put(_key(user, b"l", seq), record)
                txn.put(_key(user, b"m", message_id.encode()), BODY)
                txn.put(_key(user, b"h"), seq)
                outcomes.append(True)
        return outcomes  # the `with` committed, fsync included

    def close(self) -> None:
        self._env.close()


class _RocksDB(_Engine):
    name = "rocksdb"

    def __init__(self, folder: Path) -> None:
        from rocksdict import Options, Rdict, WriteBatch, WriteOptions

        self._db = Rdict(str(folder / "rocksdb"), Options(raw_mode=True))
        self._batch = WriteBatch
        self._sync = WriteOptions()
        self._sync.sync = True

    def commit(self, batch: list[tuple[int, int, bytes, str]]) -> list[bool]:
        outcomes = []
        heads: dict[int, int] = {}  # this batch's own appends, ahead of what is stored
        writes = self._batch(raw_mode=True)
        for user, expected, record, message_id in batch:
            if user not in heads:
                head = self._db.get(_key(user, b"h"))
                heads[user] = int.from_bytes(head, "big") if head else 0
            if heads[user] != expected:
                outcomes.append(False)
                continue
            seq = (expected + 1).to_bytes(8, "big")
            writes.put(_key(user, b"l", seq), record)
            writes.put(_key(user, b"m", message_id.encode()), BODY)
            writes.put(_key(user, b"h"), seq)
            heads[user] = expected + 1
            outcomes.append(True)
        self._db.write(writes, self._sync)
        return outcomes

    def close(self) -> None:
        self._db.close()


class _GroupCommit:
    """A writer thread that commits every write queued at that moment in one batch."""

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="engine-writer", daemon=True)
        self._thread.start()

    async def append(self, user: int, expected: int, record: bytes, message_id: str) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put(((user, expected, record, message_id), loop, future))
        return await future

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            outcomes = self._engine.commit([write for write, _, _ in batch])
            self.batches += 1
            for (_, loop, future), ok in zip(batch, outcomes, strict=True):
                loop.call_soon_threadsafe(future.set_result, ok)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


async def _drive(append: Callable[..., Any], seconds: float) -> float:
    """Appends per second from WRITERS writers, each on users of its own."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer(user: int) -> None:
        nonlocal done
        seq = 0
        while time.perf_counter() < deadline:
            ok = await append(user, seq, os.urandom(160), f"m{user}-{seq}")
            if ok is False:
                raise RuntimeError(f"user {user}: lost a compare-and-set it should have won")
            seq += 1
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(user) for user in range(1, WRITERS + 1)))
    return done / (time.perf_counter() - started)


async def _sqlite_appends(folder: Path, seconds: float) -> float:
    from pyserver.store.base import LogAppend
    from pyserver.store.sqlite import SQLiteStore

    store = SQLiteStore(folder / "engines.sqlite", synchronous="FULL")
    await store.open()

    async def append(user: int, expected: int, record: bytes, message_id: str) -> None:
        await store.append(LogAppend(user, expected, [record], messages={message_id: BODY}))

    try:
        return await _drive(append, seconds)
    finally:
        await store.close()


async def _engine_appends(engine: _Engine, seconds: float) -> float:
    writer = _GroupCommit(engine)
    try:
        return await _drive(writer.append, seconds)
    finally:
        writer.stop()
        engine.close()


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 1.0 if quick else 4.0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as folder:
        root = Path(folder)
        results["mailbox"] = asyncio.run(_mailbox_sends(root, seconds))
        engines = {"sqlite": asyncio.run(_sqlite_appends(root, seconds))}
        for engine in (_LMDB(root), _RocksDB(root)):
            engines[engine.name] = asyncio.run(_engine_appends(engine, seconds))
    results["engine_appends_per_s"] = {name: round(rate) for name, rate in engines.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.writes", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="1 s per figure instead of 4")
    args = parser.parse_args()
    results = run(args.quick)
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
