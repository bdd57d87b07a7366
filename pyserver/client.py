"""The asyncio client of the app server's binary protocol (docs/protocol.md).

Owns the client side of a connection: pipelined requests matched to replies by request
id, HELLO, reconnecting with backoff after the connection drops, typed errors, and
subscriptions. Calls only the wire codec.

    client = await Client.connect("127.0.0.1", 7100, service_key=KEY)
    reply = await client.send(1, [2], "lunch?")
    async with client.subscribe(2) as events:
        async for event in events:
            ...
    await client.close()

Errors come back as the `pyserver.errors` class of their code (`NOT_FOUND` raises
`NotFound`, ...); a code without a class of its own (`CONFLICT`, `INTERNAL`, anything
unknown) raises `PyserverError` whose `code` is that code. A request in flight when the
connection drops raises `Unavailable`, and so does one that finds no connection within
its timeout: both may be retried. Meanwhile the client reconnects with exponential
backoff and says HELLO again; a HELLO refused on reconnect (an expired token) is final
and every later request raises that `Unauthenticated`.

A subscription is an async iterator of event dicts. It *raises* rather than stopping
when the server can no longer deliver: `SubscriptionOverflow` (a kind of `Unavailable`)
after the server's overflow event, `Unavailable` when the connection drops. Either way
events were missed: re-read the mailbox, then subscribe again. It stops (plain end of
iteration) only after `close()`.

May import: pyserver.errors, pyserver.userid, pyserver.framedef, pyserver.wire,
pyserver.servicekey.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any, cast

import orjson
import pybase64

from pyserver.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    NotOwner,
    PyserverError,
    TooLarge,
    TooMany,
    Unauthenticated,
    Unavailable,
)
from pyserver.servicekey import ServiceKey, current_key
from pyserver.wire.frame import (
    KIND_ERROR,
    KIND_EVENT,
    KIND_REPLY,
    KIND_REQUEST,
    MAX_REQUEST_ID,
    MIN_FRAME_LENGTH,
    FrameDecoder,
    encode_frame,
)
from pyserver.wire.ops import Op

__all__ = ["Client", "Subscription", "SubscriptionOverflow", "error_from_payload"]

log = logging.getLogger(__name__)

_ERROR_CLASSES: dict[str, type[PyserverError]] = {
    "BAD_REQUEST": BadRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "FORBIDDEN": Forbidden,
    "UNAVAILABLE": Unavailable,
    "NOT_FOUND": NotFound,
    "TOO_LARGE": TooLarge,
    "TOO_MANY": TooMany,
}


class SubscriptionOverflow(Unavailable):
    """The server ended a subscription that fell behind; re-read, then subscribe again."""


def error_from_payload(payload: Any) -> PyserverError:
    """The exception for an error frame's payload: the class of its code, else PyserverError."""
    if not isinstance(payload, dict):
        return PyserverError(f"malformed error payload: {payload!r}")
    code = str(payload.get("code", "INTERNAL"))
    message = str(payload.get("message", ""))
    if code == "NOT_OWNER":
        return NotOwner(message, str(payload.get("owner", "")))
    error_class = _ERROR_CLASSES.get(code)
    if error_class is not None:
        return error_class(message)
    exc = PyserverError(message)
    exc.code = code
    return exc


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"operation {op}"


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


class Subscription:
    """Events of one user's mailbox, as an async iterator (see the module docstring).

    `await client.subscribe(user)` returns once the server has confirmed it; `async with`
    and `async for` start it on first use too. `close()` unsubscribes.
    """

    def __init__(self, client: Client, user: int) -> None:
        self._client = client
        self.user = user
        self.id: int | None = None  # the SUBSCRIBE's request id, once sent
        self._link: _Link | None = None
        self._events: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._end: BaseException | None = None  # raised once the queued events are read
        self._started = False
        self._closed = False

    async def start(self) -> Subscription:
        if not self._started:
            self._started = True
            await self._client._subscribe(self)
        return self

    def __await__(self) -> Generator[Any, None, Subscription]:
        return self.start().__await__()

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            await self.start()
        while not self._events:
            if self._end is not None:
                raise self._end
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if self._link is not None:
            self._link.event_consumed(self)
        return event

    @property
    def queued(self) -> int:
        """Events received and not yet read."""
        return len(self._events)

    async def close(self) -> None:
        """Unsubscribe (best effort: a dropped connection already ended it)."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        live = self._end is None and link is not None and not link.lost
        self._events.clear()
        self._finish(StopAsyncIteration())
        if link is not None:
            link.forget(self)
        if live and link is not None and self.id is not None:
            with contextlib.suppress(PyserverError):
                await self._client._request_on(link, Op.UNSUBSCRIBE, {"subscription": self.id})

    # ---- called by the link ----

    def _push(self, event: dict[str, Any]) -> None:
        if self._end is not None:
            return
        self._events.append(event)
        self._wake()

    def _finish(self, reason: BaseException) -> None:
        if self._end is None:
            self._end = reason
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Link(asyncio.Protocol):
    """One TCP connection of a Client: its pending requests and subscriptions."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._decoder = FrameDecoder(client.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.subscriptions: dict[int, Subscription] = {}
        self.lost = False
        self.lost_waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_id = 0
        self._full: set[Subscription] = set()  # subscriptions whose queue made us stop reading
        self.server_max_frame_size = 0  # from the HELLO reply; 0 until then
        self._out: list[bytes] = []  # encoded requests waiting for the next flush
        self._flush_scheduled = False

    def next_request_id(self) -> int:
        while True:
            self._next_id = self._next_id % MAX_REQUEST_ID + 1  # 1 .. 2**32-1, never 0
            if self._next_id not in self.pending and self._next_id not in self.subscriptions:
                return self._next_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        decoder.feed(data)
        try:
            for frame in decoder:
                self._frame(frame.kind, frame.request_id, frame.payload)
        except PyserverError as exc:  # the server sent bytes that are not frames
            log.warning("bad frame from server error=%r", str(exc))
            self.close()

    def _frame(self, kind: int, request_id: int, payload: bytes) -> None:
        if kind == KIND_EVENT:
            subscription = self.subscriptions.get(request_id)
            if subscription is None:
                return
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                log.warning("undecodable event subscription=%d", request_id)
                return
            if isinstance(event, dict) and event.get("event") == "overflow":
                self.subscriptions.pop(request_id, None)
                self._full.discard(subscription)
                subscription._finish(
                    SubscriptionOverflow(
                        f"the server ended the subscription to user {subscription.user}: "
                        "it fell too far behind"
                    )
                )
                self._maybe_resume()
                return
            subscription._push(event)
            if subscription.queued >= self._client.max_queued_events:
                self._full.add(subscription)
                if self.transport is not None:
                    self.transport.pause_reading()
            return
        future = self.pending.pop(request_id, None)
        if future is None:
            if kind == KIND_ERROR and request_id == 0:
                # The server could not read our stream and is closing the connection.
                log.warning("server rejected the stream error=%r", payload[:200])
            return
        if future.done():
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            future.set_exception(PyserverError("the server sent an undecodable payload"))
            return
        if kind == KIND_REPLY:
            future.set_result(body)
        else:
            future.set_exception(error_from_payload(body))

    def forget(self, subscription: Subscription) -> None:
        """A subscription was closed: route no more events to it, and read again."""
        if subscription.id is not None and self.subscriptions.get(subscription.id) is subscription:
            del self.subscriptions[subscription.id]
        if subscription in self._full:
            self._full.discard(subscription)
            self._maybe_resume()

    def event_consumed(self, subscription: Subscription) -> None:
        if (
            subscription in self._full
            and subscription.queued <= self._client.max_queued_events // 2
        ):
            self._full.discard(subscription)
            self._maybe_resume()

    def _maybe_resume(self) -> None:
        if not self._full and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        reason = "connection to the server lost" + (f": {exc}" if exc else "")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(reason))
        self.pending.clear()
        for subscription in self.subscriptions.values():
            subscription._finish(Unavailable(reason))
        self.subscriptions.clear()
        if not self.lost_waiter.done():
            self.lost_waiter.set_result(None)
        self._client._link_lost(self)

    def send(self, op: int, request_id: int, payload: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise Unavailable("connection to the server lost")
        if (
            self.server_max_frame_size
            and MIN_FRAME_LENGTH + len(payload) > self.server_max_frame_size
        ):
            raise TooLarge(
                f"request of {len(payload)} bytes is over the server's frame limit of "
                f"{self.server_max_frame_size}"
            )
        # Requests made in one loop iteration leave in one write (one system call).
        self._out.append(encode_frame(KIND_REQUEST, op, request_id, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()


class Client:
    """A pipelined, reconnecting connection to one app server. Use `await Client.connect(...)`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        service_key: ServiceKey | None = None,
        user_token: str | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        reconnect: bool = True,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        max_frame_size: int = 64 << 20,
        max_queued_events: int = 10_000,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if service_key is not None and user_token is not None:
            raise ValueError("give a service_key or a user_token, not both")
        self.host = host
        self.port = port
        self._service_key = service_key
        self._user_token = user_token
        self.tls = tls
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.max_frame_size = max_frame_size
        self.max_queued_events = max_queued_events
        self.hello: dict[str, Any] | None = None  # the last HELLO reply
        self.reconnects = 0
        self._link: _Link | None = None
        self._closed = False
        self._fatal: PyserverError | None = None
        self._changed = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        service_key: ServiceKey | None = None,
        user_token: str | None = None,
        **options: Any,
    ) -> Client:
        """Connect and say HELLO (if given a credential); Unavailable if the server is not there."""
        client = cls(host, port, service_key=service_key, user_token=user_token, **options)
        await client._open()
        return client

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.lost

    # ---- connection lifetime ----

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, link = await loop.create_connection(
                    lambda: _Link(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError included: a refused handshake
            raise Unavailable(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        try:
            if self._service_key is not None or self._user_token is not None:
                key = None if self._service_key is None else current_key(self._service_key)
                hello = _without_none(service_key=key, user_token=self._user_token)
                reply = await self._request_on(link, Op.HELLO, hello, self.connect_timeout)
                self.hello = reply
                max_size = reply.get("max_frame_size")
                if isinstance(max_size, int):
                    link.server_max_frame_size = max_size
        except BaseException:
            link.close()
            raise
        if self._closed:
            link.close()
            raise Unavailable("client is closed")
        self._link = link
        self._signal()

    def _signal(self) -> None:
        """Wake every request waiting for the connection state to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _link_lost(self, link: _Link) -> None:
        if link is not self._link:
            return
        self._link = None
        self._signal()
        if not self._closed and self.reconnect and self._reconnect_task is None:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = self._backoff_initial_s
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except Unauthenticated as exc:
                    log.warning(
                        "reconnect refused host=%s port=%d error=%r", self.host, self.port, str(exc)
                    )
                    self._fatal = exc
                    self._signal()
                    return
                except (Unavailable, OSError, TimeoutError) as exc:
                    log.debug(
                        "reconnect failed host=%s port=%d error=%r", self.host, self.port, exc
                    )
                    delay = min(delay * 2, self._backoff_max_s)
                    continue
                self.reconnects += 1
                log.info("reconnected host=%s port=%d", self.host, self.port)
                return
        finally:
            self._reconnect_task = None

    async def _ready_link(self, timeout: float) -> _Link:
        """The live connection, waiting up to `timeout` for a reconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed:
                raise Unavailable("client is closed")
            if self._fatal is not None:
                raise self._fatal
            link = self._link
            if link is not None and not link.lost:
                return link
            if not self.reconnect:
                raise Unavailable("not connected to the server")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(f"no connection to {self.host}:{self.port} within {timeout:g} s")
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue

    async def close(self) -> None:
        """Close the connection; requests in flight raise Unavailable, subscriptions end."""
        if self._closed:
            return
        self._closed = True
        self._signal()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        link = self._link
        self._link = None
        if link is not None:
            for subscription in list(link.subscriptions.values()):
                subscription._finish(StopAsyncIteration())
            link.close()
            try:
                async with asyncio.timeout(1.0):
                    await link.lost_waiter
            except TimeoutError:
                if link.transport is not None:
                    link.transport.abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- requests ----

    async def request(
        self, op: Op | int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its reply payload (or raise its error)."""
        timeout = self.request_timeout if timeout is None else timeout
        link = self._link
        if link is None or link.lost:
            link = await self._ready_link(timeout)
        return await self._request_on(link, op, payload, timeout)

    async def _request_on(
        self, link: _Link, op: Op | int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        timeout = self.request_timeout if timeout is None else timeout
        body = orjson.dumps(payload)
        request_id = link.next_request_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.send(int(op), request_id, body)
        link.pending[request_id] = future
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise Unavailable(f"no reply to {_op_name(op)} within {timeout:g} s") from None
        finally:
            link.pending.pop(request_id, None)

    async def _subscribe(self, subscription: Subscription) -> None:
        link = self._link
        if link is None or link.lost:
            link = await self._ready_link(self.request_timeout)
        request_id = link.next_request_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Registered before sending: events may follow the reply at once.
        subscription.id = request_id
        subscription._link = link
        link.subscriptions[request_id] = subscription
        link.pending[request_id] = future
        try:
            link.send(Op.SUBSCRIBE, request_id, orjson.dumps({"user": subscription.user}))
            async with asyncio.timeout(self.request_timeout):
                await future
        except BaseException as exc:
            link.subscriptions.pop(request_id, None)
            subscription._finish(exc if isinstance(exc, PyserverError) else Unavailable(str(exc)))
            if isinstance(exc, TimeoutError):
                raise Unavailable(
                    f"no reply to SUBSCRIBE within {self.request_timeout:g} s"
                ) from None
            raise
        finally:
            link.pending.pop(request_id, None)

    # ---- operations (docs/protocol.md) ----

    async def ping(self) -> dict[str, Any]:
        return await self.request(Op.PING, {})

    async def send(
        self,
        sender: int,
        recipients: Sequence[int | str],
        text: str,
        channel: str = "chat",
        subject: str = "",
        key: str | None = None,
    ) -> dict[str, Any]:
        payload = _without_none(
            sender=sender,
            recipients=list(recipients),
            text=text,
            channel=channel,
            subject=subject,
            key=key,
        )
        return await self.request(Op.SEND, payload)

    async def deliver(
        self,
        user: int,
        sender: int = 0,
        text: str = "",
        channel: str = "email",
        subject: str = "",
        key: str | None = None,
        from_: str | None = None,
        participants: Sequence[int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An inbound message for `user`; `from_` is the payload's "from" (an outside sender)."""
        payload = _without_none(
            user=user,
            sender=sender,
            text=text,
            channel=channel,
            subject=subject,
            key=key,
            participants=list(participants) if participants is not None else None,
            extra=extra,
        )
        if from_ is not None:
            payload["from"] = from_
        return await self.request(Op.DELIVER, payload)

    async def list_threads(
        self, user: int, folder: str = "inbox", limit: int = 20, before: str | None = None
    ) -> dict[str, Any]:
        payload = _without_none(user=user, folder=folder, limit=limit, before=before)
        return await self.request(Op.LIST_THREADS, payload)

    async def get_thread(
        self, user: int, thread_id: str, limit: int = 50, before: str | None = None
    ) -> dict[str, Any]:
        payload = _without_none(user=user, thread_id=thread_id, limit=limit, before=before)
        return await self.request(Op.GET_THREAD, payload)

    async def get_message(self, user: int, message_id: str) -> dict[str, Any]:
        return await self.request(Op.GET_MESSAGE, {"user": user, "message_id": message_id})

    async def folder_messages(
        self, user: int, folder: str, after_uid: int = 0, limit: int = 1000
    ) -> dict[str, Any]:
        """A folder's messages by UID, after `after_uid` (IMAP's view; docs/protocol.md)."""
        payload = {"user": user, "folder": folder, "after_uid": after_uid, "limit": limit}
        return await self.request(Op.FOLDER_MESSAGES, payload)

    async def get_blob_range(
        self,
        user: int,
        ref: str,
        offset: int = 0,
        length: int | None = None,
        message_id: str | None = None,
    ) -> dict[str, Any]:
        """One GET_BLOB reply: up to `length` bytes of a blob from `offset` ("data" in base64)."""
        payload = _without_none(
            user=user, ref=ref, offset=offset, length=length, message_id=message_id
        )
        return await self.request(Op.GET_BLOB, payload)

    async def get_blob(
        self, user: int, ref: str, message_id: str | None = None, window: int = 4
    ) -> AsyncIterator[bytes]:
        """A blob (an attachment, a long body, a raw mail) of one of the user's messages, in
        pieces: ranges are requested `window` at a time ahead of the one being read."""
        first = await self.get_blob_range(user, ref, 0, message_id=message_id)
        data = pybase64.b64decode(first["data"])
        size, step = first["size"], len(data) or 1
        message_id = first["message_id"]  # later ranges skip the search for a message
        yield data
        offsets = iter(range(step, size, step))
        pending: deque[asyncio.Task[dict[str, Any]]] = deque()
        try:
            while True:
                while len(pending) < window and (offset := next(offsets, None)) is not None:
                    fetch = self.get_blob_range(user, ref, offset, step, message_id)
                    pending.append(asyncio.ensure_future(fetch))
                if not pending:
                    return
                yield pybase64.b64decode((await pending.popleft())["data"])
        finally:
            for task in pending:
                task.cancel()

    async def counts(self, user: int) -> dict[str, Any]:
        return await self.request(Op.COUNTS, {"user": user})

    async def search(self, user: int, query: str, limit: int = 20) -> dict[str, Any]:
        return await self.request(Op.SEARCH, {"user": user, "query": query, "limit": limit})

    async def mark_read(
        self, user: int, thread_id: str, message_id: str | None = None
    ) -> dict[str, Any]:
        payload = _without_none(user=user, thread_id=thread_id, message_id=message_id)
        return await self.request(Op.MARK_READ, payload)

    async def mark_unread(
        self, user: int, thread_id: str, message_id: str | None = None
    ) -> dict[str, Any]:
        payload = _without_none(user=user, thread_id=thread_id, message_id=message_id)
        return await self.request(Op.MARK_UNREAD, payload)

    async def move(self, user: int, thread_id: str, folder: str) -> dict[str, Any]:
        payload = {"user": user, "thread_id": thread_id, "folder": folder}
        return await self.request(Op.MOVE, payload)

    async def delete(
        self, user: int, thread_id: str, message_id: str | None = None
    ) -> dict[str, Any]:
        payload = _without_none(user=user, thread_id=thread_id, message_id=message_id)
        return await self.request(Op.DELETE, payload)

    async def mark_seen(self, user: int, folder: str) -> dict[str, Any]:
        return await self.request(Op.MARK_SEEN, {"user": user, "folder": folder})

    async def block(self, user: int, sender: int) -> dict[str, Any]:
        return await self.request(Op.BLOCK, {"user": user, "sender": sender})

    async def unblock(self, user: int, sender: int) -> dict[str, Any]:
        return await self.request(Op.UNBLOCK, {"user": user, "sender": sender})

    async def friend_add(self, user: int, friend: int) -> dict[str, Any]:
        return await self.request(Op.FRIEND_ADD, {"user": user, "friend": friend})

    async def friend_remove(self, user: int, friend: int) -> dict[str, Any]:
        return await self.request(Op.FRIEND_REMOVE, {"user": user, "friend": friend})

    async def stats(self) -> dict[str, Any]:
        return await self.request(Op.STATS, {})

    async def health(self) -> dict[str, Any]:
        return await self.request(Op.HEALTH, {})

    def subscribe(self, user: int) -> Subscription:
        """Events of `user`'s mailbox: `await` it, or use it with `async with` / `async for`."""
        return Subscription(self, user)
