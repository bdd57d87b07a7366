"""Loopback listeners the benchmarks start beside a cell: a free port, and a process
serving on it (the sinks that are bench mail's ceilings), stopped afterwards."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["free_port", "listening_process"]


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
