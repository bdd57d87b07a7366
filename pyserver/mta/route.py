"""How the proxy reaches a recipient's owner: one small interface, one implementation per topology.

`OwnerRoute.deliver(payload)` sends DELIVER for `payload["user"]` to the app
server that owns that user and returns the reply once the copy is durable;
it raises `Unavailable` when the owner cannot be reached in time (the proxy
then answers 451 and the sending MTA retries). A single-node cell has one app
server owning everyone (`SingleServerRoute`); a cluster's route asks
discovery for the owner instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from pyserver.client import Client
from pyserver.errors import Unavailable
from pyserver.wire.ops import Op

__all__ = ["OwnerRoute", "SingleServerRoute"]


class OwnerRoute(Protocol):
    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class SingleServerRoute:
    """Every user's owner is the one app server at host:port (a single-node cell).

    Connects on first use with the service key and keeps the connection; the
    client reconnects by itself after the server restarts. `timeout_s` bounds
    a whole delivery, the wait for a connection included.
    """

    def __init__(self, host: str, port: int, service_key: str, timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self._service_key = service_key
        self._timeout_s = timeout_s
        self._client: Client | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> Client:
        client = self._client
        if client is not None:
            return client
        async with self._connecting:
            if self._client is None:
                self._client = await Client.connect(
                    self.host,
                    self.port,
                    service_key=self._service_key,
                    connect_timeout=min(self._timeout_s, 5.0),
                    request_timeout=self._timeout_s,
                    backoff_max_s=0.5,
                )
            return self._client

    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout_s):
                client = await self._connected()
                return await client.request(Op.DELIVER, payload, timeout=self._timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"app server {self.host}:{self.port} did not answer DELIVER within "
                f"{self._timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
