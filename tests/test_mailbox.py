"""Mailbox: every operation of docs/protocol.md against the real SQLiteStore in a tmp dir."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import importlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyserver.app.imagecache as imagecache_module
import pyserver.app.residency as residency_module
from pyserver import implementation
from pyserver.app.image import UserImage, thread_id_for
from pyserver.app.mailbox import Mailbox, MailboxSettings, search_terms
from pyserver.blobs.base import BlobCorrupt
from pyserver.errors import BadRequest, NotFound, NotOwner, TooLarge, Unavailable
from pyserver.framedef import KIND_REPLY, KIND_REQUEST
from pyserver.store.base import LogAppend, StoreUnavailable, WriteConflict
from pyserver.store.sqlite import SQLiteStore
from pyserver.userindex import UserIndex
from pyserver.userindex.local import LocalUserIndex
from pyserver.wire import frame as frame_codec
from pyserver.wire.ops import Op


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function to completion in its own event loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


class SpyStore:
    """A store that passes everything through, counting calls; `fail_append` can refuse one."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.fail_append: Callable[[LogAppend], BaseException | None] | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == "append" and self.fail_append is not None:
                error = self.fail_append(args[0])
                if error is not None:
                    raise error
            return await attr(*args, **kwargs)

        return call

    def reads(self) -> int:
        return sum(n for name, n in self.calls.items() if name != "append")


@contextlib.asynccontextmanager
async def opened(
    path: Path, index: UserIndex | None = None, **knobs: Any
) -> AsyncIterator[tuple[Mailbox, SpyStore]]:
    store = SQLiteStore(path / "cell.sqlite", synchronous="OFF")
    await store.open()
    spy = SpyStore(store)
    mailbox = Mailbox(spy, index, MailboxSettings(**knobs))  # type: ignore[arg-type]
    try:
        yield mailbox, spy
    finally:
        await mailbox.close()
        await store.close()


async def send(m: Mailbox, sender: int, recipients: list[int], text: str = "hi", **more: Any):
    payload = {"sender": sender, "recipients": recipients, "text": text, "channel": "chat"}
    return await m.execute(Op.SEND, payload | more)


async def deliver(m: Mailbox, user: int, sender: int, text: str = "mail", **more: Any):
    payload = {"user": user, "sender": sender, "text": text, "channel": "email"}
    return await m.execute(Op.DELIVER, payload | more)


async def threads(m: Mailbox, user: int, folder: str = "inbox", **more: Any) -> list[dict]:
    return (await m.execute(Op.LIST_THREADS, {"user": user, "folder": folder, **more}))["threads"]


async def messages(m: Mailbox, user: int, thread_id: str) -> list[dict]:
    reply = await m.execute(Op.GET_THREAD, {"user": user, "thread_id": thread_id})
    return reply["messages"]


async def counts(m: Mailbox, user: int) -> dict[str, dict[str, int]]:
    return (await m.execute(Op.COUNTS, {"user": user}))["folders"]


# ---- SEND and DELIVER ----


@run_async
async def test_a_sends_copies_settle_together_in_order_and_are_cancelled_together() -> None:
    """The sender's copy runs in the request's task, the others in tasks of their own:
    every outcome comes back in order, a failure as its exception once all are done, and
    a cancelled SEND cancels the copies still being written."""
    from pyserver.app.mailbox import _settle_together

    finished: list[str] = []

    async def copy(name: str, delay: float, fail: bool = False) -> str:
        await asyncio.sleep(delay)
        if fail:
            raise Unavailable(f"{name} failed")
        finished.append(name)
        return name

    outcomes = await _settle_together(
        copy("sender", 0.01, fail=True), [copy("a", 0.03), copy("b", 0.0)]
    )
    assert outcomes[1:] == ["a", "b"] and isinstance(outcomes[0], Unavailable)
    assert sorted(finished) == ["a", "b"]  # the failure did not cut the others short

    finished.clear()
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(30)
        finished.append("slow")
        return "slow"

    waiter = asyncio.ensure_future(_settle_together(copy("sender", 0.0), [slow()]))
    await started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(1000):  # the cancelled copy ends on a later turn of the loop
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not others:
            break
        await asyncio.sleep(0)
    assert not others
    assert finished == ["sender"]


@run_async
async def test_send_writes_every_copy_and_routes_each_recipient(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        await m.execute(Op.FRIEND_ADD, {"user": 1, "friend": 2})
        reply = await send(m, 1, [2, 3], "lunch?")
        assert set(reply) == {"message_id", "thread_id", "ts", "duplicate"}
        assert reply["duplicate"] is False
        assert reply["thread_id"] == thread_id_for([1, 2, 3])
        # friend -> inbox, stranger -> other, the sender's copy -> sent, already read
        assert [t["thread_id"] for t in await threads(m, 2)] == [reply["thread_id"]]
        assert [t["thread_id"] for t in await threads(m, 3, "other")] == [reply["thread_id"]]
        [mine] = await threads(m, 1, "sent")
        assert mine["unread"] == 0 and mine["participants"] == [1, 2, 3]
        for user, unread in ((1, False), (2, True), (3, True)):
            [message] = await messages(m, user, reply["thread_id"])
            assert message == {
                "message_id": reply["message_id"], "thread_id": reply["thread_id"],
                "sender": 1, "from": None, "channel": "chat", "ts": message["ts"],
                "subject": "", "text": "lunch?", "unread": unread,
            }  # fmt: skip
        assert (await counts(m, 2))["inbox"] == {"unread": 1, "unseen": 1}
        assert (await counts(m, 3))["other"] == {"unread": 1, "unseen": 1}
        assert (await counts(m, 1))["sent"] == {"unread": 0, "unseen": 0}


@run_async
async def test_chat_sms_and_email_between_the_same_people_share_one_thread(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        chat = await send(m, 1, [2], "chat")
        sms = await send(m, 2, [1], "sms", channel="sms")
        email = await deliver(m, 2, 1, "email", subject="Re: us", key="<x@example.org>")
        assert chat["thread_id"] == sms["thread_id"] == email["thread_id"]
        [summary] = await threads(m, 2, "other")
        assert summary["channels"] == ["chat", "email", "sms"]
        assert summary["messages"] == 3
        assert summary["subject"] == "Re: us"
        assert summary["snippet"] == "email"
        texts = [x["text"] for x in await messages(m, 2, chat["thread_id"])]
        assert texts == ["chat", "sms", "email"]
        # user 1 started it (sent) and got a reply: the thread comes to the inbox
        [mine] = await threads(m, 1)
        assert mine["thread_id"] == chat["thread_id"]
        assert await threads(m, 1, "sent") == []


@run_async
async def test_deliver_from_outside_keys_the_thread_by_address(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        first = await deliver(m, 2, 0, "one", **{"from": "alice@example.org"}, extra={"h": 1})
        again = await deliver(m, 2, 0, "two", **{"from": "Alice@Example.org"})
        other = await deliver(m, 2, 0, "three", **{"from": "bob@example.org"})
        assert first["folder"] == "other" and first["dropped"] is False
        assert first["thread_id"] == again["thread_id"] != other["thread_id"]
        full = await m.execute(Op.GET_MESSAGE, {"user": 2, "message_id": first["message_id"]})
        assert full["from"] == "alice@example.org"
        assert full["extra"] == {"h": 1}
        with pytest.raises(BadRequest, match="from"):
            await deliver(m, 2, 0, "no address")


@run_async
async def test_send_with_a_used_key_is_a_no_op_answering_the_first_result(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, store):
        first = await send(m, 1, [2], "once", key="k1")
        appends = store.calls["append"]
        again = await send(m, 1, [2], "once", key="k1")
        assert again == first | {"duplicate": True}
        assert store.calls["append"] == appends
        other = await send(m, 1, [2], "twice", key="k2")
        assert other["message_id"] != first["message_id"]
        assert len(await messages(m, 2, first["thread_id"])) == 2
        # the same key from another sender is another message
        assert (await send(m, 3, [2], "x", key="k1"))["duplicate"] is False


@run_async
async def test_a_send_that_failed_half_way_is_retried_without_duplicates(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, store):
        store.fail_append = lambda w: StoreUnavailable("down") if w.user_id == 1 else None
        with pytest.raises(StoreUnavailable):
            await send(m, 1, [2, 3], "retry me", key="k")
        store.fail_append = None
        reply = await send(m, 1, [2, 3], "retry me", key="k")
        assert reply["duplicate"] is False
        for user, folder in ((1, "sent"), (2, "other"), (3, "other")):
            [summary] = await threads(m, user, folder)
            assert summary["messages"] == 1, user


@run_async
async def test_deliver_with_a_used_key_is_a_duplicate(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        first = await deliver(m, 2, 0, "x", key="<id@x>", **{"from": "a@x"})
        again = await deliver(m, 2, 0, "x", key="<id@x>", **{"from": "a@x"})
        assert again == first | {"duplicate": True}
        [summary] = await threads(m, 2, "other")
        assert summary["messages"] == 1


def _inline(raw: bytes, **named: Any) -> dict[str, Any]:
    """DELIVER's fields for a mail whose raw bytes come inline (`named`: extra.raw's fields)."""
    fields = {"ref": hashlib.sha256(raw).hexdigest(), "size": len(raw), "inline": True}
    return {"raw": base64.b64encode(raw).decode(), "extra": {"raw": fields | named}}


@run_async
async def test_a_mails_raw_bytes_delivered_inline_are_kept_in_its_body(tmp_path: Path) -> None:
    raw = b"From: a@x\r\nSubject: hi\r\n\r\nhello\r\n"
    ref = hashlib.sha256(raw).hexdigest()
    async with opened(tmp_path) as (m, store):  # a mailbox with no blob store at all
        reply = await deliver(m, 2, 0, "hello", key="<r@x>", **{"from": "a@x"}, **_inline(raw))
        message_id = reply["message_id"]
        full = await m.execute(Op.GET_MESSAGE, {"user": 2, "message_id": message_id})
        assert full["extra"]["raw"] == {"ref": ref, "size": len(raw), "inline": True}
        assert "raw" not in full  # the image keeps the ref alone
        stored = orjson.loads((await store.get_messages(2, [message_id]))[message_id])
        assert base64.b64decode(stored["raw"]) == raw
        whole = await m.execute(Op.GET_BLOB, {"user": 2, "ref": ref})
        assert base64.b64decode(whole["data"]) == raw and whole["eof"] is True
        assert whole["message_id"] == message_id and whole["size"] == len(raw)
        part = await m.execute(Op.GET_BLOB, {"user": 2, "ref": ref, "offset": 6, "length": 4})
        assert base64.b64decode(part["data"]) == raw[6:10] and part["eof"] is False
        with pytest.raises(BadRequest, match="offset"):
            await m.execute(Op.GET_BLOB, {"user": 2, "ref": ref, "offset": len(raw) + 1})
        with pytest.raises(NotFound):  # only the users the mail reached may read it
            await m.execute(Op.GET_BLOB, {"user": 3, "ref": ref})
        appends = store.calls["append"]
        bad = [
            ({**_inline(raw), "raw": "not base64!"}, BadRequest, "base64"),
            ({**_inline(raw), "raw": 7}, BadRequest, "base64 string"),
            (_inline(raw, size=len(raw) + 1), BadRequest, "name these bytes"),
            (_inline(raw, ref="0" * 64), BadRequest, "name these bytes"),
            ({"raw": _inline(raw)["raw"], "extra": {}}, BadRequest, "name these bytes"),
            ({"extra": _inline(raw)["extra"]}, BadRequest, "missing"),
            (_inline(b"x" * 70_000), TooLarge, "limit"),
        ]
        for n, (fields, error, words) in enumerate(bad):
            with pytest.raises(error, match=words):
                await deliver(m, 2, 0, "bad", key=f"<bad{n}@x>", **{"from": "a@x"}, **fields)
        assert store.calls["append"] == appends  # nothing written


@run_async
async def test_raw_bytes_a_body_lost_are_never_served(tmp_path: Path) -> None:
    raw = b"Subject: lost\r\n\r\nbody\r\n"
    ref = hashlib.sha256(raw).hexdigest()
    async with opened(tmp_path) as (m, store):
        reply = await deliver(m, 2, 0, "body", **{"from": "a@x"}, **_inline(raw))
        stored = orjson.loads(
            (await store.get_messages(2, [reply["message_id"]]))[reply["message_id"]]
        )
        for damaged in ({**stored, "raw": base64.b64encode(b"other bytes").decode()},
                        {k: v for k, v in stored.items() if k != "raw"}):  # fmt: skip
            real = store.inner.get_messages

            async def serving(user: int, ids: Any, damaged: dict = damaged) -> dict[str, bytes]:
                return {i: orjson.dumps(damaged) for i in ids}

            store.inner.get_messages = serving
            try:
                with pytest.raises(BlobCorrupt, match=ref):
                    await m.execute(Op.GET_BLOB, {"user": 2, "ref": ref})
            finally:
                store.inner.get_messages = real


@run_async
async def test_blocked_senders_reach_nobody_who_blocked_them(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        blocked = await m.execute(Op.BLOCK, {"user": 2, "sender": 1})
        assert blocked == {"seq": 1}
        assert await m.execute(Op.BLOCK, {"user": 2, "sender": 1}) == {"seq": 1}  # no-op
        reply = await send(m, 1, [2, 3], "hello")
        assert reply["duplicate"] is False
        assert await threads(m, 2, "other") == []
        assert len(await threads(m, 3, "other")) == 1
        dropped = await deliver(m, 2, 1, "mail")
        assert dropped["dropped"] is True and dropped["message_id"] is None
        assert (await m.execute(Op.UNBLOCK, {"user": 2, "sender": 1})) == {"seq": 2}
        assert (await deliver(m, 2, 1, "mail"))["dropped"] is False
        with pytest.raises(BadRequest, match="sender"):
            await m.execute(Op.BLOCK, {"user": 2, "sender": 2})


# ---- routing ----


class BrokenIndex:
    """A user index that fails or hangs."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def relation(self, user_id: int, sender_id: int) -> str:
        if self.hang:
            await asyncio.sleep(30)
        raise ConnectionError("index down")

    async def add_friend(self, user_id: int, friend_id: int) -> None: ...

    async def remove_friend(self, user_id: int, friend_id: int) -> None: ...


@run_async
async def test_friends_and_friends_of_friends_go_to_inbox_strangers_to_other(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as (m, _):
        await m.execute(Op.FRIEND_ADD, {"user": 1, "friend": 2})
        await m.execute(Op.FRIEND_ADD, {"user": 2, "friend": 3})
        assert (await deliver(m, 1, 2))["folder"] == "inbox"  # friend
        assert (await deliver(m, 1, 3))["folder"] == "inbox"  # friend of a friend
        assert (await deliver(m, 1, 4))["folder"] == "other"  # stranger
        await m.execute(Op.FRIEND_REMOVE, {"user": 1, "friend": 2})
        assert (await deliver(m, 1, 2, participants=[1, 2, 5]))["folder"] == "other"


@run_async
async def test_an_existing_thread_keeps_its_folder_but_leaves_the_archive(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        first = await deliver(m, 1, 4)
        tid = first["thread_id"]
        await m.execute(Op.MOVE, {"user": 1, "thread_id": tid, "folder": "spam"})
        assert (await deliver(m, 1, 4))["folder"] == "spam"
        await m.execute(Op.MOVE, {"user": 1, "thread_id": tid, "folder": "archived"})
        assert (await deliver(m, 1, 4))["folder"] == "inbox"
        await m.execute(Op.MOVE, {"user": 1, "thread_id": tid, "folder": "archived"})
        await send(m, 1, [4], "my reply")
        assert [t["thread_id"] for t in await threads(m, 1)] == [tid]


@run_async
async def test_a_send_filed_from_a_mail_client_keeps_its_extra_and_relays_nothing(
    tmp_path: Path,
) -> None:
    queued: list[tuple[int, str]] = []
    async with opened(tmp_path) as (m, _):
        m._outbound_queued = lambda user, message: queued.append((user, message))
        raw = {"raw": {"ref": "a" * 64, "size": 10}, "message_id_header": "<s@x>"}
        reply = await send(m, 1, [2, "carol@example.org"], "sent already", channel="email",
                           key="<s@x>", extra=raw, relay=False)  # fmt: skip
        assert reply["thread_id"] == thread_id_for([1, 2], ["carol@example.org"])
        mine = await m.execute(Op.GET_MESSAGE, {"user": 1, "message_id": reply["message_id"]})
        assert mine["extra"]["raw"] == raw["raw"]
        assert "outbound" not in mine["extra"]  # nothing queued to go out
        assert mine["extra"]["to_addresses"] == ["carol@example.org"]
        theirs = await m.execute(Op.GET_MESSAGE, {"user": 2, "message_id": reply["message_id"]})
        assert theirs["text"] == "sent already" and "raw" not in theirs["extra"]
        assert await m.pending_outbound(1) == [] and queued == []
        # the same mail filed again is the same message
        again = await send(m, 1, [2], "sent already", channel="email", key="<s@x>", relay=False)
        assert again["duplicate"] is True and again["message_id"] == reply["message_id"]
        # an ordinary SEND to an outside address still queues it
        out = await send(m, 1, ["carol@example.org"], "goes out", channel="email")
        assert queued == [(1, out["message_id"])]
        with pytest.raises(BadRequest, match="relay"):
            await send(m, 1, [2], "x", relay="no")


@run_async
async def test_a_deliver_with_a_folder_files_a_new_thread_there_and_keeps_an_old_ones(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as (m, _):
        first = await deliver(m, 2, 0, "old mail", folder="archived",
                              **{"from": "alice@example.org"})  # fmt: skip
        assert first["folder"] == "archived"
        assert [t["thread_id"] for t in await threads(m, 2, "archived")] == [first["thread_id"]]
        # the conversation exists: it stays where it is (not back to the inbox)
        again = await deliver(m, 2, 0, "more", folder="spam", **{"from": "alice@example.org"})
        assert again["folder"] == "archived" and again["thread_id"] == first["thread_id"]
        chat = await send(m, 1, [2], "hello")
        assert (await deliver(m, 2, 1, "mail", folder="spam"))["folder"] == "other"
        assert chat["thread_id"] in [t["thread_id"] for t in await threads(m, 2, "other")]
        with pytest.raises(BadRequest, match="folder"):
            await deliver(m, 2, 0, "x", folder="drafts", **{"from": "a@example.org"})


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "times-out"])
@run_async
async def test_an_index_that_cannot_answer_gives_the_default_folder(
    tmp_path: Path, hang: bool
) -> None:
    knobs = {"default_folder": "other", "user_index_timeout_s": 0.05}
    async with opened(tmp_path, BrokenIndex(hang), **knobs) as (m, _):
        reply = await deliver(m, 1, 2, "not lost")
        assert reply["folder"] == "other"
        [message] = await messages(m, 1, reply["thread_id"])
        assert message["text"] == "not lost"
        assert m.stats()["index_failures"] == 1


# ---- reads ----


@run_async
async def test_list_threads_pages_most_recent_first(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        ids = [
            (await deliver(m, 1, 0, f"m{n}", **{"from": f"a{n}@x"}))["thread_id"] for n in range(5)
        ]
        await deliver(m, 1, 0, "again", **{"from": "a1@x"})  # thread 1 becomes the newest
        expected = [ids[1], ids[4], ids[3], ids[2], ids[0]]
        seen: list[str] = []
        cursor = None
        while True:
            page = await m.execute(
                Op.LIST_THREADS, {"user": 1, "folder": "other", "limit": 2, "before": cursor}
            )
            seen += [t["thread_id"] for t in page["threads"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == expected
        assert (await threads(m, 1, "other"))[0]["snippet"] == "again"


@run_async
async def test_get_thread_pages_back_in_time_oldest_first_within_a_page(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        for n in range(5):
            reply = await send(m, 1, [2], f"m{n}")
        tid = reply["thread_id"]
        page = await m.execute(Op.GET_THREAD, {"user": 2, "thread_id": tid, "limit": 2})
        assert [x["text"] for x in page["messages"]] == ["m3", "m4"]
        assert page["participants"] == [1, 2] and page["folder"] == "other"
        page = await m.execute(
            Op.GET_THREAD, {"user": 2, "thread_id": tid, "limit": 2, "before": page["next"]}
        )
        assert [x["text"] for x in page["messages"]] == ["m1", "m2"]
        page = await m.execute(
            Op.GET_THREAD, {"user": 2, "thread_id": tid, "limit": 2, "before": page["next"]}
        )
        assert [x["text"] for x in page["messages"]] == ["m0"]
        assert page["next"] is None


@run_async
async def test_unknown_users_and_things(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        assert await threads(m, 99) == []
        assert await counts(m, 99) == {
            f: {"unread": 0, "unseen": 0} for f in ("inbox", "other", "archived", "sent", "spam")
        }
        with pytest.raises(NotFound, match="thread_id"):
            await m.execute(Op.GET_THREAD, {"user": 99, "thread_id": "t-nope"})
        with pytest.raises(NotFound, match="message_id"):
            await m.execute(Op.GET_MESSAGE, {"user": 99, "message_id": "m-nope"})
        reply = await send(m, 1, [2])
        for op in (Op.MARK_READ, Op.DELETE):
            with pytest.raises(NotFound, match="message_id"):
                await m.execute(
                    op, {"user": 2, "thread_id": reply["thread_id"], "message_id": "m-nope"}
                )
        with pytest.raises(NotFound):
            await m.execute(Op.MOVE, {"user": 2, "thread_id": "t-nope", "folder": "inbox"})


@run_async
async def test_search_finds_whole_words_case_insensitively_newest_first(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        a = await send(m, 1, [2], "Lunch on Friday?")
        b = await deliver(m, 2, 3, "friday lunch, again", subject="LUNCH")
        await send(m, 1, [2], "lunchtime is not lunch-free")
        await send(m, 1, [2], "nothing here")

        async def found(query: str, **more: Any) -> list[str]:
            reply = await m.execute(Op.SEARCH, {"user": 2, "query": query, **more})
            return [x["message_id"] for x in reply["messages"]]

        assert await found("FRIDAY lunch") == [b["message_id"], a["message_id"]]
        assert await found("friday", limit=1) == [b["message_id"]]
        assert len(await found("lunch")) == 3
        assert await found("lunc") == []
        await m.execute(
            Op.DELETE, {"user": 2, "thread_id": b["thread_id"], "message_id": b["message_id"]}
        )
        assert await found("friday") == [a["message_id"]]
        with pytest.raises(BadRequest, match="query"):
            await found("  ,; ")
        with pytest.raises(TooLarge, match="query"):
            await found(" ".join(f"w{n}" for n in range(17)))


@run_async
async def test_search_terms_are_written_off_the_durable_path_and_derived_from_the_log(
    tmp_path: Path,
) -> None:
    """A write's append holds no search terms; they follow in the background, and a
    mailbox that died before writing them (nothing closed) finds them from the log."""
    store = SQLiteStore(tmp_path / "cell.sqlite", synchronous="OFF")
    await store.open()
    appends: list[LogAppend] = []
    spy = SpyStore(store)
    spy.fail_append = lambda write: appends.append(write)  # type: ignore[func-returns-value]
    first = Mailbox(spy)  # type: ignore[arg-type]
    sent = await send(first, 1, [2], "quarterly plan draft")
    assert appends and all(not write.terms for write in appends)
    assert await store.search(2, ["quarterly"]) == []  # not yet: derived a moment later
    await first.drain()
    assert await store.search(2, ["quarterly"]) == [sent["message_id"]]
    assert await store.indexed_seq(2) == 1

    # More writes, then the process "dies": its pending terms are never written.
    lost = await send(first, 1, [2], "budget figures attached")
    await first.execute(Op.MARK_READ, {"user": 2, "thread_id": sent["thread_id"]})
    assert await store.search(2, ["budget"]) == []

    second = Mailbox(store)
    reply = await second.execute(Op.SEARCH, {"user": 2, "query": "budget"})
    assert [x["message_id"] for x in reply["messages"]] == [lost["message_id"]]
    assert await store.indexed_seq(2) == 3

    # A write after such a gap indexes the gap too, in the background: sender 1's
    # "budget" copy was never indexed, and the next one starts after it.
    later = await send(second, 1, [3], "budget for three")
    await second.drain()
    assert sorted(await store.search(1, ["budget"])) == sorted(
        [lost["message_id"], later["message_id"]]
    )
    assert await store.indexed_seq(1) == 3
    await second.close()
    await store.close()


@run_async
async def test_a_failed_index_write_is_retried_and_search_still_finds_it(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, spy):
        real = spy.inner.index_terms_many
        failures = [1]

        async def flaky(marks: Any) -> None:
            if any(user == 2 for user, _, _ in marks) and failures[0]:  # user 2's first
                failures[0] -= 1
                raise StoreUnavailable("the index write failed")
            await real(marks)

        spy.inner.index_terms_many = flaky  # type: ignore[method-assign]
        sent = await send(m, 1, [2], "retry me please")
        await m.drain()  # the first write fails, and waits for the next flush
        assert await spy.inner.search(2, ["retry"]) == []
        reply = await m.execute(Op.SEARCH, {"user": 2, "query": "retry"})
        assert [x["message_id"] for x in reply["messages"]] == [sent["message_id"]]
        assert m.stats()["search_index_failures"] == 1


def test_settings_come_from_the_config_and_are_checked() -> None:
    from pyserver.config import Config

    config = Config()
    knobs = MailboxSettings.from_config(config)
    assert knobs.cache_max_users == config.cache_max_users
    assert knobs.snapshot_every == config.snapshot_every
    assert knobs.default_folder == config.default_folder
    with pytest.raises(ValueError, match="default_folder"):
        MailboxSettings(default_folder="trash")
    with pytest.raises(ValueError, match="snapshot_every"):
        MailboxSettings(snapshot_every=0)


def test_search_terms_are_casefolded_distinct_words() -> None:
    assert search_terms("Hello, hello WORLD", "Straße") == ["hello", "world", "strasse"]
    assert search_terms("x" * 65) == []


# ---- writes to one's own mailbox ----


@run_async
async def test_mark_read_and_unread_thread_and_message(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        await send(m, 1, [2], "a")
        reply = await send(m, 1, [2], "b")
        tid = reply["thread_id"]
        seq = (await m.execute(Op.MARK_READ, {"user": 2, "thread_id": tid}))["seq"]
        assert seq == 3
        assert (await counts(m, 2))["other"] == {"unread": 0, "unseen": 1}
        # nothing to change: nothing written, the same seq
        assert (await m.execute(Op.MARK_READ, {"user": 2, "thread_id": tid})) == {"seq": 3}
        one = {"user": 2, "thread_id": tid, "message_id": reply["message_id"]}
        assert (await m.execute(Op.MARK_UNREAD, one)) == {"seq": 4}
        unread = [x["unread"] for x in await messages(m, 2, tid)]
        assert unread == [False, True]
        assert (await threads(m, 2, "other"))[0]["unread"] == 1
        assert (await m.execute(Op.MARK_UNREAD, {"user": 2, "thread_id": tid})) == {"seq": 5}
        assert (await threads(m, 2, "other"))[0]["unread"] == 2


@run_async
async def test_move_and_delete(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        first = await send(m, 1, [2], "a")
        second = await send(m, 1, [2], "b")
        tid = first["thread_id"]
        assert await m.execute(Op.MOVE, {"user": 2, "thread_id": tid, "folder": "archived"}) == {
            "seq": 3
        }
        assert await threads(m, 2, "other") == []
        assert (await counts(m, 2))["archived"]["unread"] == 1
        with pytest.raises(BadRequest, match="folder"):
            await m.execute(Op.MOVE, {"user": 2, "thread_id": tid, "folder": "trash"})
        one = {"user": 2, "thread_id": tid, "message_id": second["message_id"]}
        assert (await m.execute(Op.DELETE, one)) == {"seq": 4}
        assert [x["text"] for x in await messages(m, 2, tid)] == ["a"]
        with pytest.raises(NotFound):
            await m.execute(Op.GET_MESSAGE, {"user": 2, "message_id": second["message_id"]})
        assert (await m.execute(Op.DELETE, {"user": 2, "thread_id": tid})) == {"seq": 5}
        assert await threads(m, 2, "archived") == []
        assert (await counts(m, 2))["archived"] == {"unread": 0, "unseen": 0}
        # the sender's copy is untouched
        assert len(await messages(m, 1, tid)) == 2


@run_async
async def test_folder_messages_lists_a_folder_by_uid_in_pages(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        sent = [await send(m, 1, [2], f"a{n}") for n in range(3)]
        other = await send(m, 3, [2], "from three")
        await m.execute(
            Op.MOVE, {"user": 2, "thread_id": sent[0]["thread_id"], "folder": "archived"}
        )

        async def listing(folder: str, **more: Any) -> dict[str, Any]:
            return await m.execute(Op.FOLDER_MESSAGES, {"user": 2, "folder": folder, **more})

        archived = await listing("archived")
        assert [x["uid"] for x in archived["messages"]] == [1, 2, 3]
        assert [x["message_id"] for x in archived["messages"]] == [s["message_id"] for s in sent]
        assert archived["uid_validity"] == 1 and archived["uid_next"] == 4
        assert archived["more"] is False and archived["messages"][0]["unread"] is True
        # MODSEQ: the move (entry 5) filed all three; reading one changes its own
        assert [x["modseq"] for x in archived["messages"]] == [5, 5, 5] and archived["seq"] == 5
        one = {"user": 2, "thread_id": sent[0]["thread_id"], "message_id": sent[1]["message_id"]}
        await m.execute(Op.MARK_READ, one)
        archived = await listing("archived")
        assert [x["modseq"] for x in archived["messages"]] == [5, 6, 5] and archived["seq"] == 6
        # "other" keeps the fourth message's UID; the three moved away leave a gap
        assert [(x["uid"], x["message_id"]) for x in (await listing("other"))["messages"]] == [
            (4, other["message_id"])
        ]
        page = await listing("archived", after_uid=1, limit=1)
        assert [x["uid"] for x in page["messages"]] == [2] and page["more"] is True
        assert (await listing("archived", after_uid=3))["messages"] == []
        for bad in ({"after_uid": -1}, {"after_uid": "1"}, {"limit": 0}, {"folder": "trash"}):
            with pytest.raises(BadRequest):
                await listing(bad.pop("folder", "inbox"), **bad)


@run_async
async def test_mark_seen_zeroes_unseen_only(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        await send(m, 1, [2], "a")
        assert (await m.execute(Op.MARK_SEEN, {"user": 2, "folder": "other"})) == {"seq": 2}
        assert (await counts(m, 2))["other"] == {"unread": 1, "unseen": 0}
        assert (await m.execute(Op.MARK_SEEN, {"user": 2, "folder": "other"})) == {"seq": 2}
        await send(m, 1, [2], "b")
        assert (await counts(m, 2))["other"] == {"unread": 1, "unseen": 1}


# ---- validation ----

BAD = [
    (Op.SEND, {"recipients": [2], "text": "x", "channel": "chat"}, BadRequest, "sender"),
    (Op.SEND, {"sender": 0, "recipients": [2], "text": "x", "channel": "chat"}, BadRequest,
     "sender"),
    (Op.SEND, {"sender": True, "recipients": [2], "text": "x", "channel": "chat"}, BadRequest,
     "sender"),
    (Op.SEND, {"sender": 1, "recipients": [], "text": "x", "channel": "chat"}, BadRequest,
     "recipients"),
    (Op.SEND, {"sender": 1, "recipients": [1], "text": "x", "channel": "chat"}, BadRequest,
     "recipients"),
    (Op.SEND, {"sender": 1, "recipients": "2", "text": "x", "channel": "chat"}, BadRequest,
     "recipients"),
    (Op.SEND, {"sender": 1, "recipients": [2**64], "text": "x", "channel": "chat"}, BadRequest,
     "recipients"),
    (Op.SEND, {"sender": 1, "recipients": [2], "channel": "chat"}, BadRequest, "text"),
    (Op.SEND, {"sender": 1, "recipients": [2], "text": 5, "channel": "chat"}, BadRequest, "text"),
    (Op.SEND, {"sender": 1, "recipients": [2], "text": "x", "channel": "fax"}, BadRequest,
     "channel"),
    (Op.SEND, {"sender": 1, "recipients": [2], "text": "x", "channel": "chat", "key": 1},
     BadRequest, "key"),
    (Op.SEND, {"sender": 1, "recipients": [2], "text": "x" * 1001, "channel": "chat"}, TooLarge,
     "text"),
    (Op.SEND, {"sender": 1, "recipients": list(range(2, 13)), "text": "x", "channel": "chat"},
     TooLarge, "recipients"),
    (Op.DELIVER, {"user": 1, "sender": 2, "text": "x", "channel": "email", "extra": []},
     BadRequest, "extra"),
    (Op.DELIVER, {"user": 1, "sender": 2, "text": "x", "channel": "email",
                  "extra": {"a": "x" * 2000}}, TooLarge, "extra"),
    (Op.DELIVER, {"user": 1, "sender": 2, "text": "x", "channel": "email", "participants": [0]},
     BadRequest, "participants"),
    (Op.LIST_THREADS, {"user": 1, "limit": 0}, BadRequest, "limit"),
    (Op.LIST_THREADS, {"user": 1, "limit": 201}, BadRequest, "limit"),
    (Op.LIST_THREADS, {"user": 1, "folder": "trash"}, BadRequest, "folder"),
    (Op.LIST_THREADS, {"user": 1, "before": "abc"}, BadRequest, "before"),
    (Op.LIST_THREADS, {"user": "1"}, BadRequest, "user"),
    (Op.GET_THREAD, {"user": 1}, BadRequest, "thread_id"),
    (Op.GET_MESSAGE, {"user": 1, "message_id": 3}, BadRequest, "message_id"),
    (Op.SEARCH, {"user": 1}, BadRequest, "query"),
    (Op.MARK_READ, {"user": 1, "thread_id": ["t"]}, BadRequest, "thread_id"),
    (Op.MARK_SEEN, {"user": 1, "folder": 3}, BadRequest, "folder"),
    (Op.UNBLOCK, {"user": 1}, BadRequest, "sender"),
    (Op.FRIEND_ADD, {"user": 1, "friend": 1}, BadRequest, "friend"),
    (Op.PING, {}, BadRequest, "op"),
]  # fmt: skip


@pytest.mark.parametrize(("op", "payload", "error", "field"), BAD)
@run_async
async def test_bad_payloads_name_the_field(
    tmp_path: Path, op: Op, payload: dict, error: type, field: str
) -> None:
    knobs = {"max_text_bytes": 1000, "max_recipients": 10, "max_extra_bytes": 1000}
    async with opened(tmp_path, **knobs) as (m, store):
        with pytest.raises(error, match=field) as caught:
            await m.execute(op, payload)
        assert caught.value.code == error.code
        assert store.calls["append"] == 0


@run_async
async def test_text_over_the_limit_counts_bytes_not_characters(tmp_path: Path) -> None:
    async with opened(tmp_path, max_text_bytes=10) as (m, _):
        await send(m, 1, [2], "é" * 5)  # 10 bytes
        with pytest.raises(TooLarge, match="11 bytes"):
            await send(m, 1, [2], "é" * 5 + "x")


# ---- the cache, snapshots, reloads ----


@run_async
async def test_reads_of_a_cached_user_touch_no_store(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, store):
        reply = await send(m, 1, [2], "hello", key="k")
        await m.drain()
        before = store.reads()
        await threads(m, 2, "other")
        await messages(m, 2, reply["thread_id"])
        await m.execute(Op.GET_MESSAGE, {"user": 2, "message_id": reply["message_id"]})
        await counts(m, 2)
        await send(m, 1, [2], "hello", key="k")  # a duplicate answers from the image
        assert store.reads() == before
        stats = m.stats()
        assert stats["hits"] >= 5 and stats["users"] == 2
        assert 0 < stats["hit_rate"] <= 1


@run_async
async def test_a_snapshot_is_written_every_k_entries(tmp_path: Path) -> None:
    async with opened(tmp_path, snapshot_every=3) as (m, store):
        for n in range(2):
            await send(m, 1, [2], f"m{n}")
        await m.drain()
        assert await store.inner.read_snapshot(2) is None
        await send(m, 1, [2], "m2")
        await m.drain()
        seq, data = await store.inner.read_snapshot(2)
        assert seq == 3
        assert UserImage.from_snapshot(data).seq == 3
        assert m.stats()["snapshots"] >= 1


@run_async
async def test_a_large_image_is_snapshotted_every_quarter_of_its_messages(tmp_path: Path) -> None:
    """A snapshot costs the whole image: past `snapshot_every` x 4 messages they are
    written every quarter of the messages, so the cost per write stays flat."""
    async with opened(tmp_path, snapshot_every=3) as (m, store):
        written = []
        for n in range(40):
            await send(m, 1, [2], f"m{n}")
            await m.drain()
            written.append((await store.inner.read_snapshot(2))[0] if n >= 2 else 0)
        # every 3 entries up to 15 messages, then every quarter of them: 19, 25, 33
        assert sorted(set(written) - {0}) == [3, 6, 9, 12, 15, 19, 25, 33]


@run_async
async def test_an_evicted_image_is_snapshotted_and_reloads_the_same(tmp_path: Path) -> None:
    async with opened(tmp_path, cache_max_users=1, snapshot_every=1000) as (m, store):
        # Both copies are written at once; whichever user is cached second evicts the other.
        reply = await send(m, 1, [2], "hello")
        await m.drain()
        snapshots = [await store.inner.read_snapshot(user) for user in (1, 2)]
        assert [s[0] for s in snapshots if s is not None] == [1], snapshots
        assert m.stats()["evictions"] >= 1
        assert len(await messages(m, 2, reply["thread_id"])) == 1
        assert len(await messages(m, 1, reply["thread_id"])) == 1
        assert m.stats()["users"] == 1


@run_async
async def test_a_reload_after_close_gives_the_same_answers(tmp_path: Path) -> None:
    async def answers(m: Mailbox) -> list[Any]:
        tid = thread_id_for([1, 2])
        return [
            await threads(m, 2, "other"),
            await messages(m, 2, tid),
            await counts(m, 2),
            await m.execute(Op.SEARCH, {"user": 2, "query": "hello"}),
        ]

    async with opened(tmp_path, snapshot_every=2) as (m, _):
        for n in range(3):
            await send(m, 1, [2], f"hello {n}")
        await m.execute(Op.MARK_READ, {"user": 2, "thread_id": thread_id_for([1, 2])})
        await m.execute(Op.BLOCK, {"user": 2, "sender": 9})
        before = await answers(m)
    async with opened(tmp_path) as (m, store):
        assert await answers(m) == before
        # close() snapshotted the image, so the reload replays nothing
        assert store.calls["read_snapshot"] == 1 and store.calls["get_messages"] == 0


@run_async
async def test_a_load_replays_the_log_after_the_snapshot(tmp_path: Path) -> None:
    async with opened(tmp_path, snapshot_every=2) as (m, store):
        for n in range(5):
            await send(m, 1, [2], f"m{n}")
        await m.drain()
        assert (await store.inner.read_snapshot(2))[0] == 4
        expected = await messages(m, 2, thread_id_for([1, 2]))
        fresh = Mailbox(store)  # type: ignore[arg-type]
        bodies = store.calls["get_messages"]
        assert await messages(fresh, 2, thread_id_for([1, 2])) == expected
        assert store.calls["get_messages"] == bodies + 1  # the one message after the snapshot


@run_async
async def test_a_lost_race_reloads_and_retries(tmp_path: Path) -> None:
    async with opened(tmp_path) as (a, store):
        b = Mailbox(store)  # type: ignore[arg-type]
        await send(a, 1, [2], "from a")
        await send(b, 3, [2], "from b")  # user 2's log moves on behind a's back
        await send(a, 1, [2], "a again")  # a's image of 2 is stale: conflict, reload, retry
        assert a.stats()["conflicts"] >= 1
        texts = sorted(x["text"] for x in await messages(a, 2, thread_id_for([1, 2])))
        assert texts == ["a again", "from a"]
        assert len(await threads(a, 2, "other")) == 2
        await b.close()


@run_async
async def test_a_race_lost_every_time_answers_conflict(tmp_path: Path) -> None:
    async with opened(tmp_path, conflict_retries=2) as (m, store):
        store.fail_append = lambda w: WriteConflict(w.user_id, w.expected_seq, w.expected_seq + 1)
        with pytest.raises(WriteConflict) as caught:
            await m.execute(Op.BLOCK, {"user": 2, "sender": 9})
        assert caught.value.code == "CONFLICT"
        assert store.calls["append"] == 3  # the first try and two retries


# ---- the reply table across writes ----


def _asked_of_table(m: Mailbox, op: Op, raw: bytes) -> bytes | None:
    """The reply frame the table gives a service connection's request, or None."""
    decoder = frame_codec.FrameDecoder()
    decoder.feed(frame_codec.encode_frame(KIND_REQUEST, op, 7, raw))
    return m.reply_table().answer(decoder, 0)


@run_async
async def test_a_held_reply_is_answered_again_after_a_write_only_while_it_is_asked_for(
    tmp_path: Path,
) -> None:
    """A write answers again the held replies read since they were last answered; one
    nobody asked for since goes (a later read answers and holds it again)."""
    async with opened(tmp_path) as (m, _store):
        tid = (await send(m, 1, [2], "first"))["thread_id"]
        request = {"user": 2, "thread_id": tid}
        raw = orjson.dumps(request)
        key = (Op.GET_THREAD.value, raw)
        m.remember_reply(Op.GET_THREAD, request, raw,
                         orjson.dumps(m.answer_cached(Op.GET_THREAD, request)))  # fmt: skip
        await send(m, 1, [2], "second")  # it was read (the remembered read): answered again
        assert m.reply_table().held(2) == [key]
        assert b"second" in (_asked_of_table(m, Op.GET_THREAD, raw) or b"")
        await send(m, 1, [2], "third")  # read from the table since: answered again
        assert b"third" in (_asked_of_table(m, Op.GET_THREAD, raw) or b"")
        await send(m, 1, [2], "fourth")  # answered again, but nobody asks for it now
        await send(m, 1, [2], "fifth")  # so this write drops it
        assert m.reply_table().held(2) == []
        assert _asked_of_table(m, Op.GET_THREAD, raw) is None


# ---- group commit per user ----


@run_async
async def test_concurrent_writes_of_one_user_are_appended_together_and_each_answered(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as (m, store):
        first = await send(m, 1, [2], "the first, alone")
        before = store.calls["append"]
        tid = first["thread_id"]
        _check_replies(m, frame_codec, scope=0)  # fills the reply table
        replies = await asyncio.gather(
            *(send(m, 1, [2], f"burst {n}", key=f"k{n % 10}") for n in range(20)),
            m.execute(Op.MARK_READ, {"user": 2, "thread_id": tid}),
            m.execute(Op.MOVE, {"user": 2, "thread_id": "no-such-thread", "folder": "spam"}),
            return_exceptions=True,
        )
        sends, marked, moved = replies[:20], replies[20], replies[21]
        assert isinstance(moved, NotFound)  # fails alone: the others are written
        assert isinstance(marked, dict) and marked["seq"] >= 2
        # Ten keys: each stored once, its repeats answered as duplicates of it.
        stored = [r for r in sends if not r["duplicate"]]
        assert len(stored) == 10
        assert {r["message_id"] for r in sends} == {r["message_id"] for r in stored}
        # Far fewer appends than writes: the burst went in a few groups per user.
        appended = store.calls["append"] - before
        assert appended < 20, appended
        # The replies held were answered again from the image the group left.
        assert len(m.reply_table()) > 0
        _check_replies(m, frame_codec, scope=0)
        # Each user's log is gap-free and equals its image.
        for user in (1, 2):
            report = await m.rebuild(user)
            assert report["ok"], report
        assert report["messages"] == 11


@run_async
async def test_writes_of_one_user_that_arrive_together_go_in_one_append(tmp_path: Path) -> None:
    """Writes that came in the same turn of the event loop (a pipelined connection's
    frames, a relay link's copies) join the first one's group: one compare-and-set."""
    async with opened(tmp_path) as (m, store):
        await deliver(m, 2, 7, "warm up", key="w")
        before = store.calls["append"]
        replies = await asyncio.gather(
            *(deliver(m, 2, 7, f"together {n}", key=f"t{n}") for n in range(6))
        )
        assert store.calls["append"] - before == 1
        assert all(not r["duplicate"] for r in replies)
        report = await m.rebuild(2)
        assert report["ok"] and report["messages"] == 7


@run_async
async def test_a_cancelled_first_write_does_not_fail_the_writes_that_joined_it(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as (m, spy):
        await deliver(m, 2, 7, "warm up", key="w")
        real_append = spy.inner.append
        release, appending = asyncio.Event(), asyncio.Event()

        async def held(write: LogAppend) -> None:
            appending.set()
            await release.wait()
            await real_append(write)

        spy.inner.append = held  # type: ignore[method-assign]
        writes = [
            asyncio.ensure_future(deliver(m, 2, 7, f"joined {n}", key=f"j{n}")) for n in range(3)
        ]
        await asyncio.wait_for(appending.wait(), 5)
        writes[0].cancel()  # the caller of the first gives up while the group commits
        release.set()
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert all(isinstance(o, dict) and not o["duplicate"] for o in outcomes[1:]), outcomes
        spy.inner.append = real_append  # type: ignore[method-assign]
        report = await m.rebuild(2)
        assert report["ok"] and report["messages"] == 4  # the group was written whole


@run_async
async def test_a_group_that_loses_its_race_is_decided_again_and_one_that_fails_is_not_kept(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as (m, store):
        await send(m, 1, [2], "warm up")
        lost = [1]

        def lose_once(write: LogAppend) -> BaseException | None:
            if write.user_id == 2 and len(write.records) > 1 and lost[0]:
                lost[0] -= 1
                return WriteConflict(2, write.expected_seq, write.expected_seq + 1)
            return None

        store.fail_append = lose_once
        burst = [deliver(m, 2, 7, f"mail {n}", key=f"c{n}") for n in range(8)]
        replies = await asyncio.gather(*burst)
        assert lost == [0] and all(not r["duplicate"] for r in replies)
        assert (await m.rebuild(2))["messages"] == 9

        seen = await counts(m, 2)
        store.fail_append = lambda w: StoreUnavailable("down") if w.user_id == 2 else None
        failed = await asyncio.gather(
            *(deliver(m, 2, 7, f"lost {n}", key=f"f{n}") for n in range(6)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreUnavailable) for r in failed)
        store.fail_append = None
        # Nothing of the failed group is visible: the image was reloaded from the log.
        assert await counts(m, 2) == seen
        report = await m.rebuild(2)
        assert report["ok"] and report["messages"] == 9


@run_async
async def test_nobody_reads_a_group_before_it_is_durable(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, spy):
        first = await deliver(m, 2, 7, "already there", key="w0")
        tid = first["thread_id"]
        assert len(await messages(m, 2, tid)) == 1
        real_append = spy.inner.append
        release = asyncio.Event()
        group_waiting = asyncio.Event()
        first_appending = asyncio.Event()

        async def slow_then_fail(write: LogAppend) -> None:
            if write.user_id == 2 and len(write.records) > 1:
                group_waiting.set()
                await release.wait()
                raise StoreUnavailable("the disk went away")
            if write.user_id == 2:
                first_appending.set()
            await real_append(write)

        spy.inner.append = slow_then_fail  # type: ignore[method-assign]
        writes = [asyncio.ensure_future(deliver(m, 2, 7, "pending 0", key="p0"))]
        await asyncio.wait_for(first_appending.wait(), 5)  # it leads a group of itself
        writes += [
            asyncio.ensure_future(deliver(m, 2, 7, f"pending {n}", key=f"p{n}"))
            for n in range(1, 5)
        ]
        await asyncio.wait_for(group_waiting.wait(), 5)
        # The first went alone and is durable; the other four wait in one append.
        assert m.answer_cached(Op.COUNTS, {"user": 2}) is None  # not from a pending image
        read = asyncio.ensure_future(messages(m, 2, tid))
        await asyncio.sleep(0.05)
        assert not read.done()  # it waits for the group, it does not see it
        release.set()
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        stored = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(stored) == 1  # the one that went alone
        assert all(isinstance(o, (dict, StoreUnavailable)) for o in outcomes)
        # That write shows, nothing of the failed group does.
        texts = [x["text"] for x in await read]
        assert len(texts) == 2 and texts[1].startswith("pending"), texts
        assert len(await messages(m, 2, tid)) == 2
        report = await m.rebuild(2)
        assert report["ok"] and report["messages"] == 2


# ---- admin: rebuild, export, import ----


@run_async
async def test_rebuild_reports_a_drifted_snapshot_and_repairs_it(tmp_path: Path) -> None:
    async with opened(tmp_path, snapshot_every=2) as (m, store):
        for n in range(3):
            reply = await send(m, 1, [2], f"m{n}")
        await m.drain()
        report = await m.rebuild(2)
        assert report["ok"] is True and report["differences"] == []
        assert report["seq"] == 3 and report["threads"] == 1 and report["messages"] == 3
        # a snapshot that says the thread lives in spam
        seq, data = await store.inner.read_snapshot(2)
        wrong = UserImage.from_snapshot(data)
        wrong.apply({"seq": seq + 1, "ts": 1, "action": "moved",
                     "thread_id": reply["thread_id"], "folder": "spam"})  # fmt: skip
        wrong.seq = seq
        await store.inner.write_snapshot(2, seq, wrong.to_snapshot())
        report = await m.rebuild(2)
        assert report["ok"] is False
        assert any("folder" in line for line in report["differences"]), report
        assert (await m.rebuild(2))["ok"] is True
        assert (await threads(m, 2, "other"))[0]["thread_id"] == reply["thread_id"]


@run_async
async def test_export_then_import_into_another_cell_gives_the_same_mailbox(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with opened(tmp_path / "a") as (m, _):
        tid = (await send(m, 1, [2], "lunch friday", subject="Plans"))["thread_id"]
        await deliver(m, 2, 0, "hello", **{"from": "x@y"}, extra={"k": [1]})
        await m.execute(Op.MARK_READ, {"user": 2, "thread_id": tid})
        exported = await m.export_log(2)
        expected = [await threads(m, 2, "other"), await counts(m, 2), await messages(m, 2, tid)]
    assert [e["seq"] for e in exported] == [1, 2, 3]
    assert exported[1]["body"] == {"text": "hello", "from": "x@y", "extra": {"k": [1]}}
    async with opened(tmp_path / "b") as (m, _):
        assert await m.import_log(2, exported) == 3
        assert await m.import_log(2, exported) == 0  # re-running is harmless
        got = [await threads(m, 2, "other"), await counts(m, 2), await messages(m, 2, tid)]
        assert got == expected
        found = await m.execute(Op.SEARCH, {"user": 2, "query": "Friday"})
        assert [x["thread_id"] for x in found["messages"]] == [tid]
        gap = [dict(exported[0], seq=9)]
        with pytest.raises(BadRequest, match="seq"):
            await m.import_log(5, gap)
        with pytest.raises(BadRequest):
            await m.import_log(5, [dict(exported[0], action="exploded")])
        assert await m.export_log(5) == []


# ---- subscriptions, ownership, stats ----


@run_async
async def test_subscribers_get_one_event_per_commit_in_log_order(tmp_path: Path) -> None:
    async with opened(tmp_path) as (m, _):
        events: list[dict] = []
        token = m.subscribe(2, events.append)

        def broken(event: dict) -> None:
            raise RuntimeError("subscriber bug")

        m.subscribe(2, broken)
        reply = await send(m, 1, [2], "hi")
        await m.execute(Op.MOVE, {"user": 2, "thread_id": reply["thread_id"], "folder": "inbox"})
        await send(m, 2, [3], "not about 2's other thread")
        m.unsubscribe(token)
        m.unsubscribe(token)  # harmless
        await m.execute(Op.MARK_READ, {"user": 2, "thread_id": reply["thread_id"]})
        assert [(e["seq"], e["event"]) for e in events] == [
            (1, "message_added"), (2, "moved"), (3, "message_added")
        ]  # fmt: skip
        assert events[0]["user"] == 2 and events[0]["thread_id"] == reply["thread_id"]
        assert events[0]["message"]["text"] == "hi" and events[0]["folder"] == "other"
        assert events[1] == {"user": 2, "seq": 2, "event": "moved",
                             "thread_id": reply["thread_id"], "folder": "inbox"}  # fmt: skip


@pytest.mark.parametrize("owner", ["10.0.0.2:7400", None])
@run_async
async def test_users_this_server_does_not_own_are_refused(tmp_path: Path, owner: Any) -> None:
    store = SQLiteStore(tmp_path / "c.sqlite", synchronous="OFF")
    await store.open()
    try:
        m = Mailbox(store, owns=lambda user: user != 2, owner_of=lambda user: owner)
        expected = NotOwner if owner else Unavailable
        with pytest.raises(expected) as caught:
            await threads(m, 2)
        if owner:
            assert caught.value.owner == owner
        with pytest.raises(expected):
            await send(m, 2, [1])
        with pytest.raises(expected):
            await send(m, 1, [2])  # a recipient's copy is a write to that user too
        assert await store.last_seq(1) == 0 and await store.last_seq(2) == 0
        assert await threads(m, 1) == []
        await m.close()
    finally:
        await store.close()


@run_async
async def test_local_user_index_relations_and_cache_invalidation(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.sqlite", synchronous="OFF")
    await store.open()
    try:
        index = LocalUserIndex(store, cache_users=2)
        assert isinstance(index, UserIndex)
        assert await index.relation(1, 1) == "friend"
        assert await index.relation(1, 2) == "stranger"
        await index.add_friend(1, 2)
        await index.add_friend(2, 3)
        assert await index.relation(1, 2) == "friend"
        assert await index.relation(2, 1) == "friend"
        assert await index.relation(1, 3) == "friend_of_friend"
        assert await index.relation(4, 1) == "stranger"
        await index.remove_friend(2, 3)
        assert await index.relation(1, 3) == "stranger"
        with pytest.raises(BadRequest, match="friend"):
            await index.add_friend(5, 5)
    finally:
        await store.close()


# ---- the whole mailbox on each twin of the cache and codec ----


@pytest.fixture(params=["native", "pure"])
def twins(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point the mailbox at one twin of the snapshot cache, the log codec and the reply
    table; returns that twin's wire-frame codec (whose decoder the table reads)."""
    if request.param == "native":
        if implementation.PURE_FORCED:
            pytest.skip("PYSERVER_PURE=1 forces the pure twins")
        native = importlib.import_module("pyserver._native")
        cache, codec = native.SnapshotCache, native
        frames = importlib.import_module("pyserver_framecodec")
        table = frames.ReplyTable
    else:
        cache = importlib.import_module("pyserver.pure.snapcache").SnapshotCache
        codec = importlib.import_module("pyserver.pure.logcodec")
        frames = importlib.import_module("pyserver.pure.frame")
        table = importlib.import_module("pyserver.pure.replies").ReplyTable
    monkeypatch.setattr(imagecache_module, "SnapshotCache", cache)
    monkeypatch.setattr(imagecache_module, "ReplyTable", table)
    monkeypatch.setattr(residency_module, "logcodec", codec)
    return frames


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["send", "deliver", "read", "unread", "move", "delete", "seen", "block", "evict"]
        ),
        st.integers(1, 4),
        st.integers(1, 4),
        st.sampled_from(["", "k1", "k2"]),
        st.sampled_from(["inbox", "other", "archived", "spam"]),
    ),
    max_size=24,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_the_cached_images_always_equal_a_rebuild_from_the_log(
    twins: Any, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]
) -> None:
    """...and the reply table answers, after every operation, exactly what Python would."""
    asyncio.run(_random_ops(tmp_path_factory.mktemp("twins"), ops, twins))


def _reads_of(m: Mailbox, user: int) -> list[tuple[Op, dict[str, Any]]]:
    """The reads the reply table may hold for a user: COUNTS and the first pages."""
    reads: list[tuple[Op, dict[str, Any]]] = [(Op.COUNTS, {"user": user})]
    for folder in ("inbox", "other", "archived", "sent", "spam"):
        reads.append((Op.LIST_THREADS, {"user": user, "folder": folder}))
    reads.append((Op.LIST_THREADS, {"user": user, "folder": "inbox", "limit": 1}))
    for other in range(1, 5):
        tid = thread_id_for([user, other])
        reads.append((Op.GET_THREAD, {"user": user, "thread_id": tid}))
        reads.append((Op.GET_THREAD, {"user": user, "thread_id": tid, "limit": 1}))
    return reads


def _check_replies(m: Mailbox, frames: Any, scope: int) -> None:
    """Each read, asked of the reply table then of Python: the table answers only what
    Python answers now, byte for byte. Python's replies then fill the table, as the
    dispatcher does."""
    for user in range(1, 5):
        for op, request in _reads_of(m, user):
            raw = orjson.dumps(request)
            decoder = frames.FrameDecoder()
            decoder.feed(frames.encode_frame(KIND_REQUEST, op, 7, raw))
            table = m.reply_table()
            answered = table.answer(decoder, scope)
            try:
                result = m.answer_cached(op, request)
            except NotFound:
                result = None
            if result is None:  # not cached, or an error: never answered from the table
                assert answered is None, (op, request)
                continue
            if scope not in (0, user):  # the Python path refuses it (FORBIDDEN)
                assert answered is None, (op, request, scope)
            body = orjson.dumps(result)
            if answered is not None:
                assert answered == frames.encode_frame(KIND_REPLY, op, 7, body), (op, request)
                assert decoder.buffered == 0
            m.remember_reply(op, request, raw, body)


async def _view(m: Mailbox, user: int) -> list[Any]:
    """Everything a client can read of a user's mailbox."""
    out: list[Any] = [await counts(m, user)]
    for folder in ("inbox", "other", "archived", "sent", "spam"):
        for summary in await threads(m, user, folder):
            out += [summary, await messages(m, user, summary["thread_id"])]
    return out


async def _random_ops(path: Path, ops: list[tuple], frames: Any) -> None:
    async with opened(path, cache_max_users=2, snapshot_every=3) as (m, store):
        for step, (kind, user, other, key, folder) in enumerate(ops):
            # a service connection (0) reads everyone; a user's connection only itself
            _check_replies(m, frames, scope=0 if step % 2 else user)
            tid = thread_id_for([user, other])
            try:
                if kind == "send":
                    await send(m, user, [other], f"{kind} {key}", key=key)
                elif kind == "deliver":
                    await deliver(m, user, other, "mail", key=key)
                elif kind in ("read", "unread"):
                    op = Op.MARK_READ if kind == "read" else Op.MARK_UNREAD
                    await m.execute(op, {"user": user, "thread_id": tid})
                elif kind == "move":
                    await m.execute(Op.MOVE, {"user": user, "thread_id": tid, "folder": folder})
                elif kind == "delete":
                    await m.execute(Op.DELETE, {"user": user, "thread_id": tid})
                elif kind == "seen":
                    await m.execute(Op.MARK_SEEN, {"user": user, "folder": folder})
                elif kind == "block" and user != other:
                    await m.execute(Op.BLOCK, {"user": user, "sender": other})
                elif kind == "evict":
                    await m.close()
                    m = Mailbox(store, settings=m.settings)  # type: ignore[arg-type]
            except (NotFound, BadRequest):
                pass
        _check_replies(m, frames, scope=0)
        await m.drain()
        for user in range(1, 5):
            before = await _view(m, user)
            report = await m.rebuild(user)
            assert report["ok"], report
            assert await _view(m, user) == before
