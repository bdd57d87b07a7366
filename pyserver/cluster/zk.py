"""One ZooKeeper session of a process: bounded start and calls, prompt suspension, listeners.

Wraps aiozk's `ZKClient` with what a cell needs and aiozk does not give:

* `start()` is bounded (aiozk retries forever), and every call is bounded by
  `call_timeout_s` (aiozk waits forever while disconnected); a failure to
  reach ZooKeeper raises `ZooKeeperUnavailable` (an `Unavailable`), while
  ZooKeeper's answers (`NoNode`, `NodeExists`, `BadVersion`) pass through.
* `live` says whether the session is connected *now*. aiozk notices a dead
  connection only when a heartbeat goes unanswered, up to the whole session
  timeout later; this module watches the connection's read loop and suspends
  the session the moment it ends, which also starts aiozk's reconnection. And
  a session not heard from for two thirds of its timeout (`lease_s`) is not
  live, whatever aiozk believes: a process stopped (SIGSTOP, a stall) longer
  than its session wakes up fenced, before it has read ZooKeeper's goodbye.
* Reconnection attempts are at most `_RECONNECT_MAX_S` apart (aiozk's own
  back-off grows to 60 s, far longer than a session lives).
* Listeners hear every change of state ("connected", "suspended", "lost"), of
  session id, and every new connection ("connected" again): a new id after
  "connected" means the old session expired, and with it every ephemeral node
  it held (aiozk restores watches, not ephemerals).
* Making a connection is bounded by the call timeout, and after each new
  connection the watches are restored on that connection, bounded too: aiozk
  waited on a connect or its `srvr` probe as long as TCP held them (a minute
  against a ZooKeeper starting), and its restore of the watches waited for a
  connected session, so a connection lost right then hung its reconnection
  for good.
* Paths are relative to a chroot whose nodes are created persistent:
  aiozk's `ensure_path` (and its own chroot support) creates container nodes,
  which ZooKeeper deletes once their last child is gone.
* Access control (docs/security.md): with `auth` ("user:password"), the session
  signs in with that digest identity on every connection (aiozk does not do it
  again after a reconnection), and every node it creates is readable and writable
  by that identity and readable by the `read_ids` (digest ids, `digest_id`), and
  by nobody else. A refusal is `ZooKeeperForbidden`, never mistaken for an outage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import aiozk
import aiozk.session
from aiozk import exc, protocol
from aiozk.connection import Connection
from aiozk.states import States

from pyserver.errors import Forbidden, Unavailable

__all__ = [
    "CHILDREN_CHANGED",
    "CREATED",
    "DATA_CHANGED",
    "DELETED",
    "BadVersion",
    "NoNode",
    "NodeExists",
    "NotEmpty",
    "StateListener",
    "ZooKeeper",
    "ZooKeeperForbidden",
    "ZooKeeperUnavailable",
    "digest_id",
]

log = logging.getLogger(__name__)

NoNode = exc.NoNode
NodeExists = exc.NodeExists
BadVersion = exc.BadVersion
NotEmpty = exc.NotEmpty

CREATED = aiozk.WatchEvent.CREATED
DELETED = aiozk.WatchEvent.DELETED
DATA_CHANGED = aiozk.WatchEvent.DATA_CHANGED
CHILDREN_CHANGED = aiozk.WatchEvent.CHILDREN_CHANGED

# Longest pause between two reconnection attempts. aiozk reads this module global at
# each reconnection; its default (60 s) would keep a node fenced long after ZooKeeper
# is back.
_RECONNECT_MAX_S = 0.5

_ALL_STATES = (States.CONNECTED, States.SUSPENDED, States.READ_ONLY, States.LOST)
# ZooKeeper's own answers: the request reached the server and was refused.
_ANSWERS = (exc.NoNode, exc.NodeExists, exc.BadVersion, exc.NotEmpty)

# (state, session id) -> None; state is "connected", "suspended", "lost" or "closed".
StateListener = Callable[[str, int | None], None]

T = TypeVar("T")


class ZooKeeperUnavailable(Unavailable):
    """ZooKeeper could not be reached (or did not answer in time); retry later."""


class ZooKeeperForbidden(Forbidden):
    """ZooKeeper refused the call: this session's identity may not (ACLs)."""


# ZooKeeper's refusals of an identity: not an outage, not worth a retry.
_REFUSALS = (exc.NoAuth, exc.AuthFailed, exc.InvalidACL)


def digest_id(credentials: str) -> str:
    """The ACL id of the digest identity "user:password": "user:" and the base64 SHA-1 of
    the whole (ZooKeeper's DigestAuthenticationProvider); safe to publish."""
    user, colon, _ = credentials.partition(":")
    if not user or not colon:
        raise ValueError("ZooKeeper credentials are user:password")
    # ZooKeeper's digest scheme is defined with SHA-1 (docs/security.md, bandit)
    hashed = hashlib.sha1(credentials.encode("utf-8")).digest()  # nosec B324
    return f"{user}:{base64.b64encode(hashed).decode()}"


def normalize_chroot(chroot: str) -> str:
    """The chroot as an absolute path ("/a/b" for "a/b/"), or "" for the root."""
    parts = [part for part in chroot.split("/") if part]
    return "/" + "/".join(parts) if parts else ""


class ZooKeeper:
    """A ZooKeeper session under a chroot. `await start()`, use, `await close()`."""

    def __init__(
        self,
        servers: str,
        *,
        chroot: str = "/pyserver",
        session_timeout_s: float = 10.0,
        call_timeout_s: float = 5.0,
        auth: str = "",
        read_ids: Sequence[str] = (),
    ) -> None:
        if not servers:
            raise ValueError("servers: give ZooKeeper's address as host:port[,host:port...]")
        if session_timeout_s <= 0 or call_timeout_s <= 0:
            raise ValueError("session_timeout_s and call_timeout_s must be positive")
        self.servers = servers
        self.chroot = normalize_chroot(chroot)
        self.session_timeout_s = session_timeout_s
        self.call_timeout_s = call_timeout_s
        self._auth = auth
        # what every node this session creates allows: everything to its own identity,
        # reading to the read ids; without an identity, everything to everyone
        self.acl = (
            [
                aiozk.ACL.make("digest", digest_id(auth), True, True, True, True, True),
                *(aiozk.ACL.make("digest", read_id, read=True) for read_id in read_ids),
            ]
            if auth
            else [protocol.UNRESTRICTED_ACCESS]
        )
        self._client: aiozk.ZKClient | None = None
        self._listeners: list[StateListener] = []
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        # when ZooKeeper was last heard from (time.monotonic(), which runs on while the
        # process is stopped)
        self._last_heard = float("-inf")

    # ---- life ----

    async def start(self, timeout_s: float = 10.0) -> None:
        """Open the session and create the chroot; ZooKeeperUnavailable if not within timeout_s."""
        if self._client is not None:
            raise RuntimeError("this ZooKeeper session is already started")
        aiozk.session.MAX_FIND_WAIT = _RECONNECT_MAX_S
        # read_timeout bounds reads of a reply that has begun to arrive.
        client = aiozk.ZKClient(
            self.servers,
            session_timeout=self.session_timeout_s,
            read_timeout=max(1.0, self.session_timeout_s / 3),
            default_acl=self.acl,
        )
        self._prepare_every_connection(client.session)
        self._client = client
        try:
            async with asyncio.timeout(timeout_s):
                await client.start()
        except TimeoutError:
            await self._teardown()
            raise ZooKeeperUnavailable(
                f"no ZooKeeper session with {self.servers} within {timeout_s:g} s"
            ) from None
        except BaseException:
            await self._teardown()
            raise
        self._monitor = asyncio.get_running_loop().create_task(self._watch_states())
        if self.chroot:
            try:
                await self.ensure_persistent("/")
            except ZooKeeperForbidden as refused:  # the session stands; each call says so
                log.warning("zookeeper chroot %s not readable here: %s", self.chroot, refused)
        log.info(
            "zookeeper session started servers=%s session=%#x timeout_s=%g chroot=%s",
            self.servers,
            self.session_id or 0,
            self.negotiated_timeout_s,
            self.chroot or "/",
        )

    def _prepare_every_connection(self, session: Any) -> None:
        """Replace aiozk's restore of the watches after each new connection with one that
        signs in first (with `auth`) and can neither hang nor fail the reconnection.

        aiozk's repair loop calls `set_existing_watches` right after a connection is made
        (the first one included), before any waiting request runs, and only then goes
        back to waiting for a lost connection. Its own version sends SetWatches through
        `session.send`, which waits for the session to be connected: when the connection
        dies right then (ZooKeeper restarting, a flapping network), the reply never comes,
        the repair loop waits forever, and the session stays suspended for good (the node
        fenced until it is restarted). Here both requests go on this connection, bounded by
        the call timeout; a failure drops the connection and suspends the session, and the
        repair loop connects again.
        """

        async def prepare_connection() -> None:
            conn = session.conn
            self._hear_on(conn)
            try:
                if self._auth:
                    credentials = self._auth.encode("utf-8")
                    request = protocol.AuthRequest(type=0, scheme="digest", auth=credentials)
                    await self._on_connection(conn, request)
                watches = _set_watches_request(session)
                if watches is not None:
                    await self._on_connection(conn, watches, xid=_next_xid(session))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("zookeeper connection failed while being prepared: %r", error)
                if conn is not None and not conn.closing:
                    conn.abort(exc.ConnectError)
                    if conn.writer is not None:
                        conn.writer.close()
                if session.conn is conn and session.state.current_state in (
                    States.CONNECTED,
                    States.READ_ONLY,
                ):
                    session.state.transition_to(States.SUSPENDED)

        session.set_existing_watches = prepare_connection

        async def make_connection(host: str, port: int) -> Any:
            """aiozk's own, bounded: it opens a connection for the `srvr` probe, reads the
            answer to its end, then opens the session's connection, waiting as long as each
            takes. A ZooKeeper starting (listening, not yet accepting) or shutting down
            holds a connect or that read for a minute (TCP's SYN retries): the reconnection
            waited that long, the session expired meanwhile, and the node stayed fenced."""
            conn = Connection(
                host, port, watch_handler=session.event_dispatch, read_timeout=session.read_timeout
            )
            try:
                async with asyncio.timeout(min(self.call_timeout_s, 2 * session.read_timeout)):
                    await conn.connect()
            except asyncio.CancelledError:
                _close_quietly(conn)
                raise
            except Exception as error:
                log.info("no connection to zookeeper %s:%s: %r", host, port, error)
                _close_quietly(conn)
                return None
            return conn

        session.make_connection = make_connection

    def _hear_on(self, conn: Any) -> None:
        """Note the time of every reply and event read on `conn` (for `live`)."""
        self._last_heard = time.monotonic()
        read_response = conn.read_response

        async def read_and_note(*args: Any, **kwargs: Any) -> Any:
            response = await read_response(*args, **kwargs)
            self._last_heard = time.monotonic()
            return response

        conn.read_response = read_and_note

    async def _on_connection(self, conn: Any, request: Any, xid: int | None = None) -> None:
        """Send one request on `conn` and wait for its reply, for at most the call timeout;
        ConnectionError if the connection's reads end first."""
        reply = conn.send(request, xid=xid)
        reads = conn.read_loop_task
        waits = {reply} if reads is None else {reply, reads}
        done, _ = await asyncio.wait(
            waits, timeout=self.call_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if reply not in done:
            reply.cancel()
            raise ConnectionError(f"no reply to {type(request).__name__} on this connection")
        reply.result()

    async def close(self) -> None:
        """End the session (its ephemeral nodes go at once when ZooKeeper can be told)."""
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        client = self._client
        if client is not None and self.live:
            try:
                async with asyncio.timeout(self.call_timeout_s):
                    await client.close()
            except Exception as error:  # best effort: the session expires on its own
                log.info("zookeeper close was not acknowledged error=%r", error)
        await self._teardown()
        self._notify("closed", None)

    async def _teardown(self) -> None:
        """Stop whatever aiozk still runs (its own close stops short when disconnected)."""
        client = self._client
        if client is None:
            return
        session = client.session
        session.closing = True
        tasks = [session.repair_loop_task, session.heartbeat_task]
        if session.heartbeat_handle is not None:
            session.heartbeat_handle.cancel()
        conn = session.conn
        if conn is not None and not conn.closing:
            conn.closing = True
            tasks.append(conn.read_loop_task)
            conn.abort(exc.ConnectError)
            if conn.writer is not None:
                conn.writer.close()
        pending = [task for task in tasks if task is not None and not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        session.started = False

    # ---- state ----

    @property
    def client(self) -> aiozk.ZKClient:
        if self._client is None:
            raise RuntimeError("the ZooKeeper session is not started")
        return self._client

    @property
    def state(self) -> str:
        """The session's state: aiozk's "connected", "suspended", "read_only" or "lost";
        or "closed"."""
        if self._closed or self._client is None:
            return "closed"
        return str(self._client.session.state.current_state)

    @property
    def session_id(self) -> int | None:
        return None if self._client is None else self._client.session.session_id

    @property
    def negotiated_timeout_s(self) -> float:
        """The session timeout ZooKeeper granted (it bounds the asked one by its own limits)."""
        if self._client is None:
            return self.session_timeout_s
        return float(self._client.session.timeout)

    @property
    def live(self) -> bool:
        """Connected now: the session is connected and its connection is still being read."""
        if self._closed or self._client is None:
            return False
        session = self._client.session
        if session.state.current_state != States.CONNECTED or session.closing:
            return False
        conn = session.conn
        task = conn.read_loop_task if conn is not None else None
        if task is None or task.done():
            return False
        return time.monotonic() - self._last_heard < self.lease_s

    @property
    def lease_s(self) -> float:
        """How long after ZooKeeper's last word the session still counts as live: two thirds
        of the session timeout. aiozk pings every third of it; a process that has heard
        nothing for longer (stopped, starved) may have lost its session without knowing,
        and another node may serve its users already."""
        return self.negotiated_timeout_s * 2 / 3

    def add_listener(self, listener: StateListener) -> None:
        """Call `listener(state, session_id)` on every change of state or session (on the loop)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def wait_live(self, timeout_s: float) -> None:
        """Return once the session is live; ZooKeeperUnavailable after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.live:
            if self._closed:
                raise ZooKeeperUnavailable("the ZooKeeper session is closed")
            if loop.time() >= deadline:
                raise ZooKeeperUnavailable(f"ZooKeeper not connected within {timeout_s:g} s")
            await asyncio.sleep(0.05)

    def _notify(self, state: str, session_id: int | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(state, session_id)
            except Exception:
                log.exception("zookeeper state listener failed state=%s", state)

    async def _watch_states(self) -> None:
        """Tell the listeners of each change; suspend at once when a connection's reads end."""
        session = self.client.session
        machine = session.state
        last: tuple[Any, Any, Any] = (None, None, None)
        while True:
            state = machine.current_state
            # a new connection counts as a change even when the state looks the same: the
            # session may have been suspended and connected again before this task ran
            conn = session.conn if state == States.CONNECTED else None
            current = (state, session.session_id, conn)
            if current != last:
                if state == States.CONNECTED:
                    self._watch_connection()
                if state != last[0]:
                    log.info("zookeeper session %s session=%#x", state, current[1] or 0)
                last = current
                self._notify(str(state), current[1])
            others = [state for state in _ALL_STATES if state != machine.current_state]
            change = machine.wait_for(*others)
            try:
                await change
            finally:
                for state in others:  # aiozk never forgets a waiter for a state not reached
                    machine.futures[state].discard(change)

    def _watch_connection(self) -> None:
        session = self.client.session
        conn = session.conn
        task = conn.read_loop_task if conn is not None else None
        if task is None:
            return
        if task.done():
            self._connection_ended(conn)
            return
        task.add_done_callback(lambda _task: self._connection_ended(conn))

    def _connection_ended(self, conn: Any) -> None:
        """aiozk's read loop returns quietly when ZooKeeper closes the connection; its session
        stays "connected" until a heartbeat times out. Suspend it now: nothing is served on a
        session we cannot hear, and suspension starts aiozk's reconnection."""
        if self._closed or self._client is None:
            return
        session = self._client.session
        if session.closing or session.conn is not conn:
            return
        if session.state.current_state in (States.CONNECTED, States.READ_ONLY):
            log.warning("zookeeper connection lost; session suspended")
            session.state.transition_to(States.SUSPENDED)

    # ---- paths and calls (paths are relative to the chroot) ----

    def path(self, relative: str) -> str:
        """The absolute ZooKeeper path of a chroot-relative one."""
        inner = "/".join(part for part in relative.split("/") if part)
        return f"{self.chroot}/{inner}" if inner else (self.chroot or "/")

    async def _call(self, operation: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                return await operation
        except _ANSWERS:
            raise
        except _REFUSALS as refusal:
            raise ZooKeeperForbidden(
                f"ZooKeeper refused: {type(refusal).__name__} (this process's credentials"
                " may not do that; docs/security.md)"
            ) from refusal
        except TimeoutError:
            raise ZooKeeperUnavailable(
                f"ZooKeeper did not answer within {self.call_timeout_s:g} s ({self.state})"
            ) from None
        except (exc.ZKError, OSError) as error:
            raise ZooKeeperUnavailable(f"ZooKeeper: {error!r}") from error

    async def get(self, path: str, watch: bool = False) -> tuple[bytes, Any]:
        """(data, stat); NoNode if there is no such node."""
        data, stat = await self._call(self.client.get(self.path(path), watch=watch))
        return (data or b""), stat

    async def get_children(self, path: str, watch: bool = False) -> list[str]:
        return list(await self._call(self.client.get_children(self.path(path), watch=watch)))

    async def exists(self, path: str, watch: bool = False) -> bool:
        return bool(await self._call(self.client.exists(self.path(path), watch=watch)))

    async def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False) -> None:
        """Create one node (persistent unless ephemeral); NodeExists, NoNode (no parent)."""
        await self._call(self.client.create(self.path(path), data, ephemeral=ephemeral))

    async def commit(
        self,
        creates: Sequence[tuple[str, bytes]] = (),
        sets: Sequence[tuple[str, bytes]] = (),
        *,
        ephemeral: bool = False,
        deletes: Sequence[str] = (),
        checks: Sequence[str] = (),
    ) -> bool:
        """Check that these nodes exist, create these nodes, replace these nodes' data and
        delete these nodes (in that order) in one transaction (ZooKeeper's multi): True once
        all of it is done, False if ZooKeeper refused it (a node there already, or missing,
        or not empty), in which case none of it is."""
        transaction = self.client.begin_transaction()
        for path in checks:
            transaction.check_version(self.path(path), -1)
        for path, data in creates:
            transaction.create(self.path(path), data, ephemeral=ephemeral)
        for path, data in sets:
            transaction.set_data(self.path(path), data)
        for path in deletes:
            transaction.delete(self.path(path))
        try:
            result = await self._call(transaction.commit())
        except _ANSWERS:
            return False
        return bool(result)

    async def set_data(self, path: str, data: bytes, version: int = -1) -> None:
        """Replace a node's data (only at that version, unless -1); NoNode, BadVersion."""
        await self._call(self.client.set(self.path(path), data, version))

    async def delete(self, path: str, version: int = -1) -> None:
        """Delete one node; NoNode, BadVersion, NotEmpty."""
        request = protocol.DeleteRequest(path=self.path(path), version=version)
        await self._call(self.client.send(request))

    async def ensure_persistent(self, path: str, data: bytes = b"") -> bool:
        """Create the chroot-relative path's missing nodes, all persistent; `data` goes to the
        last one if this call creates it. True if it did."""
        parts = [part for part in (self.chroot + "/" + path).split("/") if part]
        created = False
        for depth in range(1, len(parts) + 1):
            absolute = "/" + "/".join(parts[:depth])
            last = depth == len(parts)
            # a node that is there needs no create (which a read-only identity may not do)
            if await self._call(self.client.exists(absolute)):
                continue
            try:
                await self._call(self.client.create(absolute, data if last else b""))
                created = last
            except exc.NodeExists:
                pass
        return created

    # ---- watches ----

    def add_watch(self, path: str, events: Iterable[int], callback: Callable[[str], None]) -> None:
        """Call `callback(absolute path)` on the loop when one of `events` happens at `path`.

        The callback stays registered (aiozk re-arms it on reconnection) until removed,
        but ZooKeeper fires a watch only once per read that set it: read again with
        watch=True after each event.
        """
        absolute = self.path(path)
        for event in events:
            self.client.session.add_watch_callback(event, absolute, callback)

    def remove_watch(
        self, path: str, events: Iterable[int], callback: Callable[[str], None]
    ) -> None:
        absolute = self.path(path)
        callbacks = self.client.session.watch_callbacks
        for event in events:
            if callback in callbacks.get((event, absolute), ()):
                self.client.session.remove_watch_callback(event, absolute, callback)


def _close_quietly(conn: Any) -> None:
    if conn.writer is not None:
        with contextlib.suppress(Exception):
            conn.writer.close()


def _next_xid(session: Any) -> int:
    """The next request id of the session, as aiozk's `Session.send` counts them."""
    session.xid = session.xid + 1 if session.xid < 0x7FFFFFFF else 1
    return int(session.xid)


def _set_watches_request(session: Any) -> protocol.SetWatchesRequest | None:
    """The SetWatches request that re-arms every watch callback registered (as aiozk's own
    `set_existing_watches` builds it), or None when there is none."""
    if not session.watch_callbacks:
        return None
    request = protocol.SetWatchesRequest(
        relative_zxid=session.last_zxid or 0, data_watches=[], exist_watches=[], child_watches=[]
    )
    for event_type, path in session.watch_callbacks:
        if event_type == protocol.WatchEvent.CREATED:
            request.exist_watches.append(path)
        elif event_type == protocol.WatchEvent.DATA_CHANGED:
            request.data_watches.append(path)
        elif event_type == protocol.WatchEvent.CHILDREN_CHANGED:
            request.child_watches.append(path)
    return request


async def retry_until(
    attempt: Callable[[], Awaitable[T]], timeout_s: float, pause_s: float = 0.2
) -> T:
    """`attempt()` until it does not raise ZooKeeperUnavailable, for at most timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await attempt()
        except ZooKeeperUnavailable:
            if loop.time() + pause_s >= deadline:
                raise
            await asyncio.sleep(pause_s)
