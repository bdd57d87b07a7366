"""A front-end process's own requests, timed into its `Metrics` (its `/metrics`).

The app servers and the services on the binary protocol time every request in
their dispatcher. The processes that speak other protocols use these:

* `http_middleware(metrics)`: an aiohttp middleware (the web tier) that times each
  request as the operation "METHOD /route" (the route's pattern, so
  `/thread/{thread_id}` is one operation however many threads there are); a reply
  of 400 or more counts as the error `HTTP_<status>`, an exception as `INTERNAL`.
* `time_replies(metrics, name, answer)`: wraps an async function that answers with
  an SMTP-style reply ("250 ...", "451 ...") so each call is timed as the
  operation `name`; a reply not starting with 2 counts as the error
  `SMTP_<class>XX` (`SMTP_4XX`: try later, `SMTP_5XX`: refused), an exception as
  `INTERNAL`.

The figures land in `pyserver_requests_total{op,code}` and
`pyserver_request_seconds{op}`, which `pyserver cells`, `/ops` and Prometheus read.

May import: pyserver.metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pyserver.metrics import Metrics

__all__ = ["http_middleware", "time_replies"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    info = request.match_info.route.resource
    pattern = info.canonical if info is not None else "(no route)"
    return f"{request.method} {pattern}"


def http_middleware(metrics: Metrics) -> Any:
    """The aiohttp middleware (module docstring)."""

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        code: str | None = "INTERNAL"
        try:
            response = await handler(request)
            code = f"HTTP_{response.status}" if response.status >= 400 else None
            return response
        except web.HTTPException as answer:
            code = f"HTTP_{answer.status}" if answer.status >= 400 else None
            raise
        finally:
            metrics.observe(_route(request), time.perf_counter() - started, code)

    return observed


def time_replies(
    metrics: Metrics, name: str, answer: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    """`answer`, timed as the operation `name` (module docstring). The reply is the value
    itself, or the first item of a tuple (`(reply, user)`)."""

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        code: str | None = "INTERNAL"
        try:
            result = await answer(*args, **kwargs)
            reply = result[0] if isinstance(result, tuple) else result
            text = str(reply)
            code = None if text.startswith("2") else f"SMTP_{text[:1] or '?'}XX"
            return result
        finally:
            metrics.observe(name, time.perf_counter() - started, code)

    return timed
