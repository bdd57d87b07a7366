"""Eager start of coroutines: run to the first real suspension now, make a task only then.

Most requests of a cached user finish without ever waiting (a COUNTS touches
no store), so a Task per request (allocation, scheduling, one more loop
iteration) would be most of their cost. This is Python 3.12's
`asyncio.eager_task_factory` for one coroutine, on 3.11.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` until it first suspends; None if it finished, else the task carrying it on.

    Exceptions raised before the first suspension propagate to the caller, as they
    would from a plain call.
    """
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_carry_on(coro, awaited))


async def _carry_on(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Drive a started coroutine: wait for what it awaits, then resume it, until it returns.

    The coroutine yielded an asyncio future (or None, a bare yield to the loop). Once
    that future is done, `send(None)` resumes the coroutine, which reads the future's
    result or exception itself, exactly as when a Task drives it.
    """
    try:
        while True:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                # The coroutine's own `await` marked the future as blocking; a Task clears
                # the mark when it takes the future over, and so must we.
                awaited._asyncio_future_blocking = False
                try:
                    await awaited
                except asyncio.CancelledError:
                    if not awaited.cancelled():
                        # This task was cancelled while what it awaited was not:
                        # cancel the coroutine where it waits, as a Task would.
                        awaited = coro.throw(asyncio.CancelledError())
                        continue
                except BaseException:
                    pass  # the coroutine reads the exception from the future itself
            awaited = coro.send(None)
    except StopIteration:
        return
