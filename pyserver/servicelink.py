"""A server-side link to another tier: one connection, opened on first use, replaced when it
drops, and a short pause after a failed connect.

Every part that calls another process through `pyserver.client` (an app server
calling the user index or the dirty service, the MTA calling an app server, a
node relaying to its peers) holds its connection this way. While the other side
is down, a call costs a fast `Unavailable`, not a connect timeout each time: the
caller decides what that means (file a message in the default folder, answer
SMTP 451, retry another owner).

May import: pyserver.errors, pyserver.addresses, pyserver.client, pyserver.servicekey.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

from pyserver.addresses import parse_host_port
from pyserver.client import Client
from pyserver.errors import Unavailable
from pyserver.servicekey import ServiceKey

__all__ = ["ServiceLink", "ServiceLinks"]


class ServiceLink:
    """The link to the service at host:port, as the service tier `name` (for messages).

    `request_timeout_s` is the default bound of a request; a failed connect makes
    every call for the next `retry_connect_after_s` fail at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        *,
        name: str = "service",
        connect_timeout_s: float = 1.0,
        request_timeout_s: float = 10.0,
        retry_connect_after_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.port = port
        self.name = name
        self._service_key = service_key
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._retry_connect_after_s = retry_connect_after_s
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._connect_failed_at: float | None = None
        self._closed = False

    @classmethod
    def from_address(cls, address: str, service_key: ServiceKey, **options: Any) -> ServiceLink:
        """A link to "host:port"; ValueError if the address is not one."""
        host, port = parse_host_port(address)
        return cls(host, port, service_key, **options)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def client(self, retry_now: bool = False) -> Client:
        """The connected client; Unavailable if the service cannot be reached now.
        `retry_now`: try to connect even within the pause after a failed connect."""
        client = self._client
        if client is not None and client.connected:
            return client
        async with self._connecting:  # one connect at a time; the others wait for it
            client = self._client
            if client is not None and client.connected:
                return client
            if self._closed:
                raise Unavailable(f"the link to the {self.name} at {self.address} is closed")
            if client is not None:  # dropped: a new connection replaces it
                self._client = None
                await client.close()
            failed_at = self._connect_failed_at
            paused = (
                failed_at is not None and time.monotonic() - failed_at < self._retry_connect_after_s
            )
            if paused and not retry_now:
                raise Unavailable(f"the {self.name} at {self.address} is down")
            try:
                client = await Client.connect(
                    self.host,
                    self.port,
                    service_key=self._service_key,
                    tls=self.tls,
                    reconnect=False,
                    connect_timeout=self._connect_timeout_s,
                    request_timeout=self._request_timeout_s,
                )
            except Unavailable:
                self._connect_failed_at = time.monotonic()
                raise
            self._connect_failed_at = None
            if self._closed:
                await client.close()
                raise Unavailable(f"the link to the {self.name} at {self.address} is closed")
            self._client = client
            return client

    async def request(
        self,
        op: int,
        payload: dict[str, Any],
        timeout: float | None = None,
        retry_now: bool = False,
    ) -> dict[str, Any]:
        """One request on the link (the client's typed errors as they are)."""
        client = await self.client(retry_now)
        return await client.request(op, payload, timeout or self._request_timeout_s)

    async def close(self) -> None:
        self._closed = True
        async with self._connecting:
            client, self._client = self._client, None
        if client is not None:
            await client.close()


class ServiceLinks:
    """One `ServiceLink` per address ("host:port"), made on first use: a node's links to the
    other app servers it relays to."""

    def __init__(self, service_key: ServiceKey, **options: Any) -> None:
        self._service_key = service_key
        self._options = options
        self._links: dict[str, ServiceLink] = {}
        self._closed = False

    async def get(self, addr: str) -> Client:
        """The connected client of `addr`; Unavailable if it cannot be reached now."""
        link = self._links.get(addr)
        if link is None:
            if self._closed:
                raise Unavailable("the links are closed")
            try:
                link = ServiceLink.from_address(addr, self._service_key, **self._options)
            except ValueError:
                raise Unavailable(f"{addr!r} is not a host:port address") from None
            self._links[addr] = link
        return await link.client()

    def addresses(self) -> list[str]:
        return sorted(self._links)

    async def discard(self, addr: str) -> None:
        """Close and forget the link to `addr` (a server that left the cell)."""
        link = self._links.pop(addr, None)
        if link is not None:
            await link.close()

    async def close(self) -> None:
        self._closed = True
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
