"""`pyserver dirty`: the memcache dirty service as its own process.

Owns the command line and the life of the process: it connects to every data
centre's memcached (`--dc NAME=HOST:PORT[+HOST:PORT...]`, or the config's
`memcached_dcs`), serves `DirtyService` on the app server's wire shell until
SIGINT or SIGTERM, then stops gracefully.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyserver.addresses import DataCentre, parse_data_centres
from pyserver.config import Config, load_config
from pyserver.dirty.service import DirtyService
from pyserver.processes.assembly import service_server
from pyserver.processes.runtime import (
    add_ready_file_argument,
    announce_ready,
    configure_logging,
    run,
    stop_signal,
    withdraw_ready,
)

__all__ = ["DEFAULT_PORT", "DirtyProcess", "add_parser"]

DEFAULT_PORT = 7420


class DirtyProcess:
    """The service and its listener, started and stopped together."""

    def __init__(self, config: Config, centres: Sequence[DataCentre]) -> None:
        self.config = config.with_service_key()
        self.service = DirtyService(centres)
        self.server = service_server(
            self.config, self.service, f"dirty-{self.config.node_id}", stats_section="dirty"
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.service.start()
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop(self.config.shutdown_grace_s)
        await self.service.close()


async def _serve(process: DirtyProcess, host: str, port: int, ready: Path | None) -> None:
    stopped = stop_signal()
    bound_host, bound_port = await process.start(host, port)
    centres = " ".join(str(centre) for centre in process.service.centres)
    print(f"pyserver: dirty service listening on {bound_host}:{bound_port}", flush=True)
    print(f"  data centres  {centres}", flush=True)
    announce_ready(ready, "dirty", f"{bound_host}:{bound_port}")
    try:
        await stopped.wait()
    finally:
        withdraw_ready(ready)
        await process.stop()


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides={"data_dir": args.data})
    configure_logging(config.log_level)
    try:
        centres = parse_data_centres(args.dc or config.memcached_dcs)
    except ValueError as exc:
        print(f"pyserver dirty: {exc}", file=sys.stderr)
        return 2
    if not centres:
        print("pyserver dirty: no data centre (--dc NAME=HOST:PORT)", file=sys.stderr)
        return 2
    process = DirtyProcess(config, centres)
    run(_serve(process, args.host or config.host, args.port, args.ready_file))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `dirty` to the `pyserver` command line."""
    sub = commands.add_parser("dirty", help="run the memcache dirty service (its own process)")
    sub.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    sub.add_argument(
        "--data", type=Path, default=default_data, help="the cell's data folder (service key)"
    )
    sub.add_argument("--host", help="address to listen on (default: the config's host)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    sub.add_argument(
        "--dc",
        action="append",
        metavar="NAME=HOST:PORT",
        help="a data centre's memcached (repeat per data centre; HOST:PORT+HOST:PORT for several)",
    )
    add_ready_file_argument(sub)
    sub.set_defaults(handler=_run)
    return sub
