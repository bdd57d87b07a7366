"""What many test modules need, written once: running a scenario on a fresh event loop,
a free loopback port, and the native twin of a core part (or a skip under
PYSERVER_PURE=1, never otherwise)."""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TypeVar

import pytest

from pyserver.app.loop import new_event_loop
from pyserver.implementation import PURE_FORCED

__all__ = ["free_port", "native", "run"]

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
