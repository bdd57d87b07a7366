"""`pyserver node add|remove` on a running cluster (`cluster up --cells 1 --nodes 2`).

Under a steady load of SENDs and reads through `ClusterClient`, `node add`
starts a third app server: it returns once the node serves, the cell's ring
(as discovery gives it) holds three nodes, the new one owns about a third of the
users, and no request fails. Then `node remove` of the first node: it drains
(every image it held ahead of its snapshot is snapshotted on the way out, so
each of its users' new owner loads a current snapshot and replays nothing), its
process exits, the cluster's state forgets it, and every acknowledged SEND is in
its sender's and recipients' logs exactly once. Removing the last node of a cell
and adding a node under a taken id are refused with a clear message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ops_rollout import LoadDuringRollout, check_writes
from pyserver.cluster.state import read_state
from pyserver.discovery.client import CellRing, ClusterClient, connect_to_cluster
from pyserver.processes.launcher import alive
from pyserver.store.spec import open_store, parse_store_spec
from tests import support
from tests.support import run_cli as pyserver


@pytest.fixture
def cluster(tmp_path: Path, zookeeper: str) -> Iterator[Path]:
    folder = tmp_path / "cluster"
    up = pyserver("cluster", "up", "--cluster", str(folder), "--cells", "1", "--nodes", "2",
                  "--engine", "sqlite", "--session-timeout", "5", timeout=240)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield folder
    finally:
        pyserver("cluster", "down", "--cluster", str(folder), "--purge", "--grace", "10",
                 timeout=120)  # fmt: skip


def _nodes(folder: Path) -> dict[str, dict]:
    return {p["node"]: p for p in read_state(folder)["processes"] if p["role"] == "node"}


async def _ring(client: ClusterClient, nodes: int) -> CellRing:
    for _ in range(200):
        ring = await client.ring_of("cell-1", refresh=True)
        if len(ring.ring) == nodes:
            return ring
        await asyncio.sleep(0.05)
    raise AssertionError(f"discovery's ring of cell-1 never had {nodes} nodes")


def test_node_add_then_remove_under_load(cluster: Path) -> None:
    async def scenario() -> None:
        client = await connect_to_cluster(cluster)
        try:
            load = LoadDuringRollout(client)
            load.start()
            await asyncio.sleep(1.5)
            added = await asyncio.to_thread(
                pyserver, "node", "add", "--cluster", str(cluster), "--cell", "cell-1", "--json",
                timeout=180,
            )  # fmt: skip
            assert added.returncode == 0, added.stdout + added.stderr
            assert json.loads(added.stdout)["added"] == "cell-1-n3"
            ring = await _ring(client, 3)
            share = sum(ring.ring.owner(u) == "cell-1-n3" for u in range(1, 30_001)) / 30_000
            assert 0.15 <= share <= 0.5, share
            await asyncio.sleep(1.5)
            await load.stop()
            assert not load.failed, load.failed
            # the first node's users, which its removal hands over
            owned = [u for u in range(1, load.users + 1) if ring.ring.owner(u) == "cell-1-n1"]
            assert owned
            pid = _nodes(cluster)["cell-1-n1"]["pid"]
            removed = await asyncio.to_thread(
                pyserver, "node", "remove", "--cluster", str(cluster), "--node-id", "cell-1-n1",
                "--json", timeout=180,
            )  # fmt: skip
            assert removed.returncode == 0, removed.stdout + removed.stderr
            assert not alive(pid)
            assert "cell-1-n1" not in _nodes(cluster)
            await _ring(client, 2)
            # its users' new owners start warm: each one's snapshot is at its log's end
            state = read_state(cluster)
            store = open_store(parse_store_spec(state["cells"]["cell-1"], Path(state["data"])))
            await store.open()
            try:
                for user in owned:
                    last = (await store.read_log(user, 0, 1_000_000))[-1][0]
                    snapshot = await store.read_snapshot(user)
                    assert snapshot is not None and snapshot[0] == last, (user, snapshot, last)
            finally:
                await store.close()
            # and they are served: a read of each, through the new owners
            for user in owned:
                await client.counts(user)
            lost, doubled = await check_writes(cluster, load.acked, load.users)
            assert (lost, doubled) == (0, 0)
        finally:
            await client.close()

    support.run(scenario, timeout=400.0)
    # the last node of the cell cannot go, a taken id cannot come
    nodes = sorted(_nodes(cluster))
    assert nodes == ["cell-1-n2", "cell-1-n3"]
    assert (
        pyserver("node", "remove", "--cluster", str(cluster), "--node-id", nodes[0]).returncode == 0
    )
    last = pyserver("node", "remove", "--cluster", str(cluster), "--node-id", nodes[1])
    assert last.returncode == 1 and "last app server of cell-1" in last.stderr
    taken = pyserver("node", "add", "--cluster", str(cluster), "--cell", "cell-1",
                     "--node-id", nodes[1])  # fmt: skip
    assert taken.returncode == 1 and "already a process" in taken.stderr
