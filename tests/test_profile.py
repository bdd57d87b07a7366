"""`pyserver profile`: a real `pyserver node` sampled by py-spy while it serves SENDs.

The node (ZooKeeper, SQLite; tests/cluster_harness.py) carries a load of SENDs
while `pyserver profile PID --seconds 3 --json` samples it: the report must have
have sampled stacks and name the app server's own code (the mailbox's write path)
among the functions the time is spent under. The collapsed-stack arithmetic is
checked on a made-up profile, and a pid that is no process gets a clear error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyserver.ops.profiler import Profile, parse_collapsed
from tests import support
from tests.cluster_harness import Cluster, SendLoad
from tests.support import run_cli as pyserver


@pytest.fixture
def cluster(tmp_path: Path, zookeeper: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, zookeeper)
    try:
        yield cluster
    finally:
        cluster.close()


def test_profile_of_a_node_under_load_names_its_write_path(cluster: Cluster) -> None:
    (node,) = cluster.start("n1")

    async def scenario() -> dict:
        async with await cluster.client() as cell:
            load = SendLoad(cell, users=40, workers=4, pause_s=0.0)
            load.start()
            await asyncio.sleep(0.5)
            profiled = await asyncio.to_thread(
                pyserver, "profile", str(node.proc.pid), "--seconds", "3", "--top", "40",
                "--json", timeout=90,
            )  # fmt: skip
            await load.stop()
            assert profiled.returncode == 0, profiled.stdout + profiled.stderr
            assert not load.failed and load.acked
            return json.loads(profiled.stdout)

    report = support.run(scenario, timeout=120.0)
    print(f"\nprofile: {report['samples']} samples, busy threads {report['busy_threads']}; "
          f"own: {[r['function'] for r in report['own'][:5]]}")  # fmt: skip
    assert report["pid"] == node.proc.pid and report["samples"] > 10
    assert report["busy_threads"] > 0
    # each busy sample is one function's own time (the shares are rounded: count samples)
    assert sum(row["samples"] for row in report["own"]) <= report["samples"]
    under = " ".join(row["function"] for row in report["total"])
    assert "mailbox.py" in under or "residency.py" in under, under


def test_collapsed_stacks_count_own_and_total_time() -> None:
    profile = parse_collapsed(
        "main (a.py:1);serve (b.py:5);send (c.py:9) 30\n"
        "main (a.py:1);serve (b.py:5) 10\n"
        "main (a.py:1);serve (b.py:5);send (c.py:9);append (d.py:2) 60\n"
        "not a stack line\n",
        Profile(pid=1, seconds=1.0, rate=200),
    )
    assert profile.samples == 100 and profile.busy_threads == 0.5
    assert profile.own == {"send (c.py:9)": 30, "serve (b.py:5)": 10, "append (d.py:2)": 60}
    assert profile.total["main (a.py:1)"] == 100 and profile.total["send (c.py:9)"] == 90
    assert profile.report(limit=1)["own"] == [
        {"function": "append (d.py:2)", "samples": 60, "share": 0.6}
    ]


def test_profile_of_no_process_says_so() -> None:
    done = pyserver("profile", "999999999", "--seconds", "1")
    assert done.returncode == 1 and "py-spy could not sample pid 999999999" in done.stderr
    named = pyserver("profile", "cell-1-n1", "--seconds", "1")
    assert named.returncode == 1 and "--cluster DIR" in named.stderr
