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
    "reply_table": {"decode+encode"},
}


def _bench_json(*args: str) -> dict:
    """Run `python -m <args>` and parse the JSON it prints."""
    out = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    return json.loads(out)


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_micro_bench_json_shape() -> None:
    results = _bench_json("bench", "micro", "--json", "--quick")
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


def test_bench_server_refuses_to_run_without_its_redis_ceiling(tmp_path) -> None:
    # A PATH with this Python but no redis-server: the benchmark stops before measuring.
    (tmp_path / "python").symlink_to(sys.executable)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "server", "--quick"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "redis-server and redis-benchmark are missing" in proc.stderr


def test_the_load_generator_drives_a_real_redis_in_resp(tmp_path) -> None:
    import shutil
    import socket
    import time

    server = shutil.which("redis-server")
    assert server, "redis-server is installed by scripts/test (scripts/debian-packages)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--op", "redis_get",
             "--conns", "4", "--pipeline", "8", "--seconds", "0.3", "--warmup", "0.1",
             "--value-bytes", "150"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    figures = json.loads(out)
    assert figures["ops_per_s"] > 0 and figures["errors"] == 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]


def test_memory_per_cached_user_is_measured() -> None:
    figures = _bench_json("bench.memory", "--users", "300")
    assert figures["users"] == 300 and figures["threads_per_user"] == 10
    # 200 messages are held per user: at least their snapshot's worth, well under 10 MB
    assert figures["snapshot_bytes"] < figures["bytes_per_cached_user"] < 10_000_000


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_bench_writes_measures_the_mailbox_and_three_engines() -> None:
    results = _bench_json("bench", "writes", "--json", "--quick")
    mailbox = results["mailbox"]
    assert mailbox["sends_per_s"] > 0 and mailbox["writes_per_commit"] >= 1
    assert 0 < mailbox["event_loop_cpu_share"] <= 1.5
    assert set(results["engine_appends_per_s"]) == {"sqlite", "lmdb", "rocksdb"}
    assert all(rate > 0 for rate in results["engine_appends_per_s"].values())


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_bench_web_measures_live_chat_beside_direct_sends() -> None:
    web = _bench_json("bench", "web", "--json", "--quick")["web"]
    assert web["pages_connected"] == 100 and web["chat_samples"] == 50
    assert 0 < web["chat_p50_ms"] <= web["chat_p99_ms"]
    assert web["delivered_per_s"] > 0
    assert web["web_vs_direct_send"] == pytest.approx(
        web["web_send_us"] / web["direct_send_us"], rel=0.05
    )
    assert web["web_cpu_us_per_message"] > 0 and web["server_cpu_us_per_send"] > 0


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_bench_sms_measures_texts_both_ways_beside_their_ceilings() -> None:
    sms = _bench_json("bench", "sms", "--json", "--quick")["sms"]
    for figure in ("sms_in_per_s", "deliver_ceiling_per_s", "sms_out_per_s",
                   "send_ceiling_per_s", "smpp34_submits_per_s", "sms_in_cpu_ms",
                   "deliver_cpu_ms", "sms_out_cpu_ms", "send_cpu_ms"):  # fmt: skip
        assert sms[figure] > 0, figure
    assert sms["sms_in_vs_deliver"] == pytest.approx(
        sms["sms_in_per_s"] / sms["deliver_ceiling_per_s"], abs=0.01
    )
    assert sms["window"] == 32
    assert sms["gateway"] == "in the app server"


def test_bench_sms_runs_the_gateway_in_a_process_of_its_own(monkeypatch) -> None:
    # texts both ways pass through `pyserver sms` beside the app server
    monkeypatch.setenv("BENCH_SMS_GATEWAY", "process")
    sms = _bench_json("bench", "sms", "--json", "--quick")["sms"]
    assert sms["gateway"] == "process"
    assert sms["sms_in_per_s"] > 0 and sms["sms_out_per_s"] > 0
    # both processes' CPU counted, the app server's alone a part of it
    assert 0 < sms["sms_out_server_cpu_ms"] <= sms["sms_out_cpu_ms"] + 0.05


@pytest.mark.slow
def test_bench_ops_evacuates_a_cell_beside_its_copy_ceiling() -> None:
    ops = _bench_json("bench", "ops", "--json", "--quick")
    assert ops["evacuate_users"] == 600 and ops["evacuate_passes"] == 1
    assert ops["evacuate_users_per_s"] > 0 and ops["evacuate_copy_ceiling_users_per_s"] > 0
    assert 0 < ops["evacuate_vs_copy"] <= 1.5
    # the rollout of a 3-node cell under load (bench/ops_rollout.py)
    assert ops["rollout_failed_requests"] == 0 and ops["rollout_lost_writes"] == 0
    assert ops["rollout_doubled_writes"] == 0 and ops["rollout_p99_ms"] > 0
