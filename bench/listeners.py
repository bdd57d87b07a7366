"""Loopback listeners the benchmarks start: a free port, a process serving on it (the
sinks that are bench mail's ceilings), and `pyserver` commands themselves (a cell, a
web tier) once their ready file says they serve, each stopped afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["free_port", "listening_process", "start_cell", "start_pyserver", "stop_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def listening_process(argv_for: Callable[[int], list[str]], what: str) -> Iterator[int]:
    """`argv_for(port)` started on a free port, once it accepts connections: the port. The
    process is terminated on the way out; RuntimeError if it exits or stays silent 10 s."""
    port = free_port()
    proc = subprocess.Popen(argv_for(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bench: {what} did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_pyserver(args: list[str], ready: Path) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
    """`python -m pyserver.cli ARGS --ready-file READY` on the native core (never the pure
    twins), once it serves: the process and the addresses its ready file holds.
    RuntimeError, with its error output, if it exits or stays silent 60 s."""
    from pyserver import endpoints

    env = {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", *args, "--ready-file", str(ready)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while (addresses := endpoints.read_file(ready)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            errors = proc.stderr.read() if proc.stderr else b""
            raise RuntimeError(f"bench: pyserver {args[0]} did not start: {errors!r}")
        time.sleep(0.05)
    return proc, addresses


def start_cell(
    data: Path, *flags: str, imap: bool = False
) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
    """`pyserver run` on `data` with these `flags`, every port a free one, no web tier and
    the IMAP gateway only with `imap`, as `start_pyserver` starts it (ready file
    `data`/ready.json)."""
    return start_pyserver(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "0" if imap else "-1", *flags],
        data / "ready.json",
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still there after `timeout_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
