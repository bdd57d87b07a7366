"""What many test modules need, written once: running a scenario on a fresh event loop,
a free loopback port, the native twin of a core part (or a skip under
PYSERVER_PURE=1, never otherwise), a `pyserver` process started and waited for
until its ready file says it serves, and a `pyserver` command run to its end."""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from pyserver import endpoints
from pyserver.app.loop import new_event_loop
from pyserver.implementation import PURE_FORCED

__all__ = ["cli", "free_port", "native", "run", "run_cli", "serve_cell", "start_serving"]

T = TypeVar("T")


def run(
    scenario: Callable[[], Awaitable[T]],
    timeout: float = 30.0,
    new_loop: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
) -> T:
    """Run `scenario()` to completion on a new loop (uvloop unless the twins are forced),
    failing it after `timeout` seconds; the loop is closed afterwards."""
    loop = new_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(scenario(), timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def native(module_name: str) -> ModuleType:
    """The native module of a twin; a skip under PYSERVER_PURE=1 only (a missing build
    fails the test)."""
    if PURE_FORCED:
        pytest.skip("PYSERVER_PURE=1 forces the pure twins")
    return importlib.import_module(module_name)


def start_serving(
    args: list[str], ready_file: Path, timeout_s: float = 30.0, **popen: Any
) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
    """`python -m pyserver.cli ARGS --ready-file READY_FILE`, once it serves: the process and
    the addresses it wrote. AssertionError (with its error output) if it exits first or stays
    silent for `timeout_s`."""
    ready_file.unlink(missing_ok=True)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", *args, "--ready-file", str(ready_file)], **popen
    )
    deadline = time.monotonic() + timeout_s
    while (ready := endpoints.read_file(ready_file)) is None:
        failed = proc.poll() is not None or time.monotonic() > deadline
        if failed:
            proc.kill()
            _, errors = proc.communicate(timeout=10)
            raise AssertionError(f"pyserver {args[0]} did not serve in {timeout_s:g} s: {errors}")
        time.sleep(0.05)
    return proc, ready


def serve_cell(
    data: Path, settings: dict[str, str] | None = None, *flags: str
) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
    """`pyserver run` on `data`, every port a free one, the web tier off and the IMAP
    gateway on, with these PYSERVER_* `settings` instead of the environment's own: the
    process and the addresses its ready file holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVER_")}
    return start_serving(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "0", *flags],
        data / "ready.json", env={**env, **(settings or {})},
    )  # fmt: skip


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m pyserver.cli ARGS`, run to its end: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "pyserver.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def cli(*args: str, timeout: float = 60.0) -> str:
    """`pyserver ARGS`'s output; AssertionError (with its errors) if it fails."""
    done = run_cli(*args, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
