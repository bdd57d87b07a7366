"""`pyserver cluster rollout`: new code through a running cluster, one app server at a time.

For each cell (all, or those named with `--cell`), for each of its app servers
in turn:

1. **drain** it (`pyserver.cluster.tools.drain_node`: marked draining in
   ZooKeeper, it leaves every ring, answers NOT_OWNER naming the next owner for
   `drain_settle_s`, answers what is in flight, snapshots the images it holds so
   their new owners load them warm, leaves the cell and exits); a node that has
   not exited when `--drain-timeout` is over gets SIGTERM, then SIGKILL, and
   the step says so;
2. **start** it again with the command and settings `cluster up` gave it (kept in
   `cluster.json`), on the new code: `--code DIR` runs the `pyserver` package of
   that source tree (default: the code this command runs), and `--version LABEL`
   is the release label the node reports (its /health and `pyserver_info`);
3. **wait** until it serves: its ready file, then its /health says "ok" with the
   new label, it is active in ZooKeeper, and the ring it sees holds the cell's
   nodes, so it owns its share again;

then the next. A node that does not come back (exits while starting, or is not
healthy within `--start-timeout`) stops the rollout: the report names it, says
why (with the end of its log), and the nodes after it keep running the old code.
The state file is updated after each node (its new pid and addresses), under
the folder's lock. A cell of a single node is refused: its users would have no
owner while it restarts.

This module starts processes as the launcher does (`pyserver.processes.launcher`)
and reads and changes the cluster's state through `pyserver.cluster.state`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyserver.cluster.state import NoCluster, active_nodes, read_state, update_state
from pyserver.cluster.tools import drain_node
from pyserver.cluster.zk import ZooKeeper
from pyserver.processes.launcher import (
    LaunchError,
    _public,
    _spawn,
    _wait_ready,
    _zookeeper_identity,
    alive,
)
from pyserver.tls import TierTls

__all__ = ["NodeStep", "RolloutError", "add_actions", "cluster_rollout"]


class RolloutError(Exception):
    """The rollout stopped; `steps` says what was done, the message what went wrong."""

    def __init__(self, message: str, steps: list[NodeStep]) -> None:
        super().__init__(message)
        self.steps = steps


@dataclass
class NodeStep:
    """What happened to one app server."""

    node: str
    cell: str
    old_pid: int
    new_pid: int = 0
    drain_s: float = 0.0  # from the drain's start to the old process's exit
    start_s: float = 0.0  # from the new process's start until it serves its share
    forced: str = ""  # "SIGTERM"/"SIGKILL" when the drain did not end it in time
    ok: bool = False
    error: str = ""


# ---- one node ----


def _session(state: dict[str, Any]) -> ZooKeeper:
    return ZooKeeper(
        state["zookeeper"],
        chroot=state["chroot"],
        session_timeout_s=10.0,
        call_timeout_s=5.0,
        **_zookeeper_identity(state.get("zookeeper_acl")),
    )


async def _drain(state: dict[str, Any], cell: str, node_id: str) -> bool:
    """Mark the node draining in ZooKeeper; False if it is not registered."""
    zk = _session(state)
    await zk.start(10.0)
    try:
        await drain_node(zk, cell, node_id)
        return True
    except LookupError:
        return False
    finally:
        await zk.close()


async def _active(state: dict[str, Any], cell: str) -> set[str]:
    zk = _session(state)
    await zk.start(10.0)
    try:
        return await active_nodes(zk, cell)
    finally:
        await zk.close()


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        _reap(pid)
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    # not our child (started by `cluster up`): init reaps it
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop_old(
    state: dict[str, Any], entry: dict[str, Any], step: NodeStep, timeout_s: float
) -> None:
    """Drain the node and wait for its process to end (forcing it after `timeout_s`)."""
    started = time.monotonic()
    pid = entry["pid"]
    if alive(pid):
        if not asyncio.run(_drain(state, entry["cell"], entry["node"])):
            os.kill(pid, signal.SIGTERM)  # not registered (fenced, starting): its own drain
        if not _wait_exit(pid, timeout_s):
            step.forced = "SIGTERM"
            os.kill(pid, signal.SIGTERM)
            if not _wait_exit(pid, 10.0):
                step.forced = "SIGKILL"
                os.kill(pid, signal.SIGKILL)
                _wait_exit(pid, 10.0)
    step.drain_s = time.monotonic() - started


def _health(address: str, tls: ssl.SSLContext | None) -> dict[str, Any]:
    scheme = "https" if tls is not None else "http"
    try:
        with urllib.request.urlopen(  # nosec B310 (our own node's /health on loopback)
            f"{scheme}://{address}/health", timeout=2.0, context=tls
        ) as reply:
            return dict(json.loads(reply.read()))
    except OSError as error:
        if hasattr(error, "read"):  # an HTTP error status: the body is the health report
            try:
                return dict(json.loads(error.read()))
            except ValueError:
                pass
        return {"status": f"unreachable: {error}"}
    except ValueError as error:
        return {"status": f"unreadable: {error}"}


def _wait_serving(
    state: dict[str, Any],
    entry: dict[str, Any],
    peers: set[str],
    release: str,
    deadline: float,
) -> None:
    """Until the node is healthy on the new release, active in ZooKeeper, and sees `peers`
    and itself in its ring; LaunchError once `deadline` passes."""
    tls = TierTls(**state["tls"]).client_context() if state.get("tls") else None
    node_id = entry["node"]
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not alive(entry["pid"]):
            raise LaunchError(f"{node_id} exited after it started:\n{_tail(entry)}")
        health = _health(entry["metrics"], tls) if entry.get("metrics") else {"status": "ok"}
        ring = set(health.get("ring", ()))
        if (
            health.get("status") == "ok"
            and (not release or health.get("release") == release)
            and (not entry.get("metrics") or peers | {node_id} <= ring)
            and node_id in asyncio.run(_active(state, entry["cell"]))
        ):
            return
        time.sleep(0.1)
    raise LaunchError(f"{node_id} did not serve its share in time; its /health: {health}")


def _tail(entry: dict[str, Any], lines: int = 15) -> str:
    try:
        text = Path(entry["log"]).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _start_new(
    folder: Path,
    state: dict[str, Any],
    entry: dict[str, Any],
    peers: set[str],
    release: str,
    code: Path | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Start the node again on the new code; its new entry once it serves its share."""
    env = dict(entry.get("env") or {})
    if release:
        env["PYSERVER_RELEASE"] = release
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(code.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    deadline = time.monotonic() + timeout_s
    # `python -m` imports from its working folder first: the new code's, with --code
    new = _spawn(
        folder, {}, entry["name"], "node", list(entry["args"]), env,
        cwd=code.resolve() if code is not None else None, cell=entry["cell"], node=entry["node"],
    )  # fmt: skip
    _wait_ready([new], timeout_s)
    _wait_serving(state, new, peers, release, deadline)
    return new


# ---- the rollout ----


def _plan(state: dict[str, Any], cells: list[str] | None) -> list[tuple[str, list[dict[str, Any]]]]:
    nodes = [p for p in state["processes"] if p["role"] == "node"]
    missing = [p["name"] for p in nodes if "args" not in p]
    if missing:
        raise LaunchError(
            f"the state file does not say how {', '.join(missing)} were started "
            "(a cluster up before rollouts existed): `cluster down` and `up` it once"
        )
    names = sorted({p["cell"] for p in nodes})
    unknown = sorted(set(cells or ()) - set(names))
    if unknown:
        raise LaunchError(f"no cell {', '.join(unknown)} in this cluster (it has {names})")
    plan = []
    for cell in cells or names:
        members = sorted((p for p in nodes if p["cell"] == cell), key=lambda p: p["name"])
        if len(members) < 2:
            raise LaunchError(f"cell {cell} has one app server: its users would have no owner")
        plan.append((cell, members))
    return plan


def cluster_rollout(
    folder: Path,
    *,
    cells: list[str] | None = None,
    release: str = "",
    code: Path | None = None,
    drain_timeout_s: float = 60.0,
    start_timeout_s: float = 120.0,
    say: Callable[[str], object] = print,
) -> list[NodeStep]:
    """Restart every app server of `cells` (default all) in turn (module docstring); the
    steps, or RolloutError (with the steps done) once a node does not come back."""
    if code is not None and not (code / "pyserver" / "__init__.py").exists():
        raise LaunchError(f"--code {code}: no pyserver package there")
    folder = folder.resolve()  # the new processes may start in another folder (--code)
    state = read_state(folder)
    steps: list[NodeStep] = []
    for cell, members in _plan(state, cells):
        cell_nodes = {p["node"] for p in members}
        for entry in members:
            step = NodeStep(entry["node"], cell, entry["pid"])
            steps.append(step)
            say(f"{cell} {entry['node']}: draining (pid {entry['pid']})")
            _stop_old(state, entry, step, drain_timeout_s)
            say(f"{cell} {entry['node']}: stopped after {step.drain_s:.1f} s"
                + (f" ({step.forced})" if step.forced else "") + "; starting")  # fmt: skip
            started = time.monotonic()
            try:
                new = _start_new(
                    folder, state, entry, cell_nodes - {entry["node"]}, release, code,
                    start_timeout_s,
                )  # fmt: skip
            except LaunchError as error:
                step.error = str(error)
                step.start_s = time.monotonic() - started
                raise RolloutError(
                    f"{entry['node']} of {cell} did not come back; rollout stopped "
                    f"({sum(s.ok for s in steps)} of the nodes done): {error}",
                    steps,
                ) from None
            step.start_s = time.monotonic() - started
            step.new_pid = new["pid"]
            step.ok = True
            public = _public(new)

            def replace(state: dict[str, Any], public: dict[str, Any] = public) -> None:
                state["processes"] = [
                    public if p["name"] == public["name"] else p for p in state["processes"]
                ]
                if release:
                    state["release"] = release

            state = update_state(folder, replace)
            say(f"{cell} {entry['node']}: serving again (pid {new['pid']}) "
                f"after {step.start_s:.1f} s")  # fmt: skip
    return steps


# ---- the command line ----


def _rollout_command(args: argparse.Namespace) -> int:
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    say = (lambda _line: None) if args.json else print
    try:
        steps = cluster_rollout(
            args.dir,
            cells=args.cell or None,
            release=args.version or "",
            code=args.code,
            drain_timeout_s=args.drain_timeout,
            start_timeout_s=args.start_timeout,
            say=say,
        )
    except RolloutError as error:
        if args.json:
            print(json.dumps({"ok": False, "error": str(error),
                              "steps": [asdict(s) for s in error.steps]}))  # fmt: skip
        print(f"pyserver cluster rollout: {error}", file=sys.stderr)
        return 2
    except (LaunchError, NoCluster) as error:
        print(f"pyserver cluster rollout: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "steps": [asdict(s) for s in steps]}))
    else:
        print(f"rolled {len(steps)} app servers" + (f" to {args.version}" if args.version else ""))
    return 0


def add_actions(action: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `rollout` to `pyserver cluster` (`action(name, help)` makes a sub-command that
    names the cluster's folder)."""
    rollout = action("rollout", "restart the app servers one at a time on new code, drained")
    rollout.add_argument("--cell", action="append", help="only this cell (repeatable)")
    rollout.add_argument("--version", help="the release label the restarted nodes report")
    rollout.add_argument("--code", type=Path, help="a source tree whose pyserver the nodes run")
    rollout.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds for a node to drain"
    )
    rollout.add_argument(
        "--start-timeout", type=float, default=120.0, help="seconds for it to serve again"
    )
    rollout.add_argument("--json", action="store_true", help="print one JSON object")
    rollout.set_defaults(handler=_rollout_command)
