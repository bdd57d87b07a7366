"""`evacuate_users_per_s`: how fast `pyserver cell evacuate` empties a cell (issue 13's bar:
10,000 users at 500/s or better on this machine).

Two cells on the running ZooKeeper (a chroot of their own) with SQLite stores:
cell `ca` of two `pyserver node` processes and cell `cb` of one. `USERS` users
are made in `ca` through its app servers (each SEND writes its sender's and its
recipient's logs, so every user has a log and a snapshot to copy) and placed there
in the directory. Then, in this process:

* the ceiling, `evacuate_copy_ceiling_users_per_s`: the same users' logs copied
  from `ca`'s store into a scratch store with `copy_log`, as many at once as the
  evacuation runs: the store work of a move, without the freeze, the wait for the
  app servers' acknowledgements, the directory flip and the tombstone;
* `evacuate_cell` of `ca` into `cb` (`PARALLEL` moves at once, no rate cap),
  timed: `evacuate_users_per_s`, and `evacuate_vs_copy` the ratio to the ceiling.

The run checks what it measured: no user left in `ca`, none failed, and each
user's log in `cb` as long as it was in `ca`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pyserver import endpoints

USERS = 10_000
QUICK_USERS = 600
PARALLEL = 128
TARGET_USERS_PER_S = 500
SEED_AT_ONCE = 200


def _env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"},
        "PYTHONUNBUFFERED": "1",
    }


class _Nodes:
    """`pyserver node` processes of the benchmark's cells."""

    def __init__(self, folder: Path, zookeeper: str, chroot: str) -> None:
        self.folder, self.zookeeper, self.chroot = folder, zookeeper, chroot
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, node_id: str, cell: str, store: str) -> None:
        ready = self.folder / f"{node_id}.ready.json"
        with open(self.folder / f"{node_id}.log", "ab") as log:
            self.procs[node_id] = subprocess.Popen(  # nosec B603
                [sys.executable, "-m", "pyserver.cli", "node", "--data", str(self.folder),
                 "--cell", cell, "--node-id", node_id, "--port", "0", "--http-port", "0",
                 "--zookeeper", self.zookeeper, "--chroot", self.chroot, "--store", store,
                 "--session-timeout", "10", "--ready-file", str(ready)],
                env=_env(), stdout=log, stderr=log,
            )  # fmt: skip

    def wait_serving(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        for node_id, proc in self.procs.items():
            ready = self.folder / f"{node_id}.ready.json"
            while endpoints.read_file(ready) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bench: node {node_id} did not start (see {self.folder})")
                time.sleep(0.05)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _seed(zookeeper: str, chroot: str, key: str, users: list[int]) -> None:
    """One SEND from each even user to the next: every user gets a log in `ca`."""
    from pyserver.cluster.cellclient import CellClient
    from pyserver.wire.ops import Op

    def send(sender: int, recipient: int) -> dict[str, Any]:
        text = f"hello {recipient}, the plan for the quarter is attached"
        return {"sender": sender, "recipients": [recipient], "channel": "chat", "text": text}

    async with await CellClient.open(zookeeper, "ca", key, chroot=chroot) as client:
        pairs = list(zip(users[::2], users[1::2], strict=False))
        for start in range(0, len(pairs), SEED_AT_ONCE):
            batch = pairs[start : start + SEED_AT_ONCE]
            await asyncio.gather(*(client.request(s, Op.SEND, send(s, r)) for s, r in batch))


async def _measure(folder: Path, zookeeper: str, chroot: str, users: list[int]) -> dict[str, Any]:
    from pyserver.cluster.state import set_cell_record
    from pyserver.cluster.zk import ZooKeeper
    from pyserver.discovery.directory import Directory
    from pyserver.discovery.evacuate import evacuate_cell
    from pyserver.discovery.move import copy_log
    from pyserver.store.spec import open_store, parse_store_spec

    specs = {
        name: f"sqlite:{folder / (name + '.sqlite3')}" for name in ("ca", "cb", "dir", "scratch")
    }
    stores = {name: open_store(parse_store_spec(spec, folder)) for name, spec in specs.items()}
    for store in stores.values():
        await store.open()
    zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=10.0)
    await zk.start(10.0)
    try:
        for store in (stores["dir"],):
            for user in users:
                await store.set_cell(user, "ca")
        lengths = {user: await stores["ca"].last_seq(user) for user in users}
        assert all(lengths.values()), "bench: a seeded user has no log"

        # the ceiling: the store work of the moves alone
        queue = list(users)
        started = time.perf_counter()

        async def copier() -> None:
            while queue:
                await copy_log(stores["ca"], stores["scratch"], queue.pop())

        await asyncio.gather(*(copier() for _ in range(PARALLEL)))
        copy_s = time.perf_counter() - started

        directory = Directory(stores["dir"])
        report = await evacuate_cell(
            zk, directory, {"ca": stores["ca"], "cb": stores["cb"]}, "ca",
            parallel=PARALLEL, rate=0.0,
        )  # fmt: skip
        left = await directory.users_in("ca")
        short = [u for u in users if await stores["cb"].last_seq(u) != lengths[u]]
        if report.failed or left or short:
            raise RuntimeError(
                f"bench: evacuation incomplete: {len(report.failed)} failed, {len(left)} left, "
                f"{len(short)} logs short"
            )
        await set_cell_record(zk, "ca", state="enabled")
    finally:
        await zk.close()
        for store in stores.values():
            await store.close()
    copy_rate = len(users) / copy_s
    return {
        "evacuate_users": len(users),
        "evacuate_parallel": PARALLEL,
        "evacuate_seconds": round(report.seconds, 2),
        "evacuate_users_per_s": round(report.users_per_s, 1),
        "evacuate_target_users_per_s": TARGET_USERS_PER_S,
        "evacuate_copy_ceiling_users_per_s": round(copy_rate, 1),
        "evacuate_vs_copy": round(report.users_per_s / copy_rate, 3),
        "evacuate_passes": report.passes,
    }


async def _remove(zookeeper: str, chroot: str) -> None:
    """The benchmark's ZooKeeper tree, gone (the app servers' acknowledgements, ephemeral,
    may still be vanishing as their sessions end: try again)."""
    import aiozk

    for _ in range(5):
        client = aiozk.ZKClient(zookeeper, session_timeout=5)
        try:
            await asyncio.wait_for(client.start(), 10)
            if await client.exists(chroot):
                await client.deleteall(chroot)
            return
        except Exception:  # cleanup only: try again
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


def run(quick: bool = False) -> dict[str, Any]:
    """The evacuation figures (module docstring)."""
    from pyserver.cluster.state import set_cell_record
    from pyserver.cluster.zk import ZooKeeper
    from pyserver.processes.launcher import ZOOKEEPER, _ensure_engines
    from pyserver.servicekey import load_or_create_service_key

    logging.getLogger("aiozk").setLevel(logging.CRITICAL)
    _ensure_engines("sqlite", lambda _text: None)
    folder = Path(tempfile.mkdtemp(prefix="bench-evacuate-"))
    chroot = f"/pyserver-bench-evacuate-{uuid.uuid4().hex[:8]}"
    count = QUICK_USERS if quick else USERS
    users = list(range(5_000_000, 5_000_000 + count))
    key = load_or_create_service_key(folder)
    nodes = _Nodes(folder, ZOOKEEPER, chroot)

    async def cells() -> None:
        zk = ZooKeeper(ZOOKEEPER, chroot=chroot, session_timeout_s=10.0)
        await zk.start(10.0)
        for cell in ("ca", "cb"):
            await set_cell_record(zk, cell, store=f"sqlite:{folder / (cell + '.sqlite3')}")
        await zk.close()

    try:
        asyncio.run(cells())
        nodes.spawn("ca-n1", "ca", f"sqlite:{folder / 'ca.sqlite3'}")
        nodes.spawn("ca-n2", "ca", f"sqlite:{folder / 'ca.sqlite3'}")
        nodes.spawn("cb-n1", "cb", f"sqlite:{folder / 'cb.sqlite3'}")
        nodes.wait_serving()
        seeded = time.perf_counter()
        asyncio.run(_seed(ZOOKEEPER, chroot, key, users))
        seed_s = time.perf_counter() - seeded
        figures = asyncio.run(_measure(folder, ZOOKEEPER, chroot, users))
        figures["evacuate_seed_seconds"] = round(seed_s, 1)
        return figures
    finally:
        nodes.close()
        asyncio.run(_remove(ZOOKEEPER, chroot))
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv)))
