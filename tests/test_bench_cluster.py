"""`python -m bench cluster --json --quick`: the figures other checks rely on are there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.hbase_ceiling import _hbase_jars, _java
from pyserver.implementation import PURE_FORCED
from tests.cluster_harness import REPO


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_cluster_bench_reports_failover_join_and_send_rates(
    zookeeper: str, hbase_thrift: tuple[str, int]
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "cluster", "--json", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for key in ("hbase_send_ops_per_s", "sqlite_send_ops_per_s", "hbase_get_thread_ops_per_s"):
        assert results[key] > 0, key
    assert results["errors"] == 0
    # the engine's ceilings beside the cell, measured in the same run
    assert results["hbase_raw_put_ops_per_s"] > 0  # three processes, as the cell's nodes
    assert results["hbase_raw_put_one_process_ops_per_s"] > 0
    assert results["hbase_raw_cas_ops_per_s"] > 0
    assert results["hbase_send_vs_raw_put"] == round(
        results["hbase_send_ops_per_s"] / results["hbase_raw_put_ops_per_s"], 3
    )
    if _java() is not None and _hbase_jars() is not None:
        assert results["hbase_pe_ops_per_s"] > 0, results["hbase_pe_skipped"]
    else:
        assert results["hbase_pe_ops_per_s"] is None and results["hbase_pe_skipped"]
    # failover: within the ZooKeeper session timeout plus one second (and a margin for CI)
    assert 0 < results["failover_s"] <= results["session_timeout_s"] + 2.0
    assert 0 < results["join_s"] < 30
    assert 0.1 < results["join_share"] < 0.5
