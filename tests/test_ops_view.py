"""The operators' views of a running cluster: `pyserver cells`, the web tier's `/ops`, and a
real Prometheus scraping every process with deploy/prometheus.yml.

One cluster (`pyserver cluster up`, 2 cells of 2 app servers on SQLite, with
discovery, user index, dirty, MTA, web and IMAP processes) serves the whole
scenario; the figures are checked against what the test did to it. The
percentile arithmetic is checked on its own first (pure logic).
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import pyserver
from pyserver.discovery.client import connect_to_cluster
from pyserver.ops.figures import Reading, figures, quantile
from pyserver.ops.slowest import slowest
from tests import support

REPO = Path(__file__).resolve().parent.parent


def test_percentiles_and_rates_from_two_readings() -> None:
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.001)
    assert quantile(buckets, 0.9) == pytest.approx(0.01)
    assert quantile(buckets, 0.99) == pytest.approx(0.01 + 0.09 * 0.9)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == 0.1  # all beyond the last bound

    def text(sends: int, errors: int, slow: int, hits: int, misses: int) -> str:
        return (
            "# TYPE pyserver_requests counter\n"
            f'pyserver_requests_total{{op="SEND",code="OK"}} {sends}\n'
            f'pyserver_requests_total{{op="SEND",code="UNAVAILABLE"}} {errors}\n'
            "# TYPE pyserver_request_seconds histogram\n"
            f'pyserver_request_seconds_bucket{{op="SEND",le="0.001"}} {sends + errors - slow}\n'
            f'pyserver_request_seconds_bucket{{op="SEND",le="0.1"}} {sends + errors}\n'
            f'pyserver_request_seconds_bucket{{op="SEND",le="+Inf"}} {sends + errors}\n'
            f'pyserver_request_seconds_count{{op="SEND"}} {sends + errors}\n'
            'pyserver_request_seconds_sum{op="SEND"} 1.0\n'
            "# TYPE pyserver_cache_hits counter\n"
            f"pyserver_cache_hits_total {hits}\n"
            "# TYPE pyserver_cache_misses counter\n"
            f"pyserver_cache_misses_total {misses}\n"
            "# TYPE pyserver_ring_share gauge\npyserver_ring_share 0.25\n"
            "# TYPE pyserver_zookeeper_session gauge\n"
            'pyserver_zookeeper_session{state="connected"} 1.0\n'
            "# TYPE pyserver_info gauge\n"
            'pyserver_info{role="node",version="9.9"} 1.0\n'
        )

    first = Reading.parse(text(100, 0, 0, 10, 10), at=10.0)
    second = Reading.parse(text(300, 10, 210, 100, 10), at=12.0)
    alone = figures(first)
    assert alone["ops_per_s"] is None and alone["requests"] == 100
    assert alone["ops"]["SEND"]["p99_ms"] == pytest.approx(0.99, abs=0.01)
    now = figures(second, first)
    assert now["ops_per_s"] == 105.0 and now["errors_per_s"] == 5.0
    assert now["errors"] == 10 and now["errors_by_code"] == {"UNAVAILABLE": 10}
    # the 210 requests of the window were all slow: the recent p50 says so
    assert now["ops"]["SEND"]["p50_ms"] > 1.0
    assert now["cache_hit_rate"] == 1.0  # 90 hits, no miss in the window
    assert (now["ring_share"], now["zookeeper"], now["version"]) == (0.25, "connected", "9.9")
    with pytest.raises(ValueError):
        Reading.parse("this is { not metrics", at=0.0)


def test_the_slowest_operations_and_store_calls_are_ranked_across_the_cluster() -> None:
    def op(count: int, p99: float | None) -> dict[str, Any]:
        return {"count": count, "p50_ms": 0.5, "p99_ms": p99}

    report = {
        "cells": [
            {
                "cell": "cell-1",
                "nodes": [
                    {"name": "cell-1-n1", "role": "node", "up": True,
                     "ops": {"SEND": op(10, 40.0), "COUNTS": op(5, 2.0), "LIST": op(0, None)},
                     "slowest_store_calls": [{"method": "append", "calls": 10, "p99_ms": 30.0},
                                             {"method": "get_cell", "calls": 0, "p99_ms": None}]},
                    {"name": "cell-1-n2", "role": "node", "up": False, "error": "refused",
                     "ops": {"SEND": op(10, 900.0)}},
                ],
            },
        ],
        "services": [
            {"name": "mta", "role": "mta", "up": True, "ops": {"DATA": op(3, 120.0)},
             "slowest_store_calls": [{"method": "put_blob", "calls": 3, "p99_ms": 55.0}]},
        ],
    }  # fmt: skip
    ranked = slowest(report)
    assert [(e["process"], e["op"], e["p99_ms"]) for e in ranked["operations"]] == [
        ("mta", "DATA", 120.0),
        ("cell-1-n1", "SEND", 40.0),
        ("cell-1-n1", "COUNTS", 2.0),
    ]  # a process that is down, and an operation never called, are left out
    assert ranked["operations"][1]["cell"] == "cell-1" and ranked["operations"][0]["cell"] is None
    assert [(e["process"], e["method"]) for e in ranked["store_calls"]] == [
        ("mta", "put_blob"),
        ("cell-1-n1", "append"),
    ]
    assert len(slowest(report, limit=1)["operations"]) == 1
    assert slowest({"cells": [], "services": []}) == {"operations": [], "store_calls": []}


def _pyserver(*args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyserver.cli", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
        env={**os.environ, "COLUMNS": "220"},
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, auth: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:  # nosec B310 (loopback)
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _wait(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.5)


def test_cells_view_ops_page_and_prometheus_on_a_running_cluster(
    tmp_path: Path, zookeeper: str
) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus is needed (scripts/debian-packages)"
    folder = tmp_path / "cluster"
    up = _pyserver(
        "cluster", "up", "--cluster", str(folder), "--engine", "sqlite", "--cells", "2",
        "--nodes", "2", "--timeout", "150",
    )  # fmt: skip
    scraper: subprocess.Popen[bytes] | None = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((folder / "cluster.json").read_text())
        processes = state["processes"]
        assert all(p.get("metrics") for p in processes), "every process serves /metrics"

        async def traffic() -> None:
            client = await connect_to_cluster(folder)
            try:
                for user in range(1, 21):
                    await client.send(user, [user % 20 + 1], f"hello {user}")
                    await client.list_threads(user)
            finally:
                await client.close()

        support.run(traffic, timeout=120.0)
        # the front ends count what they answer: a mail to nobody refused at RCPT, a web page
        mta = next(p for p in processes if p["role"] == "mta")["address"]
        host, port = mta.rsplit(":", 1)
        with smtplib.SMTP(host, int(port), timeout=30) as smtp:
            smtp.ehlo("test.example")
            smtp.mail("someone@elsewhere.example")
            code, _ = smtp.rcpt("nobody-at-all@nowhere.invalid")
            assert code >= 500
        web_address = next(p for p in processes if p["role"] == "web")["address"]
        for _ in range(3):
            assert _get(f"http://{web_address}/login")[0] == 200
        imap_host, imap_port = next(p for p in processes if p["role"] == "imap")["address"].rsplit(
            ":", 1
        )
        with imaplib.IMAP4(imap_host, int(imap_port), timeout=30) as imap:  # CAPABILITY at once
            assert imap.noop()[0] == "OK"
            with pytest.raises(imaplib.IMAP4.error):
                imap.xatom("XYZZY")  # BAD
        disabled = _pyserver("cell", "disable", "cell-2", "--cluster", str(folder))
        assert disabled.returncode == 0, disabled.stderr

        # ---- pyserver cells --json
        shown = _pyserver("cells", "--cluster", str(folder), "--json", "--interval", "1")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        cells = {cell["cell"]: cell for cell in report["cells"]}
        assert {name: cell["state"] for name, cell in cells.items()} == {
            "cell-1": "enabled",
            "cell-2": "disabled",
        }
        sends = 0
        for cell in cells.values():
            assert [n["name"] for n in cell["nodes"]] == [
                f"{cell['cell']}-n1",
                f"{cell['cell']}-n2",
            ]
            assert sum(n["ring_share"] for n in cell["nodes"]) == pytest.approx(1.0, abs=0.01)
            for node in cell["nodes"]:
                assert node["up"] and node["state"] == "active", node
                assert node["version"] == pyserver.__version__
                assert node["zookeeper"] == "connected" and node["serving"] is True
                assert node["ops_per_s"] is not None  # two readings: a rate
                sends += node["ops"].get("SEND", {}).get("count", 0)
        assert sends >= 20, "every SEND went to an app server"
        assert sum(c["users_cached"] or 0 for c in cells.values()) >= 20
        services = {s["name"]: s for s in report["services"]}
        assert {"discovery-1", "discovery-2", "userindex", "mta", "web", "imap"} <= set(services)
        assert all(s["up"] and s["version"] == pyserver.__version__ for s in services.values())
        lookups = sum(
            s["ops"].get("LOOKUP", {}).get("count", 0)
            for s in services.values()
            if s["role"] == "discovery"
        )
        assert lookups >= 20, "discovery's own metrics count the client's lookups"
        rcpt = services["mta"]["ops"]["SMTP RCPT"]
        assert rcpt["count"] >= 1 and rcpt["p99_ms"] is not None
        assert services["mta"]["errors_by_code"].get("SMTP_5XX", 0) >= 1
        assert services["web"]["ops"]["GET /login"]["count"] >= 3
        assert services["imap"]["ops"]["IMAP NOOP"]["count"] >= 1
        assert services["imap"]["errors_by_code"].get("IMAP_BAD", 0) >= 1
        # where the time goes: the slowest operations and store calls, across the cluster
        ranked = report["slowest"]
        assert ranked["operations"] and ranked["store_calls"]
        p99s = [entry["p99_ms"] for entry in ranked["operations"]]
        assert p99s == sorted(p99s, reverse=True) and p99s[0] > 0
        every_op = {
            (process["name"], op)
            for process in [*(n for c in cells.values() for n in c["nodes"]), *services.values()]
            for op, values in process.get("ops", {}).items()
            if values["count"]
        }
        assert {(e["process"], e["op"]) for e in ranked["operations"]} <= every_op
        assert any(e["role"] == "node" and e["op"] == "SEND" for e in ranked["operations"]) or (
            len(ranked["operations"]) == 10
        )
        assert all(e["calls"] > 0 and e["p99_ms"] > 0 for e in ranked["store_calls"])
        assert any(e["role"] == "node" for e in ranked["store_calls"])

        # ---- from ZooKeeper alone (no folder): the cells and their nodes, no services
        alone = _pyserver(
            "cells", "--zookeeper", state["zookeeper"], "--chroot", state["chroot"],
            "--json", "--interval", "0",
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr
        found = json.loads(alone.stdout)
        assert found["services"] == [] and found["cluster"] is None
        assert sorted(n["name"] for c in found["cells"] for n in c["nodes"] if n["up"]) == [
            "cell-1-n1", "cell-1-n2", "cell-2-n1", "cell-2-n2",
        ]  # fmt: skip

        # ---- pyserver cells --once: the tables
        once = _pyserver("cells", "--cluster", str(folder), "--once", "--interval", "0")
        assert once.returncode == 0, once.stderr
        for text in ("cell-1", "cell-2", "disabled", "cell-2-n2", "discovery-1", "connected",
                     "slowest operations", "slowest store calls"):  # fmt: skip
            assert text in once.stdout, (text, once.stdout)

        # ---- /ops on the web tier: operators only
        web = next(p for p in processes if p["role"] == "web")["address"]
        key = Path(state["service_key_file"]).read_text().split()[0]
        status, _, headers = _get(f"http://{web}/ops")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert _get(f"http://{web}/ops.json", "Bearer not-the-key")[0] == 401
        status, body, _ = _get(f"http://{web}/ops", f"Bearer {key}")
        page = body.decode()
        assert status == 200
        for name in ("cell-1-n1", "cell-1-n2", "cell-2-n1", "cell-2-n2"):
            assert f'data-node="{name}"' in page
        assert 'class="state disabled"' in page and 'data-service="discovery-1"' in page
        assert "slowest operations" in page and 'data-slow-op="' in page
        assert 'data-slow-call="cell-' in page  # an app server's store call
        basic = base64.b64encode(f"ops:{key}".encode()).decode()
        status, body, _ = _get(f"http://{web}/ops.json", f"Basic {basic}")
        assert status == 200 and len(json.loads(body)["cells"]) == 2

        # ---- a real Prometheus with deploy/prometheus.yml scrapes every process
        scrape = tmp_path / "prometheus"
        scrape.mkdir()
        shutil.copy(REPO / "deploy" / "prometheus.yml", scrape / "prometheus.yml")
        written = _pyserver(
            "cells", "--cluster", str(folder), "--prometheus-targets",
            str(scrape / "pyserver-targets.json"),
        )  # fmt: skip
        assert written.returncode == 0, written.stderr
        groups = json.loads((scrape / "pyserver-targets.json").read_text())
        assert len(groups) == len(processes)
        port = _free_port()
        log = (scrape / "prometheus.log").open("wb")
        scraper = subprocess.Popen(  # nosec B603
            [
                prometheus,
                f"--config.file={scrape / 'prometheus.yml'}",
                f"--storage.tsdb.path={scrape / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{port}/api/v1"

        def all_up() -> list[dict[str, Any]] | None:
            if scraper.poll() is not None:
                raise AssertionError((scrape / "prometheus.log").read_text()[-2000:])
            try:
                status, body, _ = _get(f"{api}/targets")
            except OSError:
                return None
            if status != 200:
                return None
            active = json.loads(body)["data"]["activeTargets"]
            healthy = len(active) == len(groups) and all(t["health"] == "up" for t in active)
            return active if healthy else None

        active = _wait(all_up, 90, "Prometheus scrapes every target, all up")
        assert {t["labels"]["instance_name"] for t in active} == {p["name"] for p in processes}

        # every query of the shipped Grafana dashboard runs on those series
        dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                query = urllib.parse.urlencode({"query": expr})
                status, body, _ = _get(f"{api}/query?{query}")
                assert status == 200 and json.loads(body)["status"] == "success", (expr, body)

        def series(expr: str) -> list[dict[str, Any]]:
            _, body, _ = _get(f"{api}/query?{urllib.parse.urlencode({'query': expr})}")
            return json.loads(body)["data"]["result"]

        ups = series('up{job="pyserver"}')
        assert len(ups) == len(processes) and all(s["value"][1] == "1" for s in ups)
        shares = _wait(lambda: series("pyserver_ring_share"), 30, "ring shares scraped")
        assert {s["metric"]["node"] for s in shares} == {
            p["node"] for p in processes if p["role"] == "node"
        }
    finally:
        if scraper is not None:
            scraper.terminate()
            try:
                scraper.wait(timeout=20)
            except subprocess.TimeoutExpired:
                scraper.kill()
                scraper.wait()
        _pyserver("cluster", "down", "--cluster", str(folder), "--purge", "--grace", "10")
