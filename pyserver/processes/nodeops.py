"""`pyserver node add|remove`: app servers in and out of a running cluster's cell.

* `add --cluster DIR --cell CELL [--node-id ID]` starts one more app server in the
  cell, with the command and settings of the cell's others (kept in
  `cluster.json` by `cluster up`) under a new id (default the next
  `<cell>-n<k>`), and returns once it serves its share: its /health says "ok",
  it is active in ZooKeeper and the ring it sees holds the cell's nodes. The
  ring gives it about 1/N of the cell's users; their old owners see the new ring
  and drop them, and clients re-route on NOT_OWNER.
* `remove --cluster DIR --node ID` drains the node first (`drain_node`: it leaves
  every ring, drops its cached images after snapshotting every one ahead of its
  last snapshot, so each user's new owner loads a current snapshot and replays
  nothing, answers NOT_OWNER while clients re-route, then exits), waits for it to
  exit, and takes it out of `cluster.json`. The last node of a cell is refused:
  its users would have no owner.

Both change the state file under its lock (`pyserver.cluster.state.update_state`).
Processes start as the launcher starts them; the waiting is the rollout's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pyserver.cluster.state import NoCluster, read_state, update_state
from pyserver.processes.launcher import LaunchError, _public, _spawn, _wait_ready, alive
from pyserver.processes.rollout import NodeStep, _stop_old, _wait_serving

__all__ = ["add_node", "add_node_actions", "remove_node"]


def _cell_nodes(state: dict[str, Any], cell: str) -> list[dict[str, Any]]:
    return [p for p in state["processes"] if p["role"] == "node" and p["cell"] == cell]


def add_node(
    folder: Path, cell: str, node_id: str | None = None, *, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Start a new app server in `cell` (module docstring); its state entry once it serves."""
    folder = folder.resolve()
    state = read_state(folder)
    if cell not in state["cells"]:
        raise LaunchError(f"no cell {cell} in this cluster (it has {sorted(state['cells'])})")
    members = _cell_nodes(state, cell)
    template = next((p for p in members if "args" in p), None)
    if template is None:
        raise LaunchError(f"no app server of {cell} says how it was started: add needs one")
    taken = {p["name"] for p in state["processes"]}
    if node_id is None:
        free = (f"{cell}-n{k}" for k in range(1, len(taken) + 2))
        node_id = next(name for name in free if name not in taken)
    elif node_id in taken:
        raise LaunchError(f"{node_id} is already a process of this cluster")
    args = list(template["args"])
    args[args.index("--node-id") + 1] = node_id
    peers = {p["node"] for p in members if alive(p["pid"])}
    deadline = time.monotonic() + timeout_s
    new = _spawn(folder, {}, node_id, "node", args, dict(template.get("env") or {}),
                 cell=cell, node=node_id)  # fmt: skip
    try:
        _wait_ready([new], timeout_s)
        _wait_serving(state, new, peers, "", deadline)
    except LaunchError:
        if alive(new["pid"]):
            new["_process"].kill()
        raise
    entry = _public(new)
    update_state(folder, lambda state: state["processes"].append(entry))
    return entry


def remove_node(folder: Path, node_id: str, *, timeout_s: float = 60.0) -> NodeStep:
    """Drain the app server, wait for it to exit, forget it (module docstring)."""
    folder = folder.resolve()
    state = read_state(folder)
    entry = next(
        (p for p in state["processes"] if p["role"] == "node" and p["node"] == node_id), None
    )
    if entry is None:
        raise LaunchError(f"no app server {node_id} in this cluster")
    others = [p for p in _cell_nodes(state, entry["cell"]) if p is not entry and alive(p["pid"])]
    if not others:
        raise LaunchError(f"{node_id} is the last app server of {entry['cell']}: add one first")
    step = NodeStep(node_id, entry["cell"], entry["pid"])
    _stop_old(state, entry, step, timeout_s)
    step.ok = not step.forced

    def forget(state: dict[str, Any]) -> None:
        state["processes"] = [p for p in state["processes"] if p["name"] != entry["name"]]

    update_state(folder, forget)
    return step


# ---- the command line (`pyserver node add|remove`, beside `pyserver node` itself) ----


def node_action(args: argparse.Namespace) -> int:
    """`pyserver node add|remove` (the `node` command with an action)."""
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    if args.cluster is None:
        print("pyserver node: add and remove need --cluster DIR", file=sys.stderr)
        return 1
    try:
        if args.action == "add":
            if not args.cell:
                print("pyserver node add: --cell CELL is required", file=sys.stderr)
                return 1
            entry = add_node(args.cluster, args.cell, args.node_id, timeout_s=args.timeout)
            report: dict[str, Any] = {"added": entry["node"], "cell": entry["cell"],
                                      "addr": entry["address"], "pid": entry["pid"]}  # fmt: skip
            text = f"{entry['node']} serves in {entry['cell']} at {entry['address']}"
        else:
            if not args.node_id:
                print("pyserver node remove: --node-id ID is required", file=sys.stderr)
                return 1
            step = remove_node(args.cluster, args.node_id, timeout_s=args.timeout)
            report = {"removed": step.node, "cell": step.cell, "drain_s": step.drain_s,
                      "forced": step.forced}  # fmt: skip
            text = f"{step.node} drained and left {step.cell} after {step.drain_s:.1f} s" + (
                f" ({step.forced}: it did not drain in time)" if step.forced else ""
            )
    except (LaunchError, NoCluster) as error:
        print(f"pyserver node {args.action}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else text)
    return 0 if not report.get("forced") else 2


def add_node_actions(node: argparse.ArgumentParser) -> None:
    """Give `pyserver node` its `add|remove` actions (without one it runs an app server)."""
    node.add_argument(
        "action", nargs="?", choices=("add", "remove"),
        help="add or remove an app server of a running cluster (--cluster DIR); "
        "without it: run one",
    )  # fmt: skip
    node.add_argument(
        "--cluster", type=Path, metavar="DIR",
        help="the cluster (`pyserver cluster up` folder): for add|remove, or to run one more app "
        "server of --cell with its peers' settings",
    )  # fmt: skip
    node.add_argument("--timeout", type=float, default=120.0, help="for add|remove: seconds")
    node.add_argument("--json", action="store_true", help="for add|remove: one JSON object")
