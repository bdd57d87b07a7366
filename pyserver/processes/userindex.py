"""`pyserver userindex`: the user index service as its own process.

Owns the command line and the life of the process: it opens the configured `store`
(the embedded one on `--data` by default, or HBase), serves `UserIndexService` on the app
server's wire shell, with the configured limits, until SIGINT or SIGTERM, then stops
gracefully.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pyserver.config import Config, ConfigError, load_config
from pyserver.processes.assembly import service_server
from pyserver.processes.runtime import (
    add_ready_file_argument,
    announce_ready,
    configure_logging,
    run,
    stop_signal,
    withdraw_ready,
)
from pyserver.store.base import SocialStore
from pyserver.store.spec import open_store
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.service import UserIndexService

__all__ = ["DEFAULT_PORT", "UserIndexProcess", "add_parser"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 7410


class UserIndexProcess:
    """The service, its store and its listener, started and stopped together."""

    def __init__(self, config: Config, store: SocialStore, cache_users: int = 100_000) -> None:
        self.config = config.with_service_key()
        self.store = store
        self.service = UserIndexService(LocalUserIndex(store, cache_users))
        self.server = service_server(
            self.config,
            self.service,
            f"userindex-{self.config.node_id}",
            health_check=store.healthy,
            stats_section="userindex",
        )

    @classmethod
    def from_config(cls, config: Config, cache_users: int = 100_000) -> UserIndexProcess:
        """The process on the store the configuration names (not opened yet)."""
        try:
            store = open_store(config.store_spec)
        except ValueError as exc:
            raise ConfigError(f"config store: {exc}") from None
        return cls(config, store, cache_users)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.store.open()
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop(self.config.shutdown_grace_s)
        await self.store.close()


async def _serve(process: UserIndexProcess, host: str, port: int, ready: Path | None) -> None:
    stopped = stop_signal()
    bound_host, bound_port = await process.start(host, port)
    print(f"pyserver: user index service listening on {bound_host}:{bound_port}", flush=True)
    announce_ready(ready, "userindex", f"{bound_host}:{bound_port}")
    try:
        await stopped.wait()
    finally:
        withdraw_ready(ready)
        await process.stop()


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides={"data_dir": args.data})
    configure_logging(config.log_level)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    process = UserIndexProcess.from_config(config, args.cache_users)
    run(_serve(process, args.host or config.host, args.port, args.ready_file))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `userindex` to the `pyserver` command line."""
    sub = commands.add_parser("userindex", help="run the user index service (its own process)")
    sub.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    sub.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
    sub.add_argument("--host", help="address to listen on (default: the config's host)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    sub.add_argument("--cache-users", type=int, default=100_000, help="hot users' friend lists")
    add_ready_file_argument(sub)
    sub.set_defaults(handler=_run)
    return sub
