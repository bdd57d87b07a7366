"""A cluster's state, in one place: the launcher's `cluster.json`, the cells' records in
ZooKeeper, and how a command names a cluster.

* **The folder's state file.** `pyserver cluster up` writes `cluster.json` in its
  folder (ZooKeeper, chroot, stores, discovery addresses, the service key file, the
  processes); every other reader (the client library, the admin tools, the web and
  IMAP tiers, the operations commands) reads it here (`read_state`) and every writer
  changes it here (`write_state`, or `update_state` under the folder's lock). No
  other module knows the file's name.
* **The cells' records.** `/cells/<cell>` in ZooKeeper holds a cell's state
  ("enabled"/"disabled": discovery places new users only in enabled cells) and its
  store; `cell_record`, `set_cell_record`, `set_cell_state`, `cell_names`,
  `node_records` and `active_nodes` read and change them (layout in
  `pyserver.cluster.layout`).
* **Naming a cluster on the command line.** A command that reaches a cluster takes
  `--cluster DIR` (a `pyserver cluster up` folder; `add_cluster_folder_argument`),
  and one that talks to ZooKeeper also `--zookeeper/--chroot` and `--config`
  (`add_cluster_arguments`), resolved the same way everywhere (`cluster_settings`): a
  flag, else the cluster folder, else the configuration. A process started by hand
  into a running cluster (`pyserver node --cluster DIR`, `pyserver discovery
  --cluster DIR`) takes the settings its peers were started with (`process_settings`).

This module sits above `pyserver.config` and below discovery and the processes:
the configuration never reads a cluster's state, and nothing here imports
discovery or the launcher (tests/test_layers.py keeps it so).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pyserver.cluster import layout
from pyserver.cluster.layout import NodeRecord
from pyserver.cluster.zk import BadVersion, NoNode, ZooKeeper
from pyserver.config import load_config
from pyserver.errors import BadRequest, NotFound

__all__ = [
    "DEFAULT_FOLDER",
    "STATE_FILE",
    "ClusterSettings",
    "NoCluster",
    "active_nodes",
    "add_cluster_arguments",
    "add_cluster_folder_argument",
    "cell_names",
    "cell_record",
    "cluster_settings",
    "node_records",
    "process_settings",
    "read_state",
    "set_cell_record",
    "set_cell_state",
    "update_state",
    "write_state",
]

STATE_FILE = "cluster.json"
_LOCK_FILE = "cluster.lock"
# where `pyserver cluster up|status|down` look when no folder is named
DEFAULT_FOLDER = Path("pyserver-cluster")


class NoCluster(Exception):
    """No cluster state in the folder named."""


# ---- the folder's state file ----


def read_state(folder: Path) -> dict[str, Any]:
    """The cluster's `cluster.json`; NoCluster if there is none."""
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except FileNotFoundError:
        raise NoCluster(f"no cluster in {folder} (pyserver cluster up --cluster DIR)") from None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Replace the state atomically (a reader never sees half a file); readable by its
    owner only (it names the cluster's ZooKeeper credentials)."""
    folder = Path(folder)
    temporary = folder / (STATE_FILE + ".tmp")
    temporary.touch(mode=0o600)
    temporary.chmod(0o600)
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(folder / STATE_FILE)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    lock = (Path(folder) / _LOCK_FILE).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        lock.close()  # closing releases the lock


def update_state(folder: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the state, let `change` edit it in place, write it back; the new state. Two
    commands changing one cluster (a node added while another is removed) take turns on
    the folder's lock, so neither loses the other's change."""
    with _locked(folder):
        state = read_state(folder)
        change(state)
        write_state(folder, state)
        return state


# ---- the cells' records in ZooKeeper ----


def _record(data: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        record = {}
    return record if isinstance(record, dict) else {}


async def cell_names(zk: ZooKeeper) -> list[str]:
    """The cells registered in ZooKeeper, sorted."""
    try:
        return sorted(await zk.get_children(layout.CELLS))
    except NoNode:
        return []


async def cell_record(zk: ZooKeeper, cell: str) -> dict[str, Any]:
    """The cell's ZooKeeper record (state, store, ...); NotFound if there is no such cell."""
    try:
        data, _ = await zk.get(layout.cell_path(cell))
    except NoNode:
        raise NotFound(f"no cell {cell!r} in ZooKeeper") from None
    return _record(data)


async def set_cell_record(zk: ZooKeeper, cell: str, **fields: Any) -> dict[str, Any]:
    """Create the cell (enabled) if missing and merge `fields` into its record."""
    await zk.ensure_persistent(layout.cell_path(cell), orjson.dumps({"state": "enabled"}))
    await zk.ensure_persistent(layout.nodes_path(cell))
    while True:
        data, stat = await zk.get(layout.cell_path(cell))
        record = {**_record(data), **fields}
        record.setdefault("state", "enabled")
        try:
            await zk.set_data(layout.cell_path(cell), orjson.dumps(record), stat.version)
        except BadVersion:
            continue  # changed meanwhile: merge again
        return record


async def set_cell_state(zk: ZooKeeper, cell: str, state: str) -> dict[str, Any]:
    """Enable or disable an existing cell; its record. NotFound for an unknown cell,
    BadRequest for a state that is not one of `layout.CELL_STATES`."""
    if state not in layout.CELL_STATES:
        raise BadRequest(f"cell state {state!r} is not one of {', '.join(layout.CELL_STATES)}")
    await cell_record(zk, cell)  # a typo must not create a cell
    return await set_cell_record(zk, cell, state=state)


async def node_records(zk: ZooKeeper, cell: str) -> list[NodeRecord]:
    """The cell's registered app servers (active or draining), by node id; a node whose
    record is unreadable or gone meanwhile is left out."""
    try:
        children = await zk.get_children(layout.nodes_path(cell))
    except NoNode:
        return []

    async def record(node_id: str) -> NodeRecord | None:
        try:
            data, _ = await zk.get(layout.node_path(cell, node_id))
            return NodeRecord.from_bytes(node_id, data)
        except (NoNode, ValueError):
            return None

    # read at once (one round trip for them all): a mover reads them for every batch
    records = await asyncio.gather(*map(record, sorted(children)))
    return [found for found in records if found is not None]


async def active_nodes(zk: ZooKeeper, cell: str) -> set[str]:
    """The ids of the cell's registered, active app servers."""
    return {record.node_id for record in await node_records(zk, cell) if record.active}


# ---- a process joining a running cluster ----


def process_settings(
    folder: Path, role: str, cell: str | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """What one more process of `role` ("node" of `cell`, or "discovery") of the cluster in
    `folder` is started with, as `pyserver cluster up` started its peers: the environment
    (the addresses of the services, TLS, the ZooKeeper identity: a running peer's) and the
    settings of `cluster.json` (ZooKeeper, chroot, data folder, service key; the cell's
    store and discovery for an app server, the directory's store for discovery), as
    `load_config` overrides. NoCluster for a folder without a cluster, or an unknown cell."""
    state = read_state(folder)
    processes = state.get("processes") or []
    peers = [
        p for p in processes if p.get("role") == role and (cell is None or p.get("cell") == cell)
    ]
    peers = peers or [p for p in processes if p.get("role") == role]
    env = {key: str(value) for key, value in (peers[0].get("env") or {}).items()} if peers else {}
    acl = state.get("zookeeper_acl")
    if acl:  # the cluster's identity (discovery: the read-only one)
        env["PYSERVER_ZOOKEEPER_AUTH"] = acl["reader_auth"] if role == "discovery" else acl["auth"]
        env["PYSERVER_ZOOKEEPER_READ_IDS"] = ",".join(acl.get("read_ids", []))
    overrides: dict[str, Any] = {
        "zookeeper": state["zookeeper"],
        "zookeeper_chroot": state["chroot"],
        "data_dir": Path(state["data"]),
        "service_key_file": state["service_key_file"],
    }
    if role == "node":
        cells = state.get("cells") or {}
        if cell not in cells:
            known = ", ".join(sorted(cells)) or "none"
            raise NoCluster(f"the cluster in {folder} has no cell {cell!r} (its cells: {known})")
        overrides["store"] = cells[cell]
        overrides["discovery_addrs"] = ",".join(state.get("discovery") or [])
    elif role == "discovery":
        overrides["store"] = state["directory_store"]
    return env, overrides


# ---- naming a cluster on the command line ----


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Where a command finds a cluster: its ZooKeeper, the cells' chroot, the directory's
    store and the cell the command is about."""

    zookeeper: str
    chroot: str
    directory_store: str
    cell: str
    # the ZooKeeper identity the command signs in with, and who else may read what it makes
    zookeeper_auth: str = ""
    zookeeper_read_ids: tuple[str, ...] = ()

    def session(self, **options: Any) -> ZooKeeper:
        """A ZooKeeper session (not started) on the cluster's tree, as this identity."""
        return ZooKeeper(
            self.zookeeper,
            chroot=self.chroot,
            auth=self.zookeeper_auth,
            read_ids=self.zookeeper_read_ids,
            **options,
        )


def add_cluster_folder_argument(
    parser: argparse.ArgumentParser, *, dest: str = "cluster", default: Path | None = None
) -> None:
    """`--cluster DIR`, the `pyserver cluster up` folder; `pyserver cluster ...` itself
    (dest "dir") keeps its older spelling `--dir` too."""
    names = ("--cluster", "--dir") if dest == "dir" else ("--cluster",)
    where = f" (default ./{default})" if default else ""
    parser.add_argument(
        *names,
        dest=dest,
        type=Path,
        default=default,
        metavar="DIR",
        help=f"the cluster's folder, as `pyserver cluster up` made it{where}",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser, *, cell: bool = False) -> None:
    """The flags that name a cluster (and, with `cell`, one of its cells)."""
    parser.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    add_cluster_folder_argument(parser)
    parser.add_argument("--zookeeper", help="ZooKeeper, host:port[,host:port...]")
    parser.add_argument("--chroot", help="ZooKeeper path the cells live under")
    if cell:
        parser.add_argument("--cell", help="the cell (default from the configuration)")


def cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    """The cluster the flags name: each setting from its flag, else the `--cluster` folder,
    else the configuration; SystemExit when no ZooKeeper is named at all."""
    found: dict[str, Any] = {}
    if getattr(args, "cluster", None):
        try:
            state = read_state(Path(args.cluster))
        except NoCluster as error:
            raise SystemExit(f"pyserver: {error}") from None
        found = {
            "zookeeper": state["zookeeper"],
            "chroot": state["chroot"],
            "directory": state["directory_store"],
            # `cluster up --tls`: the cluster's own identity, for the operator's tools
            "auth": (state.get("zookeeper_acl") or {}).get("auth", ""),
            "read_ids": (state.get("zookeeper_acl") or {}).get("read_ids", []),
        }
    config = load_config(getattr(args, "config", None))
    zookeeper = getattr(args, "zookeeper", None) or found.get("zookeeper") or config.zookeeper
    if not zookeeper:
        raise SystemExit(
            "pyserver: give ZooKeeper's address (--zookeeper, --cluster DIR or PYSERVER_ZOOKEEPER)"
        )
    return ClusterSettings(
        zookeeper=zookeeper,
        chroot=getattr(args, "chroot", None) or found.get("chroot") or config.zookeeper_chroot,
        directory_store=(
            getattr(args, "directory", None) or found.get("directory") or config.store
        ),
        cell=getattr(args, "cell", None) or config.cell,
        zookeeper_auth=found.get("auth") or config.zookeeper_auth,
        zookeeper_read_ids=tuple(found.get("read_ids") or config.zookeeper_read_id_list),
    )
