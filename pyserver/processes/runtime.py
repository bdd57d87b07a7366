"""One pyserver process (`pyserver run`, `node`, `mta`, `discovery`, ...): its logging,
its event loop, its readiness file, and serving until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pyserver import endpoints
from pyserver.app.loop import new_event_loop

T = TypeVar("T")


def configure_logging(level: str) -> None:
    """Structured-enough lines on standard error, at the configured level."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # aiozk logs every reconnection attempt with a traceback; pyserver.cluster.zk logs what
    # matters (suspended, lost, connected again).
    logging.getLogger("aiozk").setLevel(logging.ERROR)
    logging.getLogger("aiozk.session").setLevel(logging.CRITICAL)


def stop_signal() -> asyncio.Event:
    """An event set when the process receives SIGINT or SIGTERM; the handlers are
    installed now, so call it before starting to serve."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop (uvloop unless PYSERVER_PURE=1)."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


def add_ready_file_argument(parser: argparse.ArgumentParser) -> None:
    """`--ready-file PATH`, which every serving command takes."""
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write this process's addresses here (JSON) once it serves; removed when it stops",
    )


def announce_ready(
    path: Path | None, role: str, addr: str, addresses: dict[str, Any] | None = None
) -> None:
    """Tell whoever started the process that it serves: `role`, `addr` (the "host:port"
    others reach it at) and its other addresses, written atomically to `path`."""
    if path is not None:
        endpoints.write_file(path, {**(addresses or {}), "role": role, "addr": addr})


def withdraw_ready(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def add_service_arguments(
    parser: argparse.ArgumentParser, default_data: Path, default_port: int, data_help: str
) -> None:
    """The flags every service process takes: its configuration, data folder, address and
    ready file."""
    parser.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    parser.add_argument("--data", type=Path, default=default_data, help=data_help)
    parser.add_argument("--host", help="address to listen on (default: the config's host)")
    parser.add_argument("--port", type=int, default=default_port, help="port (0: any free port)")
    add_ready_file_argument(parser)


class ServiceProcess(Protocol):
    """A service with its listener, as `serve_service` runs it."""

    async def start(self, host: str, port: int) -> tuple[str, int]: ...

    async def stop(self) -> None: ...

    def banner(self) -> list[str]:
        """What it says under its first line once it serves (settings worth seeing)."""
        ...


async def serve_service(
    process: ServiceProcess, role: str, title: str, host: str, port: int, ready: Path | None
) -> None:
    """Start the service, say where it listens (and write the ready file), serve until
    SIGINT or SIGTERM, then stop it."""
    stopped = stop_signal()
    bound_host, bound_port = await process.start(host, port)
    print(f"pyserver: {title} listening on {bound_host}:{bound_port}", flush=True)
    for line in process.banner():
        print(f"  {line}", flush=True)
    announce_ready(ready, role, f"{bound_host}:{bound_port}")
    try:
        await stopped.wait()
    finally:
        withdraw_ready(ready)
        await process.stop()
