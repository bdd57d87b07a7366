"""`python -m bench cluster`: a 3-node cell on HBase against one node on SQLite, failover, join.

Side by side in one run, with the same load generator (`bench.loadgen`, its
own processes):

* SEND (durable) and GET_THREAD throughput and p99 on a single `pyserver run`
  node on SQLite, then on a cell of three `pyserver node` processes sharing an
  HBase namespace of their own (one load generator per node, each sending as
  users that node owns, to users that mostly live on another node, so most
  SENDs also relay a copy between nodes);
* `failover_s`: kill -9 of one of the three nodes, until a SEND of a user it
  owned is acknowledged by another (ZooKeeper session timeout `SESSION_S`);
* `join_s`: a fourth node started, until it serves a user the new ring gives it;
* the engine's ceilings right after (`bench.hbase_ceiling`): plain 300-byte puts
  through the Thrift1 gateway from as many Python processes (three) and gateway
  connections (48) as the cell's nodes hold (`hbase_raw_put_ops_per_s`), the same
  from one process on the 48 connections (`hbase_raw_put_one_process_ops_per_s`)
  and as compare-and-sets of one cell (`hbase_raw_cas_ops_per_s`), and straight
  into HBase from its own Java client (`hbase_pe_ops_per_s`), with the ratios
  `hbase_send_vs_raw_put` and `hbase_raw_put_vs_pe`.

ZooKeeper and HBase must be up (`scripts/engines up`; started here if they are
not). Everything shares the machine's cores: HBase's JVMs, the Thrift gateway,
the app servers and the load generators.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.server import _cell, _prefill
from pyserver import endpoints
from pyserver.wire.ops import Op

SESSION_S = 3.0
TOKENS = 64
NODES = ("n1", "n2", "n3")
CONNS, PIPELINE = 48, 4  # in all: split among the nodes' load generators
# Gateway connections of the cell: each node's store pool (HBaseStore's default size).
GATEWAY_CONNECTIONS = len(NODES) * 16


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}


def _loadgens(
    targets: list[tuple[int, list[str]]], op: str, key: str, seconds: float, warmup_s: float = 0.5
) -> dict[str, Any]:
    """One load generator per (port, its own arguments), all at once; figures summed."""
    procs = []
    for port, extra in targets:
        conns = max(1, CONNS // len(targets))
        args = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--key", key,
                "--op", op, "--conns", str(conns), "--pipeline", str(PIPELINE),
                "--seconds", str(seconds), "--warmup", str(warmup_s), *extra]  # fmt: skip
        procs.append(subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, text=True))
    results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    return {
        "ops_per_s": sum(r["ops_per_s"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_codes": dict(sum((Counter(r["error_codes"]) for r in results), Counter())),
    }


class _Cell:
    """Three (then four) `pyserver node` processes on one HBase namespace and a ZooKeeper chroot."""

    def __init__(self, folder: Path, thrift: str, zookeeper: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.folder = folder
        self.namespace = f"bench{tag}"
        self.store = f"hbase:{thrift}/{self.namespace}"
        self.zookeeper = zookeeper
        self.chroot = f"/pyserver-bench-{tag}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addrs: dict[str, str] = {}

    def spawn(self, node_id: str) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{node_id}.log", "ab")  # noqa: SIM115 (the child holds it)
        self._ready_file(node_id).unlink(missing_ok=True)  # a killed node's is left behind
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyserver.cli", "node", "--data", str(self.folder),
             "--cell", "bench", "--node-id", node_id, "--port", "0", "--http-port", "0",
             "--zookeeper", self.zookeeper, "--chroot", self.chroot, "--store", self.store,
             "--session-timeout", str(SESSION_S), "--tokens", str(TOKENS),
             "--drain-settle", "0.2", "--ready-file", str(self._ready_file(node_id))],
            env={**_env(), "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        self.procs[node_id] = proc
        return proc

    def _ready_file(self, node_id: str) -> Path:
        return self.folder / f"{node_id}.ready.json"

    def wait_serving(self, node_id: str, timeout_s: float = 60.0) -> str:
        proc = self.procs[node_id]
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            ready = endpoints.read_file(self._ready_file(node_id))
            if ready is not None:
                self.addrs[node_id] = ready["addr"]
                return self.addrs[node_id]
            time.sleep(0.05)
        raise RuntimeError(f"bench: node {node_id} did not start (see {self.folder})")

    def port(self, node_id: str) -> int:
        return int(self.addrs[node_id].rsplit(":", 1)[1])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _owned(nodes: list[str], count: int, first: int = 1_000_000) -> dict[str, list[int]]:
    """`count` users owned by each node on a ring of `nodes`."""
    from pyserver.ring import HashRing

    ring = HashRing(TOKENS)
    for node in nodes:
        ring.add_node(node)
    owned: dict[str, list[int]] = {node: [] for node in nodes}
    user = first
    while any(len(users) < count for users in owned.values()):
        users = owned[ring.owner(user)]
        if len(users) < count:
            users.append(user)
        user += 2  # senders write to sender + 1: keep them apart
    return owned


async def _prefill_cell(cell: _Cell, key: str, owned: dict[str, list[int]]) -> dict[str, str]:
    """A 30-message thread for one user of each node; {node: "user thread"}."""
    from pyserver.cluster.cellclient import CellClient

    async with await CellClient.open(cell.zookeeper, "bench", key, chroot=cell.chroot) as client:
        threads = {}
        for node, users in owned.items():
            reader = users[0]
            reply: dict[str, Any] = {}
            for n in range(30):
                payload = {"sender": reader + 1, "recipients": [reader], "channel": "chat",
                           "text": f"message number {n} about the quarterly plan"}  # fmt: skip
                reply = await client.request(reader + 1, Op.SEND, payload)
            read = {"user": reader, "thread_id": reply["thread_id"], "limit": 20}
            await client.request(reader, Op.GET_THREAD, read)
            threads[node] = f"{reader} {reply['thread_id']}"
        return threads


async def _failover(cell: _Cell, key: str, victim: str, user: int) -> float:
    """Seconds from kill -9 of `victim` until a SEND of its user `user` is acknowledged."""
    from pyserver.cluster.cellclient import CellClient

    client = await CellClient.open(
        cell.zookeeper, "bench", key, chroot=cell.chroot, request_timeout_s=0.5
    )
    try:
        cell.procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for attempt in range(1000):
            payload = {"sender": user, "recipients": [user + 1], "channel": "chat",
                       "text": "after the kill", "key": f"failover-{attempt}"}  # fmt: skip
            try:
                await client.request(user, Op.SEND, payload, timeout_s=0.5)
                return round(time.monotonic() - killed, 2)
            except Exception:
                await asyncio.sleep(0.05)
        raise RuntimeError("bench: no failover within the attempts")
    finally:
        await client.close()


async def _join(cell: _Cell, key: str, node_id: str) -> tuple[float, float]:
    """(seconds from process start until it serves a user of its own, its share of users)."""
    from pyserver.client import Client
    from pyserver.errors import PyserverError

    nodes = [n for n, p in cell.procs.items() if p.poll() is None] + [node_id]
    owned = _owned(sorted(nodes), 1)[node_id][0]
    started = time.monotonic()
    cell.spawn(node_id)
    addr = await asyncio.to_thread(cell.wait_serving, node_id)
    host, _, port = addr.rpartition(":")
    async with await Client.connect(host, int(port), service_key=key) as client:
        while True:
            try:
                await client.counts(owned)
                break
            except PyserverError:
                await asyncio.sleep(0.02)
    elapsed = round(time.monotonic() - started, 2)
    from pyserver.ring import HashRing

    ring = HashRing(TOKENS)
    for node in nodes:
        ring.add_node(node)
    return elapsed, round(ring.shares()[node_id], 3)


def _hbase_cell(seconds: float, key: str, folder: Path) -> dict[str, Any]:
    from pyserver.processes.launcher import (
        HBASE_GATEWAYS,
        ZOOKEEPER,
        _create_tables,
        _drop_tables,
    )

    cell = _Cell(folder, HBASE_GATEWAYS, ZOOKEEPER)
    asyncio.run(_create_tables([cell.namespace]))
    try:
        for node in NODES:
            cell.spawn(node)
        for node in NODES:
            cell.wait_serving(node)
        owned = _owned(list(NODES), CONNS // len(NODES))
        threads = asyncio.run(_prefill_cell(cell, key, owned))
        senders = [(cell.port(n), ["--senders", ",".join(map(str, owned[n]))]) for n in NODES]
        # Each of the 96 users' first write loads its image from HBase (snapshot, log,
        # friends): the figure is the steady state after those.
        send = _loadgens(senders, "send", key, seconds, warmup_s=min(2 * seconds, 4.0))
        readers = []
        for node in NODES:
            user, thread = threads[node].split()
            readers.append((cell.port(node), ["--user", user, "--thread", thread]))
        get_thread = _loadgens(readers, "get_thread", key, seconds)
        failover_s = asyncio.run(_failover(cell, key, "n3", owned["n3"][1]))
        join_s, share = asyncio.run(_join(cell, key, "n4"))
    finally:
        cell.close()
        asyncio.run(_drop_tables([cell.namespace]))
        from pyserver.processes.launcher import _remove_tree

        asyncio.run(_remove_tree(ZOOKEEPER, cell.chroot))
    return {"send": send, "get_thread": get_thread, "failover_s": failover_s,
            "join_s": join_s, "join_share": share}  # fmt: skip


def run(quick: bool = False) -> dict[str, Any]:
    from pyserver.processes.launcher import _ensure_engines

    seconds = 0.5 if quick else 5.0
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    _ensure_engines("hbase", lambda line: print(f"bench cluster: {line}", file=sys.stderr))
    print("bench cluster: one node on SQLite", file=sys.stderr)
    with _cell(pure=False) as (port, key):
        thread, _ = asyncio.run(_prefill(port, key))
        sqlite_send = _loadgens([(port, [])], "send", key, seconds)
        sqlite_get = _loadgens(
            [(port, ["--user", "2", "--thread", thread])], "get_thread", key, seconds
        )
    print(f"  send {sqlite_send}  get_thread {sqlite_get}", file=sys.stderr)
    print("bench cluster: three nodes on HBase", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-hbase-cell-") as folder:
        from pyserver.servicekey import load_or_create_service_key

        key = load_or_create_service_key(Path(folder))
        hbase = _hbase_cell(seconds, key, Path(folder))
    print(f"  {hbase}", file=sys.stderr)
    print(
        "bench cluster: plain puts through the gateway and from HBase's Java client",
        file=sys.stderr,
    )
    from bench.hbase_ceiling import measure
    from pyserver.processes.launcher import THRIFT

    ceiling = measure(THRIFT, GATEWAY_CONNECTIONS, max(seconds, 1.0), processes=len(NODES))
    print(f"  {ceiling}", file=sys.stderr)
    raw_puts = ceiling["thrift_processes"]["ops_per_s"]
    java_puts = ceiling["java"].get("ops_per_s")
    return {
        "sqlite_send_ops_per_s": sqlite_send["ops_per_s"],
        "sqlite_send_p99_ms": sqlite_send["p99_ms"],
        "sqlite_get_thread_ops_per_s": sqlite_get["ops_per_s"],
        "sqlite_get_thread_p99_ms": sqlite_get["p99_ms"],
        "hbase_send_ops_per_s": hbase["send"]["ops_per_s"],
        "hbase_send_p99_ms": hbase["send"]["p99_ms"],
        "hbase_get_thread_ops_per_s": hbase["get_thread"]["ops_per_s"],
        "hbase_get_thread_p99_ms": hbase["get_thread"]["p99_ms"],
        "errors": sqlite_send["errors"]
        + sqlite_get["errors"]
        + hbase["send"]["errors"]
        + hbase["get_thread"]["errors"]
        + ceiling["thrift"]["errors"]
        + ceiling["thrift_processes"]["errors"]
        + ceiling["thrift_swap"]["errors"],
        "hbase_raw_put_ops_per_s": raw_puts,
        "hbase_raw_put_one_process_ops_per_s": ceiling["thrift"]["ops_per_s"],
        "hbase_raw_cas_ops_per_s": ceiling["thrift_swap"]["ops_per_s"],
        "hbase_pe_ops_per_s": java_puts,
        "hbase_pe_skipped": ceiling["java"].get("skipped"),
        "hbase_send_vs_raw_put": round(hbase["send"]["ops_per_s"] / raw_puts, 3),
        "hbase_raw_put_vs_pe": round(raw_puts / java_puts, 3) if java_puts else None,
        "failover_s": hbase["failover_s"],
        "session_timeout_s": SESSION_S,
        "join_s": hbase["join_s"],
        "join_share": hbase["join_share"],
        "load": f"{CONNS} connections x {PIPELINE} in flight, {seconds:g} s per figure; puts:"
        f" {GATEWAY_CONNECTIONS} writers ({len(NODES)} processes; one process)",
    }
