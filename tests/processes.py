"""Starting `pyserver` commands as separate processes in tests, and waiting for them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable


def start(args: list[str], env: dict[str, str], ready: Callable[[], bool]) -> subprocess.Popen:
    """`pyserver ARGS` in its own process, once `ready()` says it serves (30 s at most)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{args[0]} exited: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{args[0]} did not come up in 30 s")
        time.sleep(0.05)
    return proc


def listening(port: int) -> Callable[[], bool]:
    """A readiness check: something accepts connections on 127.0.0.1:port."""

    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check
