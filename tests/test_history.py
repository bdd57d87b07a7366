"""A user's past from the log (pyserver.app.history): the audit trail, the mailbox at a
time, and the restore, on the real SQLite store through the real mailbox; then the
restore through a served cell, as `pyserver admin restore` does it, read back through the
running server; and the operations' access rule (service connections only)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver import logcodec
from pyserver.app import history
from pyserver.app.auth import make_user_token
from pyserver.app.image import UserImage
from pyserver.app.mailbox import Mailbox, MailboxSettings
from pyserver.blobs.disk import DiskBlobStore
from pyserver.client import Client
from pyserver.discovery.client import connect_to_cluster
from pyserver.discovery.move import copy_log
from pyserver.errors import BadRequest, Forbidden
from pyserver.processes.cell import open_mailbox, open_store
from pyserver.servicekey import read_service_key
from pyserver.store.hbase import HBaseStore
from pyserver.store.sqlite import SQLiteStore
from pyserver.wire.ops import Op
from tests.hbase_namespaces import drop_made, fresh_namespace, wait_for_drops
from tests.support import cli, run, run_cli, serve_cell


def run_cli_module(*args: str) -> str:
    """`python -m ARGS`'s standard output; AssertionError (with its errors) if it fails."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# The clock the mailbox stamps entries with: one second per entry, from this moment.
T0 = 1_764_000_000 * 1_000_000
SECOND = 1_000_000


class Clock:
    """The time the mailbox stamps entries with; the tests move it on one second before
    each operation, so user 2's entry k is stamped T0 + k seconds."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def tick(self) -> None:
        self.now += SECOND


@asynccontextmanager
async def opened(
    path: Path, store: Any = None, **knobs: Any
) -> AsyncIterator[tuple[Mailbox, Any, Clock]]:
    """A mailbox on `store` (default: SQLite under `path`) whose clock the test moves."""
    store = store or SQLiteStore(path / "cell.sqlite", synchronous="OFF")
    await store.open()
    clock = Clock()
    mailbox = Mailbox(store, settings=MailboxSettings(**knobs), clock=clock)
    original = mailbox.execute

    async def execute(op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        clock.tick()
        return await original(op, payload)

    mailbox.execute = execute  # type: ignore[method-assign]
    try:
        yield mailbox, store, clock
    finally:
        await mailbox.close()
        await store.close()


@pytest.fixture(scope="module")
def _drop_hbase_tables() -> Iterator[None]:
    yield
    drop_made()
    wait_for_drops()


@pytest.fixture(params=["sqlite", "hbase"])
def engine(request: pytest.FixtureRequest) -> Any:
    """No store (the SQLite default), or one on HBase in a namespace of its own."""
    if request.param == "sqlite":
        return None
    request.getfixturevalue("_drop_hbase_tables")
    host, port = request.getfixturevalue("hbase_thrift")
    return HBaseStore(host, port, namespace=fresh_namespace(host, port, "history"))


async def send(m: Mailbox, sender: int, recipients: list[int], text: str) -> dict[str, Any]:
    payload = {"sender": sender, "recipients": recipients, "text": text, "channel": "chat"}
    return await m.execute(Op.SEND, payload)


async def replayed(store: Any, user: int, until: int) -> UserImage:
    """The image of the log's first `until` entries, replayed from empty (the reference)."""
    image = UserImage()
    for seq, record in await store.read_log(user, 0, until):
        entry = logcodec.decode(record)
        bodies = await store.get_messages(user, [entry.get("body_ref", "")])
        body = json.loads(bodies[entry["body_ref"]]) if entry.get("body_ref") in bodies else None
        image.apply(entry, body)
        assert entry["seq"] == seq
    return image


async def scenario(m: Mailbox) -> dict[str, Any]:
    """User 2's mailbox through a day: three threads, then marks, a move, deletions."""
    a = await send(m, 1, [2], "lunch on friday?")  # seq 1
    await send(m, 1, [2], "or saturday")  # seq 2
    b = await send(m, 3, [2], "the report is late")  # seq 3
    c = await send(m, 4, [2], "photos from the trip")  # seq 4
    await m.execute(Op.MARK_READ, {"user": 2, "thread_id": a["thread_id"]})  # seq 5
    return {"a": a, "b": b, "c": c}


# ---- times ----


def test_times_are_read_as_iso_8601_or_unix_seconds_exactly() -> None:
    assert history.parse_time("2025-11-24T16:00:00Z") == 1_764_000_000 * SECOND
    assert history.parse_time("2025-11-24T16:00:00") == 1_764_000_000 * SECOND
    assert history.parse_time("2025-11-24T17:00:00+01:00") == 1_764_000_000 * SECOND
    assert history.parse_time("2025-11-24T16:00:00.000001Z") == 1_764_000_000 * SECOND + 1
    assert history.parse_time("1764000000.000001") == 1_764_000_000 * SECOND + 1
    assert history.parse_time(1_764_000_000) == 1_764_000_000 * SECOND
    assert history.format_time(1_764_000_000 * SECOND) == "2025-11-24T16:00:00Z"
    for bad in ("yesterday", "", True, None, [1], "-5", float("nan")):
        with pytest.raises(BadRequest):
            history.parse_time(bad)


# ---- the audit trail ----


def test_the_history_lists_every_entry_in_words_with_its_time_and_channel(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, store, _):
            sent = await scenario(m)
            await m.execute(Op.DELETE, {"user": 2, "thread_id": sent["b"]["thread_id"]})
            page = await history.read_history(store, 2)
            items = page["entries"]
            assert [i["seq"] for i in items] == [1, 2, 3, 4, 5, 6]
            assert [i["action"] for i in items] == ["message_added"] * 4 + [
                "marked_read",
                "thread_deleted",
            ]
            assert [i["channel"] for i in items] == ["chat"] * 4 + [None, None]
            assert items[0]["ts"] == T0 + SECOND
            assert items[0]["time"] == history.format_time(T0 + SECOND)
            assert "from user 1 by chat, unread, filed in" in items[0]["what"]
            assert (
                items[4]["what"] == f"every message of thread {sent['a']['thread_id']} marked read"
            )
            assert items[5]["what"] == f"thread {sent['b']['thread_id']} deleted"
            assert all(i["restore"] is None for i in items)
            assert page["next"] is None and page["last_seq"] == 6
            # paged
            first = await history.read_history(store, 2, after=0, limit=4)
            assert [i["seq"] for i in first["entries"]] == [1, 2, 3, 4] and first["next"] == 4
            rest = await history.read_history(store, 2, after=first["next"], limit=4)
            assert [i["seq"] for i in rest["entries"]] == [5, 6] and rest["next"] is None
            # through the operation, as a service connection asks
            reply = await m.execute(Op.HISTORY, {"user": 2, "after": 4, "limit": 1})
            assert [i["seq"] for i in reply["entries"]] == [5] and reply["next"] == 5
            with pytest.raises(BadRequest):
                await m.execute(Op.HISTORY, {"user": 2, "after": -1})
            # filtered: one thread, or from a time on (a page may come back empty)
            a = sent["a"]["thread_id"]
            only = await history.read_history(store, 2, thread_id=a)
            assert [i["seq"] for i in only["entries"]] == [1, 2, 5] and only["next"] is None
            reply = await m.execute(Op.HISTORY, {"user": 2, "thread_id": a, "limit": 3})
            assert [i["seq"] for i in reply["entries"]] == [1, 2] and reply["next"] == 3
            reply = await m.execute(Op.HISTORY, {"user": 2, "thread_id": a, "after": 5})
            assert reply["entries"] == [] and reply["next"] is None
            since = history.format_time(T0 + 4 * SECOND)
            reply = await m.execute(Op.HISTORY, {"user": 2, "since": since, "limit": 2})
            assert reply["entries"] == [] and reply["next"] == 2
            reply = await m.execute(Op.HISTORY, {"user": 2, "since": since, "after": 2})
            assert [i["seq"] for i in reply["entries"]] == [4, 5, 6]
            with pytest.raises(BadRequest, match="since: "):
                await m.execute(Op.HISTORY, {"user": 2, "since": "soon"})

    run(go)


def test_a_history_page_and_a_show_stay_well_inside_a_frame(tmp_path: Path) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, _store, clock):
            for n in range(150):
                subject = f"{n} " + "s" * 4000
                payload = {"sender": 100 + n, "recipients": [2], "text": "x", "subject": subject}
                await m.execute(Op.SEND, {**payload, "channel": "email"})
            seen: list[int] = []
            after, pages = 0, 0
            while after is not None:
                page = await m.execute(Op.HISTORY, {"user": 2, "after": after, "limit": 1000})
                assert len(orjson.dumps(page)) <= history.REPLY_BUDGET + 16_384
                seen += [item["seq"] for item in page["entries"]]
                after, pages = page["next"], pages + 1
            assert seen == list(range(1, 151)) and pages > 1
            shown = await m.execute(Op.SHOW_AT, {"user": 2, "at": clock.now / SECOND,
                                                 "limit": 500})  # fmt: skip
            assert len(orjson.dumps(shown)) <= history.REPLY_BUDGET + 16_384
            listed = sum(len(f["threads"]) for f in shown["folders"].values())
            assert 0 < listed < 150 and shown["threads"] == 150
            assert any(f["more"] for f in shown["folders"].values())

    run(go)


# ---- the mailbox at a time ----


def test_show_at_a_time_is_the_log_replayed_up_to_it_even_past_a_newer_snapshot(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with opened(tmp_path, snapshot_every=1000) as (m, store, clock):
            sent = await scenario(m)
            await m.execute(Op.MOVE, {"user": 2, "thread_id": sent["c"]["thread_id"],
                                      "folder": "archived"})  # fmt: skip
            await m.execute(Op.DELETE, {"user": 2, "thread_id": sent["b"]["thread_id"]})
            # a snapshot newer than every TIME below but the last
            await store.write_snapshot(2, 7, (await replayed(store, 2, 7)).to_snapshot())
            for seq in range(0, 8):
                at = T0 + seq * SECOND  # entry `seq` was stamped T0 + seq seconds
                past = await history.image_at(store, 2, at)
                assert past.seq == seq
                assert past.image == await replayed(store, 2, seq), seq
                assert past.start == (7 if seq == 7 else 0)
            # half a second after entry 4: the prefix up to 4
            shown = history.show(await history.image_at(store, 2, T0 + 4 * SECOND + SECOND // 2))
            assert shown["seq"] == 4 and shown["threads"] == 3 and shown["messages"] == 4
            inbox = shown["folders"]["inbox"]
            assert inbox["total"] + shown["folders"]["other"]["total"] == 3
            # a snapshot older than TIME, inside the prefix, is where the replay starts
            await m.execute(Op.MARK_UNREAD, {"user": 2, "thread_id": sent["a"]["thread_id"]})
            newer = await history.image_at(store, 2, clock.now)
            assert (newer.start, newer.seq) == (7, 8)
            assert newer.image == await replayed(store, 2, 8)
            # through the operation, with an ISO time
            reply = await m.execute(
                Op.SHOW_AT, {"user": 2, "at": history.format_time(T0 + 3 * SECOND)}
            )
            assert reply["seq"] == 3 and reply["messages"] == 3

    run(go)


def test_show_refuses_a_time_before_what_a_compacted_log_keeps(tmp_path: Path) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, store, _):
            await scenario(m)
        # the mailbox's close left a snapshot at seq 5; entries 1..2 are compacted away
        with sqlite3.connect(tmp_path / "cell.sqlite") as db:
            removed = db.execute(
                "DELETE FROM log WHERE user = ? AND seq < ?",
                ((2).to_bytes(8, "big"), (3).to_bytes(8, "big")),
            ).rowcount
        assert removed == 2
        store = SQLiteStore(tmp_path / "cell.sqlite")
        await store.open()
        try:
            assert (await store.read_snapshot(2) or (0,))[0] == 5
            assert (await history.image_at(store, 2, T0 + 6 * SECOND)).start == 5
            # before the snapshot, the replay would need entries 1..2: refused
            with pytest.raises(history.PastUnavailable) as refused:
                await history.image_at(store, 2, T0 + 4 * SECOND)
            assert refused.value.earliest_us == T0 + 5 * SECOND
            assert "before seq 3 was compacted away" in str(refused.value)
            assert history.format_time(T0 + 5 * SECOND) in str(refused.value)
        finally:
            await store.close()
        # without the snapshot, no time can be shown at all
        with sqlite3.connect(tmp_path / "cell.sqlite") as db:
            assert db.execute("DELETE FROM snapshots").rowcount >= 1
        store = SQLiteStore(tmp_path / "cell.sqlite")
        await store.open()
        try:
            with pytest.raises(history.PastUnavailable) as refused:
                await history.image_at(store, 2, T0 + 60 * SECOND)
            assert refused.value.earliest_us is None
            assert "no snapshot covers it: no time can be shown" in str(refused.value)
        finally:
            await store.close()

    run(go)


# ---- the restore ----


def test_a_restore_appends_what_brings_the_mailbox_back_to_a_replay_of_that_time(
    tmp_path: Path, engine: Any
) -> None:
    async def go() -> None:
        async with opened(tmp_path, engine) as (m, store, _):
            sent = await scenario(m)
            at = T0 + 5 * SECOND  # after the mark, before what follows
            a, b, c = (sent[k]["thread_id"] for k in "abc")
            await m.execute(Op.DELETE, {"user": 2, "thread_id": b})  # a whole thread
            await m.execute(Op.DELETE, {"user": 2, "thread_id": a,
                                        "message_id": sent["a"]["message_id"]})  # fmt: skip
            await m.execute(Op.MOVE, {"user": 2, "thread_id": c, "folder": "spam"})
            await m.execute(Op.MARK_UNREAD, {"user": 2, "thread_id": a})
            await m.execute(Op.MARK_READ, {"user": 2, "thread_id": c})
            late = await send(m, 5, [2], "arrived after the time")  # kept by the restore
            before = await store.last_seq(2)

            report = await m.execute(Op.RESTORE, {"user": 2, "at": at / SECOND, "by": "test"})
            assert report["at_seq"] == 5 and report["first_seq"] == before + 1
            assert sorted(report["messages_restored"]) == sorted(
                [sent["a"]["message_id"], sent["b"]["message_id"]]
            )
            assert report["threads_moved"] == [c]
            assert report["missing_bodies"] == [] and report["missing_blobs"] == []

            past = await history.image_at(store, 2, at)
            assert past.image == await replayed(store, 2, 5)
            now = await m._resident.read(2)  # the served image, as reads see it
            view = history.restorable_view(now)
            assert view.pop(late["thread_id"])["messages"].keys() == {late["message_id"]}
            assert view == history.restorable_view(past.image)
            # the restored messages keep their own date and text
            restored = now.messages[sent["b"]["message_id"]]
            assert restored.ts == T0 + 3 * SECOND and restored.text == "the report is late"
            found = await m.execute(Op.SEARCH, {"user": 2, "query": "report late"})
            assert [f["message_id"] for f in found["messages"]] == [sent["b"]["message_id"]]
            # the log says the same from scratch, and the snapshot path agrees
            assert (await m.rebuild(2))["differences"] == []
            assert await replayed(store, 2, await store.last_seq(2)) == now

            # the restore is in the history, marked
            trail = (await history.read_history(store, 2, after=before))["entries"]
            assert trail and all(i["restore"] is not None for i in trail)
            assert trail[0]["restore"]["by"] == "test"
            assert trail[0]["restore"]["at"] == history.format_time(at)
            earlier = (await history.read_history(store, 2, limit=before))["entries"]
            assert all(i["restore"] is None for i in earlier)

            # nothing left to do: a second restore writes nothing
            again = await m.execute(Op.RESTORE, {"user": 2, "at": str(at / SECOND)})
            assert again["entries"] == 0 and await store.last_seq(2) == report["last_seq"]

    run(go, timeout=120)


def test_the_restore_marks_travel_with_the_log_when_a_user_moves_cells(tmp_path: Path) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, store, clock):
            sent = await send(m, 1, [2], "hello")
            at = clock.now
            await m.execute(Op.DELETE, {"user": 2, "thread_id": sent["thread_id"]})
            await m.execute(Op.RESTORE, {"user": 2, "at": at / SECOND, "by": "ops"})
            await send(m, 3, [2], "after the restore")  # the log goes on past it
            target = SQLiteStore(tmp_path / "other-cell.sqlite", synchronous="OFF")
            await target.open()
            try:
                await copy_log(store, target, 2)  # what `admin move-user` copies
                here = await history.read_history(store, 2)
                there = await history.read_history(target, 2)
                assert there == here
                assert [i["restore"] is not None for i in there["entries"]] == [
                    False, False, True, False
                ]  # fmt: skip
            finally:
                await target.close()

    run(go)


def test_a_thread_deleted_then_written_to_again_gets_its_old_messages_back(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, store, clock):
            await m.execute(Op.FRIEND_ADD, {"user": 1, "friend": 2})
            first = await send(m, 1, [2], "one")
            second = await send(m, 1, [2], "two")
            at = clock.now
            thread = first["thread_id"]
            await m.execute(Op.DELETE, {"user": 2, "thread_id": thread})
            third = await send(m, 1, [2], "three")  # the same thread, made anew
            assert third["thread_id"] == thread
            await m.execute(Op.MOVE, {"user": 2, "thread_id": thread, "folder": "archived"})
            report = await m.execute(Op.RESTORE, {"user": 2, "at": at / SECOND})
            assert report["threads_moved"] == [thread]
            assert report["messages_restored"] == [first["message_id"], second["message_id"]]
            now = await m._resident.read(2)
            past = await history.image_at(store, 2, at)
            view = history.restorable_view(now)
            assert view[thread]["messages"].pop(third["message_id"])["text"] == "three"
            assert view == history.restorable_view(past.image)
            assert view[thread]["folder"] == "inbox"

    run(go)


def test_a_restore_keeps_the_blobs_still_there_and_names_those_gone(tmp_path: Path) -> None:
    """A deleted message's blobs may be collected (`admin blob-gc`); a restore stores the
    ones still there again (their time refreshed, as any writer does) and names the rest."""

    async def go() -> None:
        blobs = DiskBlobStore(tmp_path / "blobs", durable=False)
        await blobs.open()
        store = SQLiteStore(tmp_path / "cell.sqlite", synchronous="OFF")
        await store.open()
        mailbox = Mailbox(store, blobs=blobs)
        try:
            kept = await blobs.put(b"the slides" * 100)
            lost = await blobs.put(b"the budget" * 100)
            sent = {}
            for sender, name, info in ((8, "kept", kept), (10, "lost", lost)):
                sent[name] = await mailbox.execute(Op.SEND, {
                    "sender": sender, "recipients": [9], "text": f"{name} file",
                    "channel": "email",
                    "attachments": [{"ref": info.ref, "name": name, "size": info.size}],
                })  # fmt: skip
            await asyncio.sleep(0.01)
            at = time.time()
            await asyncio.sleep(0.01)
            for name in sent:
                await mailbox.execute(Op.DELETE, {"user": 9, "thread_id": sent[name]["thread_id"]})
            week_ago = time.time() - 7 * 86_400
            os.utime(blobs.path_of(kept.ref), (week_ago, week_ago))
            assert await blobs.remove_if_stale(lost.ref, time.time())  # collected
            report = await mailbox.execute(Op.RESTORE, {"user": 9, "at": at})
            assert report["messages_restored"] == [sent[n]["message_id"] for n in ("kept", "lost")]
            assert report["missing_blobs"] == [
                {"message_id": sent["lost"]["message_id"], "ref": lost.ref}
            ]
            assert os.stat(blobs.path_of(kept.ref)).st_mtime > time.time() - 60, "refreshed"
            # the restored message's attachment reads again
            message_id = sent["kept"]["message_id"]
            reply = await mailbox.execute(
                Op.GET_BLOB, {"user": 9, "ref": kept.ref, "message_id": message_id}
            )
            assert reply["size"] == kept.size
        finally:
            await mailbox.close()
            await store.close()
            await blobs.close()

    run(go)


# One step of a random day of user 2's mailbox: (what, a correspondent or a pick, a folder).
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["receive", "send", "delete", "delete_thread", "move", "read",
                         "unread", "read_one", "seen", "now"]),
        st.integers(0, 50),
        st.sampled_from(["inbox", "other", "archived", "spam"]),
    ),
    min_size=1,
    max_size=40,
)  # fmt: skip


async def _random_day(folder: Path, steps: list[tuple[str, int, str]]) -> None:
    async with opened(folder) as (m, store, clock):
        await m.execute(Op.FRIEND_ADD, {"user": 2, "friend": 1})
        at = clock.now  # the moment restored to: the last "now" step (else the start)
        for what, pick, where in steps:
            image = await m._resident.read(2)
            threads = list(image.threads.values())
            messages = list(image.messages.values())
            thread = threads[pick % len(threads)] if threads else None
            message = messages[pick % len(messages)] if messages else None
            if what == "now":
                at = clock.now
                clock.tick()
            elif what == "receive":
                await send(m, (1, 3, 4, 5)[pick % 4], [2], f"to 2, {pick}")
            elif what == "send":
                await send(m, 2, [(1, 3, 4, 5)[pick % 4]], f"from 2, {pick}")
            elif thread is None or message is None:
                continue
            elif what == "delete":
                await m.execute(Op.DELETE, {"user": 2, "thread_id": message.thread_id,
                                            "message_id": message.message_id})  # fmt: skip
            elif what == "delete_thread":
                await m.execute(Op.DELETE, {"user": 2, "thread_id": thread.thread_id})
            elif what == "move":
                await m.execute(Op.MOVE, {"user": 2, "thread_id": thread.thread_id,
                                          "folder": where})  # fmt: skip
            elif what in ("read", "unread"):
                op = Op.MARK_READ if what == "read" else Op.MARK_UNREAD
                await m.execute(op, {"user": 2, "thread_id": thread.thread_id})
            elif what == "read_one":
                await m.execute(Op.MARK_READ, {"user": 2, "thread_id": message.thread_id,
                                               "message_id": message.message_id})  # fmt: skip
            elif what == "seen":
                await m.execute(Op.MARK_SEEN, {"user": 2, "folder": where})
        before = history.restorable_view(await m._resident.read(2))
        await m.execute(Op.RESTORE, {"user": 2, "at": str(at / SECOND)})
        now = history.restorable_view(await m._resident.read(2))
        past = history.restorable_view((await history.image_at(store, 2, at)).image)
        for thread_id, then in past.items():
            here = now[thread_id]
            assert here["folder"] == then["folder"], thread_id
            assert here["participants"] == then["participants"]
            for message_id, state in then["messages"].items():
                assert here["messages"][message_id] == state, message_id
        # nothing the mailbox held before the restore went away
        for thread_id, held in before.items():
            assert held["messages"].keys() <= now[thread_id]["messages"].keys()
        assert (await m.rebuild(2))["differences"] == []


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=STEPS)
def test_a_restore_after_any_day_gives_back_that_moments_mailbox(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, str]]
) -> None:
    run(lambda: _random_day(tmp_path_factory.mktemp("day"), steps))


def test_a_restored_mail_to_outside_addresses_is_not_sent_again(tmp_path: Path) -> None:
    async def go() -> None:
        async with opened(tmp_path) as (m, _store, _):
            sent = await m.execute(
                Op.SEND,
                {"sender": 7, "recipients": ["bob@example.org"], "text": "hello bob",
                 "channel": "email"},
            )  # fmt: skip
            image = await m._resident.read(7)
            assert image.pending_outbound() == [(sent["message_id"], ["bob@example.org"])]
            at = T0 + SECOND
            await m.execute(Op.DELETE, {"user": 7, "thread_id": sent["thread_id"]})
            report = await m.execute(Op.RESTORE, {"user": 7, "at": at / SECOND})
            assert report["messages_restored"] == [sent["message_id"]]
            image = await m._resident.read(7)
            assert image.pending_outbound() == [], "a restore sends nothing"
            delivery = image.messages[sent["message_id"]].extra["delivery"]
            assert delivery["bob@example.org"]["state"] == "failed"

    run(go)


# ---- the command line on a stopped cell, over an imported mailbox ----


def test_admin_restore_on_a_stopped_cell_brings_back_imported_mail_and_its_file(
    tmp_path: Path,
) -> None:
    """`pyserver import jsonl` fills a mailbox (dated messages, a file in the blob
    store); with no cell running, `admin restore --data` opens the store and the blob
    folder itself."""
    data = tmp_path / "cell"
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "plan.txt").write_text("the plan, in full\n" * 50)
    lines = [
        {"id": "a1", "from": 61, "to": [62], "ts": "2024-01-02T08:00:00Z", "text": "the plan",
         "channel": "email", "subject": "plan",
         "attachments": [{"path": "files/plan.txt", "name": "plan.txt", "type": "text/plain"}]},
        {"id": "a2", "from": 62, "to": [61], "ts": "2024-01-02T09:00:00Z", "text": "thanks",
         "channel": "email", "in_reply_to": "a1"},
    ]  # fmt: skip
    source = tmp_path / "history.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli("import", "jsonl", str(source), "--data", str(data), "--quiet")
    at = time.time()

    async def delete() -> dict[str, Any]:
        async with open_mailbox(data) as mailbox:
            listed = await mailbox.execute(Op.LIST_THREADS, {"user": 62, "folder": "inbox"})
            [thread] = listed["threads"]
            await mailbox.execute(Op.DELETE, {"user": 62, "thread_id": thread["thread_id"]})
            return thread

    thread = run(delete)
    assert thread["messages"] == 2
    done = json.loads(cli("admin", "restore", "--user", "62", "--at", str(at), "--json",
                          "--data", str(data)))  # fmt: skip
    assert len(done["messages_restored"]) == 2 and done["missing_blobs"] == []

    async def check() -> None:
        async with open_mailbox(data) as mailbox:
            listed = await mailbox.execute(Op.LIST_THREADS, {"user": 62, "folder": "inbox"})
            assert [t["thread_id"] for t in listed["threads"]] == [thread["thread_id"]]
            got = await mailbox.execute(
                Op.GET_THREAD, {"user": 62, "thread_id": thread["thread_id"]}
            )
            texts = sorted(m["text"].strip() for m in got["messages"])
            assert texts == ["thanks", "the plan"]
            [plan] = [m for m in got["messages"] if m["text"].strip() == "the plan"]
            assert plan["ts"] == history.parse_time("2024-01-02T08:00:00Z")
            [file] = plan["attachments"]
            # the file is back and its blob readable by the user's message
            reply = await mailbox.execute(
                Op.GET_MESSAGE, {"user": 62, "message_id": plan["message_id"]}
            )
            assert reply["extra"]["attachments"][0]["ref"] == file["ref"]

    run(check)
    trail = cli("admin", "history", "--user", "62", "--data", str(data))
    assert trail.count("[restore to") == 2


# ---- through a served cell: the CLI, the operations, their access rule ----


def test_admin_restore_on_a_running_cell_is_served_at_once(tmp_path: Path) -> None:
    data = tmp_path / "cell"
    proc, ready = serve_cell(data)
    try:

        async def before() -> dict[str, Any]:
            key = read_service_key(data)
            client = await Client.connect("127.0.0.1", ready["server"]["port"], service_key=key)
            try:
                await client.request(Op.FRIEND_ADD, {"user": 21, "friend": 22})
                first = await client.send(21, [22], "keep this one")
                second = await client.send(23, [22], "and this thread")
                again = await client.send(21, [22], "and this reply")
                await client.mark_read(22, first["thread_id"], first["message_id"])
                threads = await client.list_threads(22, "inbox")  # cached by the server now
                assert len(threads["threads"]) == 1
                time.sleep(0.05)
                at = time.time()
                time.sleep(0.05)
                await client.mark_unread(22, first["thread_id"])
                await client.delete(22, first["thread_id"], again["message_id"])
                await client.delete(22, first["thread_id"])
                await client.move(22, second["thread_id"], "archived")
                assert (await client.list_threads(22, "inbox"))["threads"] == []
                return {"at": at, "first": first, "second": second}
            finally:
                await client.close()

        state = run(before)
        at_iso = history.format_time(int(state["at"] * SECOND))
        shown = json.loads(cli("admin", "show", "--user", "22", "--at", at_iso, "--json",
                               "--data", str(data)))  # fmt: skip
        assert shown["threads"] == 2 and shown["messages"] == 3
        done = json.loads(cli("admin", "restore", "--user", "22", "--at", str(state["at"]),
                              "--json", "--data", str(data)))  # fmt: skip
        assert len(done["messages_restored"]) == 2
        assert done["threads_moved"] == [state["second"]["thread_id"]]
        trail = cli("admin", "history", "--user", "22", "--data", str(data))
        assert trail.count("[restore to ") == done["last_seq"] - done["first_seq"] + 1
        second = state["second"]["thread_id"]
        only = cli("admin", "history", "--user", "22", "--thread", second, "--data", str(data))
        assert (
            only.splitlines() == [line for line in trail.splitlines() if f"thread {second}" in line]
            and len(only.splitlines()) == 3
        )  # added, moved away, moved back
        assert "thread " + state["first"]["thread_id"] + " deleted" in trail

        async def after() -> None:
            key = read_service_key(data)
            client = await Client.connect("127.0.0.1", ready["server"]["port"], service_key=key)
            try:
                # what the running server serves now equals the log replayed up to TIME
                served: dict[str, Any] = {}
                for folder in ("inbox", "other", "archived", "sent", "spam"):
                    for summary in (await client.list_threads(22, folder))["threads"]:
                        thread = await client.get_thread(22, summary["thread_id"])
                        served[summary["thread_id"]] = {
                            "folder": folder,
                            "participants": summary["participants"],
                            "messages": {
                                m["message_id"]: {key: m[key] for key in
                                                  ("unread", "sender", "channel", "ts",
                                                   "subject", "text")}
                                for m in thread["messages"]
                            },
                        }  # fmt: skip
                async with open_store(data) as store:
                    past = await history.image_at(store, 22, int(state["at"] * SECOND))
                assert served == history.restorable_view(past.image)
                inbox = await client.list_threads(22, "inbox")
                assert [t["thread_id"] for t in inbox["threads"]] == [state["first"]["thread_id"]]
                assert inbox["threads"][0]["messages"] == 2
                other = await client.list_threads(22, "other")
                assert [t["thread_id"] for t in other["threads"]] == [state["second"]["thread_id"]]
                trail = await client.request(Op.HISTORY, {"user": 22})
                assert trail["entries"][-1]["restore"] is not None
                # a user token may not read or restore the past, even its own
                token = make_user_token(22, int(time.time()) + 600, read_service_key(data))
                user = await Client.connect("127.0.0.1", ready["server"]["port"], user_token=token)
                try:
                    for op in (Op.HISTORY, Op.SHOW_AT, Op.RESTORE):
                        with pytest.raises(Forbidden):
                            await user.request(op, {"user": 22, "at": state["at"]})
                finally:
                    await user.close()
            finally:
                await client.close()

        run(after)
        bad = run_cli("admin", "show", "--user", "22", "--at", "last week", "--data", str(data))
        assert bad.returncode == 2 and "neither unix seconds nor an ISO 8601 time" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_history_show_and_restore_reach_a_users_owner_in_a_cluster(
    tmp_path: Path, zookeeper: str
) -> None:
    """`--cluster DIR`: the commands go to the user's owner through discovery (two app
    servers, so the owner is found, not assumed), and the restore is served at once."""
    folder = str(tmp_path / "cluster")

    async def scenario() -> None:
        await asyncio.to_thread(
            cli, "cluster", "up", "--cluster", folder, "--engine", "sqlite", "--cells", "1",
            "--nodes", "2", "--session-timeout", "3",
        )  # fmt: skip
        try:
            cluster = await connect_to_cluster(folder)
            try:
                await cluster.request(Op.FRIEND_ADD, {"user": 31, "friend": 32})
                sent = await cluster.send(31, [32], "still here?")
                assert len((await cluster.list_threads(32, "inbox"))["threads"]) == 1
                await asyncio.sleep(0.05)
                at = time.time()
                await asyncio.sleep(0.05)
                await cluster.delete(32, sent["thread_id"])
                assert (await cluster.list_threads(32, "inbox"))["threads"] == []

                def admin(*args: str) -> dict[str, Any]:
                    out = cli("admin", *args, "--user", "32", "--cluster", folder, "--json")
                    return json.loads(out)

                shown = await asyncio.to_thread(admin, "show", "--at", str(at))
                assert shown["messages"] == 1 and shown["folders"]["inbox"]["total"] == 1
                done = await asyncio.to_thread(admin, "restore", "--at", str(at))
                assert done["messages_restored"] == [sent["message_id"]]
                trail = await asyncio.to_thread(admin, "history")
                assert [e["action"] for e in trail["entries"]] == [
                    "message_added", "thread_deleted", "message_added"
                ]  # fmt: skip
                assert trail["entries"][-1]["restore"]["at_seq"] == 1
                inbox = await cluster.list_threads(32, "inbox")
                assert [t["snippet"] for t in inbox["threads"]] == ["still here?"]
            finally:
                await cluster.close()
        finally:
            await asyncio.to_thread(cli, "cluster", "down", "--cluster", folder, "--grace", "10")

    run(scenario, timeout=240)


def test_bench_history_measures_show_history_and_restore_against_reading_the_log() -> None:
    done = run_cli_module("bench", "history", "--quick", "--json")
    figures = json.loads(done)["history"]
    assert figures["log_entries"] == 2_100 and figures["restored_messages"] == 400
    assert figures["show_ratio"] > 0 and figures["history_ratio"] > 0
    assert figures["ceiling_read_decode_entries_per_s"] > 0 and figures["restore_s"] > 0
