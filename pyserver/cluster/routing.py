"""Requests for a user sent to that user's owner: pooled connections, NOT_OWNER, retries.

`OwnerRouter(locate, service_key)` sends a per-user request to the app server
`locate(user)` names ("host:port"), over one pooled `pyserver.client.Client`
connection per server. A NOT_OWNER answer is followed at once to the owner it
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

from pyserver.client import Client
from pyserver.errors import NotOwner, PyserverError, Unavailable
from pyserver.wire.ops import Op

__all__ = ["ClientPool", "OwnerRouter"]

log = logging.getLogger(__name__)

# Errors worth another try: the owner is fenced, starting, draining or moving; a write
# lost its compare-and-set too often; the connection failed.
_RETRIABLE_CODES = frozenset({"UNAVAILABLE", "CONFLICT"})


class ClientPool:
    """One `Client` per app server address, connected on first use, replaced when it drops."""

    def __init__(
        self,
        service_key: str,
        *,
        connect_timeout_s: float = 1.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self._service_key = service_key
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._clients: dict[str, Client] = {}
        self._connecting: dict[str, asyncio.Future[Client]] = {}
        self._closed = False

    async def get(self, addr: str) -> Client:
        """The connected client of `addr` ("host:port"); Unavailable if it cannot connect."""
        client = self._clients.get(addr)
        if client is not None and client.connected:
            return client
        if self._closed:
            raise Unavailable("the connection pool is closed")
        pending = self._connecting.get(addr)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._connecting[addr] = future
        try:
            if client is not None:
                self._clients.pop(addr, None)
                await client.close()
            host, _, port = addr.rpartition(":")
            if not host or not port.isdigit():
                raise Unavailable(f"{addr!r} is not a host:port address")
            client = await Client.connect(
                host,
                int(port),
                service_key=self._service_key,
                reconnect=False,
                connect_timeout=self._connect_timeout_s,
                request_timeout=self._request_timeout_s,
            )
            if self._closed:
                await client.close()
                raise Unavailable("the connection pool is closed")
            self._clients[addr] = client
            future.set_result(client)
            return client
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            self._connecting.pop(addr, None)

    def addresses(self) -> list[str]:
        return sorted(self._clients)

    async def discard(self, addr: str) -> None:
        """Close and forget the connection to `addr` (a server that left the cell)."""
        client = self._clients.pop(addr, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


class OwnerRouter:
    """Sends each user's requests to the user's owner (see the module docstring)."""

    def __init__(
        self,
        locate: Callable[[int], str | None],
        service_key: str = "",
        *,
        pool: ClientPool | None = None,
        timeout_s: float = 5.0,
        max_hops: int = 3,
        backoff_initial_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        if pool is None and not service_key:
            raise ValueError("give a service_key or a pool")
        self._locate = locate
        self.pool = pool if pool is not None else ClientPool(service_key)
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
