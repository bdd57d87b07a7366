"""The app server's network shell: an asyncio `Protocol` between TCP and the dispatcher.

Owns what only a transport can know: bytes in and out, per-connection limits (in-flight
requests, frame size, idle and request timeouts), flow control in both directions, the
delivery of subscription events and graceful shutdown. Everything the protocol means
lives in `pyserver.app.dispatcher`; this module feeds it frames and writes its answers.
It runs on whatever loop is running (uvloop when started through `pyserver.app.loop`).
Reads the mailbox's reply table holds are answered first, a run of them in one native
call straight out of the frame decoder's buffer (`Dispatcher.answer_buffered`); every
other frame goes through the dispatcher.

Flow control, both ways:
* Reading stops while a connection has `max_in_flight` requests running, while the
  peer is not reading what we write (`pause_writing`), and while the server drains.
  Requests are answered in the order they complete, each in its own task.
* Events for a connection whose transport is paused wait in a per-connection backlog.
  A subscription whose next event finds that backlog full, or whose events have been
  stuck for longer than `event_stall_s`, gets one last `{"event": "overflow"}` event and
  ends, so nothing is ever buffered without bound.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import orjson

from pyserver.app.dispatcher import Dispatcher, Session
from pyserver.errors import BadRequest, FrameError, TooMany, Unavailable, error_payload
from pyserver.framedef import KIND_ERROR, KIND_EVENT, Frame
from pyserver.wire import frame as default_codec
from pyserver.wire.ops import Op

__all__ = ["AppServer", "ServerLimits"]

log = logging.getLogger(__name__)

# How long a closing connection may take to flush what it owes before it is cut.
_CLOSE_FLUSH_S = 2.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection bounds of the app server (the frame size limit is the dispatcher's)."""

    # Requests of one connection running at once; reading pauses at the cap.
    max_in_flight: int = 128
    # A connection with nothing running, no subscription and no bytes received for this
    # long is closed.
    idle_timeout_s: float = 300.0
    # A request still running after this long is answered UNAVAILABLE (it keeps running
    # to completion, and its late reply is dropped).
    request_timeout_s: float = 30.0
    # Events held for one connection while its transport is paused.
    event_backlog: int = 1024
    # How long a subscription's events may stay undeliverable before it overflows.
    event_stall_s: float = 5.0
    # The transport's write buffer high-water mark: above it the peer is "not reading".
    write_buffer_high: int = 256 * 1024
    # SO_SNDBUF of each connection's socket; None keeps the kernel's (autotuned, up to
    # megabytes), a small one makes a peer that stops reading show up sooner.
    socket_send_buffer: int | None = None
    # A frame must arrive whole within this long of its first byte (a peer trickling
    # bytes to hold the connection: slowloris); else the stream fails and closes.
    frame_timeout_s: float = 30.0
    # Connections from one peer address at once; one more is answered TOO_MANY and closed.
    max_connections_per_peer: int = 4096

    @classmethod
    def from_config(cls, config: Any) -> ServerLimits:
        """The limits a process's configuration sets (pyserver.config.Config)."""
        return cls(
            max_in_flight=config.max_in_flight_per_connection,
            idle_timeout_s=config.idle_timeout_s,
            request_timeout_s=config.request_timeout_s,
            frame_timeout_s=config.frame_timeout_s,
            max_connections_per_peer=config.max_connections_per_peer,
        )

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.event_backlog < 1:
            raise ValueError("event_backlog must be at least 1")
        if self.max_connections_per_peer < 1:
            raise ValueError("max_connections_per_peer must be at least 1")
        for name in ("idle_timeout_s", "request_timeout_s", "event_stall_s", "frame_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _Request:
    """One request in flight: its frame, when it started, and whether it was answered."""

    __slots__ = ("answered", "frame", "started")

    def __init__(self, frame: Frame, started: float) -> None:
        self.frame = frame
        self.started = started
        self.answered = False


class _Connection(asyncio.Protocol):
    """One client connection: decodes frames, runs requests, writes replies and events."""

    def __init__(self, server: AppServer) -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._limits = server.limits
        self._encode = server.codec.encode_frame
        self._loop = asyncio.get_running_loop()
        self._decoder = server.codec.FrameDecoder(server.dispatcher.max_frame_size)
        self._answer_buffered = server.dispatcher.answer_buffered
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self.peer = "?"
        self._in_flight = 0
        # Requests running, oldest first (dicts keep insertion order). One sweep timer
        # per connection times them out, rather than one timer per request.
        self._running: dict[_Request, None] = {}
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._closing = False  # no more reading or writing of replies
        self._draining = False  # finish what runs, start nothing new, then close
        self._stream_error: Exception | None = None  # sent last, just before closing
        self._eof = False  # the peer sent all it will: close once everything is answered
        self._reading_paused = False
        self._write_paused = False
        self._write_paused_at = 0.0
        # Encoded event frames waiting for the transport to drain: (subscription id, frame).
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._overflowed: set[int] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        # started by the first byte of a frame still incomplete (`frame_timeout_s`)
        self._frame_timer: asyncio.TimerHandle | None = None
        self._last_activity = self._loop.time()
        self._out: list[bytes] = []  # encoded frames waiting for the next flush
        self._flush_scheduled = False

    # ---- transport callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        limit = self._limits.max_connections_per_peer
        if self._server.connections_from(self.peer_host) >= limit:
            # one address holding every connection would starve the others
            self._dispatcher.count("peer_limit_refusals")
            log.warning("refusing connection peer=%s: %d open from it", self.peer, limit)
            refusal = TooMany(f"{limit} connections from {self.peer_host} already")
            payload = orjson.dumps(error_payload(refusal))
            self._transport.write(self._encode(KIND_ERROR, 0, 0, payload))
            self._closing = True
            self._transport.close()
            return
        self._transport.set_write_buffer_limits(high=self._limits.write_buffer_high)
        if self._limits.socket_send_buffer is not None:
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, self._limits.socket_send_buffer
                )
        self._session = self._dispatcher.open_session(self.peer, self._deliver_event)
        self._server._connection_opened(self)
        log.debug("connection opened peer=%s", self.peer)
        if self._server.stopping:
            self.close()
            return
        self._idle_timer = self._loop.call_later(self._limits.idle_timeout_s, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        timers = (self._idle_timer, self._stall_timer, self._abort_timer, self._timeout_timer)
        for timer in (*timers, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._backlog.clear()
        if self._session is not None:
            self._dispatcher.close_session(self._session)
        self._server._connection_closed(self)
        log.debug("connection closed peer=%s error=%r", self.peer, exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._loop.time()
        decoder = self._decoder
        decoder.feed(data)
        # The common case first: reads the reply table holds, answered in one native
        # call and written at once, not at the loop's next turn like other replies.
        if not (self._write_paused or self._draining or self._out):
            replies = self._answer_buffered(self._session, decoder)
            if replies is not None:
                self._transport.write(replies)  # type: ignore[union-attr]
                if not decoder.buffered:
                    return
        self._process()

    def eof_received(self) -> bool | None:
        # The peer has finished sending: answer what it sent, then close.
        self._eof = True
        self._process()
        self._close_if_done()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self._loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._flush_backlog()
        if not self._draining:
            self._process()  # frames that arrived while we were not starting any
        else:
            self._update_reading()
        self._close_if_done()

    # ---- requests ----

    def _process(self) -> None:
        """Start the buffered requests, up to the in-flight cap and while the peer reads."""
        cap = self._limits.max_in_flight
        assert self._session is not None
        # While the peer is not reading, start nothing: each reply would add to the pile.
        while self._in_flight < cap and not (self._write_paused or self._closing or self._draining):
            # Reads the reply table holds are answered in one native call per run of them.
            replies = self._answer_buffered(self._session, self._decoder)
            if replies is not None:
                self._send(replies)
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                self._fail_stream(exc)
                return
            except Exception as exc:  # a codec bug must not take the server down
                log.exception("frame decoder failed peer=%s", self.peer)
                self._fail_stream(exc)
                return
            if frame is None:
                self._watch_partial_frame()
                break
            if frame.request_id == 0:
                # Id 0 names the stream in errors; a client using it cannot be answered
                # unambiguously, so it is a protocol error like a bad frame.
                self._fail_stream(BadRequest("request id 0 is reserved for stream errors"))
                return
            self._start(frame)
        self._update_reading()

    def _watch_partial_frame(self) -> None:
        """All whole frames are taken: what is left is part of one, which must arrive whole
        within `frame_timeout_s` (the timer runs from the first part seen)."""
        if not self._decoder.buffered:
            if self._frame_timer is not None:
                self._frame_timer.cancel()
                self._frame_timer = None
        elif self._frame_timer is None:
            self._frame_timer = self._loop.call_later(
                self._limits.frame_timeout_s, self._frame_too_slow
            )

    def _frame_too_slow(self) -> None:
        self._frame_timer = None
        if self._closing or not self._decoder.buffered:
            return
        self._dispatcher.count("slow_frames")
        limit = self._limits.frame_timeout_s
        self._fail_stream(TooMany(f"a frame did not arrive whole within {limit:g} s"))

    def _start(self, frame: Frame) -> None:
        assert self._session is not None
        answer = self._dispatcher.admit(self._session, frame)  # over the user's rate?
        if answer is None:
            answer = self._dispatcher.handle_now(self._session, frame)
        if answer is not None:  # a read of a cached user: answered without a task
            self._write(answer[0], frame.op, frame.request_id, answer[1])
            return
        self._in_flight += 1
        request = _Request(frame, self._loop.time())
        self._running[request] = None
        if self._timeout_timer is None:
            self._timeout_timer = self._loop.call_at(
                request.started + self._limits.request_timeout_s, self._sweep_timeouts
            )
        self._server._track(self._loop.create_task(self._run(request)))

    async def _run(self, request: _Request) -> None:
        frame = request.frame
        assert self._session is not None
        try:
            kind, payload = await self._dispatcher.handle(self._session, frame)
        finally:
            del self._running[request]
            self._in_flight -= 1
        if not request.answered:
            request.answered = True
            self._write(kind, frame.op, frame.request_id, payload)
        self._request_finished()

    def _sweep_timeouts(self) -> None:
        """Answer the requests running past the timeout; re-arm for the oldest of the rest."""
        self._timeout_timer = None
        deadline = self._loop.time() - self._limits.request_timeout_s
        for request in list(self._running):
            if request.started > deadline:
                self._timeout_timer = self._loop.call_at(
                    request.started + self._limits.request_timeout_s, self._sweep_timeouts
                )
                return
            self._time_out(request)

    def _time_out(self, request: _Request) -> None:
        if request.answered:
            return
        request.answered = True
        frame = request.frame
        self._dispatcher.count("request_timeouts")
        log.warning(
            "request timed out peer=%s op=%d request_id=%d after_s=%.3f",
            self.peer,
            frame.op,
            frame.request_id,
            self._loop.time() - request.started,
        )
        exc = Unavailable(f"request timed out after {self._limits.request_timeout_s:g} s")
        self._write(KIND_ERROR, frame.op, frame.request_id, orjson.dumps(error_payload(exc)))

    def _request_finished(self) -> None:
        self._last_activity = self._loop.time()
        if self._closing:
            return
        if not self._draining:
            self._process()
        self._close_if_done()

    def _close_if_done(self) -> None:
        """Close a draining connection, or one whose peer sent EOF, once all is answered."""
        if self._in_flight or self._closing:
            return
        # After EOF, frames may still wait in the decoder while the peer is not reading.
        if self._draining or (self._eof and not self._write_paused):
            self.close()

    def _write(self, kind: int, op: int, request_id: int, payload: bytes) -> None:
        if self._closing:
            return
        self._send(self._encode(kind, op, request_id, payload))

    def _send(self, data: bytes) -> None:
        """Queue encoded frames; they go out together once the loop has run its ready callbacks.

        One write (one system call) per loop iteration instead of one per frame: pipelined
        replies that finish together leave together.
        """
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)  # may call pause_writing()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            return
        paused = (
            self._write_paused or self._draining or self._in_flight >= self._limits.max_in_flight
        )
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _fail_stream(self, exc: Exception) -> None:
        """The byte stream cannot be trusted: read no more, answer the requests already
        running, then one error frame with request id 0 (the last frame), then close."""
        self._dispatcher.count("frame_errors")
        log.info("bad frame stream peer=%s error=%r", self.peer, str(exc))
        self._stream_error = exc
        self.drain()

    # ---- events ----

    def _deliver_event(self, subscription_id: int, event: dict[str, Any]) -> None:
        """The event sink of this connection's session (called by the mailbox)."""
        session = self._session
        if (
            self._closing
            or session is None
            or subscription_id in self._overflowed
            or subscription_id not in session.subscriptions
        ):
            return
        try:
            payload = orjson.dumps(event)
        except Exception:
            log.exception("event not encodable peer=%s subscription=%d", self.peer, subscription_id)
            return
        data = self._encode(KIND_EVENT, Op.SUBSCRIBE, subscription_id, payload)
        if not self._write_paused and not self._backlog:
            self._send(data)
            return
        stalled_for = self._loop.time() - self._write_paused_at
        if len(self._backlog) >= self._limits.event_backlog or (
            self._write_paused and stalled_for >= self._limits.event_stall_s
        ):
            self._overflow(subscription_id)
            return
        self._backlog.append((subscription_id, data))
        if self._write_paused and self._stall_timer is None:
            delay = max(0.0, self._limits.event_stall_s - stalled_for)
            self._stall_timer = self._loop.call_later(delay, self._stalled)

    def _flush_backlog(self) -> None:
        self._flush()  # what was queued before the backlog goes first
        backlog = self._backlog
        transport = self._transport
        while backlog and not self._write_paused and not self._closing:
            assert transport is not None
            # write() may call pause_writing() again: the loop then stops.
            transport.write(backlog.popleft()[1])

    def _stalled(self) -> None:
        """The transport stayed paused past the bound: overflow every subscription still waiting."""
        self._stall_timer = None
        if self._closing or not self._write_paused:
            return
        for subscription_id in {sid for sid, _ in self._backlog}:
            if subscription_id not in self._overflowed:
                self._overflow(subscription_id)

    def _overflow(self, subscription_id: int) -> None:
        """End a subscription that fell behind, after one last overflow event."""
        session = self._session
        assert session is not None
        entry = session.subscriptions.get(subscription_id)
        if entry is None or subscription_id in self._overflowed:
            return
        self._overflowed.add(subscription_id)
        self._dispatcher.count("subscription_overflows")
        log.warning(
            "subscriber overflow peer=%s subscription=%d user=%d backlog=%d",
            self.peer,
            subscription_id,
            entry[0],
            len(self._backlog),
        )
        payload = orjson.dumps({"event": "overflow", "user": entry[0]})
        # Queued behind that subscription's own events so it arrives last; at most one
        # such frame per subscription, so the backlog stays bounded.
        self._backlog.append(
            (subscription_id, self._encode(KIND_EVENT, Op.SUBSCRIBE, subscription_id, payload))
        )
        if not self._write_paused:
            self._flush_backlog()
        # The mailbox may be iterating over its subscribers right now: unsubscribe later.
        self._loop.call_soon(self._end_overflowed, subscription_id)

    def _end_overflowed(self, subscription_id: int) -> None:
        if self._session is not None:
            self._dispatcher.end_subscription(self._session, subscription_id)
        self._overflowed.discard(subscription_id)

    # ---- lifetime ----

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._closing:
            return
        timeout = self._limits.idle_timeout_s
        now = self._loop.time()
        busy = self._in_flight > 0 or bool(self._session and self._session.subscriptions)
        idle_for = now - self._last_activity
        if not busy and idle_for >= timeout:
            self._dispatcher.count("idle_closes")
            log.info("closing idle connection peer=%s idle_s=%.1f", self.peer, idle_for)
            self.close()
            return
        delay = timeout if busy else timeout - idle_for
        self._idle_timer = self._loop.call_later(delay, self._check_idle)

    def drain(self) -> None:
        """Server stopping: read nothing more, close once the running requests finish."""
        self._draining = True
        if self._in_flight == 0:
            self.close()
        else:
            self._update_reading()

    def close(self) -> None:
        """Close after flushing what was written; cut the connection if the peer won't take it."""
        if self._closing:
            return
        if self._stream_error is not None:
            self._write(KIND_ERROR, 0, 0, orjson.dumps(error_payload(self._stream_error)))
        self._flush()
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        transport.close()
        self._abort_timer = self._loop.call_later(_CLOSE_FLUSH_S, transport.abort)

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def figures(self) -> dict[str, Any]:
        """This connection's flow-control state, for operators and tests."""
        transport = self._transport
        return {
            "peer": self.peer,
            "in_flight": self._in_flight,
            "reading_paused": self._reading_paused,
            "write_paused": self._write_paused,
            "write_buffer": transport.get_write_buffer_size() if transport is not None else 0,
            "event_backlog": len(self._backlog),
            "subscriptions": len(self._session.subscriptions) if self._session else 0,
        }


class AppServer:
    """The TCP server of one app server node: `await start(host, port)`, `await stop(grace_s)`.

    `codec` is the wire-frame codec module (`encode_frame`, `FrameDecoder`); by default
    the one `pyserver.wire.frame` chose. With `tls`, every connection is TLS (a client
    speaking plain text, or without a certificate the context requires, is dropped in the
    handshake, which must end within the frame timeout).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        limits: ServerLimits | None = None,
        *,
        codec: ModuleType | Any = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.tls = tls
        self.limits = limits if limits is not None else ServerLimits()
        self.codec = codec if codec is not None else default_codec
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._per_peer: Counter[str] = Counter()  # open connections by peer address
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.address: tuple[str, int] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (port 0: any free port); returns the bound (host, port)."""
        if self._server is not None:
            raise RuntimeError("this AppServer is already started")
        loop = asyncio.get_running_loop()
        handshake = {"ssl_handshake_timeout": self.limits.frame_timeout_s} if self.tls else {}
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            backlog=1024,
            ssl=self.tls,
            **handshake,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        log.info(
            "app server listening node=%s addr=%s:%d loop=%s codec=%s tls=%s",
            self.dispatcher.node_id,
            self.address[0],
            self.address[1],
            type(loop).__module__.split(".")[0],
            getattr(self.codec, "IMPLEMENTATION", getattr(self.codec, "__name__", "?")),
            "mutual" if self.tls and self.tls.verify_mode == ssl.CERT_REQUIRED else bool(self.tls),
        )
        return self.address

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running requests finish (for at most grace_s), then close all."""
        if self.stopping:
            return
        self.stopping = True
        started = time.monotonic()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.drain()
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            _, still_running = await asyncio.wait(pending, timeout=grace_s)
            if still_running:
                log.warning(
                    "stopping with requests still running count=%d grace_s=%g",
                    len(still_running),
                    grace_s,
                )
                for task in still_running:
                    task.cancel()
                await asyncio.gather(*still_running, return_exceptions=True)
        for connection in list(self._connections):
            connection.close()
        # Give the closes a moment to flush, then cut what is left.
        deadline = time.monotonic() + _CLOSE_FLUSH_S
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
        log.info(
            "app server stopped node=%s took_s=%.3f",
            self.dispatcher.node_id,
            time.monotonic() - started,
        )

    @property
    def connections(self) -> int:
        return len(self._connections)

    def connection_figures(self) -> list[dict[str, Any]]:
        """Each open connection's flow-control state (see `_Connection.figures`)."""
        return [connection.figures() for connection in self._connections]

    def _connection_opened(self, connection: _Connection) -> None:
        self._connections.add(connection)
        self._per_peer[connection.peer_host] += 1

    def _connection_closed(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._per_peer[connection.peer_host] -= 1
            if self._per_peer[connection.peer_host] <= 0:
                del self._per_peer[connection.peer_host]

    def connections_from(self, host: str) -> int:
        """Connections open from one peer address."""
        return self._per_peer.get(host, 0)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
