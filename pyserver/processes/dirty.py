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
from pyserver.metrics import Metrics
from pyserver.processes.assembly import service_server
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service

__all__ = ["DEFAULT_PORT", "DirtyProcess", "add_parser"]

DEFAULT_PORT = 7420


class DirtyProcess:
    """The service and its listener, started and stopped together."""

    def __init__(self, config: Config, centres: Sequence[DataCentre]) -> None:
        self.config = config.with_service_key()
        self.service = DirtyService(centres)
        self.metrics = Metrics()  # served on --http-port (processes.runtime)
        self.server = service_server(
            self.config,
            self.service,
            f"dirty-{self.config.node_id}",
            stats_section="dirty",
            observer=self.metrics,
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.service.start()
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop(self.config.shutdown_grace_s)
        await self.service.close()

    def banner(self) -> list[str]:
        return [f"data centres  {' '.join(str(centre) for centre in self.service.centres)}"]


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
    host = args.host or config.host
    run(
        serve_service(
            process,
            "dirty",
            "dirty service",
            host,
            args.port,
            args.ready_file,
            args.http_port,
            remake=lambda: DirtyProcess(config, centres),
        )
    )
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `dirty` to the `pyserver` command line."""
    sub = commands.add_parser("dirty", help="run the memcache dirty service (its own process)")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "the cell's data folder (service key)")
    sub.add_argument(
        "--dc",
        action="append",
        metavar="NAME=HOST:PORT",
        help="a data centre's memcached (repeat per data centre; HOST:PORT+HOST:PORT for several)",
    )
    sub.set_defaults(handler=_run)
    return sub
