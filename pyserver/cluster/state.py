"""A running cluster's description, `cluster.json` in the folder `pyserver cluster up` ran in,
and how a command names a cluster.

The launcher writes the state (ZooKeeper, chroot, stores, discovery addresses, the
processes); commands read it, so `--cluster DIR` is all they need. Every command
that reaches a cluster takes the same flags (`add_cluster_arguments`) and resolves
them the same way (`cluster_settings`): a flag, else the cluster folder, else the
configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyserver.cluster.zk import ZooKeeper
from pyserver.config import load_config

__all__ = [
    "STATE_FILE",
    "ClusterSettings",
    "NoCluster",
    "add_cluster_arguments",
    "cluster_settings",
    "read_state",
    "write_state",
]

STATE_FILE = "cluster.json"


class NoCluster(Exception):
    """No cluster state in the folder named."""


def read_state(folder: Path) -> dict[str, Any]:
    """The cluster's `cluster.json`; NoCluster if there is none."""
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        raise NoCluster(f"no cluster in {folder} (pyserver cluster up --dir {folder})") from None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Replace the state atomically (a reader never sees half a file); readable by its
    owner only (it names the cluster's ZooKeeper credentials)."""
    temporary = folder / (STATE_FILE + ".tmp")
    temporary.touch(mode=0o600)
    temporary.chmod(0o600)
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(folder / STATE_FILE)


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


def add_cluster_arguments(parser: argparse.ArgumentParser, *, cell: bool = False) -> None:
    """The flags that name a cluster (and, with `cell`, one of its cells)."""
    parser.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    parser.add_argument("--cluster", type=Path, help="a `pyserver cluster up` folder")
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
