"""`python -m bench server`: a real app server under load, native+uvloop against pure+asyncio.

The server runs as `pyserver run` in its own process; the load comes from
`bench.loadgen` in another. Each scenario (operation x connections x pipeline
depth) runs against the native build on uvloop and against `PYSERVER_PURE=1`
on the default loop, in the same run. Where `redis-server` and
`redis-benchmark` are installed (`scripts/bench` installs them), Redis GET at the
same concurrency and pipelining is measured as the ceiling for loopback
request/reply on this machine.
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

OPS = ("counts", "get_thread", "send")
SETTINGS = ((1, 1), (1, 16), (64, 1), (64, 16))  # (connections, pipeline depth)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _cell(pure: bool) -> Iterator[tuple[int, str]]:
    """A `pyserver run` process on a fresh data folder: yields (port, service key)."""
    env = {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}
    if pure:
        env["PYSERVER_PURE"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as data:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyserver.cli", "run", "--data", data, "--port", str(port),
             "--http-port", "0", "--smtp-port", "0"],
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


async def _prefill(port: int, key: str) -> str:
    """User 1 writes 30 messages to user 2 (friends); returns the thread id, user 2 cached."""
    from pyserver.client import Client

    async with await Client.connect("127.0.0.1", port, service_key=key) as client:
        await client.friend_add(1, 2)
        reply = {}
        for n in range(30):
            reply = await client.send(1, [2], f"message number {n} about the quarterly plan")
        await client.counts(2)
        await client.get_thread(2, reply["thread_id"], limit=20)
        return reply["thread_id"]


def _loadgen(port: int, key: str, op: str, conns: int, pipeline: int, thread: str,
             seconds: float) -> dict[str, Any]:  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--key", key, "--op", op,
         "--conns", str(conns), "--pipeline", str(pipeline), "--thread", thread,
         "--seconds", str(seconds), "--user", "2"],
        env={k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"},
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


def _run_mode(pure: bool, seconds: float) -> list[dict[str, Any]]:
    results = []
    with _cell(pure) as (port, key):
        thread = asyncio.run(_prefill(port, key))
        for op in OPS:
            for conns, pipeline in SETTINGS:
                result = _loadgen(port, key, op, conns, pipeline, thread, seconds)
                result["mode"] = "pure" if pure else "native"
                results.append(result)
                print(f"  {result}", file=sys.stderr)
    return results


def _redis(seconds: float) -> list[dict[str, Any]] | None:
    server, benchmark = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if not (server and benchmark):
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        results = []
        for conns, pipeline in SETTINGS:
            # about `seconds` of work: size the request count from a short probe
            count = 20_000 * max(1, conns // 8) * pipeline
            out = subprocess.run(
                [benchmark, "-p", str(port), "-t", "get", "-c", str(conns), "-P", str(pipeline),
                 "-n", str(count), "--csv"],
                capture_output=True, text=True, check=True, timeout=300,
            ).stdout  # fmt: skip
            row = next(line for line in out.splitlines() if line.startswith('"GET"'))
            cells = [c.strip('"') for c in row.split(",")]
            results.append({
                "op": "redis_get", "conns": conns, "pipeline": pipeline,
                "ops_per_s": round(float(cells[1])),
                "p50_ms": float(cells[4]), "p99_ms": float(cells[6]),
            })  # fmt: skip
            print(f"  {results[-1]}", file=sys.stderr)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _find(results: list[dict[str, Any]], op: str, conns: int, pipeline: int) -> dict[str, Any]:
    return next(
        r for r in results if r["op"] == op and r["conns"] == conns and r["pipeline"] == pipeline
    )


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 0.5 if quick else 2.0
    print("bench server: native + uvloop", file=sys.stderr)
    native = _run_mode(False, seconds)
    print("bench server: PYSERVER_PURE=1 + asyncio", file=sys.stderr)
    pure = _run_mode(True, seconds)
    print("bench server: redis GET", file=sys.stderr)
    redis = _redis(seconds)

    ratios = [
        _find(native, r["op"], r["conns"], r["pipeline"])["ops_per_s"] / max(r["ops_per_s"], 1)
        for r in pure
    ]
    figures: dict[str, Any] = {
        "scenarios": native + pure + (redis or []),
        # geometric mean over every scenario of native ops/s / pure ops/s
        "native_vs_pure": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 2),
        "send_durable_ops_per_s": _find(native, "send", 64, 1)["ops_per_s"],
        "send_durable_pipelined_ops_per_s": _find(native, "send", 64, 16)["ops_per_s"],
    }
    if redis:
        by_setting = {
            f"{c}x{p}": round(
                _find(native, "counts", c, p)["ops_per_s"]
                / _find(redis, "redis_get", c, p)["ops_per_s"],
                3,
            )
            for c, p in SETTINGS
        }
        figures["counts_vs_redis_get_by_setting"] = by_setting
        # the headline: 64 connections, no pipelining
        figures["counts_vs_redis_get"] = by_setting["64x1"]
    else:
        figures["counts_vs_redis_get"] = None
        figures["redis"] = (
            "redis-server/redis-benchmark not installed (scripts/bench installs them)"
        )
    return figures
