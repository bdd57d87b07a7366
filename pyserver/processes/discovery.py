"""`pyserver discovery`: the discovery service as its own process.

Owns the command line and the life of the process: it opens the directory's
store (`--store`, the global one: `sqlite:PATH` or `hbase:HOST:PORT/ns`), a
ZooKeeper session, follows every cell, and serves `DiscoveryService` on the
app server's wire shell until SIGINT or SIGTERM, then stops gracefully. Start
as many as you like side by side: they share nothing but the directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pyserver.app.server import AppServer
from pyserver.cluster.state import NoCluster, add_cluster_folder_argument, process_settings
from pyserver.config import Config, ConfigError, load_config
from pyserver.discovery.directory import Directory
from pyserver.discovery.service import DiscoveryService
from pyserver.errors import Unavailable
from pyserver.metrics import Metrics
from pyserver.processes.assembly import service_server, zookeeper_session
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.store.spec import open_store

__all__ = ["DEFAULT_PORT", "DiscoveryProcess", "add_parser"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 7470


class DiscoveryProcess:
    """The service, its store, its ZooKeeper session and its listener, started and stopped
    together."""

    def __init__(self, config: Config, cache_users: int = 1_000_000) -> None:
        if not config.zookeeper:
            raise ConfigError("config zookeeper: discovery needs ZooKeeper (host:port)")
        self.config = config = config.with_service_key()
        self.store_spec = config.store_spec
        self.store: Any = open_store(self.store_spec)
        self.zk = zookeeper_session(config)
        self.directory: Directory | None = None
        self.service: DiscoveryService | None = None
        self._cache_users = cache_users
        self.server: AppServer | None = None
        self.metrics = Metrics()  # served on --http-port (processes.runtime)

    async def start(self, host: str, port: int, timeout_s: float = 30.0) -> tuple[str, int]:
        await self.store.open()
        try:
            self.directory = Directory(self.store)
            await self.zk.start(timeout_s)
            grace = self.config.moved_marker_grace_s
            self.service = DiscoveryService(
                self.zk,
                self.directory,
                cache_users=self._cache_users,
                moved_grace_s=grace if grace > 0 else None,
                moved_sweep_s=self.config.moved_marker_sweep_s,
            )
            await self.service.start(timeout_s)
            self.server = service_server(
                self.config,
                self.service,
                f"discovery-{self.config.node_id}",
                health_check=self._healthy,
                stats_section="discovery",
                observer=self.metrics,
            )
            return await self.server.start(host, port)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_s)
        if self.service is not None:
            await self.service.close()
        await self.zk.close()
        await self.store.close()

    def banner(self) -> list[str]:
        cells = self.service.cells.cells if self.service is not None else {}
        return [
            f"directory  {self.store_spec}",
            f"zookeeper  {self.config.zookeeper} chroot {self.zk.chroot or '/'}",
            f"cells      {', '.join(sorted(cells)) or '(none yet)'}",
        ]

    async def healthy(self) -> bool:
        """ZooKeeper's session is live and the directory's store answers."""
        return await self._healthy()

    async def _healthy(self) -> bool:
        if not self.zk.live:
            return False
        return await self.store.healthy()


def _run(args: argparse.Namespace) -> int:
    # `--cluster DIR`: the settings the cluster's discovery instances were started with; a
    # flag wins over the folder, the folder over the configuration
    env: dict[str, str] | None = None
    found: dict[str, Any] = {}
    if args.cluster is not None:
        try:
            peer_env, found = process_settings(args.cluster, "discovery")
        except NoCluster as error:
            print(f"pyserver discovery: {error}", file=sys.stderr)
            return 1
        env = {**os.environ, **peer_env}
    flags = {
        "data_dir": args.data if args.data != args.default_data or not found else None,
        "zookeeper": args.zookeeper,
        "zookeeper_chroot": args.chroot,
        "store": args.store,
        "node_id": args.instance,
    }
    overrides = {**found, **{name: value for name, value in flags.items() if value is not None}}
    config = load_config(args.config, env=env, overrides=overrides)
    configure_logging(config.log_level)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        process = DiscoveryProcess(config, args.cache_users)
        host = args.host or config.host
        run(
            serve_service(
                process,
                "discovery",
                "discovery",
                host,
                args.port,
                args.ready_file,
                args.http_port,
                remake=lambda: DiscoveryProcess(config, args.cache_users),
            )
        )
    except (Unavailable, ConfigError) as error:
        print(f"pyserver discovery: could not start: {error}", file=sys.stderr)
        return 1
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `discovery` to the `pyserver` command line."""
    sub = commands.add_parser(
        "discovery", help="run a discovery service instance (user -> cell -> app server)"
    )
    add_service_arguments(sub, default_data, DEFAULT_PORT, "data folder (service key, SQLite)")
    add_cluster_folder_argument(sub)  # its ZooKeeper, chroot, directory and data folder
    sub.add_argument("--zookeeper", help="ZooKeeper, host:port[,host:port...]")
    sub.add_argument("--chroot", help="ZooKeeper path the cells live under (default /pyserver)")
    sub.add_argument("--store", help="the directory's store: sqlite:PATH or hbase:HOST:PORT/ns")
    sub.add_argument("--instance", help="this instance's name (STATS, logs)")
    sub.set_defaults(default_data=default_data)
    sub.add_argument("--cache-users", type=int, default=1_000_000, help="users' cells cached")
    sub.set_defaults(handler=_run)
    return sub
