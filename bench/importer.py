"""`python -m bench import [--json] [--quick]`: importing history into a single node, beside
live traffic.

In one run, on the embedded store, with a corpus from `bench.corpus` (seeded):

* **import alone**: `pyserver import jsonl` of 10,000 users x about 100 messages
  (about 1,000,000 mailbox messages; `--quick`: 200 x 20) into a fresh data
  folder, with a worker process per core, timed from the command's start to
  its end (process start-up and the file's scan included): `import_msgs_per_s`;
  then `pyserver import tree` of a smaller corpus of mbox files (mail parsed by
  the MTA's code, bodies and attachments to the blob store):
  `import_mail_msgs_per_s`.
* **beside live load**: a cell (`pyserver run`) serves a live user whose
  COUNTS a load generator (`bench.loadgen`, 4 connections, one request in
  flight each) reads for a few seconds alone, then again while `pyserver import
  jsonl` writes a tenth of the corpus into the same cell's store:
  `live_p99_ratio` is the p99 during the import over the p99 without it (the
  load's p99 alone, measured in the same run, is its ceiling).

* **into HBase** (not with `--quick`): `pyserver cluster up --engine hbase` (one
  cell of 3 app servers, discovery), then `pyserver import jsonl --cluster` of
  1,000 users x about 20 messages, 64 users at once: `import_hbase_msgs_per_s`.

Targets (issue 14): `import_msgs_per_s` at least 20,000; `live_p99_ratio` at most 2;
`import_hbase_msgs_per_s` at least 3,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.corpus import generate
from bench.listeners import start_cell, stop_process

LIVE_USER = 1_000_000_001


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}


def _children_cpu() -> float:
    """CPU seconds (user and system) of this process's finished children so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _cpu_figures(cpu_s: float, messages: int) -> dict[str, Any]:
    """The import's own CPU (its processes', whatever else the machine runs), and the
    machine's load when it ended: a busy machine stretches the wall time, not these."""
    return {
        "cpu_seconds": round(cpu_s, 2),
        "cpu_us_per_msg": round(cpu_s * 1e6 / messages, 1) if messages else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _import(args: list[str], data: Path) -> tuple[dict[str, Any], float]:
    """`pyserver import ARGS --data DATA --json`: its report and its wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pyserver", "import", *args, "--data", str(data), "--json",
         "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bench: pyserver import failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def _loadgen(port: int, key: str, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--key", key, "--op",
         "counts", "--user", str(LIVE_USER), "--conns", "4", "--pipeline", "1",
         "--seconds", str(seconds), "--warmup", "0.3"],
        env=_env(), capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


async def _seed_live_user(host: str, port: int, key: str) -> None:
    from pyserver.client import Client

    async with await Client.connect(host, port, service_key=key) as client:
        for n in range(20):
            await client.send(LIVE_USER + 1, [LIVE_USER], f"live message {n}")
        await client.counts(LIVE_USER)


def _alone(root: Path, users: int, per_user: int) -> dict[str, Any]:
    corpus = generate(root / "corpus", users, per_user, seed=14, formats=("jsonl",))
    workers = str(os.cpu_count() or 1)
    cpu_before = _children_cpu()
    report, seconds = _import(
        ["jsonl", corpus.paths["jsonl"], "--workers", workers], root / "alone"
    )
    cpu = _cpu_figures(_children_cpu() - cpu_before, report["messages"])
    if report["messages"] != corpus.copies or report["rejected_count"]:
        raise RuntimeError(f"bench: the import lost messages: {report} vs {corpus.copies}")
    return {
        "users": users,
        "workers": int(workers),
        "messages": report["messages"],
        "bytes": report["bytes"],
        "seconds": round(seconds, 2),
        "import_msgs_per_s": round(report["messages"] / seconds),
        **cpu,
    }


def _mail(root: Path, users: int, per_user: int) -> dict[str, Any]:
    corpus = generate(root / "mail", users, per_user, seed=15, formats=("mbox",))
    report, seconds = _import(
        ["tree", corpus.paths["mbox"], "--map", corpus.paths["map"]], root / "mail-data"
    )
    return {
        "users": report["users"],
        "messages": report["messages"],
        "bytes": report["bytes"],
        "seconds": round(seconds, 2),
        "import_mail_msgs_per_s": round(report["messages"] / seconds),
    }


def _beside_live(root: Path, users: int, per_user: int, window_s: float) -> dict[str, Any]:
    from pyserver.servicekey import read_service_key

    corpus = generate(root / "live-corpus", users, per_user, seed=16, formats=("jsonl",))
    data = root / "live"
    data.mkdir()
    proc, ready = start_cell(data)
    try:
        server = ready["server"]
        key = read_service_key(data)
        asyncio.run(_seed_live_user(server["host"], server["port"], key))
        alone = _loadgen(server["port"], key, window_s)
        importer = subprocess.Popen(
            [sys.executable, "-m", "pyserver", "import", "jsonl", corpus.paths["jsonl"],
             "--data", str(data), "--json", "--quiet"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started = time.perf_counter()
        time.sleep(1.0)  # past the scan of the file: the import is writing
        during = _loadgen(server["port"], key, window_s)
        outlasted = importer.poll() is None
        out, errors = importer.communicate(timeout=3600)
        seconds = time.perf_counter() - started
        if importer.returncode != 0:
            raise RuntimeError(f"bench: the import beside the load failed: {errors[-2000:]}")
        report = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_process(proc)
    return {
        "messages": report["messages"],
        "seconds": round(seconds, 2),
        "import_beside_live_msgs_per_s": round(report["messages"] / seconds),
        "counts_alone": {k: alone[k] for k in ("ops_per_s", "p50_ms", "p99_ms", "errors")},
        "counts_during_import": {k: during[k] for k in ("ops_per_s", "p50_ms", "p99_ms", "errors")},
        "import_outlasted_the_load": outlasted,
        "live_p99_ratio": round(during["p99_ms"] / alone["p99_ms"], 2) if alone["p99_ms"] else None,
    }


def _hbase(root: Path, users: int, per_user: int) -> dict[str, Any]:
    """`pyserver import jsonl --cluster` into a cell of 3 app servers on HBase (the shared
    engines' Thrift gateway), through discovery."""
    corpus = generate(root / "hbase-corpus", users, per_user, seed=17, formats=("jsonl",))
    folder = root / "hbase-cluster"
    up = subprocess.run(
        [sys.executable, "-m", "pyserver.cli", "cluster", "up", "--cluster", str(folder),
         "--engine", "hbase", "--cells", "1", "--nodes", "3"],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if up.returncode != 0:
        raise RuntimeError(f"bench: cluster up failed: {up.stderr[-2000:]}")
    try:
        started = time.perf_counter()
        cpu_before = _children_cpu()
        done = subprocess.run(
            [sys.executable, "-m", "pyserver", "import", "jsonl", corpus.paths["jsonl"],
             "--cluster", str(folder), "--json", "--quiet", "--jobs", "64"],
            env=_env(), capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        cpu_s = _children_cpu() - cpu_before
        if done.returncode != 0:
            raise RuntimeError(f"bench: the HBase import failed: {done.stderr[-2000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(
            [sys.executable, "-m", "pyserver.cli", "cluster", "down", "--cluster", str(folder)],
            env=_env(), capture_output=True, timeout=600,
        )  # fmt: skip
    return {
        "users": users,
        "messages": report["messages"],
        "seconds": round(seconds, 2),
        "import_hbase_msgs_per_s": round(report["messages"] / seconds),
        # the command's own time, without the interpreter's start (the report's)
        "import_seconds": report["seconds"],
        **_cpu_figures(cpu_s, report["messages"]),
    }


def run(quick: bool = False) -> dict[str, Any]:
    users, per_user = (200, 20) if quick else (10_000, 100)
    mail_users = 40 if quick else 400
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = Path(tmp)
        alone = _alone(root, users, per_user)
        mail = _mail(root, mail_users, 20)
        live = _beside_live(root, max(50, users // 10), per_user, 2.0 if quick else 5.0)
        hbase = None if quick else _hbase(root, 1_000, 20)
    return {
        "import_msgs_per_s": alone["import_msgs_per_s"],
        "import_mail_msgs_per_s": mail["import_mail_msgs_per_s"],
        "live_p99_ratio": live["live_p99_ratio"],
        "import_hbase_msgs_per_s": hbase["import_hbase_msgs_per_s"] if hbase else None,
        "jsonl_alone": alone,
        "mbox_tree_alone": mail,
        "beside_live": live,
        "hbase_cell": hbase,
        "targets": {
            "import_msgs_per_s": 20_000,
            "live_p99_ratio": 2.0,
            "import_hbase_msgs_per_s": 3_000,
        },
    }
