"""Sans-I/O request handling: one decoded request frame in, one reply or error payload out.

Owns the rules of docs/protocol.md that sit between the wire codec and the mailbox:
who has said HELLO and as whom (`Session`), which operations and users a connection may
touch, the JSON payload check, SUBSCRIBE bookkeeping, STATS and HEALTH, and the mapping
of exceptions to error payloads. It never touches a socket or a transport: the asyncio
shell (`pyserver.app.server`) feeds it frames and writes what it returns, and hands each
session an event sink for subscription events. It calls only the mailbox.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import orjson

from pyserver.app.auth import UserToken, check_service_key, read_user_token
from pyserver.app.limits import InFlightLimit, UserRateLimiter
from pyserver.app.revocations import Revocations
from pyserver.errors import (
    BadRequest,
    Forbidden,
    PyserverError,
    TooLarge,
    TooMany,
    Unauthenticated,
    error_payload,
)
from pyserver.framedef import (
    DEFAULT_MAX_FRAME_SIZE,
    KIND_ERROR,
    KIND_REPLY,
    KIND_REQUEST,
    VERSION,
    Frame,
)
from pyserver.servicekey import ServiceKey
from pyserver.userid import check_user_id
from pyserver.wire.ops import NO_HELLO, SERVICE_ONLY, Op

__all__ = [
    "Dispatcher",
    "EventSink",
    "NullObserver",
    "RequestObserver",
    "Session",
]

log = logging.getLogger(__name__)

# (subscription id, event) -> None. Provided by the shell; must not block or raise.
EventSink = Callable[[int, dict[str, Any]], None]

_OPS: dict[int, Op] = {op.value: op for op in Op}
# Requests with an op code outside the protocol are counted under one name, so a
# hostile client cannot grow the counters without bound.
UNKNOWN_OP = "UNKNOWN"
# Operations whose payload names no user: everything else is a per-user request.
_NO_USER: frozenset[Op] = frozenset({Op.PING, Op.HELLO, Op.UNSUBSCRIBE, Op.STATS, Op.HEALTH})


class MailboxLike(Protocol):
    """What the dispatcher needs of `pyserver.app.mailbox.Mailbox`."""

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]: ...

    def subscribe(self, user_id: int, callback: Callable[[dict[str, Any]], None]) -> Any: ...

    def unsubscribe(self, token: Any) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class RequestObserver(Protocol):
    """A hook told of every request: its op name, latency and error code (None if it succeeded)."""

    def observe(self, op_name: str, seconds: float, error_code: str | None) -> None: ...


class RequestMirror(Protocol):
    """A hook that copies some mailbox requests elsewhere (a dark launch); `offer` must
    not block: the live reply is sent right after it."""

    def wants(self, op: Op, payload: dict[str, Any]) -> bool: ...

    def offer(self, op: Op, payload: dict[str, Any], reply: dict[str, Any]) -> None: ...


class NullObserver:
    """The default observer: records nothing."""

    __slots__ = ()

    def observe(self, op_name: str, seconds: float, error_code: str | None) -> None:
        return None


# A limited user reads the reply table only while this many tokens remain (a run of
# pipelined table answers is charged after it is answered).
_TABLE_RUN = 256


def _count_frames(data: bytes) -> int:
    """How many frames `data` holds, back to back (each starts with the u32 length of
    what follows it)."""
    count = at = 0
    while at + 4 <= len(data):
        at += 4 + int.from_bytes(data[at : at + 4], "big")
        count += 1
    return count


class Session:
    """One connection's state: who it is (after HELLO) and its live subscriptions.

    `user` is None for a service connection (or before HELLO); `subscriptions` maps a
    SUBSCRIBE's request id to (user id, mailbox token).
    """

    __slots__ = ("authenticated", "event_sink", "peer", "subscriptions", "token", "user")

    def __init__(self, peer: str, event_sink: EventSink) -> None:
        self.peer = peer
        self.event_sink = event_sink
        self.authenticated = False
        self.user: int | None = None
        self.token: UserToken | None = None  # what a user-token session said in HELLO
        self.subscriptions: dict[int, tuple[int, Any]] = {}

    @property
    def is_service(self) -> bool:
        return self.authenticated and self.user is None

    def __repr__(self) -> str:
        who = (
            "anonymous"
            if not self.authenticated
            else ("service" if self.user is None else f"user {self.user}")
        )
        return f"<Session {self.peer} {who} subscriptions={len(self.subscriptions)}>"


# What the log names for `Dispatcher.call`'s requests: a trusted tier of this process.
_LOCAL_SESSION = Session("in-process", lambda _subscription, _event: None)
_LOCAL_SESSION.authenticated = True
_LOCAL_FRAME = Frame(KIND_REQUEST, 0, 0, b"")


def _user_id(payload: dict[str, Any], field: str, minimum: int = 0) -> int:
    return check_user_id(payload.get(field), field, minimum)


class Dispatcher:
    """Answers request frames for the sessions of one app server.

    `handle()` never raises for anything a client sends: typed errors become their error
    payload, anything unexpected becomes INTERNAL and is logged.
    """

    def __init__(
        self,
        mailbox: MailboxLike,
        service_key: ServiceKey,
        node_id: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_subscriptions: int = 64,
        max_service_subscriptions: int = 100_000,
        user_limiter: UserRateLimiter | None = None,
        peer_limiter: UserRateLimiter | None = None,
        user_in_flight: InFlightLimit | None = None,
        peer_in_flight: InFlightLimit | None = None,
        observer: RequestObserver | None = None,
        health_check: Callable[[], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.time,
        stats_section: str = "mailbox",
        revocations: Revocations | None = None,
    ) -> None:
        self._mailbox = mailbox
        # The ops the mailbox may answer at once from a cached image (`handle_now`).
        self._cached_read_ops: frozenset[Op] = getattr(mailbox, "cached_read_ops", frozenset())
        # The mailbox's table of ready-made replies, for `answer_buffered` (None: no table).
        self._reply_table: Callable[[], Any] | None = getattr(mailbox, "reply_table", None)
        # the STATS field holding `mailbox.stats()` (a service names its own: "userindex", ...)
        self._stats_section = stats_section
        self._service_key = service_key
        # revoked user tokens (None: none are checked); `revoke_sessions` when they change
        self.revocations = revocations
        self.node_id = node_id
        self.max_frame_size = max_frame_size
        # A user's connection holds a few; a trusted tier (the web tier, a gateway)
        # multiplexes the subscriptions of all its users on a few connections.
        self._max_subscriptions = max_subscriptions
        self._max_service_subscriptions = max_service_subscriptions
        # requests per second of each user-token user (None: unlimited)
        self.user_limiter = user_limiter
        # requests per second from one peer address over its connections that are not
        # service connections, HELLO included (token guessing); None: unlimited
        self.peer_limiter = peer_limiter
        # requests running at once of one user-token user, and from one peer address on
        # connections that are not service connections, over all their connections
        self.user_in_flight = user_in_flight
        self.peer_in_flight = peer_in_flight
        self.observer: RequestObserver = observer if observer is not None else NullObserver()
        # a dark launch's mirror (pyserver.cluster.darklaunch): told of the requests it wants
        self.mirror: RequestMirror | None = None
        self._health_check = health_check
        self._clock = clock
        self._sessions: set[Session] = set()
        self._connections_total = 0
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        # Figures the shell reports through `count()`: timeouts, overflows, frame errors.
        self._server_counters: Counter[str] = Counter()
        self._handlers: dict[Op, Callable[[Session, Frame, dict[str, Any]], Awaitable[dict]]] = {
            Op.PING: self._ping,
            Op.HELLO: self._hello,
            Op.SUBSCRIBE: self._subscribe,
            Op.UNSUBSCRIBE: self._unsubscribe,
            Op.STATS: self._stats,
            Op.HEALTH: self._health,
        }

    # ---- sessions ----

    def open_session(self, peer: str, event_sink: EventSink) -> Session:
        """A new connection's session; `event_sink` receives its subscriptions' events."""
        session = Session(peer, event_sink)
        self._sessions.add(session)
        self._connections_total += 1
        return session

    def close_session(self, session: Session) -> None:
        """The connection is gone: end its subscriptions and forget it (safe to repeat)."""
        for subscription_id in list(session.subscriptions):
            self.end_subscription(session, subscription_id)
        self._sessions.discard(session)

    def revoke_sessions(self) -> int:
        """Sign out every session whose user token is now revoked: its subscriptions end
        and its next request needs a new HELLO (refused with that token); how many."""
        revocations = self.revocations
        if revocations is None:
            return 0
        revoked = [
            session
            for session in self._sessions
            if session.token is not None and revocations.refuses(session.token)
        ]
        for session in revoked:
            for subscription_id in list(session.subscriptions):
                session.event_sink(
                    subscription_id,
                    {"event": "overflow", "user": session.user, "reason": "token revoked"},
                )
                self.end_subscription(session, subscription_id)
            log.info("signed out peer=%s user=%s reason=token_revoked", session.peer, session.user)
            session.authenticated, session.user, session.token = False, None, None
        return len(revoked)

    def end_subscriptions_of(self, ended: Callable[[int], bool], reason: str) -> int:
        """End every subscription whose user `ended(user)` names, after one last
        `{"event": "overflow", "reason": reason}` event (the subscriber subscribes again,
        at the user's owner now); how many ended."""
        count = 0
        for session in list(self._sessions):
            for subscription_id, (user, _token) in list(session.subscriptions.items()):
                if not ended(user):
                    continue
                session.event_sink(
                    subscription_id, {"event": "overflow", "user": user, "reason": reason}
                )
                self.end_subscription(session, subscription_id)
                count += 1
        return count

    def end_subscription(self, session: Session, subscription_id: int) -> bool:
        """End one subscription of a session; False if it was not live."""
        entry = session.subscriptions.pop(subscription_id, None)
        if entry is None:
            return False
        try:
            self._mailbox.unsubscribe(entry[1])
        except Exception:
            log.exception(
                "unsubscribe failed peer=%s subscription=%d user=%d",
                session.peer,
                subscription_id,
                entry[0],
            )
        return True

    def count(self, figure: str, n: int = 1) -> None:
        """Add to one of the shell's figures reported by STATS (under "server")."""
        self._server_counters[figure] += n

    @property
    def connections(self) -> int:
        return len(self._sessions)

    # ---- requests ----

    def handle_now(self, session: Session, frame: Frame) -> tuple[int, bytes] | None:
        """The answer to a frame that needs no waiting (a read of a cached user), or None.

        The server tries this first and runs `handle` in a task only when it returns
        None: most requests of a busy cell are such reads, and a task costs more than
        the read itself.
        """
        op = _OPS.get(frame.op)
        # Only reads, and only once HELLO is done: a HELLO pipelined before this request
        # is still in its task, and requests must not overtake it.
        if op not in self._cached_read_ops or not session.authenticated:
            return None
        started = time.perf_counter()
        try:
            payload = self._payload(session, frame, op)
            result = self._mailbox.answer_cached(op, payload)  # type: ignore[attr-defined]
            if result is None:
                return None
        except Exception as exc:
            return self._finish(session, frame, op.name, started, exc)
        kind, body = self._finish(session, frame, op.name, started, result)
        mirror = self.mirror
        if mirror is not None and mirror.wants(op, payload):  # a dark launch: queued only
            mirror.offer(op, dict(payload), result)
            return kind, body  # not in the reply table: the next such read is mirrored too
        # The next identical read is answered from the reply table (`answer_buffered`).
        self._mailbox.remember_reply(op, payload, frame.payload, body)  # type: ignore[attr-defined]
        return kind, body

    @staticmethod
    def _counted(session: Session, for_user: Any, for_peer: Any) -> list[tuple[Any, Any, str]]:
        """What a request of `session` counts against, (limit, key, who) each: its user's
        limit and its peer address's, for a connection that is not a service connection
        (the trusted tiers carry many users and are not limited)."""
        if session.is_service:
            return []
        counted = []
        if for_user is not None and session.user is not None:
            counted.append((for_user, session.user, f"user {session.user}"))
        if for_peer is not None:
            host = session.peer.rpartition(":")[0] or session.peer
            counted.append((for_peer, host, f"peer {host}"))
        return counted

    def _rate_limits(self, session: Session) -> list[tuple[UserRateLimiter, Any, str]]:
        return self._counted(session, self.user_limiter, self.peer_limiter)

    def admit(self, session: Session, frame: Frame) -> tuple[int, bytes] | None:
        """The TOO_MANY answer to a request of a user or peer over its rate, or None."""
        limits = self._rate_limits(session)
        if not limits:  # a service connection, or no limits set: the common case
            return None
        now = time.monotonic()
        for limiter, key, who in limits:
            if limiter.take(key, now):
                continue
            op = _OPS.get(frame.op)
            error = TooMany(f"{who} is over {limiter.rate:g} requests a second: wait, then retry")
            return self._finish(
                session, frame, op.name if op else "unknown", time.perf_counter(), error
            )
        return None

    def answer_buffered(self, session: Session, decoder: Any) -> bytes | None:
        """Reply frames, from the mailbox's reply table, to the leading buffered requests.

        The requests answered are consumed from `decoder`; the first one the table does
        not hold stays there for `handle_now`/`handle`. Only an authenticated session
        reads the table, and a user-token session only its own user's replies, as on
        the Python path.
        """
        if not session.authenticated or self._reply_table is None:
            return None
        user = session.user
        limits = self._rate_limits(session)
        # a limited run of table answers is charged afterwards, frame by frame; near the
        # end of a bucket every request goes the charged way, one by one
        now = time.monotonic()
        if any(limiter.available(key, now) < _TABLE_RUN for limiter, key, _ in limits):
            return None
        table = self._reply_table()
        if table is None:
            return None
        replies = table.answer(decoder, user or 0)
        if replies and limits:
            count = _count_frames(replies)
            for limiter, key, _ in limits:
                limiter.take(key, time.monotonic(), count)
        return replies

    def _table_requests(self) -> dict[str, int]:
        """Requests the reply table answered, by op name."""
        hits = getattr(self._mailbox, "reply_hits", None)
        if hits is None:
            return {}
        return {_OPS[op].name: n for op, n in hits().items() if op in _OPS}

    async def handle(self, session: Session, frame: Frame) -> tuple[int, bytes]:
        """(KIND_REPLY, payload) or (KIND_ERROR, error payload) for one frame."""
        started = time.perf_counter()
        op = _OPS.get(frame.op)
        op_name = op.name if op is not None else UNKNOWN_OP
        # requests running at once, per user-token user and per peer (not for the trusted
        # tiers); the keys are taken now: a revoked token's session loses its user meanwhile
        held = self._in_flight_keys(session)
        for taken, (limit, key, who) in enumerate(held):
            if not limit.enter(key):
                for earlier, earlier_key, _ in held[:taken]:
                    earlier.leave(earlier_key)
                busy = TooMany(f"{who} has {limit.limit} requests running: wait for replies")
                return self._finish(session, frame, op_name, started, busy)
        try:
            result = await self._answer(session, frame, op)
        except Exception as exc:
            return self._finish(session, frame, op_name, started, exc)
        finally:
            for limit, key, _ in held:
                limit.leave(key)
        return self._finish(session, frame, op_name, started, result)

    def _in_flight_keys(self, session: Session) -> list[tuple[InFlightLimit, Any, str]]:
        return self._counted(session, self.user_in_flight, self.peer_in_flight)

    def _finish(
        self,
        session: Session,
        frame: Frame,
        op_name: str,
        started: float,
        outcome: dict[str, Any] | Exception,
    ) -> tuple[int, bytes]:
        """Encode a reply or an error, count it and tell the observer."""
        if isinstance(outcome, Exception):
            code = outcome.code if isinstance(outcome, PyserverError) else "INTERNAL"
            kind, body = KIND_ERROR, orjson.dumps(error_payload(outcome))
            if code == "INTERNAL":  # a bug, or the server's own fault (a corrupt record): loudly
                log.error(
                    "request failed op=%s request_id=%d peer=%s",
                    op_name,
                    frame.request_id,
                    session.peer,
                    exc_info=outcome,
                )
        else:
            kind, body, code = KIND_REPLY, orjson.dumps(outcome), None
        self._requests[op_name] += 1
        if code is not None:
            self._errors[code] += 1
        try:
            self.observer.observe(op_name, time.perf_counter() - started, code)
        except Exception:  # metrics must never cost a client its answer
            log.exception("request observer failed op=%s", op_name)
        return kind, body

    @staticmethod
    def _check_kind(frame: Frame) -> None:
        if frame.kind != KIND_REQUEST:
            raise BadRequest(
                f"expected a request frame (kind {KIND_REQUEST}), got kind {frame.kind}"
            )

    def _payload(self, session: Session, frame: Frame, op: Op) -> dict[str, Any]:
        """The request's JSON object, once the frame and the session may ask for `op`."""
        self._check_kind(frame)
        if not session.authenticated and op not in NO_HELLO:
            raise Unauthenticated(f"{op.name} needs a HELLO first on this connection")
        try:
            payload = orjson.loads(frame.payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"payload is not valid JSON: {exc}") from None
        if type(payload) is not dict:
            raise BadRequest(f"payload must be a JSON object, not {type(payload).__name__}")
        if session.user is not None:
            self._check_user_scope(session, op, payload)
        return payload

    async def _answer(self, session: Session, frame: Frame, op: Op | None) -> dict[str, Any]:
        if op is None:
            self._check_kind(frame)
            raise BadRequest(f"unknown operation code {frame.op}")
        payload = self._payload(session, frame, op)
        handler = self._handlers.get(op)
        if handler is None:
            return await self._execute(op, payload)
        return await handler(session, frame, payload)

    async def _execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        """A per-user request's reply from the mailbox (and the dark launch's mirror told)."""
        mirror = self.mirror
        if mirror is not None and mirror.wants(op, payload):  # a dark launch
            sent = dict(payload)
            result = await self._mailbox.execute(op, payload)
            mirror.offer(op, sent, result)  # queued; the reply does not wait for it
            return result
        return await self._mailbox.execute(op, payload)

    async def call(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        """A per-user request of a trusted tier in this process (the single-node cell's MTA
        proxy): what a service connection's request gets, counted and observed alike,
        without the socket and the frame codec. Raises what the request raised.

        The payload and the reply pass through JSON as they would over the wire, so the
        mailbox gets the types it gets from a frame and neither side shares objects
        with the other.
        """
        if op in _NO_USER:
            raise BadRequest(f"{op.name} is not a per-user request")
        started = time.perf_counter()
        try:
            result = await self._execute(op, orjson.loads(orjson.dumps(payload)))
        except Exception as exc:
            self._finish(_LOCAL_SESSION, _LOCAL_FRAME, op.name, started, exc)
            raise
        _, body = self._finish(_LOCAL_SESSION, _LOCAL_FRAME, op.name, started, result)
        return orjson.loads(body)

    @staticmethod
    def _check_user_scope(session: Session, op: Op, payload: dict[str, Any]) -> None:
        """A user-token connection may name only its own user and no service-only op."""
        if op in SERVICE_ONLY:
            raise Forbidden(f"{op.name} is for service connections only")
        if op in _NO_USER:
            return
        field = "sender" if op is Op.SEND else "user"
        if _user_id(payload, field) != session.user:
            raise Forbidden(f"this connection's token covers user {session.user} only")
        if op is Op.SEND and "attachments" in payload:
            # a blob ref attached is readable by every recipient: only a trusted tier,
            # which stored the bytes itself, may name one
            raise Forbidden("attachments: a SEND with attachments needs a service connection")
        if op is Op.SEND and ("extra" in payload or "relay" in payload):
            # the IMAP gateway's filing of a mail sent already (blob refs, nothing relayed)
            raise Forbidden("extra, relay: a SEND with them needs a service connection")

    # ---- operations answered here ----

    async def _ping(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        return {"pong": True, "ts": time.time_ns() // 1000}

    async def _hello(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        if session.authenticated:
            raise BadRequest("this connection has already said HELLO")
        service_key = payload.get("service_key")
        user_token = payload.get("user_token")
        if (service_key is None) == (user_token is None):
            raise BadRequest("HELLO takes exactly one of service_key and user_token")
        if service_key is not None:
            if not isinstance(service_key, str) or not check_service_key(
                service_key, self._service_key
            ):
                log.info("hello refused peer=%s reason=bad_service_key", session.peer)
                raise Unauthenticated("unknown service key")
            user = None
        else:
            if not isinstance(user_token, str):
                raise Unauthenticated("malformed user token: not a string")
            try:
                revoked = self.revocations.refuses if self.revocations is not None else None
                token = read_user_token(user_token, self._service_key, self._clock(), revoked)
            except Unauthenticated as exc:
                log.info("hello refused peer=%s reason=%r", session.peer, str(exc))
                raise
            user = token.user
            session.token = token
        session.authenticated = True
        session.user = user
        return {
            "node": self.node_id,
            "protocol": VERSION,
            "user": user,
            "max_frame_size": self.max_frame_size,
        }

    async def _subscribe(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        user = _user_id(payload, "user", minimum=1)
        subscription_id = frame.request_id
        if subscription_id in session.subscriptions:
            raise BadRequest(
                f"request id {subscription_id} already names a live subscription on this connection"
            )
        limit = self._max_service_subscriptions if session.is_service else self._max_subscriptions
        if len(session.subscriptions) >= limit:
            raise TooLarge(f"this connection already has {limit} subscriptions, the limit")
        callback = partial(session.event_sink, subscription_id)
        token = self._mailbox.subscribe(user, callback)
        session.subscriptions[subscription_id] = (user, token)
        return {"subscribed": True}

    async def _unsubscribe(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        subscription_id = payload.get("subscription")
        if type(subscription_id) is not int:
            raise BadRequest(
                f"'subscription' must be the request id of a SUBSCRIBE, not {subscription_id!r}"
            )
        # Idempotent: a subscription that already ended (overflow) is no error.
        self.end_subscription(session, subscription_id)
        return {"subscribed": False}

    async def _stats(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        return {
            "node": self.node_id,
            "connections": len(self._sessions),
            "connections_total": self._connections_total,
            "subscriptions": sum(len(s.subscriptions) for s in self._sessions),
            "requests": dict(self._requests + Counter(self._table_requests())),
            "errors": dict(self._errors),
            "server": dict(self._server_counters),
            self._stats_section: self._mailbox.stats(),
        }

    async def _health(self, session: Session, frame: Frame, payload: dict[str, Any]) -> dict:
        store = "ok"
        if self._health_check is not None:
            try:
                healthy = await self._health_check()
            except Exception as exc:
                log.warning("health check failed error=%r", exc)
                healthy = False
            store = "ok" if healthy else "down"
        return {
            "status": "ok" if store == "ok" else "degraded",
            "node": self.node_id,
            "store": store,
        }
