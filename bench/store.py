"""`python -m bench.store [--json] [--quick] [--thrift HOST:PORT]`: durable appends per second.

Each store engine (the embedded SQLite store with `synchronous=FULL`, and HBase
through its Thrift gateway when one answers) takes appends shaped like the
mailbox's (one log record, one message body, a few search terms) from 1 and
from 64 concurrent writers, each writer on users of its own, for a fixed time.
Figures: appends acknowledged per second and the p99 latency of one append.
HBase runs in a namespace of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pyserver.store.base import LogAppend, Store

WRITER_COUNTS = (1, 64)


def _append(user_id: int, seq: int) -> LogAppend:
    message_id = f"m{user_id}-{seq}"
    return LogAppend(
        user_id,
        seq,
        [os.urandom(120)],
        messages={message_id: b'{"text": "' + b"lorem ipsum " * 40 + b'"}'},
        terms=[(word, message_id) for word in ("lunch", "friday", "ipsum")],
    )


async def _measure(store: Store, writers: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer(index: int) -> None:
        user_id = 1_000_000 * writers + index  # users of its own, fresh for this run
        seq = await store.last_seq(user_id)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await store.append(_append(user_id, seq))
            latencies.append(time.perf_counter() - started)
            seq += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(writers)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "appends_per_s": round(len(latencies) / elapsed, 1),
        "p99_ms": round(p99 * 1000, 2),
        "appends": len(latencies),
    }


async def _engine(store: Store, seconds: float) -> dict[str, Any]:
    await store.open()
    try:
        return {f"writers_{n}": await _measure(store, n, seconds) for n in WRITER_COUNTS}
    finally:
        await store.close()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run(quick: bool = False, thrift: tuple[str, int] = ("127.0.0.1", 9090)) -> dict[str, Any]:
    """{engine: {writers_N: {appends_per_s, p99_ms, appends}}}; HBase if its gateway answers."""
    from pyserver.store.hbase import HBaseStore
    from pyserver.store.sqlite import SQLiteStore

    seconds = 1.0 if quick else 5.0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SQLiteStore(Path(folder) / "bench.db")
        results["sqlite"] = asyncio.run(_engine(sqlite, seconds))
    if _answers(*thrift):
        namespace = f"bench{uuid.uuid4().hex[:8]}"
        hbase = HBaseStore(*thrift, namespace=namespace, pool_size=32)
        try:
            results["hbase"] = asyncio.run(_engine(hbase, seconds))
        finally:
            asyncio.run(hbase.drop_tables())
    else:
        results["hbase"] = {"skipped": f"no Thrift gateway on {thrift[0]}:{thrift[1]}"}
    return results


def main() -> None:
    from pyserver.store.hbase import parse_thrift_address

    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="1 s per figure instead of 5")
    parser.add_argument("--thrift", default="127.0.0.1:9090", help="HBase's Thrift1 gateway")
    args = parser.parse_args()
    results = run(quick=args.quick, thrift=parse_thrift_address(args.thrift))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for engine, figures in results.items():
        for writers, figure in figures.items():
            print(f"{engine:<8}{writers:<12}{figure}")


if __name__ == "__main__":
    main()
