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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pyserver.app.revocations import Revocations
from pyserver.blobs import BlobStore, blob_store_for
from pyserver.config import Config, load_config
from pyserver.dirty import local_memcached
from pyserver.processes.frontend import FrontEnd, add_frontend_arguments, frontend_overrides
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.servicekey import ServiceKey
from pyserver.web.counts import CountReader
from pyserver.web.server import WebTier
from pyserver.web.viewer import AppServers
from pyserver.wire.ops import Op

__all__ = ["WebProcess", "add_parser", "web_tier"]

DEFAULT_PORT = 7488


def web_tier(
    config: Config,
    servers: AppServers,
    keys: ServiceKey,
    *,
    counts: Callable[[int], Awaitable[dict[str, Any]]],
    blobs: BlobStore,
    revocations: Revocations,
) -> WebTier:
    """The web tier `config` sets up, in front of `servers` (`pyserver web`, `pyserver run`)."""
    return WebTier(
        servers,
        keys,
        counts=counts,
        blobs=blobs,
        max_upload_bytes=config.web_max_upload_bytes,
        session_lifetime_s=config.web_session_s,
        revoked=revocations.refuses,
        tls=config.public_tls(),
        head_timeout_s=config.frame_timeout_s,
    )


class WebProcess:
    """The web tier, its app servers, blob store and count cache, started together."""

    def __init__(self, config: Config, server: str | None) -> None:
        self.config = config = config.with_service_key()
        self.frontend = FrontEnd(config, server)
        self.blobs = blob_store_for(config)
        self.counts: CountReader | None = None
        self.web: WebTier | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        config = self.config
        servers = await self.frontend.open()
        await self.blobs.open()
        self.counts = CountReader(await local_memcached(config), self._counts_of)
        self.web = web_tier(
            config,
            servers,
            self.frontend.keys,
            counts=self.counts.read,
            blobs=self.blobs,
            revocations=self.frontend.revocations,
        )
        return host, await self.web.start(host, port)

    async def stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
        if self.counts is not None and self.counts.cache is not None:
            await self.counts.cache.close()
        await self.blobs.close()
        await self.frontend.close()

    def banner(self) -> list[str]:
        blob_store = self.config.blob_store or "local"
        return [f"app servers {self.frontend.target}", f"blob store  {blob_store}"]

    async def _counts_of(self, user: int) -> dict[str, Any]:
        assert self.frontend.servers is not None
        return await self.frontend.servers.request(Op.COUNTS, {"user": user})


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=frontend_overrides(args))
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
    add_frontend_arguments(sub)
    sub.set_defaults(handler=_run)
    return sub
