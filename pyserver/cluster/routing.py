"""Requests for a user sent to that user's owner: pooled connections, NOT_OWNER, retries.

`OwnerRouter(locate, service_key)` sends a per-user request to the app server
`locate(user)` names ("host:port"), over one link per server
(`pyserver.servicelink.ServiceLinks`). A NOT_OWNER answer is followed at once to the owner it
names (a few hops in a row at most, then the router pauses and asks `locate`
again); UNAVAILABLE, CONFLICT and a lost or refused connection are retried with
a short exponential back-off, `locate` being asked again each time, until the
request's deadline. Whatever error remains then is raised: other errors
(BAD_REQUEST, NOT_FOUND, ...) at once.

App servers use it to deliver SEND copies to recipients' owners
(`locate` = their own ring); a client that knows a cell's ring (a
`pyserver.cluster.ringwatch.RingWatch`) uses it to reach users directly.
A retried request may have been applied already, so route only requests that
are safe to repeat: reads, SEND and DELIVER with a key, DELIVER_COPY, and the
writes that say where they leave the mailbox (MARK_READ, MOVE, ...).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from pyserver.errors import NotOwner, PyserverError, Unavailable
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLinks
from pyserver.wire.ops import Op

__all__ = ["OwnerRouter"]

log = logging.getLogger(__name__)

# Errors worth another try: the owner is fenced, starting, draining or moving; a write
# lost its compare-and-set too often; the connection failed.
_RETRIABLE_CODES = frozenset({"UNAVAILABLE", "CONFLICT"})


class OwnerRouter:
    """Sends each user's requests to the user's owner (see the module docstring)."""

    def __init__(
        self,
        locate: Callable[[int], str | None],
        service_key: ServiceKey = "",
        *,
        pool: ServiceLinks | None = None,
        timeout_s: float = 5.0,
        max_hops: int = 3,
        backoff_initial_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        if pool is None and not service_key:
            raise ValueError("give a service_key or a pool")
        self._locate = locate
        self.pool = pool if pool is not None else ServiceLinks(service_key, retry_connect_after_s=0)
        self._own_pool = pool is None
        self.timeout_s = timeout_s
        self._max_hops = max_hops
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        # "redirects" (NOT_OWNER followed), "retries" (after a retriable error),
        # "failures" (requests that raised)
        self.counters: Counter[str] = Counter()
        # every error answer met on the way, by code (NOT_OWNER, UNAVAILABLE, ...)
        self.errors: Counter[str] = Counter()

    async def request(
        self,
        user_id: int,
        op: Op | int,
        payload: dict[str, Any],
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """The reply of the user's owner to one request (see the module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        delay = self._backoff_initial_s
        hint: str | None = None
        hops = 0
        while True:
            addr = hint or self._locate(user_id)
            hint = None
            remaining = deadline - loop.time()
            error: PyserverError
            if addr is None:
                error = Unavailable(f"no app server owns user {user_id} now")
            elif remaining <= 0:
                error = Unavailable(f"no answer for user {user_id} in time")
            else:
                try:
                    client = await self.pool.get(addr)
                    return await client.request(op, payload, timeout=remaining)
                except NotOwner as redirect:
                    self.errors[redirect.code] += 1
                    self.counters["redirects"] += 1
                    hops += 1
                    if redirect.owner and redirect.owner != addr and hops <= self._max_hops:
                        hint = redirect.owner
                        continue
                    error = redirect
                except PyserverError as failure:
                    self.errors[failure.code] += 1
                    if failure.code not in _RETRIABLE_CODES:
                        self.counters["failures"] += 1
                        raise
                    error = failure
            hops = 0
            if loop.time() + delay >= deadline:
                self.counters["failures"] += 1
                raise error
            self.counters["retries"] += 1
            log.debug("retrying user=%d op=%s after %r", user_id, op, error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)

    async def close(self) -> None:
        if self._own_pool:
            await self.pool.close()
