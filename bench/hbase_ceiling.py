"""The ceilings beside `bench cluster`'s HBase cell: plain puts, through the gateway and direct.

Both write into a users table of a namespace of their own (the store's table shape:
families l/s/m/x, rows of a salt byte and an 8-byte user id), one 300-byte cell
per put (the size of a SEND's body), each writer on a row of its own, each put
acknowledged before that writer sends its next:

* `thrift_puts`: from one Python process on uvloop, through the same Thrift1
  gateway as the cell, with the store's own client and pool
  (`pyserver.store.hbase_pool`), `connections` writers on as many connections;
  with `swap=True` each put is instead a `checkAndPut` of the row's one cell from
  the value the writer wrote last (what every append of the store is);
* `thrift_puts_processes`: the same plain puts from `processes` such processes at
  once (this module run as a child: `--child`), `connections` writers in all,
  split evenly: as many client processes and connections as the cell's nodes;
* `java_puts`: HBase's own Java client on the installed HBase jars
  (`bench/java/HBasePuts.java`, run by the JDK's source launcher), `threads`
  writers on one connection, straight to the region server.

May import: pyserver.store, pyserver.processes.launcher (the engines' addresses).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from pyserver.store.hbase import HBaseStore, parse_thrift_address

VALUE_BYTES = 300
JAVA_SOURCE = Path(__file__).with_name("java") / "HBasePuts.java"


async def _thrift_puts(
    store: HBaseStore, connections: int, seconds: float, swap: bool, first_writer: int = 0
) -> dict[str, Any]:
    from Hbase_thrift import Mutation

    from pyserver.store.hbase_pool import ThriftPool

    host, port = store.address
    table = store.table("users")
    pool = ThriftPool(host, port, connections, socket_timeout_s=30)
    done = 0
    errors = 0

    last: dict[int, bytes | None] = {}

    async def writer(index: int, until: float, counted: bool) -> None:
        nonlocal done, errors
        user = (8_100_000 if swap else 8_000_000) + first_writer + index
        row = bytes([user % 256]) + user.to_bytes(8, "big")
        seq = 0
        while time.perf_counter() < until:
            value = os.urandom(VALUE_BYTES)
            try:
                async with pool.borrow() as connection:
                    if swap:
                        put = Mutation(column=b"l:last", value=value)
                        swapped = await connection.client.checkAndPut(
                            table, row, b"l:last", last.get(index), put, {}
                        )
                        errors += not swapped
                        last[index] = value
                    else:
                        put = Mutation(column=b"m:p%d" % seq, value=value)
                        await connection.client.mutateRow(table, row, [put], {})
            except Exception:
                errors += 1
            seq += 1
            done += counted

    try:
        warm = time.perf_counter() + 0.3
        await asyncio.gather(*(writer(i, warm, False) for i in range(connections)))
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(writer(i, until, True) for i in range(connections)))
        elapsed = time.perf_counter() - started
    finally:
        pool.close()
    return {"ops_per_s": round(done / elapsed), "errors": errors, "connections": connections}


def thrift_puts(
    store: HBaseStore, connections: int, seconds: float, swap: bool = False, first_writer: int = 0
) -> dict[str, Any]:
    """Plain puts (or compare-and-sets) per second through the gateway of `store`
    (writers on rows of their own, numbered from `first_writer`)."""
    return uvloop.run(_thrift_puts(store, connections, seconds, swap, first_writer))


def thrift_puts_processes(
    store: HBaseStore, processes: int, connections: int, seconds: float
) -> dict[str, Any]:
    """Plain puts per second through the gateway of `store` from `processes` processes at
    once, `connections` writers in all (each process on rows of its own)."""
    host, port = store.address
    start_at = time.time() + 2.0  # every child imported and connected by then
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    children = []
    for index, share in enumerate(shares):
        first = sum(shares[:index])
        args = [f"{host}:{port}", store.namespace, str(share), str(seconds), str(start_at)]
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.hbase_ceiling", "--child", *args, str(first)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    figures = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        if child.returncode != 0:
            raise RuntimeError(f"bench: a put process failed ({child.returncode})")
        figures.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "ops_per_s": sum(f["ops_per_s"] for f in figures),
        "errors": sum(f["errors"] for f in figures),
        "connections": connections,
        "processes": processes,
    }


def _child(thrift: str, namespace: str, connections: str, seconds: str, start_at: str,
           first_writer: str) -> None:  # fmt: skip
    host, port = parse_thrift_address(thrift)
    store = HBaseStore(host, port, namespace=namespace)
    time.sleep(max(0.0, float(start_at) - time.time()))
    figures = thrift_puts(store, int(connections), float(seconds), first_writer=int(first_writer))
    print(json.dumps(figures), flush=True)


def _java() -> str | None:
    """A JDK's java that can run a source file (11 or later), or None."""
    candidates = [os.environ.get("PYSERVER_ENGINES_JAVA", "")]
    candidates += sorted(glob.glob("/usr/lib/jvm/java-17-openjdk-*/bin/java"))
    candidates.append(shutil.which("java") or "")
    for java in filter(None, candidates):
        javac = Path(java).with_name("javac")
        if javac.exists():  # a JDK: its source launcher has the compiler
            return java
    return None


def _hbase_jars() -> Path | None:
    """The HBase jars `scripts/engines` fetched (its cache), or None."""
    cache = os.environ.get("PYSERVER_ENGINES_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyserver-engines"
    )
    complete = sorted(Path(cache).glob("hbase-*/.complete"), key=lambda p: p.stat().st_mtime)
    return complete[-1].parent if complete else None


def java_puts(table: str, threads: int, seconds: float) -> dict[str, Any]:
    """Plain puts per second from HBase's own Java client, or {"skipped": why}."""
    java, jars = _java(), _hbase_jars()
    if java is None:
        return {"skipped": "no JDK (javac) found"}
    if jars is None:
        return {"skipped": "no HBase jars (scripts/engines up hbase fetches them)"}
    zk_port = os.environ.get("PYSERVER_HBASE_ZOOKEEPER_PORT", "2182")
    where = ["127.0.0.1", zk_port, table]
    load = [str(threads), str(seconds), str(VALUE_BYTES)]
    command = [java, "-Xmx256m", "-cp", f"{jars}/*", str(JAVA_SOURCE), *where, *load]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"bench: the Java put client failed ({done.returncode}): {tail}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ops_per_s": figures["ops_per_s"], "threads": threads}


def measure(thrift: str, connections: int, seconds: float, processes: int = 1) -> dict[str, Any]:
    """The ceilings in a namespace of their own, dropped afterwards (`processes`: how many
    client processes share the `connections` in `thrift_processes`)."""
    import uuid

    host, port = parse_thrift_address(thrift)
    store = HBaseStore(host, port, namespace=f"benchraw{uuid.uuid4().hex[:8]}")
    asyncio.run(store.create_tables())
    try:
        raw = thrift_puts(store, connections, seconds)
        spread = thrift_puts_processes(store, processes, connections, seconds)
        swaps = thrift_puts(store, connections, seconds, swap=True)
        # The JVM needs a longer run than a quick figure to say anything.
        direct = java_puts(store.table("users").decode(), connections, max(seconds, 2.0))
    finally:
        asyncio.run(store.drop_tables())
    return {"thrift": raw, "thrift_processes": spread, "thrift_swap": swaps, "java": direct}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:8])
    else:
        print(json.dumps(measure("127.0.0.1:9090", 48, 2.0, processes=3)))
