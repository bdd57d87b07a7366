"""`pyserver cells`: the survey of a cluster (`pyserver.ops.survey`) at a terminal, live
with `rich`, once, or as one JSON object.

`--prometheus-targets FILE` writes the cluster's scrape targets for a Prometheus
server instead (`pyserver.ops.prometheus`). Without `--json` or `--once` the
view redraws every `--interval` seconds until Ctrl-C; rates (ops/s, errors/s)
and recent percentiles are over the last
interval. `--json` and `--once` survey twice, `--interval` apart, and report the
second survey (so rates are there); `--interval 0` surveys once (no rates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pyserver.cluster.state import add_cluster_arguments, cluster_settings, read_state
from pyserver.ops.prometheus import target_groups, write_targets
from pyserver.ops.survey import Surveyor, find_targets

__all__ = ["add_parser", "render"]


def _number(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _latency(entry: dict[str, Any]) -> str:
    return f"{_number(entry.get('p50_ms'), 2)}/{_number(entry.get('p99_ms'), 2)}"


def _busiest(ops: dict[str, dict[str, Any]], limit: int = 3) -> str:
    ranked = sorted(
        ops.items(), key=lambda item: (-(item[1].get("per_s") or 0.0), -item[1]["count"])
    )
    return "  ".join(f"{op} {_latency(values)}" for op, values in ranked[:limit] if values["count"])


def _up(entry: dict[str, Any]) -> Text:
    return Text("up", style="green") if entry["up"] else Text("DOWN", style="bold red")


def render(report: dict[str, Any]) -> Group:
    """The survey as rich tables: one per cell, one for the services."""
    when = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    where = report.get("cluster") or f"{report['zookeeper']}{report['chroot']}"
    parts: list[Any] = [Text(f"pyserver cells — {where} — {when}", style="bold")]
    for cell in report["cells"]:
        state_style = "green" if cell["state"] == "enabled" else "yellow"
        title = Text.assemble(
            (cell["cell"], "bold"), " ", (cell["state"], state_style),
            f"  {cell['nodes_up']}/{len(cell['nodes'])} nodes up,"
            f" {_number(cell['ops_per_s'])} ops/s, {cell['errors']} errors",
        )  # fmt: skip
        table = Table(title=title, title_justify="left", expand=False)
        for column in (
            "node", "state", "", "version", "ring", "users", "ops/s", "errors",
            "hit rate", "store p50/p99 ms", "ZooKeeper", "ops p50/p99 ms",
        ):  # fmt: skip
            table.add_column(column, no_wrap=column != "ops p50/p99 ms")
        for node in cell["nodes"]:
            share = node.get("ring_share")
            table.add_row(
                node["name"],
                node.get("state") or "-",
                _up(node),
                node.get("version") or "-",
                "-" if share is None else f"{share * 100:.0f}%",
                _number(node.get("users_cached")),
                _number(node.get("ops_per_s")),
                _number(node.get("errors")),
                "-" if node.get("cache_hit_rate") is None else f"{node['cache_hit_rate']:.0%}",
                f"{_number(node.get('store_p50_ms'), 2)}/{_number(node.get('store_p99_ms'), 2)}",
                node.get("zookeeper") or "-",
                _busiest(node.get("ops", {})) if node["up"] else node.get("error", ""),
            )
        parts.append(table)
    services = Table(title=Text("services", style="bold"), title_justify="left")
    for column in ("name", "role", "", "version", "ops/s", "errors", "ops p50/p99 ms"):
        services.add_column(column)
    for service in report["services"]:
        services.add_row(
            service["name"],
            service["role"],
            _up(service),
            service.get("version") or "-",
            _number(service.get("ops_per_s")),
            _number(service.get("errors")),
            _busiest(service.get("ops", {})) if service["up"] else service.get("error", ""),
        )
    if report["services"]:
        parts.append(services)
    parts += _slowest_tables(report.get("slowest") or {})
    return Group(*parts)


def _slowest_tables(ranked: dict[str, list[dict[str, Any]]]) -> list[Table]:
    """Where the time goes: the slowest operations and store calls of the cluster."""
    tables = []
    for key, title, name, count in (
        ("operations", "slowest operations", "op", "count"),
        ("store_calls", "slowest store calls", "method", "calls"),
    ):
        if not ranked.get(key):
            continue
        table = Table(title=Text(title, style="bold"), title_justify="left")
        for column in (name, "process", "cell", count, "p50/p99 ms" if name == "op" else "p99 ms"):
            table.add_column(column)
        for entry in ranked[key]:
            table.add_row(
                entry[name],
                str(entry.get("process")),
                entry.get("cell") or "-",
                _number(entry.get(count)),
                _latency(entry) if name == "op" else _number(entry.get("p99_ms"), 2),
            )
        tables.append(table)
    return tables


async def _surveys(args: argparse.Namespace) -> int:
    settings = cluster_settings(args)
    folder = Path(args.cluster) if args.cluster else None
    async with Surveyor(settings, folder) as surveyor:
        if args.prometheus_targets:
            assert surveyor.zk is not None
            state = read_state(folder) if folder is not None else None
            _, targets = await find_targets(surveyor.zk, state)
            groups = target_groups(targets, tls=bool(state and state.get("tls")))
            write_targets(Path(args.prometheus_targets), groups)
            print(f"{len(groups)} scrape targets written to {args.prometheus_targets}")
            return 0
        if args.json or args.once:
            report = await surveyor.survey()
            if args.interval > 0:
                await asyncio.sleep(args.interval)
                report = await surveyor.survey()
            if args.json:
                print(json.dumps(report))
            else:
                Console().print(render(report))
            return 0
        console = Console()
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                live.update(render(await surveyor.survey()), refresh=True)
                await asyncio.sleep(max(args.interval, 0.2))


def _run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_surveys(args))
    except KeyboardInterrupt:
        return 0
    except (OSError, TimeoutError) as error:
        print(f"pyserver cells: {error}", file=sys.stderr)
        return 1


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `cells` to the `pyserver` command line."""
    cells = commands.add_parser(
        "cells", help="every cell, node and service with its figures (live, --once or --json)"
    )
    add_cluster_arguments(cells)
    cells.add_argument("--json", action="store_true", help="print one JSON object and exit")
    cells.add_argument("--once", action="store_true", help="print the tables once and exit")
    cells.add_argument(
        "--interval", type=float, default=2.0, help="seconds between surveys (default 2)"
    )
    cells.add_argument(
        "--prometheus-targets",
        metavar="FILE",
        help="write the scrape targets for deploy/prometheus.yml (file_sd JSON) and exit",
    )
    cells.set_defaults(handler=_run)
    return cells
