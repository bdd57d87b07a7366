"""Hostile input at a running server: random, truncated, oversized and malformed frames and
payloads over raw sockets.

Every exchange must end with well-formed answers (replies or errors with a known code,
a stream error only as the last frame, with request id 0) and the server closing the
connection once the client has finished sending; meanwhile another connection keeps
being served, and a known user's mailbox is unchanged at the end. The server runs in
a thread of its own, on uvloop with the Cython codec ("native") or on asyncio's loop
with the pure-Python codec ("pure").
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyserver import implementation
from pyserver.app.auth import make_user_token
from pyserver.app.server import ServerLimits
from pyserver.framedef import KIND_ERROR, KIND_EVENT, KIND_REPLY, KIND_REQUEST
from pyserver.pure import frame as pure_frame
from pyserver.wire.ops import Op
from tests.conftest import implementation_params
from tests.support.cells import KEY, InProcessCell

MAX_FRAME = 16 * 1024
# The user whose mailbox must come through untouched; no generated input may name it.
KNOWN = 2**63 + 4242
KNOWN_TEXT = str(KNOWN).encode()
CODES = {
    "BAD_REQUEST", "UNAUTHENTICATED", "FORBIDDEN", "NOT_OWNER", "UNAVAILABLE",
    "NOT_FOUND", "CONFLICT", "TOO_LARGE", "INTERNAL",
}  # fmt: skip
_HEADER = struct.Struct(">IBBHI")
EXAMPLES = int(os.environ.get("PYSERVER_BAD_INPUT_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ServedCell:
    """A server, its mailbox and store, on an event loop in a background thread."""

    def __init__(self, path: Path, impl: str) -> None:
        self.path = path
        self.impl = impl
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"server-{impl}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the server did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _main(self) -> None:
        if self.impl == "native":
            import uvloop

            loop = uvloop.new_event_loop()
            codec = implementation.framecodec
        else:
            loop = asyncio.new_event_loop()
            codec = pure_frame
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(codec))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self, codec: Any) -> None:
        self._stop = asyncio.Event()
        cell = InProcessCell(
            self.path,
            synchronous="OFF",
            codec=codec,
            limits=ServerLimits(request_timeout_s=5, idle_timeout_s=30),
            node_id="app-hostile",
            dispatcher_options={"max_frame_size": MAX_FRAME},
        )
        async with cell:
            self.mailbox = cell.mailbox
            self.port = await cell.serve()
            self._ready.set()
            await self._stop.wait()
            await cell.stop_serving(2)

    async def snapshot(self, user: int) -> Any:
        """Everything a client can read of a user's mailbox."""
        mailbox = self.mailbox
        threads = await mailbox.execute(Op.LIST_THREADS, {"user": user, "limit": 200})
        full = [
            await mailbox.execute(Op.GET_THREAD, {"user": user, "thread_id": t["thread_id"]})
            for t in threads["threads"]
        ]
        counts = await mailbox.execute(Op.COUNTS, {"user": user})
        found = await mailbox.execute(Op.SEARCH, {"user": user, "query": "secret"})
        return threads, full, counts, found


def frame(kind: int, op: int, request_id: int, payload: bytes) -> bytes:
    return _HEADER.pack(8 + len(payload), 1, kind, op, request_id) + payload


def request(op: int, request_id: int, payload: Any) -> bytes:
    return frame(KIND_REQUEST, op, request_id, orjson.dumps(payload))


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, finish sending, read until the server closes: (bytes read, closed)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed while we still sent: the server stopped trusting the stream
        except TimeoutError:
            return bytes(received), False
    return bytes(received), True


def check_answers(received: bytes) -> list[tuple[int, int, int, Any]]:
    """Decode the server's answers and check each is well formed."""
    decoder = pure_frame.FrameDecoder(1 << 30)
    decoder.feed(received)
    frames = []
    for kind, op, request_id, payload in decoder:
        body = orjson.loads(payload)
        assert isinstance(body, dict)
        assert kind in (KIND_REPLY, KIND_ERROR, KIND_EVENT)
        if kind == KIND_ERROR:
            assert body["code"] in CODES and isinstance(body["message"], str), body
            assert body["code"] != "INTERNAL", body  # hostile input is never our bug
        frames.append((kind, op, request_id, body))
    assert decoder.buffered == 0, "the answers end inside a frame"
    for kind, _op, request_id, body in frames[:-1]:
        # An error on request id 0 (a stream error, or a request that used the reserved
        # id) ends the answers: the server closes the connection after it.
        assert not (kind == KIND_ERROR and request_id == 0), f"answers after {body}"
    return frames


@pytest.fixture(scope="module", params=implementation_params())
def cell(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    if request.param == "native":
        assert implementation.framecodec is not None, "the Cython frame codec is not built"
    served = ServedCell(tmp_path_factory.mktemp(f"hostile-{request.param}"), request.param)
    served.start()
    seed = [
        (Op.FRIEND_ADD, {"user": KNOWN, "friend": 7}),
        (
            Op.SEND,
            {
                "sender": 7,
                "recipients": [KNOWN],
                "text": "the secret plan",
                "key": "s1",
                "channel": "chat",
            },
        ),
        (
            Op.SEND,
            {
                "sender": KNOWN,
                "recipients": [8],
                "text": "secret reply",
                "subject": "re",
                "channel": "email",
            },
        ),
        (
            Op.DELIVER,
            {
                "user": KNOWN,
                "sender": 0,
                "from": "x@example.org",
                "text": "secret",
                "channel": "email",
            },
        ),
    ]
    for op, payload in seed:
        served.call(served.mailbox.execute(op, payload))
    before = served.call(served.snapshot(KNOWN))

    # Another connection, served all along: pings from a thread while the tests run.
    witness = Witness(served.port)
    witness.start()
    yield served
    witness.finish()
    assert witness.failures == [], witness.failures[:3]
    assert witness.answered > 0
    assert served.call(served.snapshot(KNOWN)) == before, "the known user's mailbox changed"
    served.stop()


class Witness(threading.Thread):
    """A well-behaved client on its own connection, pinging until told to finish."""

    def __init__(self, port: int) -> None:
        super().__init__(name="witness", daemon=True)
        self.port = port
        self.answered = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                request_id = 0
                while not self._done.wait(0.02):
                    request_id += 1
                    sock.sendall(request(Op.PING, request_id, {}))
                    head = _recv_exactly(sock, 12)
                    length, _, kind, op, got_id = _HEADER.unpack(head)
                    body = orjson.loads(_recv_exactly(sock, length - 8))
                    if (kind, op, got_id) != (KIND_REPLY, Op.PING, request_id) or not body["pong"]:
                        self.failures.append(f"bad answer {kind} {op} {got_id} {body}")
                    self.answered += 1
        except Exception as exc:
            self.failures.append(repr(exc))

    def finish(self) -> None:
        self._done.set()
        self.join(10)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the witness connection was closed")
        data += chunk
    return bytes(data)


# ---- strategies ----

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["inbox", "other", "archived", "chat", "email", "", "t", "m", "a" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)
FIELDS = [
    "user", "sender", "recipients", "text", "channel", "subject", "key", "thread_id",
    "message_id", "folder", "limit", "before", "query", "friend", "subscription",
    "participants", "from", "extra", "service_key", "user_token",
]  # fmt: skip
user_ids = st.integers(min_value=0, max_value=2**64 - 1) | st.integers(0, 20)
payload_objects = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values | user_ids | st.lists(user_ids, max_size=4),
    max_size=6,
)
ops = st.sampled_from([int(op) for op in Op]) | st.integers(0, 0xFFFF)
# A valid payload of each operation (users 1..20), for the near-valid mutations below.
TEMPLATES: dict[Op, dict[str, Any]] = {
    Op.PING: {},
    Op.SEND: {"sender": 1, "recipients": [2], "text": "hi there", "channel": "chat"},
    Op.DELIVER: {"user": 2, "sender": 0, "from": "a@example.org", "text": "x", "channel": "email"},
    Op.LIST_THREADS: {"user": 2, "folder": "inbox", "limit": 5},
    Op.GET_THREAD: {"user": 2, "thread_id": "t", "limit": 5},
    Op.GET_MESSAGE: {"user": 2, "message_id": "m"},
    Op.COUNTS: {"user": 2},
    Op.SEARCH: {"user": 2, "query": "hi", "limit": 3},
    Op.MARK_READ: {"user": 2, "thread_id": "t"},
    Op.MARK_UNREAD: {"user": 2, "thread_id": "t", "message_id": "m"},
    Op.MOVE: {"user": 2, "thread_id": "t", "folder": "archived"},
    Op.DELETE: {"user": 2, "thread_id": "t"},
    Op.MARK_SEEN: {"user": 2, "folder": "inbox"},
    Op.SUBSCRIBE: {"user": 2},
    Op.UNSUBSCRIBE: {"subscription": 1},
    Op.FRIEND_ADD: {"user": 2, "friend": 3},
    Op.FRIEND_REMOVE: {"user": 2, "friend": 3},
    Op.BLOCK: {"user": 2, "sender": 3},
    Op.UNBLOCK: {"user": 2, "sender": 3},
    Op.STATS: {},
    Op.HEALTH: {},
}


@st.composite
def near_valid_requests(draw: st.DrawFn) -> tuple[int, bytes]:
    """(op, payload): a valid request of a random operation, often with one field spoiled."""
    op = draw(st.sampled_from(sorted(TEMPLATES)))
    payload = dict(TEMPLATES[op])
    for name in ("user", "sender", "friend"):
        if payload.get(name):
            payload[name] = draw(st.integers(1, 20))
    how = draw(st.sampled_from(["keep", "replace", "drop", "add"]))
    if how == "replace" and payload:
        payload[draw(st.sampled_from(sorted(payload)))] = draw(json_values | user_ids)
    elif how == "drop" and payload:
        del payload[draw(st.sampled_from(sorted(payload)))]
    elif how == "add":
        payload[draw(st.sampled_from(FIELDS))] = draw(json_values)
    return int(op), orjson.dumps(payload)


payload_bytes = (
    payload_objects.map(orjson.dumps)
    | json_values.map(orjson.dumps)
    | st.binary(max_size=80)
    | st.sampled_from(
        [
            b"",
            b"{",
            b"{}",
            b"null",
            b'{"user": 1e999}',
            b'{"a":' * 50,
            b'{"user": 18446744073709551616}',
            b'{"user": -1}',
            b'{"user": 1.0}',
            b'{"user": 1, "user": 2}',
            b'{"user": 1}\x00',
        ]
    )
)
hellos = st.sampled_from(
    [
        b"",
        request(Op.HELLO, 1, {"service_key": KEY}),
        request(Op.HELLO, 1, {"user_token": make_user_token(11, int(time.time()) + 600, KEY)}),
        request(Op.HELLO, 1, {"user_token": make_user_token(11, 1, KEY)}),
        request(Op.HELLO, 1, {"service_key": "not the key"}),
    ]
)


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """A HELLO (or none), then well-framed requests with hostile contents, maybe cut short."""
    parts = [draw(hellos)]
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from([KIND_REQUEST] * 6 + [KIND_REPLY, KIND_ERROR, KIND_EVENT]))
        request_id = draw(st.integers(0, 2**32 - 1))
        if draw(st.booleans()):
            op, payload = draw(near_valid_requests())
        else:
            op, payload = draw(ops), draw(payload_bytes)
        parts.append(frame(kind, op, request_id, payload))
    data = b"".join(parts)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def corrupted_streams(draw: st.DrawFn) -> bytes:
    """A valid request stream with some bytes overwritten (headers included)."""
    data = bytearray(
        request(Op.HELLO, 1, {"service_key": KEY})
        + request(Op.COUNTS, 2, {"user": draw(st.integers(1, 50))})
        + request(Op.PING, 3, {})
    )
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def oversized_streams(draw: st.DrawFn) -> bytes:
    """A frame whose length field is over the limit, with or without the bytes behind it."""
    length = draw(st.integers(MAX_FRAME + 1, 2**32 - 1))
    head = _HEADER.pack(length, 1, KIND_REQUEST, Op.PING, draw(st.integers(0, 2**32 - 1)))
    if length <= 4 * MAX_FRAME and draw(st.booleans()):
        return head + b"x" * (length - 8)
    return head + draw(st.binary(max_size=64))


def _not_naming_known(data: bytes) -> bytes:
    assume(KNOWN_TEXT not in data)
    return data


# ---- the properties ----


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes(cell: ServedCell, data: bytes) -> None:
    received, closed = exchange(cell.port, data)
    assert closed, "the server neither answered nor closed"
    check_answers(received)


@SETTINGS
@given(data=frame_streams())
def test_hostile_frames_and_payloads(cell: ServedCell, data: bytes) -> None:
    _not_naming_known(data)
    received, closed = exchange(cell.port, data)
    assert closed
    # Well-framed requests are each answered on their own id; nothing closes early. A
    # request on the reserved id 0 ends the stream: it and what follows get one stream
    # error (on id 0), after the answers to the requests before it.
    answers = [f for f in check_answers(received) if f[0] != KIND_EVENT]
    whole = pure_frame.FrameDecoder(1 << 30)
    whole.feed(data)
    sent = list(whole)
    ids = [f.request_id for f in sent]
    if 0 in ids:
        ids = [*ids[: ids.index(0)], 0]
    assert sorted(f[2] for f in answers) == sorted(ids), (sent, answers)


@SETTINGS
@given(data=corrupted_streams())
def test_corrupted_headers(cell: ServedCell, data: bytes) -> None:
    received, closed = exchange(cell.port, data)
    assert closed
    check_answers(received)


@settings(SETTINGS, max_examples=max(10, EXAMPLES // 5))
@given(data=oversized_streams())
def test_oversized_frames(cell: ServedCell, data: bytes) -> None:
    received, closed = exchange(cell.port, data)
    assert closed
    frames = check_answers(received)
    if frames:  # a reset may beat the answer when we were still sending
        assert frames[-1][:3] == (KIND_ERROR, 0, 0) and frames[-1][3]["code"] == "TOO_LARGE"


def test_a_payload_naming_the_known_user_is_refused_to_other_users(cell: ServedCell) -> None:
    token = make_user_token(11, int(time.time()) + 600, KEY)
    data = (
        request(Op.HELLO, 1, {"user_token": token})
        + request(Op.DELETE, 2, {"user": KNOWN, "thread_id": "t"})
        + request(Op.SEND, 3, {"sender": KNOWN, "recipients": [11], "text": "spoof"})
        + request(Op.FRIEND_REMOVE, 4, {"user": KNOWN, "friend": 7})
    )
    received, closed = exchange(cell.port, data)
    assert closed
    answers = {f[2]: f for f in check_answers(received)}
    assert answers[1][0] == KIND_REPLY
    assert [answers[i][3]["code"] for i in (2, 3, 4)] == ["FORBIDDEN"] * 3
