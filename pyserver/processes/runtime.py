"""One pyserver process (`pyserver run`, `node`, `mta`, `discovery`, ...): its logging,
its event loop, its readiness file, a service's /metrics, and serving until SIGINT or
SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyserver
from pyserver import endpoints
from pyserver.app.loop import new_event_loop
from pyserver.errors import Unavailable
from pyserver.httpapi import HttpEndpoint
from pyserver.metrics import Metrics

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


# the pause between start attempts while a process's engines do not answer: doubling, up to
START_PAUSE_S = (0.5, 10.0)


async def start_when_engines_answer(
    start: Callable[[], Awaitable[T]], name: str, stopped: asyncio.Event
) -> T | None:
    """What `start()` gives once it succeeds. While it raises Unavailable (ZooKeeper or the
    store does not answer: a process restarted during an outage), say so and try again
    with a doubling pause, rather than exit, until `stopped` is set (then None)."""
    pause, longest = START_PAUSE_S
    while True:
        try:
            return await start()
        except Unavailable as error:
            print(
                f"pyserver: {name} waiting for its engines: {error}; again in {pause:g} s",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), pause)
        if stopped.is_set():
            return None
        pause = min(2 * pause, longest)


# The cyclic garbage collector of a long-running server: young collections every
# 50,000 allocations instead of 700 (most request objects die before, so few are
# promoted), and a full collection only after 20 x 10 of those. With the defaults a
# cell spends a fifth of its CPU in full collections, each a walk over every cached
# user's image, longer the more users it caches (docs/benchmarks.md, "The garbage
# collector, and texts out at 2,000/s").
SERVER_GC_THRESHOLDS = (50_000, 20, 10)


def tune_collector() -> None:
    """Set the server's collector thresholds, and move what exists now (modules,
    configuration) out of its sight: it lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop (uvloop unless PYSERVER_PURE=1), with
    the collector tuned for a long-running server."""
    tune_collector()
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
    add_http_port_argument(parser)
    add_ready_file_argument(parser)


def add_http_port_argument(parser: argparse.ArgumentParser) -> None:
    """`--http-port N`: serve /metrics and /health there (0: any free port; default none)."""
    parser.add_argument(
        "--http-port", type=int, help="/metrics and /health port (0: any free port; default none)"
    )


async def start_metrics_endpoint(
    process: Any, role: str, host: str, port: int | None
) -> tuple[HttpEndpoint | None, dict[str, Any]]:
    """A service's /metrics and /health on `port` (None: none); the endpoint and its address
    for the ready file (`{"http": {"host", "port"}}`). The figures are `process.metrics`
    when it has them (its requests, through its dispatcher's observer), else only what the
    process is (`pyserver_info`); /health asks `process.healthy()` when it has one."""
    if port is None:
        return None, {}
    metrics = getattr(process, "metrics", None)
    if not isinstance(metrics, Metrics):
        metrics = Metrics()
    metrics.describe(role=role, version=pyserver.__version__)
    healthy = getattr(process, "healthy", None)

    async def health() -> dict[str, Any]:
        ok = bool(await healthy()) if healthy is not None else True
        return {"status": "ok" if ok else "unavailable", "role": role}

    config = getattr(process, "config", None)
    tls = config.public_tls() if config is not None else None
    endpoint = HttpEndpoint(metrics, health)
    bound = await endpoint.start(host, port, tls=tls)
    return endpoint, {"http": {"host": host, "port": bound}}


class ServiceProcess(Protocol):
    """A service with its listener, as `serve_service` runs it."""

    async def start(self, host: str, port: int) -> tuple[str, int]: ...

    async def stop(self) -> None: ...

    def banner(self) -> list[str]:
        """What it says under its first line once it serves (settings worth seeing)."""
        ...


async def serve_service(
    process: ServiceProcess,
    role: str,
    title: str,
    host: str,
    port: int,
    ready: Path | None,
    http_port: int | None = None,
    *,
    remake: Callable[[], ServiceProcess] | None = None,
) -> None:
    """Start the service (and with `http_port` its /metrics, `start_metrics_endpoint`), say
    where it listens (and write the ready file), serve until SIGINT or SIGTERM, then stop
    it. With `remake`, a start refused because an engine does not answer is tried again
    on a new process from `remake` until it succeeds (`start_when_engines_answer`)."""
    stopped = stop_signal()
    if remake is None:
        bound_host, bound_port = await process.start(host, port)
    else:
        attempt: ServiceProcess | None = process

        async def start() -> tuple[ServiceProcess, tuple[str, int]]:
            nonlocal attempt
            current, attempt = attempt or remake(), None
            return current, await current.start(host, port)

        started = await start_when_engines_answer(start, title, stopped)
        if started is None:
            return
        process, (bound_host, bound_port) = started
    try:
        http, addresses = await start_metrics_endpoint(process, role, host, http_port)
    except BaseException:
        await process.stop()
        raise
    print(f"pyserver: {title} listening on {bound_host}:{bound_port}", flush=True)
    if addresses:
        print(f"  http       http://{host}:{addresses['http']['port']}/metrics", flush=True)
    for line in process.banner():
        print(f"  {line}", flush=True)
    announce_ready(ready, role, f"{bound_host}:{bound_port}", addresses)
    try:
        await stopped.wait()
    finally:
        withdraw_ready(ready)
        if http is not None:
            await http.stop()
        await process.stop()
