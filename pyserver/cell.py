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
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pyserver import endpoints, implementation
from pyserver.app.dispatcher import Dispatcher
from pyserver.app.loop import loop_implementation, new_event_loop
from pyserver.app.mailbox import Mailbox, MailboxSettings
from pyserver.app.server import AppServer, ServerLimits
from pyserver.config import Config
from pyserver.httpapi import HttpEndpoint
from pyserver.metrics import Metrics, TimedStore
from pyserver.store.sqlite import SQLiteStore
from pyserver.userindex.local import LocalUserIndex

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
        self.mailbox = Mailbox(
            timed_store,
            LocalUserIndex(timed_store),
            MailboxSettings.from_config(self.config),
        )
        self.dispatcher = Dispatcher(
            self.mailbox,
            self.config.service_key,
            self.config.node_id,
            max_frame_size=self.config.max_frame_size,
            observer=self.metrics,
            health_check=self._store_healthy,
        )
        self.server = AppServer(
            self.dispatcher,
            ServerLimits(
                max_in_flight=self.config.max_in_flight_per_connection,
                idle_timeout_s=self.config.idle_timeout_s,
                request_timeout_s=self.config.request_timeout_s,
            ),
        )
        self.http = HttpEndpoint(self.metrics, self._health)
        self.metrics.watch_cache(self.mailbox.stats)
        self.metrics.connections.set_function(lambda: self.dispatcher.connections)
        self.addresses: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        """Open the store, then listen; returns (and publishes) the addresses."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        host, port = await self.server.start(self.config.host, self.config.port)
        http_port = await self.http.start(self.config.host, self.config.http_port)
        self.addresses = {
            "node": self.config.node_id,
            "server": {"host": host, "port": port},
            "http": {"host": self.config.host, "port": http_port},
        }
        endpoints.publish(self.config.data_dir, self.addresses)
        return self.addresses

    async def stop(self) -> None:
        """Finish in-flight requests, snapshot cached images, close the store."""
        endpoints.withdraw(self.config.data_dir)
        await self.server.stop(self.config.shutdown_grace_s)
        await self.http.stop()
        await self.mailbox.close()
        await self.store.close()

    async def _store_healthy(self) -> bool:
        try:
            await self.store.last_seq(0)
        except Exception:
            return False
        return True

    async def _health(self) -> dict[str, Any]:
        healthy = await self._store_healthy()
        return {
            "status": "ok" if healthy else "unavailable",
            "node": self.config.node_id,
            "store": "ok" if healthy else "unavailable",
        }


async def _run_until_signalled(cell: SingleNodeCell) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    addresses = await cell.start()
    server, http = addresses["server"], addresses["http"]
    print(f"pyserver: cell {cell.config.cell} node {cell.config.node_id} running", flush=True)
    print(f"  binary protocol  {server['host']}:{server['port']}", flush=True)
    print(f"  http             http://{http['host']}:{http['port']}/metrics  /health", flush=True)
    print(f"  data             {cell.config.data_dir.resolve()}", flush=True)
    print(f"  service key      {cell.config.service_key_path.resolve()}", flush=True)
    print(f"  implementations  {implementation.report()} loop={loop_implementation(loop)}")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        print("pyserver: stopping (finishing in-flight requests)", flush=True)
        await cell.stop()


def serve(config: Config) -> int:
    """`pyserver run`: serve a single-node cell until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    loop = new_event_loop()
    try:
        loop.run_until_complete(_run_until_signalled(SingleNodeCell(config)))
    finally:
        loop.close()
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
