"""The web tier: the inbox and web chat in a browser, on aiohttp, over the app servers.

Owns the HTTP side a person uses: sign-in (`sessions`), server-rendered pages
(`templates/`, Jinja2 with autoescaping), a small script (`static/app.js`) that
keeps a page live over a WebSocket (`live`), attachment downloads streamed from
GET_BLOB ranges, and uploads put into the blob store before a SEND names them.
Every request to an app server goes through the session's `Viewer`, so a
browser reaches its own user's mailbox only.

Safety, besides the session and CSRF rules of `sessions`:

- everything a message brings (text, subject, sender, file names) is escaped by
  the templates or set as text by the script; an HTML mail is shown as the text
  the MTA proxy made of it;
- a Content-Security-Policy allows only this site's own script and style, with
  no inline script at all, so markup that slipped through would not run;
- downloads are `Content-Disposition: attachment` with `nosniff`, so an HTML or
  SVG attachment is saved, never rendered on this origin;
- a WebSocket is accepted only from this site's own pages (its Origin);
- request bodies are bounded (`max_upload_bytes`), and so are WebSocket messages.

Calls `Viewer` (app servers), `CountReader` (counts) and a `BlobStore` (uploads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import orjson
from aiohttp import WSMsgType, web

from pyserver.app.auth import UserToken
from pyserver.blobs import BlobStore
from pyserver.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PyserverError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from pyserver.metrics import Metrics
from pyserver.observe import http_middleware
from pyserver.servicekey import ServiceKey
from pyserver.slowclients import GuardedSite, SlowClientGuard
from pyserver.userid import is_user_id
from pyserver.web.live import LiveHub
from pyserver.web.ops import OpsPage
from pyserver.web.sessions import LOGIN_COOKIE, SESSION_COOKIE, SessionKeeper, WebSession
from pyserver.web.viewer import FOLDERS, AppServers, Viewer

__all__ = ["WebTier"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATUS = {
    BadRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    TooLarge: 413,
    Unavailable: 503,
}
_MAX_TEXT = 64 << 10  # a message typed in the browser
_MAX_WS_MESSAGE = 256 << 10
_CHANNELS = ("web", "chat", "email", "sms")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebTier:
    """The web tier of one process: `start()` listens, `stop()` closes pages and the app.

    `servers` reaches the app servers (a `Client` or a `ClusterClient`); `counts`
    reads a user's COUNTS (a `CountReader`'s read: memcached when there is one); `blobs`
    takes uploads (None: sending files is refused).
    """

    def __init__(
        self,
        servers: AppServers,
        service_key: ServiceKey,
        *,
        counts: Callable[[int], Awaitable[dict[str, Any]]],
        blobs: BlobStore | None = None,
        max_upload_bytes: int = 25 << 20,
        session_lifetime_s: int = 7 * 86_400,
        secure_cookies: bool = False,
        revoked: Callable[[UserToken], bool] | None = None,
        tls: ssl.SSLContext | None = None,
        head_timeout_s: float = 30.0,
        ops: OpsPage | None = None,
    ) -> None:
        self.servers = servers
        # the operators' page (/ops, /ops.json); None: not served
        self.ops = ops
        self.sessions = SessionKeeper(service_key, lifetime_s=session_lifetime_s, revoked=revoked)
        # HTTPS with this context (and cookies marked Secure); None: plain HTTP
        self.tls = tls
        # a request's head must arrive within head_timeout_s (slow clients are dropped)
        self.guard = SlowClientGuard(head_timeout_s)
        # the process's figures, when it serves /metrics (pyserver.observe)
        self.metrics: Metrics | None = None
        secure_cookies = secure_cookies or tls is not None
        self._counts = counts
        self.blobs = blobs
        self.max_upload_bytes = max_upload_bytes
        self._secure_cookies = secure_cookies
        self.live = LiveHub()
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._templates.filters["when"] = _when
        self._templates.filters["sender"] = _sender
        self._templates.filters["size"] = _size
        self._templates.globals["new_key"] = new_key

    # ---- lifetime ----

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_upload_bytes + (64 << 10),
            # with `metrics` (the web process's /metrics), every request timed first
            middlewares=[
                *([http_middleware(self.metrics)] if self.metrics is not None else []),
                self.guard.middleware,
                self._errors,
            ],
        )
        app.on_response_prepare.append(_security_headers)
        get, post = app.router.add_get, app.router.add_post
        get("/", self._home)
        get("/favicon.ico", _no_icon)
        get("/login", self._login_page)
        post("/login", self._login)
        post("/logout", self._signed_in(self._logout, csrf=True))
        get("/folder/{folder}", self._signed_in(self._folder))
        get("/thread/{thread_id}", self._signed_in(self._thread))
        post("/thread/{thread_id}/reply", self._signed_in(self._reply, csrf=True))
        post("/thread/{thread_id}/move", self._signed_in(self._move, csrf=True))
        post("/thread/{thread_id}/delete", self._signed_in(self._delete, csrf=True))
        post("/thread/{thread_id}/unread", self._signed_in(self._unread, csrf=True))
        get("/compose", self._signed_in(self._compose_page))
        post("/compose", self._signed_in(self._compose, csrf=True))
        get("/search", self._signed_in(self._search))
        get("/friends", self._signed_in(self._friends))
        post("/friends/add", self._signed_in(self._friend_add, csrf=True))
        post("/friends/remove", self._signed_in(self._friend_remove, csrf=True))
        get("/attachment/{message_id}/{ref}", self._signed_in(self._attachment))
        get("/api/counts", self._signed_in(self._api_counts))
        get("/api/threads", self._signed_in(self._api_threads))
        get("/api/thread/{thread_id}", self._signed_in(self._api_thread))
        post("/api/thread/{thread_id}/read", self._signed_in(self._api_read, csrf=True))
        get("/live", self._signed_in(self._live))
        if self.ops is not None:
            self.ops.add_routes(app)
        app.router.add_static("/static", _HERE / "static", name="static", append_version=True)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (0 picks a free one)."""
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = GuardedSite(self._runner, host, port, self.guard, ssl_context=self.tls)
        await site.start()
        return site.port

    async def stop(self) -> None:
        """Close every live page (their scripts reconnect to wherever the tier comes back)."""
        for socket in list(self._sockets):
            with contextlib.suppress(Exception):
                await socket.close(code=1012, message=b"server restarting")
        await self.live.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- sessions ----

    def _session_of(self, request: web.Request) -> WebSession | None:
        return self.sessions.read(request.cookies.get(SESSION_COOKIE))

    def _signed_in(self, handler: Handler, *, csrf: bool = False) -> Handler:
        """`handler` for a signed-in browser only (with its CSRF token, for a form)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self._session_of(request)
            if session is None:
                if request.path.startswith(("/api/", "/live", "/attachment/")):
                    raise web.HTTPUnauthorized(text="sign in first")
                raise web.HTTPSeeOther("/login")
            if csrf:
                given = request.headers.get("X-CSRF-Token")
                if given is None:
                    given = (await request.post()).get("csrf")
                if not self.sessions.check_csrf(session, given):  # type: ignore[arg-type]
                    raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
            request["session"] = session
            request["viewer"] = Viewer(self.servers, session.user, self._counts)
            return await handler(request)

        return guarded

    # ---- pages ----

    def _render(self, request: web.Request, name: str, **values: Any) -> web.Response:
        session: WebSession | None = request.get("session")
        values.setdefault("folders", FOLDERS)
        values.setdefault("counts", {})
        values.setdefault("folder", None)
        values.setdefault("user", session.user if session else None)
        values.setdefault("csrf", session.csrf if session else "")
        page = self._templates.get_template(name).render(
            static=lambda path: request.app.router["static"].url_for(filename=path),
            **values,
        )
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def _home(self, request: web.Request) -> web.StreamResponse:
        if self._session_of(request) is None:
            raise web.HTTPSeeOther("/login")
        raise web.HTTPSeeOther("/folder/inbox")

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token:  # a sign-in link, as `scripts/run` prints one
            return self._sign_in(request, token)
        nonce, form_token = self.sessions.new_login_nonce()
        response = self._render(request, "login.html", login_csrf=form_token, error=None)
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="Strict", path="/login"
        )
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not self.sessions.check_login_csrf(
            request.cookies.get(LOGIN_COOKIE), _field(form, "csrf")
        ):
            raise web.HTTPForbidden(text="the sign-in form expired: reload it")
        return self._sign_in(request, _field(form, "token"))

    def _sign_in(self, request: web.Request, token: str) -> web.StreamResponse:
        try:
            session, cookie = self.sessions.sign_in(token)
        except Unauthenticated as exc:
            nonce, form_token = self.sessions.new_login_nonce()
            response = self._render(request, "login.html", login_csrf=form_token, error=str(exc))
            response.set_status(401)
            response.set_cookie(
                LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="Strict", path="/login"
            )
            return response
        response = web.HTTPSeeOther("/folder/inbox")
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=max(1, session.expires_at - int(time.time())),
            httponly=True,
            samesite="Strict",
            secure=self._secure_cookies,
            path="/",
        )
        response.del_cookie(LOGIN_COOKIE, path="/login")
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.sign_out(request["session"])
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    async def _folder(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        folder = _folder_name(request.match_info["folder"])
        page, counts = await asyncio.gather(
            viewer.threads(folder, request.query.get("before")), viewer.counts()
        )
        return self._render(
            request, "folder.html", folder=folder, page=page, counts=counts, me=viewer.user
        )

    async def _thread(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        thread_id = request.match_info["thread_id"]
        thread = await viewer.thread(thread_id, request.query.get("before"))
        if any(message["unread"] for message in thread["messages"]):
            await viewer.mark_read(thread_id)  # opening a thread reads it
            for message in thread["messages"]:
                message["unread"] = False
        counts = await viewer.counts()
        return self._render(
            request,
            "thread.html",
            thread=thread,
            counts=counts,
            folder=thread["folder"],
            me=viewer.user,
            reply_to=_reply_recipients(thread, viewer.user),
        )

    async def _reply(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        thread_id = request.match_info["thread_id"]
        form = await request.post()
        thread = await viewer.thread(thread_id, limit=1)
        await viewer.send(
            _reply_recipients(thread, viewer.user),
            _text(_field(form, "text")),
            channel="web",
            subject=_field(form, "subject")[:500],
            key=_field(form, "key")[:64] or None,
        )
        raise web.HTTPSeeOther(f"/thread/{_quote(thread_id)}")

    async def _move(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        form = await request.post()
        await viewer.move(request.match_info["thread_id"], _folder_name(_field(form, "folder")))
        raise web.HTTPSeeOther(_back(form))

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        await viewer.delete(request.match_info["thread_id"])
        raise web.HTTPSeeOther(_back(await request.post()))

    async def _unread(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        await viewer.mark_unread(request.match_info["thread_id"])
        raise web.HTTPSeeOther(_back(await request.post()))

    async def _compose_page(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        counts = await viewer.counts()
        return self._render(
            request,
            "compose.html",
            counts=counts,
            to=request.query.get("to", ""),
            max_upload=self.max_upload_bytes,
            error=None,
        )

    async def _compose(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        form = await request.post()
        recipients = _recipients(_field(form, "to"))
        attachments = []
        for upload in form.getall("file", []):
            if isinstance(upload, web.FileField) and upload.filename:
                attachments.append(await self._store_upload(upload))
        reply = await viewer.send(
            recipients,
            _text(_field(form, "text")),
            channel="web",
            subject=_field(form, "subject")[:500],
            attachments=attachments,
            key=_field(form, "key")[:64] or None,
        )
        raise web.HTTPSeeOther(f"/thread/{_quote(reply['thread_id'])}")

    async def _store_upload(self, upload: web.FileField) -> dict[str, Any]:
        if self.blobs is None:
            raise Forbidden("this web tier has no blob store: files cannot be sent")
        data = upload.file.read()
        info = await self.blobs.put(data)
        name = Path(upload.filename.replace("\\", "/")).name[:200] or "file"
        content_type = upload.content_type or "application/octet-stream"
        return {"ref": info.ref, "name": name, "type": content_type[:100], "size": info.size}

    async def _search(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        query = request.query.get("q", "").strip()
        found = (await viewer.search(query[:500]))["messages"] if query else []
        counts = await viewer.counts()
        return self._render(request, "search.html", query=query, found=found, counts=counts)

    async def _friends(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        friends, counts = await asyncio.gather(viewer.friends(), viewer.counts())
        return self._render(request, "friends.html", friends=friends, counts=counts)

    async def _friend_add(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        await viewer.add_friend(_user_field(await request.post(), "friend"))
        raise web.HTTPSeeOther("/friends")

    async def _friend_remove(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        await viewer.remove_friend(_user_field(await request.post(), "friend"))
        raise web.HTTPSeeOther("/friends")

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        """A file of one of the user's messages, streamed from GET_BLOB ranges."""
        viewer: Viewer = request["viewer"]
        message_id, ref = request.match_info["message_id"], request.match_info["ref"]
        message = await viewer.message(message_id)
        extra = message.get("extra") or {}
        files = [file for file in extra.get("attachments", ()) if file.get("ref") == ref]
        if not files:
            raise NotFound(f"message {message_id} has no attachment {ref}")
        file = files[0]
        pieces = viewer.blob(ref, message_id)
        first = await anext(pieces)  # errors (the blob is gone) before the headers go out
        response = web.StreamResponse(
            headers={
                "Content-Type": _download_type(str(file.get("type", ""))),
                "Content-Disposition": _disposition(str(file.get("name") or "file")),
                "Content-Length": str(int(file.get("size", 0))),
            }
        )
        await response.prepare(request)
        await response.write(first)
        async for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    # ---- what the page's script reads ----

    async def _api_counts(self, request: web.Request) -> web.StreamResponse:
        return _json({"folders": await request["viewer"].counts()})

    async def _api_threads(self, request: web.Request) -> web.StreamResponse:
        folder = _folder_name(request.query.get("folder", "inbox"))
        return _json(await request["viewer"].threads(folder, request.query.get("before")))

    async def _api_thread(self, request: web.Request) -> web.StreamResponse:
        thread_id = request.match_info["thread_id"]
        return _json(await request["viewer"].thread(thread_id))

    async def _api_read(self, request: web.Request) -> web.StreamResponse:
        """The open thread page read what just arrived."""
        return _json(await request["viewer"].mark_read(request.match_info["thread_id"]))

    # ---- live pages ----

    async def _live(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="a live page is opened from this site only")
        viewer: Viewer = request["viewer"]
        session: WebSession = request["session"]
        socket = web.WebSocketResponse(heartbeat=30.0, max_msg_size=_MAX_WS_MESSAGE)
        await socket.prepare(request)
        self._sockets.add(socket)
        page = self.live.open_page(viewer)
        writer = asyncio.get_running_loop().create_task(_write_page(socket, page))
        try:
            async for incoming in socket:
                if incoming.type != WSMsgType.TEXT:
                    break
                answer = await self._page_request(viewer, session, incoming.data)
                page.offer(orjson.dumps(answer))
        finally:
            writer.cancel()
            self._sockets.discard(socket)
            await self.live.close_page(viewer.user, page)
        return socket

    async def _page_request(self, viewer: Viewer, session: WebSession, data: str) -> dict[str, Any]:
        """What a live page asks over its socket: `send` (the chat box)."""
        key = ""
        try:
            request = orjson.loads(data)
            if not isinstance(request, dict) or request.get("type") != "send":
                raise BadRequest("a page may only send {'type': 'send', ...}")
            key = str(request.get("key") or "")[:64]
            if not self.sessions.check_csrf(session, request.get("csrf")):
                raise Forbidden("missing or wrong CSRF token")
            to = request.get("to")
            if not isinstance(to, list) or not to:
                raise BadRequest("to: a list of user ids and email addresses")
            channel = request.get("channel", "chat")
            if channel not in _CHANNELS:
                raise BadRequest(f"channel: one of {', '.join(_CHANNELS)}")
            reply = await viewer.send(
                [_recipient(value) for value in to],
                _text(request.get("text")),
                channel=channel,
                subject=str(request.get("subject") or "")[:500],
                key=key or None,
            )
            return {"type": "sent", "key": key, **reply}
        except orjson.JSONDecodeError:
            return {"type": "error", "message": "not JSON"}
        except PyserverError as exc:
            return {"type": "error", "key": key, "message": str(exc)}

    # ---- errors ----

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except PyserverError as exc:
            status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
            if status >= 500:
                log.warning("web request %s failed: %s", request.path, exc)
            if request.path.startswith("/api/"):
                return _json({"code": exc.code, "message": str(exc)}, status=status)
            response = self._render(request, "error.html", status=status, message=str(exc))
            response.set_status(status)
            return response


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streamed ones and errors included, carries the security headers."""
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def _no_icon(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def _write_page(socket: web.WebSocketResponse, page: Any) -> None:
    """Send a live page what its feed queues, in order, until the socket closes."""
    try:
        while not socket.closed:
            await socket.send_str((await page.next()).decode())
    except (ConnectionError, RuntimeError):
        pass  # the page went away; the reader side ends the socket


# ---- request fields ----


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _field(form: Any, name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected text")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("text: write something to send")
    if len(value.encode("utf-8")) > _MAX_TEXT:
        raise TooLarge(f"text: over {_MAX_TEXT >> 10} KiB")
    return value


def _folder_name(value: str) -> str:
    if value not in FOLDERS:
        raise NotFound(f"no folder {value!r}: the folders are {', '.join(FOLDERS)}")
    return value


def _recipient(value: Any) -> int | str:
    """A user id (a number, or its decimal text) or an email address."""
    if isinstance(value, int) and not isinstance(value, bool) and is_user_id(value):
        return value
    text = str(value).strip()
    if text.isdigit() and is_user_id(int(text)):
        return int(text)
    if "@" in text and len(text) <= 254 and " " not in text:
        return text
    raise BadRequest(f"to: {text!r} is neither a user id nor an email address")


def _recipients(value: str) -> list[int | str]:
    found = [_recipient(part) for part in value.replace(";", ",").split(",") if part.strip()]
    if not found:
        raise BadRequest("to: name at least one recipient (a user id or an email address)")
    return found


def _user_field(form: Any, name: str) -> int:
    text = _field(form, name).strip()
    if not text.isdigit() or not is_user_id(int(text)):
        raise BadRequest(f"{name}: {text!r} is not a user id")
    return int(text)


def _reply_recipients(thread: dict[str, Any], me: int) -> list[int | str]:
    """Everyone in a conversation but the viewer: its users and its outside addresses."""
    users: list[int | str] = [user for user in thread["participants"] if user != me]
    return users + list(thread.get("addresses", ()))


def _back(form: Any) -> str:
    """Where a form's action returns to: a page of this site only."""
    target = str(form.get("back", "")) or "/folder/inbox"
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# ---- downloads ----

# Types a browser may be told a download is; anything else (HTML, SVG, script) is
# announced as bytes. The download is an attachment either way.
_PLAIN_TYPES = ("image/png", "image/jpeg", "image/gif", "application/pdf", "text/plain")


def _download_type(declared: str) -> str:
    base = declared.split(";")[0].strip().lower()
    if base in _PLAIN_TYPES or (base.startswith("application/") and "xml" not in base):
        return base
    return "application/octet-stream"


def _disposition(name: str) -> str:
    """`attachment` with the file's name, an ASCII stand-in and the exact UTF-8 one."""
    clean = "".join(ch for ch in name if ch.isprintable() and ch not in "\r\n")
    ascii_name = "".join(ch if ch.isascii() and ch not in '"\\;' else "_" for ch in clean)
    exact = urllib.parse.quote(clean, safe="")
    return f"attachment; filename=\"{ascii_name or 'file'}\"; filename*=UTF-8''{exact}"


# ---- template filters ----


def _when(ts_us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts_us / 1e6))


def _sender(message: dict[str, Any], me: int) -> str:
    if message.get("sender"):
        return "you" if message["sender"] == me else f"user {message['sender']}"
    address = str(message.get("from") or "unknown sender")
    name = message.get("from_name")
    return f"{name} <{address}>" if name else address


def _size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:g} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


def new_key() -> str:
    """An idempotency key for a form (a resubmitted form sends nothing twice)."""
    return secrets.token_urlsafe(12)
