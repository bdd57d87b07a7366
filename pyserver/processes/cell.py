"""A whole single-node cell in one process, on the embedded defaults.

Assembles the parts from one `Config`: the embedded store, the user index, the
mailbox (business logic and write-through cache), the app server speaking the
binary protocol, and the HTTP endpoint with /metrics and /health. `serve()` is
`pyserver run`: it runs the cell on uvloop until SIGINT or SIGTERM, then stops
it gracefully (in-flight requests finish, cached images are snapshotted).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from pyserver import doctor, endpoints
from pyserver.addresses import parse_data_centres
from pyserver.app.dispatcher import Dispatcher
from pyserver.app.loop import loop_implementation
from pyserver.app.mailbox import Mailbox, MailboxSettings
from pyserver.app.server import AppServer, ServerLimits
from pyserver.blobs import blob_store_for
from pyserver.config import Config
from pyserver.dirty import memcached_client
from pyserver.dirty.reporter import DirtyReporter, RemoteDirtyService
from pyserver.dirty.service import DirtyService
from pyserver.errors import BadRequest, PyserverError, error_payload
from pyserver.httpapi import HttpEndpoint
from pyserver.metrics import Metrics, TimedStore
from pyserver.mta.route import SingleServerRoute
from pyserver.mta.service import MtaService
from pyserver.processes.runtime import configure_logging, run, stop_signal
from pyserver.store.sqlite import SQLiteStore
from pyserver.userid import is_user_id
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.remote import RemoteUserIndex
from pyserver.userindex.service import UserIndexService
from pyserver.web.counts import CountReader
from pyserver.wire.ops import Op

log = logging.getLogger(__name__)

STORE_FILE = "store.sqlite3"


def store_path(data_dir: Path) -> Path:
    return data_dir / STORE_FILE


class SingleNodeCell:
    """Every part of a cell, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config.with_service_key()
        self.metrics = Metrics()
        self.store = SQLiteStore(store_path(self.config.data_dir))
        timed_store: Any = TimedStore(self.store, self.metrics)
        # The user index: this cell's own (also served to other processes), or a remote service.
        key = self.config.service_key
        self.user_index: LocalUserIndex | RemoteUserIndex = (
            RemoteUserIndex.from_address(self.config.userindex_addr, key)
            if self.config.userindex_addr
            else LocalUserIndex(timed_store)
        )
        # Dirty reports: only with memcached; to a remote dirty service, or one in-process.
        self.centres = parse_data_centres(self.config.memcached_dcs)
        self.dirty_service: DirtyService | None = None
        self.dirty_reporter: DirtyReporter | None = None
        if self.centres:
            if self.config.dirty_addr:
                invalidate: Any = RemoteDirtyService.from_address(self.config.dirty_addr, key)
            else:
                self.dirty_service = DirtyService(self.centres)
                invalidate = self.dirty_service.invalidate
            self.dirty_reporter = DirtyReporter(invalidate)
        # Attachments, long mail bodies and raw mail (GET_BLOB reads them; the MTA writes them).
        self.blobs = blob_store_for(self.config)
        # The MTA proxy, started once the app server it delivers to listens.
        self.mta: MtaService | None = None
        self.mailbox = Mailbox(
            timed_store,
            self.user_index,
            MailboxSettings.from_config(self.config),
            counts_changed=self.dirty_reporter.report if self.dirty_reporter else None,
            blobs=self.blobs,
        )
        self.dispatcher = Dispatcher(
            self.mailbox,
            self.config.service_key,
            self.config.node_id,
            max_frame_size=self.config.max_frame_size,
            observer=self.metrics,
            health_check=self.store.healthy,
        )
        self.server = AppServer(
            self.dispatcher,
            ServerLimits.from_config(self.config),
        )
        self.http = HttpEndpoint(self.metrics, self._health)
        self.userindex_server: AppServer | None = None
        if isinstance(self.user_index, LocalUserIndex):
            self.userindex_server = AppServer(
                Dispatcher(
                    UserIndexService(self.user_index),
                    key,
                    f"userindex-{self.config.node_id}",
                    stats_section="userindex",
                ),
                ServerLimits.from_config(self.config),
            )
        self.counts: CountReader | None = None
        self.http.add_get("/counts/{user}", self._serve_counts)
        self.metrics.watch_cache(self.mailbox.stats)
        self.metrics.connections.set_function(lambda: self.dispatcher.connections)
        self.addresses: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        """Open the store, then listen; returns (and publishes) the addresses."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.blobs.open()
        if self.dirty_service is not None:
            await self.dirty_service.start()
        if self.dirty_reporter is not None:
            self.dirty_reporter.start()
        self.counts = CountReader(await self._count_cache(), self._counts_of)
        host, port = await self.server.start(self.config.host, self.config.port)
        http_port = await self.http.start(self.config.host, self.config.http_port)
        self.addresses = {
            "node": self.config.node_id,
            "server": {"host": host, "port": port},
            "http": {"host": self.config.host, "port": http_port},
        }
        if self.userindex_server is not None:
            index_host, index_port = await self.userindex_server.start(self.config.host, 0)
            self.addresses["userindex"] = {"host": index_host, "port": index_port}
        route = SingleServerRoute(
            host, port, self.config.service_key, self.config.mta_deliver_timeout_s
        )
        self.mta = MtaService(self.config, self.store, self.blobs, route)
        smtp_host, smtp_port = await self.mta.start()
        self.addresses["smtp"] = {"host": smtp_host, "port": smtp_port}
        endpoints.publish(self.config.data_dir, self.addresses)
        return self.addresses

    async def stop(self) -> None:
        """Finish in-flight requests, snapshot cached images, close the store."""
        endpoints.withdraw(self.config.data_dir)
        if self.mta is not None:  # first: mail under way still reaches the app server
            await self.mta.stop()
        await self.server.stop(self.config.shutdown_grace_s)
        await self.http.stop()
        await self._stop_social()
        await self.mailbox.close()
        await self.store.close()
        await self.blobs.close()

    async def _stop_social(self) -> None:
        """Stop the user index service, the dirty reporting and the count cache."""
        if self.userindex_server is not None:
            await self.userindex_server.stop(self.config.shutdown_grace_s)
        if isinstance(self.user_index, RemoteUserIndex):
            await self.user_index.close()
        if self.dirty_reporter is not None:
            await self.dirty_reporter.close()
        if self.dirty_service is not None:
            await self.dirty_service.close()
        if self.counts is not None and self.counts.cache is not None:
            await self.counts.cache.close()

    async def _count_cache(self) -> Any:
        """The local data centre's memcached client for count reads; None without memcached."""
        if not self.centres:
            return None
        local = self.config.local_dc or self.centres[0].name
        centre = next(centre for centre in self.centres if centre.name == local)
        return await memcached_client(centre)

    async def _counts_of(self, user_id: int) -> dict[str, Any]:
        return await self.mailbox.execute(Op.COUNTS, {"user": user_id})

    async def _serve_counts(self, request: web.Request) -> web.Response:
        """GET /counts/<user>: the user's COUNTS reply, through the count cache."""
        raw = request.match_info["user"]
        if not raw.isdigit() or not is_user_id(int(raw)):
            bad = {"code": "BAD_REQUEST", "message": f"{raw!r} is not a user id"}
            return web.json_response(bad, status=400)
        assert self.counts is not None
        try:
            return web.json_response(await self.counts.read(int(raw)))
        except PyserverError as exc:
            status = 400 if isinstance(exc, BadRequest) else 503
            return web.json_response(error_payload(exc), status=status)

    async def _health(self) -> dict[str, Any]:
        healthy = await self.store.healthy()
        return {
            "status": "ok" if healthy else "unavailable",
            "node": self.config.node_id,
            "store": "ok" if healthy else "unavailable",
        }


async def _serve_until_stopped(cell: SingleNodeCell) -> None:
    stopped = stop_signal()
    addresses = await cell.start()
    server, http = addresses["server"], addresses["http"]
    print(f"pyserver: cell {cell.config.cell} node {cell.config.node_id} running", flush=True)
    print(f"  binary protocol  {server['host']}:{server['port']}", flush=True)
    print(f"  http             http://{http['host']}:{http['port']}/metrics  /health", flush=True)
    smtp = addresses["smtp"]
    print(f"  smtp (MTA proxy) {smtp['host']}:{smtp['port']}", flush=True)
    if "userindex" in addresses:
        index = addresses["userindex"]
        print(f"  user index       {index['host']}:{index['port']}", flush=True)
    if cell.centres:
        where = cell.config.dirty_addr or "in-process"
        centres = " ".join(str(centre) for centre in cell.centres)
        print(f"  dirty service    {where}, memcached {centres}", flush=True)
    print(f"  data             {cell.config.data_dir.resolve()}", flush=True)
    print(f"  service key      {cell.config.service_key_path.resolve()}", flush=True)
    loop = loop_implementation(asyncio.get_running_loop())
    print(f"  implementations  {doctor.report()} loop={loop}")
    sys.stdout.flush()
    try:
        await stopped.wait()
    finally:
        print("pyserver: stopping (finishing in-flight requests)", flush=True)
        await cell.stop()


def serve(config: Config) -> int:
    """`pyserver run`: serve a single-node cell until SIGINT/SIGTERM."""
    configure_logging(config.log_level)
    run(_serve_until_stopped(SingleNodeCell(config)))
    return 0


@asynccontextmanager
async def open_store(data_dir: Path) -> AsyncIterator[SQLiteStore]:
    """The store of the cell on data_dir, for tools that work on it directly."""
    store = SQLiteStore(store_path(data_dir))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_mailbox(data_dir: Path) -> AsyncIterator[Mailbox]:
    """A mailbox over the cell's store on data_dir (admin tools: rebuild, export, import)."""
    async with open_store(data_dir) as store:
        mailbox = Mailbox(store, LocalUserIndex(store))
        try:
            yield mailbox
        finally:
            await mailbox.close()
