"""`python -m bench micro --json` prints every documented figure (a smoke run, not a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyserver.implementation import PURE_FORCED

KEYS_AND_PEERS = {
    "ring_owner": {"uhashring"},
    "ring_owners_batch": {"uhashring"},
    "log_codec": {"msgpack", "orjson"},
    "lru_get": {"ordereddict", "lru-dict"},
    "lru_put": {"ordereddict", "lru-dict"},
    "frame_decode": {"struct"},
}


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_micro_bench_json_shape() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "micro", "--json", "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    results = json.loads(out)
    for key, peers in KEYS_AND_PEERS.items():
        figures = results[key]
        assert figures["native_ns"] > 0 and figures["pure_ns"] > 0
        assert figures["speedup"] == pytest.approx(
            figures["pure_ns"] / figures["native_ns"], rel=0.05
        )
        assert peers <= set(figures["peers"]), (key, figures["peers"])
        assert all(ns > 0 for ns in figures["peers"].values())
    assert results["ring_owners_batch"]["native_ids_per_s"] > 0


def test_bench_refuses_the_pure_fallback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "micro", "--quick"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYSERVER_PURE": "1"},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "refusing to run on the pure fallback" in proc.stderr
