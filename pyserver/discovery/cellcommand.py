"""`pyserver cell enable|disable|show|evacuate CELL`: an operator's hold on a cell.

* `disable`: discovery places no new user in the cell (its users stay and are
  served); `enable` lets it take new users again. The state is the cell's
  record in ZooKeeper (`pyserver.cluster.state`), which every discovery
  instance follows.
* `show`: the cell's record and its app servers.
* `evacuate`: disables the cell and moves every user it holds to the other
  enabled cells (`pyserver.discovery.evacuate`), `--parallel` at a time and at
  most `--rate` a second, printing its progress; exit status 1 if any user
  could not be moved (run it again to resume).

Each takes the cluster flags of `pyserver.cluster.state` (`--cluster DIR`, or
`--zookeeper/--chroot`); the stores come from the cells' records and the
directory's from the cluster (or `--directory SPEC`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pyserver.cluster.state import (
    ClusterSettings,
    add_cluster_arguments,
    cell_names,
    cell_record,
    cluster_settings,
    node_records,
    set_cell_state,
)
from pyserver.cluster.zk import ZooKeeper
from pyserver.discovery.directory import Directory
from pyserver.discovery.evacuate import EvacuationProgress, evacuate_cell
from pyserver.errors import PyserverError
from pyserver.store.base import Store
from pyserver.store.spec import open_store, parse_store_spec

__all__ = ["add_parser", "open_cell_stores"]


async def _session(settings: ClusterSettings) -> ZooKeeper:
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    zk = settings.session(session_timeout_s=10.0)
    await zk.start(10.0)
    return zk


async def open_cell_stores(
    zk: ZooKeeper, directory_spec: str
) -> tuple[Store, dict[str, Store], list[Store]]:
    """The directory's store and every cell's store (from its record), opened; a store two
    of them name is opened once. The third item lists every store opened (to close)."""
    by_spec: dict[str, Store] = {}

    async def opened(spec: str) -> Store:
        if spec not in by_spec:
            store = open_store(parse_store_spec(spec, Path(".")))
            await store.open()
            by_spec[spec] = store
        return by_spec[spec]

    try:
        directory = await opened(directory_spec)
        stores = {}
        for name in await cell_names(zk):
            spec = (await cell_record(zk, name)).get("store")
            if isinstance(spec, str) and spec:
                stores[name] = await opened(spec)
    except BaseException:
        for store in by_spec.values():
            await store.close()
        raise
    return directory, stores, list(by_spec.values())


async def _set_state(args: argparse.Namespace, state: str) -> int:
    zk = await _session(cluster_settings(args))
    try:
        record = await set_cell_state(zk, args.cell_name, state)
    finally:
        await zk.close()
    if args.json:
        print(json.dumps({"cell": args.cell_name, **record}))
    else:
        print(f"cell {args.cell_name} is {record['state']}")
    return 0


async def _show(args: argparse.Namespace) -> int:
    zk = await _session(cluster_settings(args))
    try:
        record = await cell_record(zk, args.cell_name)
        nodes = await node_records(zk, args.cell_name)
    finally:
        await zk.close()
    report = {
        "cell": args.cell_name,
        **record,
        "nodes": [{"node": n.node_id, "addr": n.addr, "state": n.state} for n in nodes],
    }
    if args.json:
        print(json.dumps(report))
    else:
        state = record.get("state", "enabled")
        print(f"cell {args.cell_name}: {state}, store {record.get('store')}")
        for node in report["nodes"]:
            print(f"  {node['node']:<12} {node['addr']:<22} {node['state']}")
    return 0


class _ProgressLine:
    """Progress on standard error: one line rewritten in place on a terminal, a line every
    few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, progress: EvacuationProgress) -> None:
        done = progress.moved + progress.failed >= progress.total
        if not done and progress.seconds - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = progress.seconds
        left = progress.total - progress.moved - progress.failed
        eta = left / progress.users_per_s if progress.users_per_s else 0.0
        line = (
            f"evacuating {progress.cell}: {progress.moved}/{progress.total} moved, "
            f"{progress.failed} failed, {progress.users_per_s:.0f} users/s, ETA {eta:.0f} s"
        )
        if self.tty:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


async def _evacuate(args: argparse.Namespace) -> int:
    settings = cluster_settings(args)
    zk = await _session(settings)
    opened: list[Store] = []
    try:
        directory_store, stores, opened = await open_cell_stores(zk, settings.directory_store)
        progress = _ProgressLine()
        report = await evacuate_cell(
            zk,
            Directory(directory_store),
            stores,
            args.cell_name,
            targets=[name for name in (args.to or "").split(",") if name],
            parallel=args.parallel,
            rate=args.rate,
            ack_timeout_s=args.ack_timeout,
            on_progress=progress,
        )
        if progress.tty:
            print(file=sys.stderr)
    finally:
        for store in opened:
            await store.close()
        await zk.close()
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        into = ", ".join(f"{n} to {cell}" for cell, n in sorted(report.to.items())) or "none"
        print(
            f"cell {report.cell}: {report.moved} users moved ({into}) in {report.seconds:.1f} s, "
            f"{report.users_per_s:.0f} users/s; {len(report.failed)} left"
        )
        for user, error in sorted(report.failed.items())[:20]:
            print(f"  user {user}: {error}")
    return 0 if not report.failed else 1


def _handler(work: Any) -> Any:
    def handle(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(work(args))
        except (PyserverError, ValueError) as error:
            print(f"pyserver cell: {error}", file=sys.stderr)
            return 1

    return handle


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `cell enable|disable|show|evacuate CELL` to the `pyserver` command line."""
    cell = commands.add_parser("cell", help="enable, disable, show or evacuate a cell")
    actions = cell.add_subparsers(dest="cell_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("cell_name", metavar="CELL", help="the cell")
        add_cluster_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        return sub

    enable = action("enable", "let discovery place new users in the cell")
    enable.set_defaults(handler=_handler(lambda args: _set_state(args, "enabled")))
    disable = action("disable", "place no new user in the cell (its users stay)")
    disable.set_defaults(handler=_handler(lambda args: _set_state(args, "disabled")))
    show = action("show", "the cell's record and app servers")
    show.set_defaults(handler=_handler(_show))
    evacuate = action("evacuate", "disable the cell and move all its users to other cells")
    evacuate.add_argument("--to", help="the target cells, CELL[,CELL...] (default: all enabled)")
    evacuate.add_argument("--parallel", type=int, default=16, help="moves at once (default 16)")
    evacuate.add_argument(
        "--rate", type=float, default=1000.0, help="at most this many moves a second (0: no cap)"
    )
    evacuate.add_argument("--directory", help="the directory's store (sqlite:PATH, hbase:H:P/ns)")
    evacuate.add_argument(
        "--ack-timeout", type=float, default=15.0, help="seconds to wait for the old cell's nodes"
    )
    evacuate.set_defaults(handler=_handler(_evacuate))
    return cell
