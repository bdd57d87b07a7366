"""The HTTP side of a process: Prometheus `/metrics` and `/health`, on aiohttp.

May import: pyserver.metrics, pyserver.slowclients.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pyserver.metrics import Metrics
from pyserver.slowclients import GuardedSite, SlowClientGuard


class HttpEndpoint:
    """Serves /metrics and /health until `stop()`."""

    def __init__(
        self,
        metrics: Metrics,
        health: Callable[[], Awaitable[dict[str, Any]]],
        *,
        head_timeout_s: float = 30.0,
    ) -> None:
        self._metrics = metrics
        self._health = health
        # a request's head must arrive within this long (slow clients are dropped)
        self.guard = SlowClientGuard(head_timeout_s)
        self._runner: web.AppRunner | None = None
        # (path, handler) of GET routes other parts add before start()
        self._routes: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = []

    def add_get(
        self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        """Serve GET `path` (aiohttp's route syntax, e.g. "/counts/{user}") too."""
        self._routes.append((path, handler))

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen (HTTPS with `tls`); returns the bound port (port 0 picks a free one)."""
        app = web.Application(middlewares=[self.guard.middleware])
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/health", self._serve_health)
        for path, handler in self._routes:
            app.router.add_get(path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = GuardedSite(self._runner, host, port, self.guard, ssl_context=tls)
        await site.start()
        return site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _serve_health(self, _request: web.Request) -> web.Response:
        health = await self._health()
        status = 200 if health.get("status") == "ok" else 503
        return web.json_response(health, status=status)
