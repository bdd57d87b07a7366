"""Appends to a store forever and prints every acknowledged append; tests kill it with SIGKILL.

Usage: python tests/store_crash_writer.py ENGINE LOCATION
(LOCATION: an SQLite file, or host:port[+port2]/namespace of HBase's Thrift gateways)

Several concurrent tasks per user run compare-and-set loops. Right after an
append returns, its task prints one line "user first_seq last_seq" and flushes,
so whatever the test reads from stdout was acknowledged as durable. Record
`seq` of user `u` is always b"u:seq", with a message "m<seq>" beside it, so the
test can check that each acknowledged append is stored exactly once.
"""

from __future__ import annotations

import asyncio
import sys

from pyserver.store.base import LogAppend, Store, WriteConflict

USERS = (0, 7, 2**63, 2**64 - 1)
TASKS_PER_USER = 4


def record(user_id: int, seq: int) -> bytes:
    return f"{user_id}:{seq}".encode()


def build_store(engine: str, location: str) -> Store:
    if engine == "sqlite":
        from pyserver.store.sqlite import SQLiteStore

        return SQLiteStore(location)
    if engine == "hbase":  # LOCATION is host:port[+port2]/namespace, as a store setting has it
        from pathlib import Path

        from pyserver.store.spec import open_store, parse_store_spec

        return open_store(parse_store_spec(f"hbase:{location}", Path(".")))
    raise SystemExit(f"unknown engine {engine!r}")


async def append_forever(store: Store, user_id: int, task: int) -> None:
    seq = await store.last_seq(user_id)
    count = 1 + task % 3
    while True:
        seqs = range(seq + 1, seq + count + 1)
        write = LogAppend(
            user_id,
            seq,
            [record(user_id, s) for s in seqs],
            messages={f"m{s}": record(user_id, s) for s in seqs},
        )
        try:
            await store.append(write)
        except WriteConflict as conflict:
            seq = conflict.actual_seq
            continue
        sys.stdout.write(f"{user_id} {seqs[0]} {seqs[-1]}\n")
        sys.stdout.flush()
        seq = write.last_seq


async def main(engine: str, location: str) -> None:
    store = build_store(engine, location)
    await store.open()
    await asyncio.gather(
        *(append_forever(store, user, task) for user in USERS for task in range(TASKS_PER_USER))
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
