"""HTTP listeners that drop slow clients: a request's head must arrive within a deadline.

aiohttp bounds idle keep-alive connections but not a request trickling in a
byte at a time (slowloris): such a connection would hold its socket, and
aiohttp's buffers, for ever. `GuardedSite` listens like aiohttp's `TCPSite`
with each connection wrapped: from the first byte of a request until aiohttp
hands the request to the application, at most `head_timeout_s` may pass, or
the connection is closed (and counted). A request the application is handling
(a long upload, a websocket) is not timed here.

May import: nothing of pyserver.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_runner import BaseSite

__all__ = ["GuardedSite", "SlowClientGuard"]

log = logging.getLogger(__name__)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the head deadline around it."""

    def __init__(self, guard: SlowClientGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request of it is in the application

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._guard.connections[id(transport)] = self
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._guard.head_timeout_s, self._too_slow)
        self._inner.data_received(data)

    def request_started(self) -> None:
        self.busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_done(self) -> None:
        self.busy = False

    def _too_slow(self) -> None:
        self._timer = None
        if self.busy or self._transport is None:
            return
        self._guard.dropped += 1
        peer = self._transport.get_extra_info("peername")
        log.info("http connection dropped peer=%s reason=slow_request_head", peer)
        self._transport.abort()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._guard.connections.pop(id(self._transport), None)
        self._inner.connection_lost(exc)


class SlowClientGuard:
    """The deadline, the connections it watches, and the aiohttp middleware that tells
    it when a request reached the application."""

    def __init__(self, head_timeout_s: float = 30.0) -> None:
        if head_timeout_s <= 0:
            raise ValueError("head_timeout_s must be positive")
        self.head_timeout_s = head_timeout_s
        self.connections: dict[int, _Guarded] = {}
        self.dropped = 0

    def wrap(self, factory: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, factory())

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        connection = self.connections.get(id(request.transport))
        if connection is not None:
            connection.request_started()
        try:
            return await handler(request)
        finally:
            if connection is not None:
                connection.request_done()


class GuardedSite(BaseSite):
    """aiohttp's TCP site, every connection under `guard` (the application must have
    `guard.middleware`, first)."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        guard: SlowClientGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port bound (after `start`)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._guard.head_timeout_s if self._ssl_context else None,
            reuse_address=True,
        )
