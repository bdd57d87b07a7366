"""The operators' page of the web tier: `/ops` (HTML, redrawn every few seconds) and
`/ops.json`, the survey `pyserver cells` shows (cells, app servers, services, figures).

Operators only: a request must carry the service key or the operator token
(`ops_token` in the configuration), as `Authorization: Bearer <secret>` or as
the password of HTTP Basic authentication (any user name), so a browser can ask
for it. Anything else gets 401 and a Basic challenge; nothing about the cluster
is said before. The survey itself is given by whoever builds the web tier
(`pyserver.processes.web`), so this module only checks and renders.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

__all__ = ["OpsPage"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
REFRESH_S = 5


def _secret_of(request: web.Request) -> str | None:
    """The secret an Authorization header carries (Bearer, or Basic's password)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, _, password = decoded.partition(":")
        return password or None
    return None


class OpsPage:
    """`/ops` and `/ops.json` over `survey()`, for requests `allowed(secret)` accepts."""

    def __init__(
        self,
        survey: Callable[[], Awaitable[dict[str, Any]]],
        allowed: Callable[[str], bool],
    ) -> None:
        self._survey = survey
        self._allowed = allowed
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.ChainableUndefined,
        )
        self._templates.filters["num"] = _num
        self._templates.filters["ms"] = _ms
        self._templates.filters["clock"] = lambda t: time.strftime("%H:%M:%S", time.localtime(t))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ops", self.page)
        app.router.add_get("/ops.json", self.json)

    def _check(self, request: web.Request) -> None:
        secret = _secret_of(request)
        if secret is None or not self._allowed(secret):
            raise web.HTTPUnauthorized(
                text="the service key or an operator token is needed\n",
                headers={"WWW-Authenticate": 'Basic realm="pyserver operators"'},
            )

    async def json(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response(await self._survey())

    async def page(self, request: web.Request) -> web.Response:
        self._check(request)
        report = await self._survey()
        html = self._templates.get_template("ops.html").render(
            report=report,
            refresh_s=REFRESH_S,
            static=lambda path: request.app.router["static"].url_for(filename=path),
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8")


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(entry: dict[str, Any]) -> str:
    return f"{_num(entry.get('p50_ms'), 2)} / {_num(entry.get('p99_ms'), 2)}"
