"""`python -m bench server`: a real app server under load, native+uvloop against pure+asyncio.

The server runs as `pyserver run` in its own process; the load comes from
`bench.loadgen` in another. Each scenario (operation x connections x pipeline
depth) runs against the native build on uvloop and against `PYSERVER_PURE=1`
on the default loop, in the same run. Where `redis-server` and
`redis-benchmark` are installed (`scripts/bench` installs them), Redis GET at the
same concurrency and pipelining is measured as the ceiling for loopback
request/reply on this machine: through the same load generator (speaking RESP), and
redis-benchmark's own figure beside it. Without Redis the benchmark stops with an error.
Every scenario reports p50/p99. `bench.memory` adds the resident bytes per cached user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.listeners import free_port
from bench.memory import cached_user_memory
from pyserver.tls import TierTls

OPS = ("counts", "get_thread", "send")
SETTINGS = ((1, 1), (1, 16), (64, 1), (64, 16))  # (connections, pipeline depth)


@contextlib.contextmanager
def _cell(pure: bool, tls: TierTls | None = None) -> Iterator[tuple[int, str]]:
    """A `pyserver run` process on a fresh data folder (with mutual TLS when given the
    certificates): yields (port, service key)."""
    env = {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}
    if pure:
        env["PYSERVER_PURE"] = "1"
    if tls is not None:
        env |= {
            "PYSERVER_TLS": "1",
            "PYSERVER_TLS_CERT_FILE": tls.cert_file,
            "PYSERVER_TLS_KEY_FILE": tls.key_file,
            "PYSERVER_TLS_CA_FILE": tls.ca_file,
            "PYSERVER_TLS_MUTUAL": "1",
        }
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as data:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyserver.cli", "run", "--data", data, "--port", str(port),
             "--http-port", "0", "--smtp-port", "0", "--web-port", "-1", "--imap-port", "-1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not (Path(data) / "endpoints.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench: pyserver run did not start")
                time.sleep(0.05)
            yield port, (Path(data) / "service.key").read_text().strip()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _prefill(port: int, key: str, tls: TierTls | None = None) -> tuple[str, int]:
    """User 1 writes 30 messages to user 2 (friends), user 2 cached: (thread id, the size
    of a COUNTS reply frame, which the Redis value matches)."""
    import orjson

    from pyserver.client import Client

    context = tls.client_context() if tls is not None else None
    async with await Client.connect("127.0.0.1", port, service_key=key, tls=context) as client:
        await client.friend_add(1, 2)
        reply = {}
        for n in range(30):
            reply = await client.send(1, [2], f"message number {n} about the quarterly plan")
        counts = await client.counts(2)
        await client.get_thread(2, reply["thread_id"], limit=20)
        return reply["thread_id"], 12 + len(orjson.dumps(counts))


def _loadgen(port: int, key: str, op: str, conns: int, pipeline: int, thread: str,
             seconds: float, tls: TierTls | None = None) -> dict[str, Any]:  # fmt: skip
    tls_args = (
        ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file]
        if tls is not None
        else []
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--key", key, "--op", op,
         "--conns", str(conns), "--pipeline", str(pipeline), "--thread", thread,
         "--seconds", str(seconds), "--user", "2", *tls_args],
        env={k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"},
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


def _run_mode(
    pure: bool, seconds: float, tls: TierTls | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Every scenario against one cell; and the size of its COUNTS reply."""
    results = []
    with _cell(pure, tls) as (port, key):
        thread, counts_bytes = asyncio.run(_prefill(port, key, tls))
        for op in OPS:
            for conns, pipeline in SETTINGS:
                result = _loadgen(port, key, op, conns, pipeline, thread, seconds, tls)
                result["mode"] = ("pure" if pure else "native") + ("+tls" if tls else "")
                results.append(result)
                print(f"  {result}", file=sys.stderr)
    return results, counts_bytes


def _redis(seconds: float, value_bytes: int) -> list[dict[str, Any]]:
    """Redis GET in every setting: through `bench.loadgen` (the same client as the cell's
    scenarios, op "redis_get") and, beside it, redis-benchmark's own figure
    (op "redis_benchmark_get")."""
    server, benchmark = _redis_programs()
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench server: redis-server did not start")
            time.sleep(0.05)
        results = []
        for conns, pipeline in SETTINGS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--op", "redis_get",
                 "--conns", str(conns), "--pipeline", str(pipeline), "--seconds", str(seconds),
                 "--value-bytes", str(value_bytes)],
                capture_output=True, text=True, check=True, timeout=120,
            )  # fmt: skip
            results.append(json.loads(out.stdout))
            print(f"  {results[-1]}", file=sys.stderr)
            # about `seconds` of work: size the request count from the loadgen's figure
            count = max(10_000, int(results[-1]["ops_per_s"] * seconds))
            out = subprocess.run(
                [benchmark, "-p", str(port), "-t", "get", "-c", str(conns), "-P", str(pipeline),
                 "-d", str(value_bytes), "-n", str(count), "--csv"],
                capture_output=True, text=True, check=True, timeout=300,
            ).stdout  # fmt: skip
            row = next(line for line in out.splitlines() if line.startswith('"GET"'))
            cells = [c.strip('"') for c in row.split(",")]
            results.append({
                "op": "redis_benchmark_get", "conns": conns, "pipeline": pipeline,
                "ops_per_s": round(float(cells[1])),
                "p50_ms": float(cells[4]), "p99_ms": float(cells[6]),
            })  # fmt: skip
            print(f"  {results[-1]}", file=sys.stderr)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _redis_programs() -> tuple[str, str]:
    """redis-server and redis-benchmark, or SystemExit saying they are missing."""
    server, benchmark = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if not (server and benchmark):
        raise SystemExit(
            "bench server: redis-server and redis-benchmark are missing; they are the "
            "ceiling this benchmark compares with (scripts/bench and scripts/test install "
            "them: apt-get install redis-server redis-tools)"
        )
    return server, benchmark


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _find(results: list[dict[str, Any]], op: str, conns: int, pipeline: int) -> dict[str, Any]:
    return next(
        r for r in results if r["op"] == op and r["conns"] == conns and r["pipeline"] == pipeline
    )


def run_tls(quick: bool = False) -> dict[str, Any]:
    """`bench server --tls`: the native server in plain text and under mutual TLS, in the
    same run; every scenario's ops/s under TLS over plain."""
    from pyserver.tls import make_dev_certificates

    seconds = 0.5 if quick else 2.0
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as folder:
        tls = make_dev_certificates(Path(folder))
        print("bench server --tls: native + uvloop, plain text", file=sys.stderr)
        plain, _ = _run_mode(False, seconds)
        print("bench server --tls: native + uvloop, mutual TLS", file=sys.stderr)
        secured, _ = _run_mode(False, seconds, tls)
    by_scenario = {
        f"{r['op']} {r['conns']}x{r['pipeline']}": round(
            r["ops_per_s"] / max(_find(plain, r["op"], r["conns"], r["pipeline"])["ops_per_s"], 1),
            3,
        )
        for r in secured
    }

    def geomean(op: str) -> float:
        ratios = [v for k, v in by_scenario.items() if k.startswith(op + " ")]
        return round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3)

    return {
        "scenarios": plain + secured,
        "tls_vs_plain_by_scenario": by_scenario,
        # geometric means over the settings: COUNTS of a cached user (the hot read), SEND
        "tls_counts_vs_plain": geomean("counts"),
        "tls_get_thread_vs_plain": geomean("get_thread"),
        "tls_send_vs_plain": geomean("send"),
        "tls_send_durable_ops_per_s": _find(secured, "send", 64, 1)["ops_per_s"],
    }


def run(quick: bool = False, tls: bool = False) -> dict[str, Any]:
    if tls:
        return run_tls(quick)
    seconds = 0.5 if quick else 2.0
    _redis_programs()  # before anything runs: no figure without its ceiling
    print("bench server: native + uvloop", file=sys.stderr)
    native, counts_bytes = _run_mode(False, seconds)
    print("bench server: PYSERVER_PURE=1 + asyncio", file=sys.stderr)
    pure, _ = _run_mode(True, seconds)
    print("bench server: redis GET (same load generator, then redis-benchmark)", file=sys.stderr)
    redis = _redis(seconds, counts_bytes)
    print("bench server: memory per cached user", file=sys.stderr)
    memory = cached_user_memory(users=2_000 if quick else 100_000)

    ratios = [
        _find(native, r["op"], r["conns"], r["pipeline"])["ops_per_s"] / max(r["ops_per_s"], 1)
        for r in pure
    ]
    by_scenario = {
        f"{c}x{p}": round(
            _find(native, "counts", c, p)["ops_per_s"]
            / max(_find(redis, "redis_get", c, p)["ops_per_s"], 1),
            3,
        )
        for c, p in SETTINGS
    }
    return {
        "scenarios": native + pure + redis,
        # geometric mean over every scenario of native ops/s / pure ops/s
        "native_vs_pure": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 2),
        "send_durable_ops_per_s": _find(native, "send", 64, 1)["ops_per_s"],
        "send_durable_pipelined_ops_per_s": _find(native, "send", 64, 16)["ops_per_s"],
        # COUNTS of a cached user over Redis GET, both driven by bench.loadgen
        "counts_vs_redis_get_by_scenario": by_scenario,
        "counts_vs_redis_get": min(by_scenario.values()),
        "bytes_per_cached_user": memory["bytes_per_cached_user"],
        "memory": memory,
    }
