"""How the proxy reaches a recipient's owner: one small interface, one implementation per topology.

`OwnerRoute.deliver(payload)` sends DELIVER for `payload["user"]` to the app
server that owns that user and returns the reply once the copy is durable;
it raises `Unavailable` when the owner cannot be reached in time (the proxy
then answers 451 and the sending MTA retries). A single-node cell has one app
server owning everyone (`SingleServerRoute` over a connection to it, or
`InProcessRoute` when the proxy runs in the app server's own process); a
cluster's route asks discovery for the owner instead.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pyserver.errors import Unavailable
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLink
from pyserver.wire.ops import Op

__all__ = ["InProcessRoute", "OwnerRoute", "SingleServerRoute"]


class OwnerRoute(Protocol):
    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def request(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        """Any per-user request, at `payload["user"]`'s owner."""
        ...

    async def close(self) -> None: ...


class SingleServerRoute:
    """Every user's owner is the one app server at host:port (a single-node cell).

    Holds a link to it (`pyserver.servicelink`), opened on first use and replaced
    after the server restarts. `timeout_s` bounds a whole delivery, the wait for a
    connection included.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._link = ServiceLink(
            host,
            port,
            service_key,
            name="app server",
            connect_timeout_s=min(timeout_s, 5.0),
            request_timeout_s=timeout_s,
            retry_connect_after_s=0,  # the sending MTA paces its own retries
            tls=tls,
        )

    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.request(Op.DELIVER, payload)

    async def request(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._link.request(op, payload, self._timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"app server {self._link.address} did not answer {op.name} within "
                f"{self._timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        await self._link.close()


class InProcessRoute:
    """Every user's owner is the app server of this very process (the single-node cell
    runs its proxy there): a request is `call(op, payload)`, the app server's dispatcher
    answering as it answers a service connection (`Dispatcher.call`), with no loopback
    connection, frame codec or second JSON parse between. `timeout_s` bounds a request
    as on a connection: a write stuck in the store answers 451, not never."""

    def __init__(
        self,
        call: Callable[[Op, dict[str, Any]], Awaitable[dict[str, Any]]],
        timeout_s: float = 10.0,
    ) -> None:
        self._call = call
        self._timeout_s = timeout_s

    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.request(Op.DELIVER, payload)

    async def request(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._call(op, payload)
        except TimeoutError:
            raise Unavailable(
                f"the app server did not answer {op.name} within {self._timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        """Nothing to close: the app server is the process's own."""
