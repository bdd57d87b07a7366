"""`pyserver cluster rollout` on a 3-node cell under load, and a rollout that stops.

A real cluster (`cluster up --cells 1 --nodes 3 --engine sqlite`: discovery,
the services, three `pyserver node` processes) carries a steady load of SENDs
and reads through `ClusterClient` (bench/ops_rollout.py's `LoadDuringRollout`) while the
`pyserver cluster rollout` command restarts its nodes one at a time with a new
release label. No request may fail, every acknowledged SEND must be in the log
of its sender and each recipient exactly once (read from the store afterwards,
by bench.ops_rollout.check_writes and by the cluster harness's own check), and every
node must come back with a new process reporting the new release. A rollout on
code that cannot start stops at the first node and says so, leaving the other
nodes on the old code. The same on two cells of two nodes (marked slow).
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.ops_rollout import LoadDuringRollout, check_writes
from pyserver.cluster.state import read_state
from pyserver.discovery.client import connect_to_cluster
from pyserver.store.spec import open_store, parse_store_spec
from tests import support
from tests.cluster_harness import check_logs
from tests.support import run_cli as pyserver


@contextmanager
def _cluster(tmp_path: Path, cells: int, nodes: int) -> Iterator[Path]:
    """A cluster of `cells` cells of `nodes` app servers on SQLite; purged afterwards."""
    folder = tmp_path / "cluster"
    up = pyserver("cluster", "up", "--cluster", str(folder), "--cells", str(cells),
                  "--nodes", str(nodes), "--engine", "sqlite", "--session-timeout", "5",
                  timeout=240)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield folder
    finally:
        pyserver("cluster", "down", "--cluster", str(folder), "--purge", "--grace", "10",
                 timeout=120)  # fmt: skip


def _health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:  # 503: the report says why
        return json.loads(error.read())


def _nodes(folder: Path) -> dict[str, dict]:
    return {p["node"]: p for p in read_state(folder)["processes"] if p["role"] == "node"}


def _roll_under_load(cell: Path) -> None:
    """Roll every cell of the cluster under load; assert the module docstring's bars."""
    before = _nodes(cell)

    async def scenario() -> dict:
        client = await connect_to_cluster(cell)
        try:
            load = LoadDuringRollout(client)
            load.start()
            await asyncio.sleep(2.0)
            load.phase = "rollout"
            rollout = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyserver.cli", "cluster", "rollout", "--cluster",
                str(cell), "--version", "v2", "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(rollout.communicate(), 240)
            load.phase = "after"
            await asyncio.sleep(1.0)
            await load.stop()
        finally:
            await client.close()
        assert rollout.returncode == 0, (out, err)
        report = json.loads(out)
        print(
            f"\nrollout: {[(s['node'], s['drain_s'], s['start_s']) for s in report['steps']]}; "
            f"{load.requests['rollout']} requests during it, p50 {load.p_ms('rollout', 0.5)} ms, "
            f"p99 {load.p_ms('rollout', 0.99)} ms (at rest p99 {load.p_ms('rest', 0.99)} ms); "
            f"{len(load.acked)} SENDs acknowledged; rerouted {client.figures['rerouted']}"
        )
        assert sorted(s["node"] for s in report["steps"]) == sorted(before)
        assert all(s["ok"] and not s["forced"] for s in report["steps"]), report
        assert not load.failed, load.failed
        assert load.requests["rollout"] > 50, load.requests
        lost, doubled = await check_writes(cell, load.acked, load.users)
        assert (lost, doubled) == (0, 0)
        state = read_state(cell)
        if len(state["cells"]) == 1:  # every user's log in the one store: the harness's check
            spec = state["cells"]["cell-1"]
            await check_logs(open_store(parse_store_spec(spec, Path(state["data"]))),
                             load.acked, load.users)  # fmt: skip
        return report

    support.run(scenario, timeout=300.0)
    after = _nodes(cell)
    for node, entry in after.items():
        assert entry["pid"] != before[node]["pid"], node
        health = _health(f"http://{entry['metrics']}/health")
        assert health["status"] == "ok" and health["release"] == "v2", health
        peers = [n for n, e in before.items() if e["cell"] == entry["cell"]]
        assert sorted(health["ring"]) == sorted(peers), health
    status = pyserver("cluster", "status", "--cluster", str(cell), "--json")
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_rollout_under_load_fails_no_request_and_a_broken_build_stops_it(
    tmp_path: Path, zookeeper: str
) -> None:
    with _cluster(tmp_path, cells=1, nodes=3) as cell:
        _roll_under_load(cell)
        _broken_build_stops_the_rollout(cell, tmp_path)


@pytest.mark.slow
def test_a_rollout_of_two_cells_under_load(tmp_path: Path, zookeeper: str) -> None:
    with _cluster(tmp_path, cells=2, nodes=2) as cluster:
        _roll_under_load(cluster)


def _broken_build_stops_the_rollout(cell: Path, tmp_path: Path) -> None:
    before = _nodes(cell)
    broken = tmp_path / "broken"
    (broken / "pyserver").mkdir(parents=True)
    (broken / "pyserver" / "__init__.py").write_text("raise ImportError('a broken build')\n")
    rollout = pyserver("cluster", "rollout", "--cluster", str(cell), "--code", str(broken),
                       "--start-timeout", "60", timeout=180)  # fmt: skip
    assert rollout.returncode == 2, rollout.stdout + rollout.stderr
    first, *others = sorted(before)
    assert f"{first} of cell-1 did not come back" in rollout.stderr
    assert "a broken build" in rollout.stderr
    after = _nodes(cell)
    for node in others:  # not touched: still the old processes, serving
        assert after[node]["pid"] == before[node]["pid"]
        health = _health(f"http://{after[node]['metrics']}/health")
        assert health["status"] == "ok" and sorted(health["ring"]) == sorted(others), health
