"""The event loop the app server runs on: uvloop when it is there and wanted, else asyncio's.

`PYSERVER_PURE=1` asks for the pure-Python side of every twin, the loop included.
"""

from __future__ import annotations

import asyncio

from pyserver.implementation import PURE_FORCED

__all__ = ["loop_implementation", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's unless PYSERVER_PURE=1 or uvloop is not installed."""
    if not PURE_FORCED:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_implementation(loop: asyncio.AbstractEventLoop) -> str:
    """Which kind of loop `loop` is, "uvloop" or "asyncio" (for logs and doctor output)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
