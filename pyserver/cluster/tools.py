"""`pyserver admin drain` and `pyserver admin nodes`: a cell's app servers, seen in ZooKeeper.

`drain --node ID` marks the node draining in its ephemeral record; the node
sees it, hands its users over and exits (pyserver.processes.node). With `--wait`
(the default) the command returns once the node has left the cell. `nodes`
lists the cell's registered nodes with their address, tokens and state.
ZooKeeper's address, the chroot and the cell come from the flags, else from
the `--cluster` folder, else from the configuration (`pyserver.cluster.state`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pyserver.cluster import layout
from pyserver.cluster.layout import NodeRecord
from pyserver.cluster.state import add_cluster_arguments, cluster_settings
from pyserver.cluster.zk import BadVersion, NoNode, ZooKeeper

__all__ = ["add_admin_actions", "drain_node", "list_nodes"]


async def drain_node(zk: ZooKeeper, cell: str, node_id: str) -> NodeRecord:
    """Mark the node draining (read, modify, write at that version); LookupError if absent."""
    path = layout.node_path(cell, node_id)
    while True:
        try:
            data, stat = await zk.get(path)
        except NoNode:
            raise LookupError(f"no node {node_id} in cell {cell}") from None
        record = NodeRecord.from_bytes(node_id, data)
        if record.state == "draining":
            return record
        draining = NodeRecord(record.node_id, record.addr, record.tokens, "draining", record.data)
        try:
            await zk.set_data(path, draining.to_bytes(), stat.version)
        except BadVersion:
            continue  # changed meanwhile: read again
        except NoNode:
            raise LookupError(f"node {node_id} left cell {cell}") from None
        return draining


async def wait_gone(zk: ZooKeeper, cell: str, node_id: str, timeout_s: float) -> bool:
    """True once the node has left the cell, False if it is still there after timeout_s."""
    path = layout.node_path(cell, node_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await zk.exists(path):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def list_nodes(zk: ZooKeeper, cell: str) -> dict[str, Any]:
    """The cell's state and every registered node's record (unreadable ones as errors)."""
    try:
        data, _ = await zk.get(layout.cell_path(cell))
    except NoNode:
        return {"cell": cell, "state": "missing", "nodes": {}}
    nodes: dict[str, Any] = {}
    try:
        children = await zk.get_children(layout.nodes_path(cell))
    except NoNode:
        children = []
    for node_id in sorted(children):
        try:
            raw, _ = await zk.get(layout.node_path(cell, node_id))
            record = NodeRecord.from_bytes(node_id, raw)
            nodes[node_id] = {"addr": record.addr, "tokens": record.tokens, "state": record.state}
        except NoNode:
            continue
        except ValueError as error:
            nodes[node_id] = {"error": str(error)}
    return {"cell": cell, "state": layout.parse_cell_state(data), "nodes": nodes}


# ---- the command line ----


def _with_zookeeper(
    args: argparse.Namespace, work: Callable[[ZooKeeper, str], Awaitable[int]]
) -> int:
    settings = cluster_settings(args)
    logging.getLogger("aiozk").setLevel(logging.ERROR)  # it logs each reconnection attempt

    async def run() -> int:
        zk = settings.session(session_timeout_s=10.0, call_timeout_s=5.0)
        await zk.start(10.0)
        try:
            return await work(zk, settings.cell)
        finally:
            await zk.close()

    return asyncio.run(run())


def _drain_command(args: argparse.Namespace) -> int:
    async def work(zk: ZooKeeper, cell: str) -> int:
        try:
            record = await drain_node(zk, cell, args.node)
        except LookupError as error:
            print(f"pyserver: {error}", file=sys.stderr)
            return 1
        print(f"node {record.node_id} ({record.addr}) of cell {cell} is draining")
        if args.wait <= 0:
            return 0
        if await wait_gone(zk, cell, args.node, args.wait):
            print(f"node {record.node_id} has left cell {cell}")
            return 0
        print(f"pyserver: node {args.node} still registered after {args.wait:g} s", file=sys.stderr)
        return 1

    return _with_zookeeper(args, work)


def _nodes_command(args: argparse.Namespace) -> int:
    async def work(zk: ZooKeeper, cell: str) -> int:
        report = await list_nodes(zk, cell)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"cell {report['cell']}: {report['state']}")
        for node_id, node in report["nodes"].items():
            if "error" in node:
                print(f"  {node_id:<16} {node['error']}")
            else:
                print(
                    f"  {node_id:<16} {node['addr']:<22} {node['state']:<9} {node['tokens']} tokens"
                )
        return 0

    return _with_zookeeper(args, work)


def add_admin_actions(actions: Any) -> None:
    """Add `drain` and `nodes` to `pyserver admin`."""

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        add_cluster_arguments(sub, cell=True)
        return sub

    drain = action("drain", "drain an app server: hand its users over, then it exits")
    drain.add_argument("--node", required=True, help="the node id")
    drain.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for it to leave (0: do not)"
    )
    drain.set_defaults(handler=_drain_command)
    nodes = action("nodes", "list a cell's app servers as ZooKeeper has them")
    nodes.add_argument("--json", action="store_true", help="print one JSON object")
    nodes.set_defaults(handler=_nodes_command)
