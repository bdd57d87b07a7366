"""What a person-facing tier process holds (`pyserver web`, `pyserver imap`).

Its connection to the app servers: a cluster through discovery (`--discovery`,
or `--cluster DIR` of `pyserver cluster up`) with a `ClusterClient`, which
follows moves and failovers, or the one app server of `--data` (or `--server
HOST:PORT`); the service keys, re-read as they rotate; and the store it reads
revoked user tokens and users' addresses from (a cluster's directory store,
where `pyserver admin revoke --cluster` records revocations too).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.app.revocations import Revocations
from pyserver.client import Client
from pyserver.cluster.state import add_cluster_folder_argument, read_state
from pyserver.config import Config
from pyserver.discovery.client import ClusterClient
from pyserver.servicekey import ServiceKey
from pyserver.store.spec import open_store

__all__ = ["FrontEnd", "add_frontend_arguments", "frontend_overrides"]


class FrontEnd:
    """The app servers, keys, store and revocations of a front-end tier process."""

    def __init__(self, config: Config, server: str | None) -> None:
        self.config = config
        self._server = server
        self.keys: ServiceKey = config.service_keys()
        self.servers: Client | ClusterClient | None = None
        self.store = open_store(config.store_spec)
        self.revocations = Revocations(self.store, refresh_s=config.revocation_refresh_s)
        self.target = ""

    async def open(self) -> Client | ClusterClient:
        """Reach the app servers, open the store and read the revocations."""
        config = self.config
        tls = config.client_tls()
        if config.discovery_addrs:
            self.target = f"discovery {config.discovery_addrs}"
            self.servers = await ClusterClient.connect(config.discovery, self.keys, tls=tls)
        else:
            host, port = endpoints.server_address(config.data_dir, self._server)
            self.target = f"{host}:{port}"
            self.servers = await Client.connect(host, port, service_key=self.keys, tls=tls)
        await self.store.open()
        await self.revocations.start()
        return self.servers

    async def close(self) -> None:
        if self.servers is not None:
            await self.servers.close()
        await self.revocations.close()
        await self.store.close()


def add_frontend_arguments(sub: argparse.ArgumentParser) -> None:
    """The flags naming what a front-end tier stands in front of."""
    sub.add_argument("--discovery", help="discovery instances, host:port[,host:port...]")
    add_cluster_folder_argument(sub)
    sub.add_argument("--server", help="one app server, HOST:PORT (default: the data folder's)")


def frontend_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings those flags give (a cluster folder: its discovery, keys and stores)."""
    overrides: dict[str, Any] = {"data_dir": args.data, "discovery_addrs": args.discovery}
    if args.cluster:
        state = read_state(Path(args.cluster))
        overrides["discovery_addrs"] = overrides["discovery_addrs"] or ",".join(state["discovery"])
        overrides["service_key_file"] = state["service_key_file"]
        overrides["blob_store"] = state["directory_store"]
        overrides["store"] = state["directory_store"]
    return overrides
