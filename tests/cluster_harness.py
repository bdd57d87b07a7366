"""What the multi-process cluster tests share: app servers as `pyserver node` processes,
a load of SENDs routed by the cell's ring, and the check of every user's log.

`Cluster` starts nodes of one or more cells on ZooKeeper under a chroot of its
own (removed afterwards), sharing one SQLite store and one service key in a
temporary folder; whatever it started is killed when it closes. `SendLoad`
keeps SENDs with idempotency keys flowing through a `CellClient` (each retried,
with its key, until it is acknowledged or its deadline passes) and records
every acknowledged message. `check_logs` then reads every user's log from the
store: each acknowledged message must be in its sender's log and in each
recipient's log exactly once, no message twice anywhere, no gap in any log.
`zk_session` opens a ZooKeeper session on a test's chroot and `eventually` polls
a condition (a function, plain or async) until it holds, as the cluster tests do.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiozk

from pyserver import endpoints, logcodec
from pyserver.cluster.cellclient import CellClient
from pyserver.cluster.zk import ZooKeeper
from pyserver.errors import PyserverError
from pyserver.servicekey import load_or_create_service_key
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.wire.ops import Op

REPO = Path(__file__).resolve().parent.parent
SESSION_TIMEOUT_S = 3.0


class NodeProcess:
    """One `pyserver node` process; its stdout lines are collected by a thread, its address
    read from its ready file."""

    def __init__(self, args: list[str], node_id: str, log_path: Path) -> None:
        self.node_id = node_id
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in wait/kill)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started_at = time.monotonic()
        self.ready_file = log_path.with_suffix(".ready.json")
        self.ready_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyserver.cli",
                "node",
                *args,
                "--ready-file",
                str(self.ready_file),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env=env,
        )
        self.output: list[str] = []
        self.addr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)

    def wait_serving(self, timeout_s: float = 30.0) -> str:
        """The node's address once its ready file says it serves; AssertionError with its log
        otherwise."""
        deadline = time.monotonic() + timeout_s
        while (ready := endpoints.read_file(self.ready_file)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"{self.node_id} did not serve in {timeout_s} s\n{self.tail()}"
                ) from None
            time.sleep(0.05)
        self.addr = ready["addr"]
        return self.addr

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return "\n".join(text.splitlines()[-lines:] + self.output[-10:])

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (kill -9), and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._log.close()
        return code


class Cluster:
    """Nodes of cells on one ZooKeeper chroot, sharing a store and a service key."""

    def __init__(
        self,
        tmp_path: Path,
        zookeeper: str,
        session_timeout_s: float = SESSION_TIMEOUT_S,
        hbase: tuple[str, int] | None = None,
        hbase_commit_port: int | None = None,
    ) -> None:
        self.zookeeper = zookeeper
        tag = uuid.uuid4().hex[:12]
        self.chroot = f"/pyserver-test-{tag}"
        self.data = tmp_path / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_service_key(self.data)
        # the nodes' store: one SQLite file, or a namespace of its own in HBase (appends
        # through the Thrift2 gateway when its port is given)
        commits = "" if hbase_commit_port is None else f"+{hbase_commit_port}"
        self.store = (
            f"hbase:{hbase[0]}:{hbase[1]}{commits}/t{tag}"
            if hbase
            else f"sqlite:{self.data / 'store.sqlite3'}"
        )
        self.session_timeout_s = session_timeout_s
        self.nodes: dict[str, NodeProcess] = {}
        if hbase:
            # as a deployment does (pyserver admin create-tables) before its nodes start
            asyncio.run(_create_tables(self.open_store()))
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)

    def spawn(self, node_id: str, cell: str = "c1", *extra: str) -> NodeProcess:
        args = [
            "--data", str(self.data), "--cell", cell, "--node-id", node_id,
            "--port", "0", "--http-port", "0", "--zookeeper", self.zookeeper,
            "--chroot", self.chroot, "--session-timeout", str(self.session_timeout_s),
            "--store", self.store, "--drain-settle", "0.5", *extra,
        ]  # fmt: skip
        node = NodeProcess(args, node_id, self.logs / f"{node_id}.log")
        self.nodes[node_id] = node
        return node

    def start(self, *node_ids: str, cell: str = "c1") -> list[NodeProcess]:
        """Spawn the nodes together, then wait for each to serve."""
        spawned = [self.spawn(node_id, cell) for node_id in node_ids]
        for node in spawned:
            node.wait_serving()
        return spawned

    def client(self, cell: str = "c1", **options: Any) -> Any:
        """A CellClient of `cell` (an awaitable: `async with await cluster.client()`)."""
        return CellClient.open(self.zookeeper, cell, self.key, chroot=self.chroot, **options)

    def open_store(self) -> Any:
        """The nodes' store, not yet opened (for the test's own reads)."""
        return open_store(parse_store_spec(self.store, self.data))

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        asyncio.run(remove_tree(self.zookeeper, self.chroot))
        if self.store.startswith("hbase:"):
            asyncio.run(_drop_tables(self.open_store()))


async def _create_tables(store: Any) -> None:
    await store.open()
    await store.close()


async def _drop_tables(store: Any) -> None:
    try:
        await store.open()
        await store.drop_tables()
        await store.close()
    except Exception:  # cleanup only
        pass


async def zk_session(zookeeper: str, chroot: str, session_timeout_s: float = 5.0) -> ZooKeeper:
    """A started ZooKeeper session on the test's chroot (close it when done)."""
    zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=session_timeout_s)
    await zk.start(10.0)
    return zk


async def eventually(check: Any, timeout_s: float, what: str, pause_s: float = 0.05) -> None:
    """Poll `check()` (plain or async) until it is true; AssertionError naming `what` after
    `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(pause_s)


async def remove_tree(servers: str, path: str) -> None:
    client = aiozk.ZKClient(servers, session_timeout=5)
    try:
        await asyncio.wait_for(client.start(), 5)
        if await client.exists(path):
            await client.deleteall(path)
        await client.close()
    except Exception:  # a test must not fail on its cleanup (ZooKeeper may be the victim)
        pass


@dataclass
class SendLoad:
    """SENDs with keys from `workers` concurrent tasks among users 1..users."""

    cell: CellClient
    users: int = 60
    workers: int = 6
    pause_s: float = 0.005
    request_timeout_s: float = 20.0
    acked: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    failed: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [
            asyncio.get_running_loop().create_task(self._worker(w)) for w in range(self.workers)
        ]

    async def stop(self) -> None:
        """Stop sending; in-flight SENDs finish (acknowledged or given up) first."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, worker: int) -> None:
        rng = random.Random(worker)
        count = 0
        while not self._stop.is_set():
            count += 1
            sender = rng.randint(1, self.users)
            others = [u for u in range(1, self.users + 1) if u != sender]
            recipients = tuple(sorted(rng.sample(others, rng.choice((1, 1, 2)))))
            payload = {
                "sender": sender,
                "recipients": list(recipients),
                "text": f"load {worker}-{count}",
                "channel": "chat",
                "key": f"w{worker}-{count}",
            }
            self.sent += 1
            try:
                reply = await self.cell.request(sender, Op.SEND, payload, self.request_timeout_s)
            except PyserverError as error:
                self.failed[error.code] += 1
            else:
                self.acked[reply["message_id"]] = (sender, recipients)
            await asyncio.sleep(self.pause_s)


async def check_logs(
    store: Any, acked: dict[str, tuple[int, tuple[int, ...]]], users: int
) -> dict[int, list[dict[str, Any]]]:
    """Every user's log in `store` (not yet opened; closed here); asserts the exactly-once
    and no-gap properties of the module doc."""
    await store.open()
    try:
        logs: dict[int, list[dict[str, Any]]] = {}
        for user in range(1, users + 1):
            page = await store.read_log(user, 0, 1_000_000)
            assert [seq for seq, _ in page] == list(range(1, len(page) + 1)), f"gap in {user}'s log"
            logs[user] = [logcodec.decode(record) for _, record in page]
    finally:
        await store.close()
    holders: dict[str, Counter[int]] = {}
    for user, entries in logs.items():
        counts = Counter(e["message_id"] for e in entries if e["action"] == "message_added")
        twice = [message for message, n in counts.items() if n > 1]
        assert not twice, f"user {user} holds messages twice: {twice[:5]}"
        for message in counts:
            holders.setdefault(message, Counter())[user] += 1
    for message, (sender, recipients) in acked.items():
        held = set(holders.get(message, ()))
        missing = {sender, *recipients} - held
        assert not missing, f"acknowledged {message} missing from the logs of {sorted(missing)}"
    return logs


def stop_gracefully(node: NodeProcess, timeout_s: float = 30.0) -> int:
    node.signal(signal.SIGTERM)
    return node.wait(timeout_s)
