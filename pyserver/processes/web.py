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
import asyncio
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pyserver.app.revocations import Revocations
from pyserver.blobs import BlobStore, blob_store_for
from pyserver.cluster.state import cluster_settings
from pyserver.config import Config, load_config
from pyserver.dirty import local_memcached
from pyserver.metrics import Metrics
from pyserver.ops.survey import Surveyor
from pyserver.processes.frontend import FrontEnd, add_frontend_arguments, frontend_overrides
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.servicekey import ServiceKey, as_service_keys
from pyserver.web.counts import CountReader
from pyserver.web.ops import OpsPage
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
    ops: OpsPage | None = None,
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
        ops=ops,
    )


class ClusterSurvey:
    """The survey behind `/ops`: a `Surveyor` of the `ops_cluster` folder, started on the
    first request and kept (its readings give the page its rates), one survey at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.surveyor: Surveyor | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, Any]:
        async with self._lock:
            if self.surveyor is None:
                settings = cluster_settings(argparse.Namespace(cluster=self.folder))
                surveyor = Surveyor(settings, self.folder)
                await surveyor.start()
                self.surveyor = surveyor
            return await self.surveyor.survey()

    async def close(self) -> None:
        if self.surveyor is not None:
            await self.surveyor.close()


def ops_page(config: Config, keys: ServiceKey, survey: ClusterSurvey) -> OpsPage:
    """`/ops` over `survey`, for the service key or the configured operator token."""
    accepted = as_service_keys(keys)

    def allowed(secret: str) -> bool:
        if config.ops_token and hmac.compare_digest(secret.encode(), config.ops_token.encode()):
            return True
        return accepted.accepts(secret)

    return OpsPage(survey, allowed)


class WebProcess:
    """The web tier, its app servers, blob store and count cache, started together."""

    def __init__(self, config: Config, server: str | None) -> None:
        self.config = config = config.with_service_key()
        self.frontend = FrontEnd(config, server)
        self.blobs = blob_store_for(config)
        self.counts: CountReader | None = None
        self.web: WebTier | None = None
        # the operators' page, when the configuration names a cluster folder to survey
        self.survey = ClusterSurvey(Path(config.ops_cluster)) if config.ops_cluster else None
        # its /metrics: every HTTP request timed by route (pyserver.observe)
        self.metrics = Metrics()

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
            ops=(
                ops_page(config, self.frontend.keys, self.survey)
                if self.survey is not None
                else None
            ),
        )
        self.web.metrics = self.metrics
        return host, await self.web.start(host, port)

    async def stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
        if self.survey is not None:
            await self.survey.close()
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
    run(serve_service(process, "web", "web tier", host, port, args.ready_file, args.http_port))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `web` to the `pyserver` command line."""
    sub = commands.add_parser("web", help="run the web tier (inbox, web chat) in front of a cell")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "data folder (service key, app server)")
    sub.set_defaults(port=None)
    add_frontend_arguments(sub)
    sub.set_defaults(handler=_run)
    return sub
