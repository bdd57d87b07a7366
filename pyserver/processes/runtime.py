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
from typing import Any, TypeVar

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
