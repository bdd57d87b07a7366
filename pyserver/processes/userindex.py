"""`pyserver userindex`: the user index service as its own process.

Owns the command line and the life of the process: it opens the configured `store`
(the embedded one on `--data` by default, or HBase), serves `UserIndexService` on the app
server's wire shell, with the configured limits, until SIGINT or SIGTERM, then stops
gracefully. On HBase any number of instances can serve one namespace side by side (app
servers list them all in `userindex_addr`); each caches hot users' friends for at most
`--cache-ttl-s`, so a change made through one reaches the others' answers within that.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pyserver.config import Config, ConfigError, load_config
from pyserver.metrics import Metrics
from pyserver.processes.assembly import service_server
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.store.base import SocialStore
from pyserver.store.spec import open_store
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.service import UserIndexService

__all__ = ["DEFAULT_PORT", "UserIndexProcess", "add_parser"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 7410
# How stale another instance's change may be in this one's answers (a shared store).
DEFAULT_CACHE_TTL_S = 2.0


class UserIndexProcess:
    """The service, its store and its listener, started and stopped together."""

    def __init__(
        self,
        config: Config,
        store: SocialStore,
        cache_users: int = 100_000,
        cache_ttl_s: float | None = DEFAULT_CACHE_TTL_S,
    ) -> None:
        self.config = config.with_service_key()
        self.store = store
        self.service = UserIndexService(LocalUserIndex(store, cache_users, cache_ttl_s))
        self.metrics = Metrics()  # served on --http-port (processes.runtime)
        self.server = service_server(
            self.config,
            self.service,
            f"userindex-{self.config.node_id}",
            health_check=store.healthy,
            stats_section="userindex",
            observer=self.metrics,
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        cache_users: int = 100_000,
        cache_ttl_s: float | None = DEFAULT_CACHE_TTL_S,
    ) -> UserIndexProcess:
        """The process on the store the configuration names (not opened yet)."""
        try:
            store = open_store(config.store_spec)
        except ValueError as exc:
            raise ConfigError(f"config store: {exc}") from None
        return cls(config, store, cache_users, cache_ttl_s)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.store.open()
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop(self.config.shutdown_grace_s)
        await self.store.close()

    def banner(self) -> list[str]:
        return [f"store  {self.config.store_spec}"]


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides={"data_dir": args.data})
    configure_logging(config.log_level)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    ttl = args.cache_ttl_s if args.cache_ttl_s > 0 else None
    process = UserIndexProcess.from_config(config, args.cache_users, ttl)
    host = args.host or config.host
    run(
        serve_service(
            process,
            "userindex",
            "user index service",
            host,
            args.port,
            args.ready_file,
            args.http_port,
            remake=lambda: UserIndexProcess.from_config(config, args.cache_users, ttl),
        )
    )
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `userindex` to the `pyserver` command line."""
    sub = commands.add_parser("userindex", help="run the user index service (its own process)")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "the cell's data folder")
    sub.add_argument("--cache-users", type=int, default=100_000, help="hot users' friend lists")
    sub.add_argument(
        "--cache-ttl-s",
        type=float,
        default=DEFAULT_CACHE_TTL_S,
        help="seconds a cached friend list is used (0: until pushed out; one instance only)",
    )
    sub.set_defaults(handler=_run)
    return sub
