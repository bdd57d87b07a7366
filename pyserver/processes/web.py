"""`pyserver web`: the web tier as its own process, in front of one app server or a cluster.

In front of a cluster (`--discovery`, or `--cluster DIR` of `pyserver cluster
up`) it reaches each user's app server through discovery with a
`ClusterClient`, which follows moves and failovers; in front of a single cell it
talks to the app server of `--data` (or `--server HOST:PORT`). Uploads go to the
cluster's blob store (`blob_store`), counts through the local data centre's
memcached when `memcached_dcs` is set. Serves until SIGINT or SIGTERM. Start as
many as you like side by side: sessions are signed with the cell's service key,
so any of them reads a cookie another issued.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.app.revocations import Revocations
from pyserver.blobs import blob_store_for
from pyserver.client import Client
from pyserver.cluster.state import read_state
from pyserver.config import Config, load_config
from pyserver.dirty import local_memcached
from pyserver.discovery.client import ClusterClient
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.store.spec import open_store
from pyserver.web.counts import CountReader
from pyserver.web.server import WebTier
from pyserver.wire.ops import Op

__all__ = ["WebProcess", "add_parser"]

DEFAULT_PORT = 7488


class WebProcess:
    """The web tier, its app-server client, blob store and count cache, started together."""

    def __init__(self, config: Config, server: str | None) -> None:
        self.config = config = config.with_service_key()
        self._server = server
        self.servers: Client | ClusterClient | None = None
        self.blobs = blob_store_for(config)
        self.counts: CountReader | None = None
        self.web: WebTier | None = None
        self._target = ""
        # revoked user tokens, read from the store (a cluster's directory store, where
        # `pyserver admin revoke --cluster` records them too): their sessions end
        self.store = open_store(config.store_spec)
        self.revocations = Revocations(self.store, refresh_s=config.revocation_refresh_s)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        config = self.config
        keys, tls = config.service_keys(), config.client_tls()
        if config.discovery_addrs:
            self._target = f"discovery {config.discovery_addrs}"
            self.servers = await ClusterClient.connect(config.discovery, keys, tls=tls)
        else:
            server_host, server_port = endpoints.server_address(config.data_dir, self._server)
            self._target = f"{server_host}:{server_port}"
            self.servers = await Client.connect(server_host, server_port, service_key=keys, tls=tls)
        await self.store.open()
        await self.revocations.start()
        await self.blobs.open()
        self.counts = CountReader(await local_memcached(config), self._counts_of)
        self.web = WebTier(
            self.servers,
            keys,
            counts=self.counts.read,
            blobs=self.blobs,
            max_upload_bytes=config.web_max_upload_bytes,
            session_lifetime_s=config.web_session_s,
            revoked=self.revocations.refuses,
            tls=config.public_tls(),
            head_timeout_s=config.frame_timeout_s,
        )
        return host, await self.web.start(host, port)

    async def stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
        if self.servers is not None:
            await self.servers.close()
        if self.counts is not None and self.counts.cache is not None:
            await self.counts.cache.close()
        await self.blobs.close()
        await self.revocations.close()
        await self.store.close()

    def banner(self) -> list[str]:
        return [f"app servers {self._target}", f"blob store  {self.config.blob_store or 'local'}"]

    async def _counts_of(self, user: int) -> dict[str, Any]:
        assert self.servers is not None
        return await self.servers.request(Op.COUNTS, {"user": user})


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"data_dir": args.data, "discovery_addrs": args.discovery}
    if args.cluster:  # a `pyserver cluster up` folder: its discovery and its service key
        state = read_state(Path(args.cluster))
        overrides["discovery_addrs"] = overrides["discovery_addrs"] or ",".join(state["discovery"])
        overrides["service_key_file"] = state["service_key_file"]
        overrides["blob_store"] = state["directory_store"]
        overrides["store"] = state["directory_store"]
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.log_level)
    port = args.port if args.port is not None else config.web_port
    host = args.host or config.host
    process = WebProcess(config, args.server)
    run(serve_service(process, "web", "web tier", host, port, args.ready_file))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `web` to the `pyserver` command line."""
    sub = commands.add_parser("web", help="run the web tier (inbox, web chat) in front of a cell")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "data folder (service key, app server)")
    sub.set_defaults(port=None)
    sub.add_argument("--discovery", help="discovery instances, host:port[,host:port...]")
    sub.add_argument("--cluster", type=Path, help="a `pyserver cluster up` folder")
    sub.add_argument("--server", help="one app server, HOST:PORT (default: the data folder's)")
    sub.set_defaults(handler=_run)
    return sub
