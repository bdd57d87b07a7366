"""The slowest operations and store calls of a whole cluster, from a survey.

Each process of a survey (`pyserver.ops.survey`) carries its own figures: per
operation its count and p50/p99 (`ops`), and per store method its calls and p99
(`slowest_store_calls`), all from its Prometheus histograms
(`pyserver_request_seconds`, `pyserver_store_seconds`) over the last interval, or
over its life when it was idle in it. `slowest(report)` ranks them across every
app server and service that is up: the operations (of any process) and the store
calls (of any process that reads or writes a store) with the highest p99 first,
each with the process, its role and cell, so an operator sees at once where the
time goes and on which machine. The ops page, `pyserver cells` and its `--json`
show the result.

Pure: it reads a survey's dictionaries and imports nothing of pyserver.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["LIMIT", "slowest"]

# entries in each ranking
LIMIT = 10


def _processes(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for cell in report.get("cells", []):
        for node in cell.get("nodes", []):
            yield {**node, "cell": node.get("cell") or cell.get("cell")}
    yield from report.get("services", [])


def slowest(report: dict[str, Any], limit: int = LIMIT) -> dict[str, list[dict[str, Any]]]:
    """`{"operations": [...], "store_calls": [...]}`, each the `limit` slowest by p99 (module
    docstring). An operation: process, role, cell, op, count, p50_ms, p99_ms; a store call:
    process, role, cell, method, calls, p99_ms."""
    operations: list[dict[str, Any]] = []
    store_calls: list[dict[str, Any]] = []
    for process in _processes(report):
        if not process.get("up"):
            continue
        where = {
            "process": process.get("name"),
            "role": process.get("role"),
            "cell": process.get("cell"),
        }
        for op, figures in (process.get("ops") or {}).items():
            if figures.get("count") and figures.get("p99_ms") is not None:
                operations.append(
                    {
                        **where,
                        "op": op,
                        "count": figures["count"],
                        "p50_ms": figures.get("p50_ms"),
                        "p99_ms": figures["p99_ms"],
                    }
                )
        for call in process.get("slowest_store_calls") or []:
            if call.get("calls") and call.get("p99_ms") is not None:
                store_calls.append(
                    {
                        **where,
                        "method": call["method"],
                        "calls": call["calls"],
                        "p99_ms": call["p99_ms"],
                    }
                )

    def rank(entry: dict[str, Any]) -> tuple[float, str, str]:
        name = entry.get("op") or entry.get("method") or ""
        return (-entry["p99_ms"], str(entry.get("process")), name)

    return {
        "operations": sorted(operations, key=rank)[:limit],
        "store_calls": sorted(store_calls, key=rank)[:limit],
    }
