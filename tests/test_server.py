"""The app server end to end: a real AppServer on 127.0.0.1, the real Mailbox on a real
SQLiteStore in a temporary directory, used through the real Client (and raw sockets
where the test needs bytes the client would never send).

Parametrised over the two implementations: "native" runs uvloop with the Cython frame
codec, "pure" runs asyncio's own loop with the pure-Python codec.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

import pyserver.app.imagecache as imagecache_module
from pyserver import implementation
from pyserver.app.auth import (
    UserToken,
    check_service_key,
    make_user_token,
    read_user_token,
    token_id,
    verify_user_token,
)
from pyserver.app.limits import InFlightLimit, UserRateLimiter
from pyserver.app.loop import loop_implementation, new_event_loop
from pyserver.app.mailbox import Mailbox
from pyserver.app.server import ServerLimits
from pyserver.client import Client, SubscriptionOverflow, error_from_payload
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
from pyserver.framedef import KIND_ERROR, KIND_REPLY, KIND_REQUEST
from pyserver.pure import frame as pure_frame
from pyserver.pure import replies as pure_replies
from pyserver.servicekey import ServiceKeys, generate_service_key, key_id
from pyserver.wire.ops import Op
from tests.conftest import implementation_params
from tests.support.cells import KEY, InProcessCell

NODE = "app-test"


# ---- the two implementations ----


@dataclass(frozen=True)
class Impl:
    name: str
    new_loop: Callable[[], asyncio.AbstractEventLoop]
    codec: ModuleType

    def run(self, scenario: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
        loop = self.new_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(scenario(), timeout))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


@pytest.fixture(params=implementation_params())
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Impl:
    if request.param == "native":
        import uvloop

        # Not a skip: a missing native codec must fail the native run.
        assert implementation.framecodec is not None, "the Cython frame codec is not built"
        return Impl("native", uvloop.new_event_loop, implementation.framecodec)
    # The reply table reads the frame decoder's buffer: the pure codec gets the pure table.
    monkeypatch.setattr(imagecache_module, "ReplyTable", pure_replies.ReplyTable)
    return Impl("pure", asyncio.new_event_loop, pure_frame)


# ---- a cell: store, mailbox, dispatcher, server ----


class GatedMailbox:
    """The real mailbox, except that a SEARCH for "slowpoke" waits until `gate` opens
    and one for "explode" fails as a bug would."""

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        if op is Op.SEARCH and payload.get("query") == "slowpoke":
            self.entered.set()
            await self.gate.wait()
        if op is Op.SEARCH and payload.get("query") == "explode":
            raise RuntimeError("a bug in the mailbox")
        return await self._mailbox.execute(op, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mailbox, name)


class Cell(InProcessCell):
    """One node's worth of server on loopback, serving a `GatedMailbox`, with its clients
    cleaned up after the test."""

    def __init__(self, tmp_path: Path, impl: Impl, limits: ServerLimits | None = None, **kw: Any):
        super().__init__(
            tmp_path, codec=impl.codec, limits=limits, node_id=NODE, wrap=GatedMailbox,
            dispatcher_options=kw,
        )  # fmt: skip
        self.gated: GatedMailbox = self.served  # type: ignore[assignment]

    async def __aenter__(self) -> Cell:
        await super().__aenter__()
        await self.serve()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.gated.gate.set()
        await super().__aexit__(*exc_info)

    async def start(self, port: int | None = None) -> None:
        await self.serve(port)

    async def anonymous(self, **options: Any) -> Client:
        client = await Client.connect("127.0.0.1", self.port, **options)
        self.clients.append(client)
        return client

    async def raw(self, rcvbuf: int | None = None) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return Raw(reader, writer, self.codec)


class Raw:
    """A connection that sends and reads raw frames."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: ModuleType
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec

    def send(self, op: int, request_id: int, payload: Any = None, *, kind: int = KIND_REQUEST):
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload or {})
        self.writer.write(self.codec.encode_frame(kind, op, request_id, body))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self, timeout: float = 3.0) -> tuple[int, int, int, Any] | None:
        """(kind, op, request_id, payload) of the next frame, or None at end of stream."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readexactly(12)
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", "the stream ended inside a frame"
                return None
            length, version, kind, op, request_id = struct.unpack(">IBBHI", head)
            assert version == 1
            body = await self.reader.readexactly(length - 8)
        return kind, op, request_id, orjson.loads(body)

    async def request(self, op: int, request_id: int, payload: Any = None) -> tuple[int, Any]:
        self.send(op, request_id, payload)
        got = await self.frame()
        assert got is not None, "connection closed instead of answering"
        kind, got_op, got_id, body = got
        assert (got_op, got_id) == (op, request_id)
        return kind, body

    async def closed(self, timeout: float = 3.0) -> bool:
        """Whether the server closes the stream (after whatever it still sends) in time."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()


def token_for(user: int, ttl: int = 3600) -> str:
    return make_user_token(user, int(time.time()) + ttl, KEY)


# ---- auth, as plain functions ----


def test_user_token_round_trip_and_rejections() -> None:
    now = 1_700_000_000
    token = make_user_token(42, now + 60, KEY, issued_at=now - 5)
    user, issued, expiry, kid, signature = token.split(".")
    assert (user, issued, expiry, kid) == ("42", str(now - 5), str(now + 60), key_id(KEY))
    assert len(signature) == 64 and signature == signature.lower()
    assert verify_user_token(token, KEY, now) == 42
    assert read_user_token(token, KEY, now) == UserToken(
        42, now - 5, now + 60, kid, token_id(token)
    )
    assert verify_user_token(make_user_token(2**64 - 1, now + 1, KEY), KEY, now) == 2**64 - 1

    with pytest.raises(Unauthenticated, match="expired"):
        verify_user_token(token, KEY, now + 60)
    with pytest.raises(Unauthenticated, match="no longer"):  # a key not (or no more) accepted
        verify_user_token(token, KEY + "x", now)
    with pytest.raises(Unauthenticated, match="signature"):
        verify_user_token(f"43.{issued}.{expiry}.{kid}.{signature}", KEY, now)
    with pytest.raises(Unauthenticated, match="signature"):
        verify_user_token(f"{user}.{issued}.{now + 10**6}.{kid}.{signature}", KEY, now)
    with pytest.raises(Unauthenticated, match="signature"):
        verify_user_token(f"{user}.{now - 1}.{expiry}.{kid}.{signature}", KEY, now)
    head = f"{issued}.{expiry}.{kid}"
    bad_forms = [
        "",
        "42",
        f"42.{expiry}",
        f"42.{expiry}.{signature}",  # the old three-field form
        f"42.{head}.{signature}.x",
        f"042.{head}.{signature}",
        f"+42.{head}.{signature}",
        f"-1.{head}.{signature}",
        f"42.0{issued}.{expiry}.{kid}.{signature}",
        f"42.{issued}.{expiry}.{kid.upper()}.{signature}",
        f"42.{head}.{signature.upper()}",
        f"42.{head}.{signature[:-1]}",
        f"4\uff12.{head}.{signature}",  # a fullwidth digit
        "9" * 200,
    ]
    for bad in bad_forms:
        with pytest.raises(Unauthenticated, match="malformed"):
            verify_user_token(bad, KEY, now)
    signed = f"{2**64}.{now}.{now + 1}.{kid}"  # well signed, but the id is over 64 bits
    over = hmac.new(KEY.encode(), signed.encode(), hashlib.sha256).hexdigest()
    with pytest.raises(Unauthenticated, match="2\\*\\*64"):
        verify_user_token(f"{signed}.{over}", KEY, now)
    with pytest.raises(Unauthenticated, match="no service key"):
        verify_user_token(token, "", now)


def test_tokens_of_every_accepted_key_are_read_and_the_current_key_signs() -> None:
    now = 1_700_000_000
    old, new = "old-key-" + "0" * 24, "new-key-" + "1" * 24
    keys = ServiceKeys([new, old])
    by_old = make_user_token(7, now + 60, old)
    by_keys = make_user_token(7, now + 60, keys)
    assert by_keys.split(".")[3] == key_id(new)
    assert verify_user_token(by_old, keys, now) == verify_user_token(by_keys, keys, now) == 7
    assert check_service_key(old, keys) and check_service_key(new, keys)
    assert not check_service_key("another", keys) and not check_service_key(old, ServiceKeys([new]))
    with pytest.raises(Unauthenticated, match="no longer"):
        verify_user_token(by_old, ServiceKeys([new]), now)
    for bad_user in (-1, 2**64, True, 1.0):
        with pytest.raises(ValueError):
            make_user_token(bad_user, now, KEY)  # type: ignore[arg-type]


def test_service_keys() -> None:
    key = generate_service_key()
    assert len(key) == 64 and key != generate_service_key()
    assert check_service_key(key, key)
    assert not check_service_key(key[:-1], key)
    assert not check_service_key("", "")  # no key configured: nobody gets in
    assert not check_service_key("é", key)
    with pytest.raises(ValueError):
        generate_service_key(8)


def test_error_payloads_become_the_class_of_their_code() -> None:
    assert type(error_from_payload({"code": "NOT_FOUND", "message": "m"})) is NotFound
    assert type(error_from_payload({"code": "TOO_LARGE", "message": "m"})) is TooLarge
    owner = error_from_payload({"code": "NOT_OWNER", "message": "m", "owner": "h:1"})
    assert isinstance(owner, NotOwner) and owner.owner == "h:1"
    conflict = error_from_payload({"code": "CONFLICT", "message": "lost the race"})
    assert type(conflict) is PyserverError and conflict.code == "CONFLICT"
    assert str(conflict) == "lost the race"
    odd = error_from_payload({"code": "SOMETHING_NEW", "message": "?"})
    assert odd.code == "SOMETHING_NEW"
    assert PyserverError.code == "INTERNAL"  # the class attribute was not touched


# ---- HELLO and what each kind of connection may do ----


def test_hello_service_key_and_user_tokens(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            anonymous = await cell.anonymous()
            assert (await anonymous.ping())["pong"] is True
            with pytest.raises(Unauthenticated, match="HELLO"):
                await anonymous.counts(1)
            with pytest.raises(BadRequest, match="exactly one"):
                await anonymous.request(Op.HELLO, {})
            with pytest.raises(BadRequest, match="exactly one"):
                await anonymous.request(Op.HELLO, {"service_key": KEY, "user_token": "x"})
            with pytest.raises(Unauthenticated):
                await anonymous.request(Op.HELLO, {"service_key": 12})
            with pytest.raises(Unauthenticated, match="unknown service key"):
                await cell.client(service_key=KEY + "-wrong")

            service = await cell.client()
            assert service.hello == {
                "node": NODE,
                "protocol": 1,
                "user": None,
                "max_frame_size": 1 << 20,
            }
            with pytest.raises(BadRequest, match="already"):
                await service.request(Op.HELLO, {"service_key": KEY})
            assert (await service.counts(6))["folders"]["inbox"] == {"unread": 0, "unseen": 0}

            user = await cell.client(user_token=token_for(5))
            assert user.hello is not None and user.hello["user"] == 5
            assert "inbox" in (await user.counts(5))["folders"]
            sent = await user.send(5, [6], "hi six")
            assert sent["duplicate"] is False
            for forbidden in (
                user.counts(6),
                user.send(6, [5], "pretending to be six"),
                user.list_threads(6),
                user.subscribe(6).start(),
                user.stats(),
                user.deliver(5, 0, "self-delivered"),
                user.friend_add(5, 6),
            ):
                with pytest.raises(Forbidden):
                    await forbidden
            with pytest.raises(BadRequest):  # True == 1 in Python, but not a user id
                await user.request(Op.COUNTS, {"user": True})
            assert (await user.health())["status"] == "ok"

            with pytest.raises(Unauthenticated, match="expired"):
                await cell.client(user_token=make_user_token(5, int(time.time()) - 1, KEY))
            foreign = make_user_token(5, int(time.time()) + 60, "another cell's key")
            with pytest.raises(Unauthenticated, match="not \\(or no longer\\) accepted"):
                await cell.client(user_token=foreign)
            genuine = make_user_token(5, int(time.time()) + 60, KEY)
            forged = "6" + genuine[1:]  # another user's id under user 5's signature
            with pytest.raises(Unauthenticated, match="signature"):
                await cell.client(user_token=forged)
            errors = (await service.stats())["errors"]
            assert errors["FORBIDDEN"] == 7 and errors["UNAUTHENTICATED"] >= 5

    impl.run(scenario)


# ---- every operation ----


def test_every_operation_end_to_end(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            c = await cell.client()
            pong = await c.ping()
            assert pong["pong"] is True and abs(pong["ts"] - time.time() * 1e6) < 60e6
            assert await c.friend_add(1, 2) == {}

            sent = await c.send(1, [2], "lunch on friday?", key="k-1")
            assert sent["duplicate"] is False
            again = await c.send(1, [2], "lunch on friday?", key="k-1")
            assert again == {**sent, "duplicate": True}
            thread = sent["thread_id"]

            delivered = await c.deliver(
                2, 0, "hello from outside", subject="Hi", from_="a@example.org",
                key="<x@example.org>", extra={"message_id_header": "<x@example.org>"},
            )  # fmt: skip
            assert delivered["folder"] == "other" and delivered["dropped"] is False

            threads = (await c.list_threads(2))["threads"]
            assert [t["thread_id"] for t in threads] == [thread]
            assert threads[0]["participants"] == [1, 2] and threads[0]["unread"] == 1
            other = (await c.list_threads(2, folder="other", limit=5))["threads"]
            assert [t["thread_id"] for t in other] == [delivered["thread_id"]]

            got = await c.get_thread(2, thread, limit=10)
            assert [m["text"] for m in got["messages"]] == ["lunch on friday?"]
            message = await c.get_message(2, delivered["message_id"])
            assert message["from"] == "a@example.org"
            assert message["extra"] == {"message_id_header": "<x@example.org>"}
            with pytest.raises(NotFound):
                await c.get_message(2, "m-no-such-message")
            with pytest.raises(NotFound):
                await c.get_thread(2, "t-no-such-thread")

            counts = (await c.counts(2))["folders"]
            assert counts["inbox"] == {"unread": 1, "unseen": 1}
            found = (await c.search(2, "FRIDAY lunch"))["messages"]
            assert [m["message_id"] for m in found] == [sent["message_id"]]
            assert (await c.search(2, "dinner"))["messages"] == []

            seq = (await c.mark_read(2, thread))["seq"]
            assert (await c.counts(2))["folders"]["inbox"]["unread"] == 0
            assert (await c.mark_unread(2, thread, sent["message_id"]))["seq"] == seq + 1
            assert (await c.mark_seen(2, "inbox"))["seq"] == seq + 2
            assert (await c.counts(2))["folders"]["inbox"] == {"unread": 1, "unseen": 0}
            assert (await c.move(2, thread, "archived"))["seq"] == seq + 3
            assert (await c.list_threads(2, "archived"))["threads"][0]["thread_id"] == thread
            with pytest.raises(BadRequest):
                await c.move(2, thread, "no-such-folder")

            assert (await c.block(2, 3))["seq"] == seq + 4
            dropped = await c.deliver(2, 3, "from a blocked sender", channel="chat")
            assert dropped["dropped"] is True
            assert (await c.unblock(2, 3))["seq"] == seq + 5
            assert await c.friend_remove(1, 2) == {}

            assert (await c.delete(2, thread))["seq"] == seq + 6
            with pytest.raises(NotFound):
                await c.get_thread(2, thread)

            assert await c.health() == {"status": "ok", "node": NODE, "store": "ok"}
            stats = await c.stats()
            assert stats["node"] == NODE and stats["connections"] == 1
            assert stats["requests"]["SEND"] == 2 and stats["requests"]["HELLO"] == 1
            assert stats["errors"]["NOT_FOUND"] == 3 and stats["errors"]["BAD_REQUEST"] == 1
            assert stats["mailbox"]["users"] >= 2

    impl.run(scenario)


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, str | None]] = []

    def observe(self, op_name: str, seconds: float, error_code: str | None) -> None:
        self.seen.append((op_name, seconds, error_code))


def test_a_bug_is_answered_internal_logged_and_observed(
    tmp_path: Path, impl: Impl, caplog: pytest.LogCaptureFixture
) -> None:
    observer = RecordingObserver()

    async def scenario() -> None:
        async with Cell(tmp_path, impl, observer=observer) as cell:
            client = await cell.client()
            with pytest.raises(PyserverError, match="RuntimeError: a bug in the mailbox") as err:
                await client.search(3, "explode")
            assert err.value.code == "INTERNAL"
            assert (await client.search(3, "fine"))["messages"] == []  # still serving
            raw = await cell.raw()
            assert (await raw.request(0xBEEF, 5))[1]["code"] == "BAD_REQUEST"

    with caplog.at_level("ERROR", logger="pyserver.app.dispatcher"):
        impl.run(scenario)
    assert any("op=SEARCH" in r.getMessage() and r.exc_info for r in caplog.records)
    ops = [(name, code) for name, _, code in observer.seen]
    assert ops == [
        ("HELLO", None), ("SEARCH", "INTERNAL"), ("SEARCH", None), ("UNKNOWN", "BAD_REQUEST")
    ]  # fmt: skip
    assert all(0 <= seconds < 5 for _, seconds, _ in observer.seen)


def test_repeated_reads_come_from_the_reply_table_and_stay_current(
    tmp_path: Path, impl: Impl
) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            service = await cell.client()
            await service.friend_add(1, 2)
            await service.friend_add(3, 2)
            sent = await service.send(1, [2], "hello two")
            reader = await cell.client(user_token=token_for(2))
            first = await reader.counts(2)  # the Python path, which fills the table
            page = await reader.list_threads(2)
            thread = await reader.get_thread(2, sent["thread_id"])
            burst = await asyncio.gather(
                *(reader.counts(2) for _ in range(40)),
                *(reader.list_threads(2) for _ in range(5)),
                *(reader.get_thread(2, sent["thread_id"]) for _ in range(5)),
            )
            assert burst == [first] * 40 + [page] * 5 + [thread] * 5
            stats = await service.request(Op.STATS, {})
            assert stats["mailbox"]["table_replies"] == 50
            assert stats["requests"]["COUNTS"] == 41

            # A write answers again the held replies read since they were last answered
            # (write-through): the next reads come from the table, and see it.
            await service.send(3, [2], "hello from three")  # a second unread thread
            after = await reader.counts(2)
            assert after["folders"]["inbox"]["unread"] == first["folders"]["inbox"]["unread"] + 1
            assert len((await reader.get_thread(2, sent["thread_id"]))["messages"]) == 1
            await service.send(1, [2], "hello again")
            assert len((await reader.get_thread(2, sent["thread_id"]))["messages"]) == 2
            assert await reader.counts(2) == after
            stats = await service.request(Op.STATS, {})
            assert stats["mailbox"]["table_replies"] == 54
            # The thread list was not read after the first write: the second dropped it,
            # and its next read is the Python path's (which holds it again).
            assert (await reader.list_threads(2))["threads"][0]["messages"] == 2
            stats = await service.request(Op.STATS, {})
            assert stats["mailbox"]["table_replies"] == 54
            # Two writes with no read between: the second drops every held reply.
            await service.send(1, [2], "one")
            await service.send(1, [2], "two")
            assert await reader.counts(2) == after  # from Python, and held again
            assert await reader.counts(2) == after  # from the table
            stats = await service.request(Op.STATS, {})
            assert stats["mailbox"]["table_replies"] == 55

            # A token for user 3 never reads user 2's held reply.
            assert await service.counts(2) == after
            other = await cell.client(user_token=token_for(3))
            with pytest.raises(Forbidden):
                await other.counts(2)

    impl.run(scenario)


def test_a_user_over_its_rate_is_told_too_many_and_others_are_served(
    tmp_path: Path, impl: Impl
) -> None:
    async def scenario() -> None:
        limiter = UserRateLimiter(rate=50, burst=100)
        async with Cell(tmp_path, impl, user_limiter=limiter) as cell:
            service = await cell.client()
            sent = await service.send(1, [2], "hi")
            flooder = await cell.client(user_token=token_for(2))
            started = time.monotonic()
            flood = asyncio.gather(*(flooder.counts(2) for _ in range(600)), return_exceptions=True)
            # the trusted tiers are not limited, and are served meanwhile
            served = await asyncio.gather(*(service.counts(2) for _ in range(300)))
            results = await flood
            elapsed = time.monotonic() - started
            answered = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, TooMany)]
            assert len(answered) + len(refused) == 600 and len(served) == 300
            assert 100 <= len(answered) <= 100 + 50 * elapsed + 1
            assert "50 requests a second" in str(refused[0])
            # writes count too (behind a burst that empties the bucket again, however
            # long the machine took since), and the bucket refills
            *_, write = await asyncio.gather(
                *(flooder.counts(2) for _ in range(200)),
                flooder.mark_read(2, sent["thread_id"]),
                return_exceptions=True,
            )
            assert isinstance(write, TooMany), write
            await asyncio.sleep(0.2)
            assert (await flooder.counts(2))["folders"]["other"]["unread"] == 1
            # another user has a bucket of its own
            other = await cell.client(user_token=token_for(1))
            assert await other.counts(1)

    impl.run(scenario)


def test_token_guessing_from_one_peer_is_slowed_and_a_users_running_requests_capped(
    tmp_path: Path, impl: Impl
) -> None:
    async def scenario() -> None:
        peers = UserRateLimiter(rate=20, burst=20)
        async with Cell(
            tmp_path,
            impl,
            peer_limiter=peers,
            user_in_flight=InFlightLimit(3),
            peer_in_flight=InFlightLimit(4),
        ) as cell:
            service = await cell.client()
            guesses: list[BaseException] = []
            for attempt in range(40):  # a peer trying tokens, one connection after another
                guesser = await cell.anonymous(reconnect=False)
                try:
                    await guesser.request(Op.HELLO, {"user_token": f"2.1.9999999999.0.{attempt}"})
                except PyserverError as refused:
                    guesses.append(refused)
                await guesser.close()
            assert len(guesses) == 40
            # (the service connection's HELLO came from the same peer, before it was one)
            assert all(isinstance(g, Unauthenticated) for g in guesses[:15]), guesses
            assert sum(isinstance(g, TooMany) for g in guesses) >= 10, guesses
            assert "peer 127.0.0.1 is over 20 requests a second" in str(guesses[-1])
            assert (await service.counts(2))["folders"]  # the trusted tiers are not limited
            # one user's requests running at once, over all their connections
            await asyncio.sleep(1.0)  # the peer's bucket refills
            first = await cell.client(user_token=token_for(2))
            second = await cell.client(user_token=token_for(2))
            slow = [asyncio.create_task(c.search(2, "slowpoke")) for c in (first, first, second)]
            await cell.gated.entered.wait()
            await asyncio.sleep(0.05)
            with pytest.raises(TooMany, match="user 2 has 3 requests running"):
                await second.search(2, "anything")
            # and one peer's, over its users: a fourth runs, a fifth waits its turn
            other = await cell.client(user_token=token_for(1))
            slow.append(asyncio.create_task(other.search(1, "slowpoke")))
            await asyncio.sleep(0.05)
            with pytest.raises(TooMany, match=r"peer 127\.0\.0\.1 has 4 requests running"):
                await other.search(1, "anything")
            assert (await service.search(2, "anything")) is not None  # others still served
            cell.gated.gate.set()
            assert len(await asyncio.gather(*slow)) == 4
            assert await second.search(2, "anything") is not None  # and the user again

    impl.run(scenario)


def test_the_rate_limiter_refills_and_forgets_quiet_users() -> None:
    limiter = UserRateLimiter(rate=10, burst=3, max_users=2)
    assert [limiter.take(7, 100.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.take(7, 100.15)  # 0.15 s: one and a half tokens back
    assert not limiter.take(7, 100.15)
    assert limiter.take(7, 100.0 + 10, count=50)  # a run answered at once goes negative
    assert limiter.available(7, 110.0) < 0 and not limiter.take(7, 111.0)
    limiter.take(8, 111.0)
    limiter.take(9, 111.0)  # user 7 is forgotten: full again
    assert limiter.available(7, 111.0) == 3 and limiter.refused == 3


def test_the_loop_is_uvloop_unless_pure_is_forced() -> None:
    loop = new_event_loop()
    try:
        expected = "asyncio" if implementation.PURE_FORCED else "uvloop"
        assert loop_implementation(loop) == expected
    finally:
        loop.close()


# ---- pipelining ----


def test_pipelined_replies_come_back_as_they_finish(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            raw = await cell.raw()
            assert (await raw.request(Op.HELLO, 1, {"service_key": KEY}))[0] == KIND_REPLY
            # One write: a slow request, then two fast ones behind it.
            raw.send(Op.SEARCH, 10, {"user": 2, "query": "slowpoke"})
            raw.send(Op.PING, 11)
            raw.send(Op.COUNTS, 12, {"user": 2})
            first, second = await raw.frame(), await raw.frame()
            assert first is not None and second is not None
            assert {first[2], second[2]} == {11, 12}, "the fast requests waited for the slow one"
            assert cell.gated.entered.is_set()
            cell.gated.gate.set()
            slow = await raw.frame()
            assert slow is not None and slow[:3] == (KIND_REPLY, Op.SEARCH, 10)
            assert slow[3] == {"messages": []}
            raw.close()

            # The client matches out-of-order replies to their callers.
            cell.gated.gate.clear()
            client = await cell.client()
            slow_task = asyncio.ensure_future(client.search(2, "slowpoke"))
            await cell.gated.entered.wait()
            replies = await asyncio.gather(*(client.counts(u) for u in range(1, 40)))
            assert all("inbox" in r["folders"] for r in replies)
            assert not slow_task.done()
            cell.gated.gate.set()
            assert await slow_task == {"messages": []}

    impl.run(scenario)


# ---- subscriptions ----


def test_subscription_events_arrive_in_real_time(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            watcher = await cell.client(user_token=token_for(2))
            writer = await cell.client()
            events = await watcher.subscribe(2)
            sent = await writer.send(1, [2], "are you there?")
            event = await asyncio.wait_for(events.__anext__(), 2)
            assert event["event"] == "message_added" and event["user"] == 2
            assert event["message"]["message_id"] == sent["message_id"]
            assert event["message"]["text"] == "are you there?"
            await writer.send(1, [3], "not for two")  # another user's mailbox: no event
            await writer.mark_read(2, sent["thread_id"])
            event = await asyncio.wait_for(events.__anext__(), 2)
            assert event["event"] == "marked_read" and event["seq"] == 2

            # Two subscriptions on one connection each get every event.
            more = await writer.subscribe(2)
            await writer.send(4, [2], "two listeners")
            for subscription in (events, more):
                event = await asyncio.wait_for(subscription.__anext__(), 2)
                assert event["message"]["text"] == "two listeners"

            await events.close()
            with pytest.raises(StopAsyncIteration):
                await events.__anext__()
            stats = await writer.stats()
            assert stats["subscriptions"] == 1 and stats["mailbox"]["subscriptions"] == 1
            # UNSUBSCRIBE of a subscription that is already gone is no error.
            gone = await writer.request(Op.UNSUBSCRIBE, {"subscription": 999})
            assert gone == {"subscribed": False}

            # The shape the CLI's `tail` uses: async for on the call itself.
            async def first_event() -> dict[str, Any]:
                async for event in watcher.subscribe(2):
                    return event
                raise AssertionError("no event")

            tail = asyncio.ensure_future(first_event())
            await asyncio.sleep(0.05)
            await writer.send(1, [2], "tailing")
            assert (await asyncio.wait_for(tail, 2))["message"]["text"] == "tailing"

    impl.run(scenario)


def test_closing_a_full_subscription_lets_the_client_read_again(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            client = await cell.client(max_queued_events=1, request_timeout=3)
            writer = await cell.client()
            events = await client.subscribe(2)
            await writer.send(1, [2], "one")
            await writer.send(1, [2], "two")
            await asyncio.sleep(0.1)  # the client has stopped reading, one event queued
            assert events.queued == 1
            await events.close()
            with pytest.raises(StopAsyncIteration):
                await events.__anext__()
            assert (await client.ping())["pong"] is True
            assert (await writer.stats())["subscriptions"] == 0

    impl.run(scenario)


def test_a_slow_subscriber_overflows_and_nothing_piles_up(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(
        event_backlog=4, event_stall_s=0.2, write_buffer_high=8192, socket_send_buffer=8192
    )

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            # This client stops reading its socket once one event is queued unread.
            slow = await cell.client(max_queued_events=1)
            # A small receive buffer, or the kernel would take megabytes for the client.
            assert slow._link is not None and slow._link.transport is not None
            slow_socket = slow._link.transport.get_extra_info("socket")
            slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            writer = await cell.client()
            events = await slow.subscribe(2)
            text = "x" * 2_000
            for i in range(60):  # ~120 kB of events: more than the socket buffers hold
                await writer.send(1, [2], f"{i} {text}")
            await asyncio.sleep(0.3)
            await writer.send(1, [2], "after the stall")  # the server gives up on it now
            for _ in range(100):
                stats = await writer.stats()
                if stats["server"].get("subscription_overflows"):
                    break
                await asyncio.sleep(0.02)
            assert stats["server"]["subscription_overflows"] == 1
            assert stats["mailbox"]["subscriptions"] == 0
            [figures] = [f for f in cell.server.connection_figures() if f["subscriptions"] == 0
                         and f["event_backlog"]]  # fmt: skip
            assert figures["event_backlog"] <= limits.event_backlog + 1

            # The reader gets what was sent before the overflow, in order, then the error.
            slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # read fast
            seen = []
            with pytest.raises(SubscriptionOverflow):
                async for event in events:
                    seen.append(int(event["message"]["text"].split()[0]))
            assert seen == list(range(len(seen))) and 0 < len(seen) < 60
            assert (await slow.ping())["pong"] is True  # the connection itself is fine
            again = await slow.subscribe(2)
            await writer.send(1, [2], "back")
            assert (await asyncio.wait_for(again.__anext__(), 2))["message"]["text"] == "back"

    impl.run(scenario, timeout=30)


# ---- flow control ----


def test_a_peer_that_does_not_read_is_not_buffered_for(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(max_in_flight=4, write_buffer_high=16384, socket_send_buffer=16384)

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            writer = await cell.client()
            for i in range(4):
                await writer.send(1, [2], f"bulk {i} " + "y" * 60_000)
            reply_size = len(orjson.dumps(await writer.search(2, "bulk")))
            assert reply_size > 240_000

            raw = await cell.raw(rcvbuf=4096)
            raw.send(Op.HELLO, 1, {"service_key": KEY})
            requests = 60  # ~15 MB of replies if the server buffered them all
            for request_id in range(2, 2 + requests):
                raw.send(Op.SEARCH, request_id, {"user": 2, "query": "bulk"})
            await raw.writer.drain()
            most_buffered = 0
            for _ in range(30):
                await asyncio.sleep(0.02)
                for figures in cell.server.connection_figures():
                    if figures["write_buffer"] or figures["reading_paused"]:
                        most_buffered = max(most_buffered, figures["write_buffer"])
                        assert figures["in_flight"] <= limits.max_in_flight
            # Stalled: at most the high-water mark, the batch of replies whose write crossed
            # it, and the replies of the requests then in flight (the cap, twice).
            bound = limits.write_buffer_high + 2 * limits.max_in_flight * reply_size
            assert 0 < most_buffered <= bound
            assert (await writer.ping())["pong"] is True  # others are served meanwhile

            answered = set()
            while len(answered) < requests + 1:
                got = await raw.frame(timeout=5)
                assert got is not None and got[0] == KIND_REPLY
                answered.add(got[2])
            assert answered == set(range(1, 2 + requests))
            raw.close()

    impl.run(scenario, timeout=30)


# ---- bad frames ----


def test_bad_frames_are_answered_and_close_only_their_connection(
    tmp_path: Path, impl: Impl
) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl, max_frame_size=4096) as cell:
            witness = await cell.client()
            assert witness.hello is not None and witness.hello["max_frame_size"] == 4096

            oversized = await cell.raw()
            oversized.send(Op.PING, 7, b"{" + b" " * 5000 + b"}")
            got = await oversized.frame()
            assert got is not None and got[:3] == (KIND_ERROR, 0, 0)
            assert got[3]["code"] == "TOO_LARGE" and "4096" in got[3]["message"]
            assert await oversized.closed()
            assert (await witness.ping())["pong"] is True

            bad_version = await cell.raw()
            bad_version.send_bytes(struct.pack(">IBBHI", 10, 9, 0, 1, 5) + b"{}")
            got = await bad_version.frame()
            assert got is not None and got[:3] == (KIND_ERROR, 0, 0)
            assert got[3]["code"] == "BAD_REQUEST" and "version" in got[3]["message"]
            assert await bad_version.closed()

            short = await cell.raw()
            short.send_bytes(struct.pack(">I", 3) + b"abc")
            got = await short.frame()
            assert got is not None and got[2] == 0 and got[3]["code"] == "BAD_REQUEST"
            assert await short.closed()

            # A good header with a bad payload: an error on its own id, connection kept.
            kept = await cell.raw()
            for payload in (b"{", b"[1, 2]", b"", b"\xff\xfe", b'"text"'):
                kind, body = await kept.request(Op.PING, 9, payload)
                assert kind == KIND_ERROR and body["code"] == "BAD_REQUEST"
            kind, body = await kept.request(999, 10, {})
            assert kind == KIND_ERROR and "unknown operation" in body["message"]
            kept.send(Op.PING, 11, {}, kind=KIND_REPLY)
            got = await kept.frame()
            assert got is not None and got[0] == KIND_ERROR and got[2] == 11
            assert (await kept.request(Op.PING, 12))[1]["pong"] is True
            kept.close()

            # The client refuses to send what the server would refuse to read.
            with pytest.raises(TooLarge):
                await witness.send(1, [2], "z" * 5000)
            assert (await witness.ping())["pong"] is True
            stats = await witness.stats()
            assert stats["server"]["frame_errors"] == 3

    impl.run(scenario)


def test_hostile_frames_behind_table_hits_are_still_refused(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            witness = await cell.client()
            await witness.friend_add(1, 2)
            await witness.send(1, [2], "hello two")
            payload = orjson.dumps({"user": 2})
            raw = await cell.raw()
            assert (await raw.request(Op.HELLO, 1, {"service_key": KEY}))[0] == KIND_REPLY
            expected = (await raw.request(Op.COUNTS, 2, payload))[1]  # fills the table
            # Three hits, a request with id 0, then a frame of an unknown version, all
            # in one write: the hits are answered from the table, then the stream error.
            raw.send_bytes(
                b"".join(raw.codec.encode_frame(KIND_REQUEST, Op.COUNTS, n, payload)
                         for n in (3, 4, 5))
                + raw.codec.encode_frame(KIND_REQUEST, Op.COUNTS, 0, payload)
                + struct.pack(">IBBHI", 10, 9, 0, 1, 6) + b"{}"
            )  # fmt: skip
            for request_id in (3, 4, 5):
                got = await raw.frame()
                assert got == (KIND_REPLY, Op.COUNTS, request_id, expected)
            got = await raw.frame()
            assert got is not None and got[:3] == (KIND_ERROR, 0, 0)
            assert "request id 0" in got[3]["message"]
            assert await raw.closed()
            stats = await witness.stats()
            assert stats["mailbox"]["table_replies"] == 3
            assert stats["server"]["frame_errors"] >= 1
            assert (await witness.counts(2)) == expected  # the server serves on

    impl.run(scenario)


# ---- timeouts ----


def test_idle_connections_are_closed_busy_ones_are_not(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(idle_timeout_s=0.3)

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            idle = await cell.raw()
            subscriber = await cell.client(reconnect=False)
            await subscriber.subscribe(2)
            chatty = await cell.raw()
            started = time.monotonic()
            for request_id in range(1, 9):  # a request every 0.1 s keeps it open
                assert (await chatty.request(Op.PING, request_id))[0] == KIND_REPLY
                await asyncio.sleep(0.1)
            assert await idle.closed(timeout=0.1)
            assert time.monotonic() - started < 3
            assert subscriber.connected and (await subscriber.ping())["pong"] is True
            assert (await chatty.request(Op.PING, 99))[0] == KIND_REPLY
            assert (await subscriber.stats())["server"]["idle_closes"] == 1

    impl.run(scenario)


def test_a_frame_trickled_in_too_slowly_fails_its_stream(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(frame_timeout_s=0.4, idle_timeout_s=60)

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            slow = await cell.raw()
            steady = await cell.raw()
            frame = impl.codec.encode_frame(KIND_REQUEST, Op.PING, 7, b"{}")
            started = time.monotonic()
            for byte in frame[:6]:  # a byte every 0.05 s: active, but never whole
                slow.send_bytes(bytes([byte]))
                await asyncio.sleep(0.05)
                # whole frames meanwhile keep the other connection going
                assert (await steady.request(Op.PING, 1))[0] == KIND_REPLY
            kind, _op, request_id, body = await slow.frame()  # type: ignore[misc]
            assert (kind, request_id, body["code"]) == (KIND_ERROR, 0, "TOO_MANY")
            assert "did not arrive whole within 0.4 s" in body["message"]
            assert await slow.closed() and time.monotonic() - started < 2.0
            # frames that arrive in pieces, but in time, are fine
            for piece in (frame[:5], frame[5:]):
                steady.send_bytes(piece)
                await asyncio.sleep(0.2)
            assert (await steady.frame())[0] == KIND_REPLY  # type: ignore[index]

    impl.run(scenario)


def test_one_address_cannot_hold_every_connection(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(max_connections_per_peer=3)

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            held = [await cell.raw() for _ in range(3)]
            refused = await cell.raw()
            kind, _op, request_id, body = await refused.frame()  # type: ignore[misc]
            assert (kind, request_id, body["code"]) == (KIND_ERROR, 0, "TOO_MANY")
            assert await refused.closed()
            for n, peer in enumerate(held, 1):  # the three serve on
                assert (await peer.request(Op.PING, n))[0] == KIND_REPLY
            held[0].close()
            await asyncio.sleep(0.1)
            again = await cell.raw()  # a place is free again
            assert (await again.request(Op.PING, 9))[0] == KIND_REPLY

    impl.run(scenario)


def test_a_request_over_its_time_is_answered_unavailable(tmp_path: Path, impl: Impl) -> None:
    limits = ServerLimits(request_timeout_s=0.2)

    async def scenario() -> None:
        async with Cell(tmp_path, impl, limits) as cell:
            client = await cell.client()
            started = time.monotonic()
            with pytest.raises(Unavailable, match="timed out"):
                await client.search(2, "slowpoke")
            assert 0.15 < time.monotonic() - started < 3
            assert (await client.ping())["pong"] is True
            cell.gated.gate.set()
            await asyncio.sleep(0.05)  # the late reply is dropped, not sent
            assert (await client.stats())["server"]["request_timeouts"] == 1

    impl.run(scenario)


# ---- shutdown and restart ----


def test_graceful_shutdown_finishes_requests_in_flight(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            client = await cell.client(reconnect=False)
            slow = asyncio.ensure_future(client.search(2, "slowpoke"))
            await cell.gated.entered.wait()
            assert cell.server is not None
            stopping = asyncio.ensure_future(cell.server.stop(grace_s=5))
            await asyncio.sleep(0.05)
            with pytest.raises(Unavailable):
                await Client.connect("127.0.0.1", cell.port, service_key=KEY)
            assert not stopping.done()
            cell.gated.gate.set()
            assert await slow == {"messages": []}
            await asyncio.wait_for(stopping, 3)
            assert cell.server.connections == 0

            # Bounded: a request that never finishes does not hold the shutdown up.
            cell.gated.gate.clear()
            await cell.start(port=0)
            client = await cell.client(reconnect=False)
            stuck = asyncio.ensure_future(client.search(2, "slowpoke"))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await cell.server.stop(grace_s=0.2)
            assert time.monotonic() - started < 3
            with pytest.raises(Unavailable):
                await stuck

    impl.run(scenario)


def test_client_reconnects_after_a_server_restart(tmp_path: Path, impl: Impl) -> None:
    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            client = await cell.client(user_token=token_for(7), request_timeout=5)
            await client.send(7, [8], "before the restart")
            in_flight = asyncio.ensure_future(client.search(7, "slowpoke"))
            await cell.gated.entered.wait()
            assert cell.server is not None
            await cell.server.stop(grace_s=0.05)
            with pytest.raises(Unavailable):  # dropped mid-request: the caller may retry
                await in_flight
            assert not client.connected

            cell.gated.gate.set()
            await asyncio.sleep(0.3)  # the client keeps trying meanwhile
            await cell.start(port=cell.port)
            threads = await client.list_threads(7, folder="sent")  # waits for the reconnect
            assert [t["snippet"] for t in threads["threads"]] == ["before the restart"]
            assert client.reconnects == 1 and client.connected
            # HELLO was said again with the same token: still user 7, and only user 7.
            with pytest.raises(Forbidden):
                await client.counts(8)

    impl.run(scenario)


def test_request_id_zero_is_a_stream_error(tmp_path: Path, impl: Impl) -> None:
    """Id 0 names the stream in errors: a request using it gets one and the connection ends."""

    async def scenario() -> None:
        async with Cell(tmp_path, impl) as cell:
            witness = await cell.client()
            reserved = await cell.raw()
            reserved.send(Op.PING, 0, b"{}")
            got = await reserved.frame()
            assert got is not None and got[:3] == (KIND_ERROR, 0, 0)
            assert got[3] == {
                "code": "BAD_REQUEST",
                "message": "request id 0 is reserved for stream errors",
            }
            assert await reserved.closed()
            assert (await witness.ping())["pong"] is True

    impl.run(scenario)


def test_a_corrupt_stored_record_is_internal_not_the_clients_fault(
    tmp_path: Path, impl: Impl, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    async def write() -> None:
        async with Cell(tmp_path, impl) as cell:
            client = await cell.client()
            await client.send(1, [2], "a record about to rot", channel="chat")

    async def read() -> None:
        async with Cell(tmp_path, impl) as cell:
            client = await cell.client()
            with pytest.raises(PyserverError) as err:
                await client.list_threads(2)
            assert err.value.code == "INTERNAL"
            assert (await client.counts(1))["folders"]  # the rest is served

    impl.run(write)
    db = sqlite3.connect(tmp_path / "cell.sqlite")
    with db:
        db.execute("DELETE FROM snapshots")  # so the log itself is replayed
        (user, seq, record), *_ = db.execute(
            "SELECT user, seq, record FROM log WHERE user = ?", ((2).to_bytes(8, "big"),)
        ).fetchall() or [(None, None, None)]
        assert record is not None, "user 2's log is stored elsewhere than the test assumes"
        rotten = bytes([record[0]]) + bytes(b ^ 0x5A for b in record[1:])
        db.execute("UPDATE log SET record = ? WHERE user = ? AND seq = ?", (rotten, user, seq))
    db.close()
    with caplog.at_level("ERROR", logger="pyserver.app.dispatcher"):
        impl.run(read)
    assert any("op=LIST_THREADS" in r.getMessage() and r.exc_info for r in caplog.records)
