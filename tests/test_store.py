"""The store contract (pyserver.store.base), run against every engine.

Engine specifics live in the `engine` fixture: the embedded SQLite store, and
the HBase store on the real engine (`scripts/engines up hbase`; a fresh
namespace, that is fresh tables, per store a test opens). The tests after
"SQLite engine" look inside the embedded store (group commit, savepoints, fault
injection); tests/test_store_hbase.py looks inside the HBase one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver.errors import BadRequest
from pyserver.store.base import (
    ALL_TOKENS,
    Fenced,
    LogAppend,
    Revocation,
    Store,
    StoreUnavailable,
    WriteConflict,
)
from pyserver.store.hbase import HBaseStore
from pyserver.store.sqlite import SQLiteStore, index_path
from pyserver.store.sqlite_file import SQLiteFile

# "hbase-thrift2": the HBase store with its appends through the Thrift2 gateway
ENGINES = ["sqlite", "hbase", "hbase-thrift2"]
U64_MAX = 2**64 - 1
EXTREME_IDS = (0, 1, 2**63 - 1, 2**63, U64_MAX)
CRASH_WRITER = Path(__file__).with_name("store_crash_writer.py")


class Engine:
    """One store engine under test: how to build stores on one piece of backing data."""

    def __init__(
        self,
        name: str,
        root: Path,
        thrift: tuple[str, int] | None = None,
        commit_port: int | None = None,
    ) -> None:
        self.name = "hbase" if name == "hbase-thrift2" else name
        self.root = root
        self.thrift = thrift  # HBase's Thrift1 gateway
        self.commit_port = commit_port  # and its Thrift2 gateway, for the appends
        self._namespaces: dict[str, str] = {}

    def location(self, dataset: str = "main") -> str:
        if self.name == "sqlite":
            return str(self.root / f"{dataset}.db")
        if self.name == "hbase":
            host, port = self.hbase_address
            commits = "" if self.commit_port is None else f"+{self.commit_port}"
            return f"{host}:{port}{commits}/{self.namespace(dataset)}"
        raise AssertionError(self.name)

    @property
    def hbase_address(self) -> tuple[str, int]:
        assert self.thrift is not None
        return self.thrift

    def namespace(self, dataset: str) -> str:
        """The HBase namespace of a dataset: fresh tables for each test."""
        if dataset not in self._namespaces:
            self._namespaces[dataset] = fresh_namespace(*self.hbase_address)
        return self._namespaces[dataset]

    def new_store(self, dataset: str = "main") -> Store:
        """A new, unopened store object on `dataset` (same dataset: same data)."""
        if self.name == "sqlite":
            return SQLiteStore(self.location(dataset))
        if self.name == "hbase":
            host, port = self.hbase_address
            return HBaseStore(
                host, port, namespace=self.namespace(dataset), commit_port=self.commit_port
            )
        raise AssertionError(self.name)

    def examples(self, sqlite_examples: int) -> int:
        """Examples for a property test that opens a fresh store per example.

        Fresh HBase tables take about a second to create, so HBase runs fewer.
        """
        return sqlite_examples if self.name == "sqlite" else max(4, sqlite_examples // 4)

    @asynccontextmanager
    async def opened(self, dataset: str = "main") -> AsyncIterator[Store]:
        store = self.new_store(dataset)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "hbase":
        return Engine("hbase", tmp_path, request.getfixturevalue("hbase_thrift"))
    if request.param == "hbase-thrift2":
        thrift, thrift2 = (request.getfixturevalue(f) for f in ("hbase_thrift", "hbase_thrift2"))
        return Engine("hbase", tmp_path, thrift, commit_port=thrift2[1])
    return Engine(request.param, tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables(_hbase_drops_finished: None) -> Iterator[None]:
    yield
    drop_made()  # in the background, while the next module runs


@pytest.fixture(scope="session")
def _hbase_drops_finished() -> Iterator[None]:
    yield
    wait_for_drops()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    return Engine("sqlite", tmp_path)


def asyncio_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (fixtures pass through)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def entry(user_id: int, seq: int) -> bytes:
    return f"{user_id}:{seq}".encode()


def appending(user_id: int, expected_seq: int, count: int = 1, **extra: Any) -> LogAppend:
    seqs = range(expected_seq + 1, expected_seq + count + 1)
    return LogAppend(user_id, expected_seq, [entry(user_id, s) for s in seqs], **extra)


async def outcomes(*writes: Awaitable[None]) -> list[BaseException | None]:
    """Run writes concurrently; None for each that succeeded, else its exception."""
    results = await asyncio.gather(*writes, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def appended_cas(store: Store, user_id: int, payloads: list[bytes]) -> list[int]:
    """Append each payload with a compare-and-set retry loop; the seqs it got."""
    got = []
    seq = await store.last_seq(user_id)
    for payload in payloads:
        while True:
            try:
                await store.append(LogAppend(user_id, seq, [payload]))
            except WriteConflict as conflict:
                seq = conflict.actual_seq
                continue
            seq += 1
            got.append(seq)
            break
    return got


# ---- the contract, on every engine ----


@asyncio_test
async def test_an_empty_store_has_nothing(engine: Engine) -> None:
    async with engine.opened() as store:
        assert await store.last_seq(5) == 0
        assert await store.read_log(5) == []
        assert await store.read_snapshot(5) is None
        assert await store.get_messages(5, ["m1"]) == {}
        assert await store.search(5, ["hello"]) == []
        assert await store.get_cell(5) is None
        assert await store.count_users_by_cell() == {}
        assert await store.friends(5) == set()
        assert await store.resolve_address("nobody@example.com") is None
        assert await store.user_ids() == []


@asyncio_test
async def test_append_then_read_the_log(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.append(appending(42, 0, count=3))
        await store.append(appending(42, 3, count=2))
        assert await store.last_seq(42) == 5
        full = [(s, entry(42, s)) for s in range(1, 6)]
        assert await store.read_log(42) == full
        assert await store.read_log(42, after_seq=3) == full[3:]
        assert await store.read_log(42, after_seq=1, limit=2) == full[1:3]
        assert await store.read_log(42, after_seq=5) == []
        assert await store.read_log(42, limit=0) == []
        assert await store.read_log(43) == []


@asyncio_test
async def test_an_append_of_messages_and_terms_only_moves_nothing_in_the_log(
    engine: Engine,
) -> None:
    async with engine.opened() as store:
        await store.append(LogAppend(1, 0, [], messages={"m": b"x"}, terms=[("t", "m")]))
        assert await store.last_seq(1) == 0
        assert await store.get_messages(1, ["m"]) == {"m": b"x"}
        assert await store.user_ids() == []  # a user with a log has at least one entry
        with pytest.raises(WriteConflict):
            await store.append(LogAppend(1, 1, []))


@asyncio_test
async def test_a_claim_fences_the_appends_of_every_earlier_owner(engine: Engine) -> None:
    async with engine.opened() as old_owner, engine.opened() as new_owner:
        assert await old_owner.claim(5) == 1  # a user with no log can be claimed
        assert await old_owner.user_ids() == []  # and has no log for it
        await old_owner.append(appending(5, 0, owner_epoch=1))
        await old_owner.append(appending(5, 1, 2, owner_epoch=1, messages={"m": b"x"}))
        # another server claims the user and reads the log, but writes nothing yet
        assert await new_owner.claim(5) == 2
        assert await new_owner.last_seq(5) == 3
        # the earlier owner's append at the right seq is refused: it is fenced
        with pytest.raises(Fenced) as fenced:
            await old_owner.append(appending(5, 3, owner_epoch=1, messages={"late": b"x"}))
        assert isinstance(fenced.value, WriteConflict)  # a conflict: reload, re-check
        assert (fenced.value.epoch, fenced.value.current_epoch) == (1, 2)
        assert await new_owner.last_seq(5) == 3
        assert await old_owner.get_messages(5, ["late"]) == {}
        # a big batch (HBase stages it apart) is fenced as well, and leaves nothing
        big = LogAppend(5, 3, [b"x" * (300 << 10)] * 4, owner_epoch=1)
        with pytest.raises(Fenced):
            await old_owner.append(big)
        # the new owner writes on; appends without an epoch (imports, moves) check the
        # seq alone; claims go on rising, per user
        await new_owner.append(appending(5, 3, owner_epoch=2))
        await old_owner.append(appending(5, 4))
        with pytest.raises(WriteConflict):
            await old_owner.append(appending(5, 4, owner_epoch=2))
        assert await old_owner.claim(5) == 3
        assert await new_owner.claim(6) == 1
        assert [seq for seq, _ in await new_owner.read_log(5)] == [1, 2, 3, 4, 5]
    async with engine.opened() as reopened:  # the epoch is durable
        assert await reopened.claim(5) == 4


@asyncio_test
async def test_messages_and_search_terms_are_per_user(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.append(
            appending(
                1,
                0,
                messages={"m1": b'{"body": "hello world"}', "m2": b'{"body": "hello"}'},
                terms=[("hello", "m1"), ("world", "m1"), ("hello", "m2")],
            )
        )
        await store.append(appending(2, 0, messages={"m1": b"other"}, terms=[("world", "m9")]))
        assert await store.get_messages(1, ["m1", "m2", "missing"]) == {
            "m1": b'{"body": "hello world"}',
            "m2": b'{"body": "hello"}',
        }
        assert await store.get_messages(2, ["m1", "m2"]) == {"m1": b"other"}
        assert await store.get_messages(1, []) == {}
        assert await store.search(1, ["hello"]) == ["m1", "m2"]
        assert await store.search(1, []) == []
        assert await store.search(1, ["hello", "world"]) == ["m1"]
        assert await store.search(1, ["world", "world"]) == ["m1"]
        assert await store.search(1, ["hello", "nowhere"]) == []
        assert await store.search(2, ["world"]) == ["m9"]
        assert await store.search(2, ["hello"]) == []


@asyncio_test
async def test_the_search_index_is_written_beside_the_log_with_a_mark_that_only_rises(
    engine: Engine,
) -> None:
    async with engine.opened() as store:
        await store.append(appending(1, 0, count=3, messages={"m1": b"a", "m2": b"b"}))
        assert await store.indexed_seq(1) == 0
        assert await store.search(1, ["lunch"]) == []
        await store.index_terms(1, 2, [("lunch", "m1"), ("friday", "m1"), ("lunch", "m2")])
        assert await store.indexed_seq(1) == 2
        assert await store.search(1, ["lunch"]) == ["m1", "m2"]
        assert await store.search(1, ["lunch", "friday"]) == ["m1"]
        await store.index_terms(1, 1, [("late", "m2")])  # a late, lower mark: terms kept
        assert await store.indexed_seq(1) == 2
        assert await store.search(1, ["late"]) == ["m2"]
        await store.index_terms(1, 3, [])  # the mark alone
        await store.index_terms(1, 3, [("lunch", "m1")])  # idempotent
        assert await store.indexed_seq(1) == 3
        assert await store.search(1, ["lunch"]) == ["m1", "m2"]
        assert await store.indexed_seq(2) == 0  # per user
        assert await store.search(2, ["lunch"]) == []
        await store.index_terms(U64_MAX, U64_MAX, [("edge", "m")])
        assert await store.indexed_seq(U64_MAX) == U64_MAX
        for bad in (-1, U64_MAX + 1):
            with pytest.raises(ValueError):
                await store.index_terms(1, bad, [])
        assert await store.indexed_seq(1) == 3


@asyncio_test
async def test_many_users_index_writes_go_in_at_once_with_marks_that_only_rise(
    engine: Engine,
) -> None:
    async with engine.opened() as store:
        await store.index_terms(3, 5, [("old", "m0")])
        await store.index_terms_many(
            [(1, 2, [("lunch", "m1"), ("friday", "m1")]), (2, 1, [("lunch", "m9")]),
             (3, 4, [("lower", "m3")]), (4, 7, [])]
        )  # fmt: skip
        assert [await store.indexed_seq(u) for u in (1, 2, 3, 4)] == [2, 1, 5, 7]
        assert await store.search(1, ["lunch", "friday"]) == ["m1"]
        assert await store.search(2, ["lunch"]) == ["m9"]
        assert await store.search(3, ["lower"]) == ["m3"]  # terms kept under a higher mark
        with pytest.raises(ValueError):
            await store.index_terms_many([(5, 1, []), (6, -1, [])])


@asyncio_test
async def test_a_later_append_replaces_a_message_body(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.append(appending(1, 0, messages={"m": b"draft"}))
        await store.append(appending(1, 1, messages={"m": b"final"}))
        assert await store.get_messages(1, ["m"]) == {"m": b"final"}


@asyncio_test
async def test_a_stale_append_is_a_write_conflict_and_writes_nothing(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.append(appending(9, 0, count=2))
        for stale in (0, 1, 3, 100):
            with pytest.raises(WriteConflict) as caught:
                await store.append(
                    appending(9, stale, messages={"lost": b"x"}, terms=[("lost", "lost")])
                )
            assert (caught.value.user_id, caught.value.expected_seq) == (9, stale)
            assert caught.value.actual_seq == 2
            assert caught.value.code == "CONFLICT"
        assert await store.read_log(9) == [(1, entry(9, 1)), (2, entry(9, 2))]
        assert await store.get_messages(9, ["lost"]) == {}
        assert await store.search(9, ["lost"]) == []
        await store.append(appending(9, 2))
        assert await store.last_seq(9) == 3


@asyncio_test
async def test_a_conflict_does_not_fail_the_writes_around_it(engine: Engine) -> None:
    async with engine.opened() as store:
        results = await outcomes(
            store.append(appending(1, 0)),
            store.append(appending(2, 7)),
            store.append(appending(3, 0, messages={"m": b"kept"})),
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], WriteConflict)
        assert [await store.last_seq(u) for u in (1, 2, 3)] == [1, 0, 1]
        assert await store.get_messages(3, ["m"]) == {"m": b"kept"}


@asyncio_test
async def test_concurrent_appends_of_one_entry_exactly_one_wins(engine: Engine) -> None:
    async with engine.opened() as store:
        writes = [LogAppend(77, 0, [f"writer {i}".encode()]) for i in range(16)]
        results = await outcomes(*(store.append(w) for w in writes))
        winners = [w for w, r in zip(writes, results, strict=True) if r is None]
        assert len(winners) == 1
        assert all(isinstance(r, WriteConflict) and r.actual_seq == 1 for r in results if r)
        assert await store.read_log(77) == [(1, winners[0].records[0])]


@asyncio_test
async def test_concurrent_compare_and_set_loops_leave_no_gap(engine: Engine) -> None:
    async with engine.opened() as store:
        payloads = {t: [f"{t}/{i}".encode() for i in range(8)] for t in range(8)}
        got = await asyncio.gather(*(appended_cas(store, 5, p) for p in payloads.values()))
        log = await store.read_log(5)
        assert [seq for seq, _ in log] == list(range(1, 65))
        stored = dict(log)
        for task_payloads, seqs in zip(payloads.values(), got, strict=True):
            assert [stored[s] for s in seqs] == task_payloads


@asyncio_test
async def test_two_stores_on_the_same_data_never_both_append_an_entry(engine: Engine) -> None:
    # Two nodes that both believe they own user 3 (DESIGN.md "Ownership and fencing").
    async with engine.opened() as node_a, engine.opened() as node_b:
        results = await outcomes(
            *(
                node.append(LogAppend(3, 0, [name]))
                for node, name in [(node_a, b"a"), (node_b, b"b")] * 4
            )
        )
        assert results.count(None) == 1
        assert all(isinstance(r, WriteConflict) for r in results if r)
        assert await node_a.read_log(3) == await node_b.read_log(3)
        assert len(await node_b.read_log(3)) == 1


@asyncio_test
async def test_many_concurrent_appends_to_many_users_all_land(engine: Engine) -> None:
    async with engine.opened() as store:
        users = range(1000, 1064)

        async def user_writes(user_id: int) -> None:
            for seq in range(3):
                await store.append(appending(user_id, seq))

        await asyncio.gather(*(user_writes(u) for u in users))
        for user_id in users:
            assert await store.read_log(user_id) == [(s, entry(user_id, s)) for s in (1, 2, 3)]


@asyncio_test
async def test_a_snapshot_never_goes_back_in_time(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.write_snapshot(4, 10, b"image@10")
        assert await store.read_snapshot(4) == (10, b"image@10")
        await store.write_snapshot(4, 9, b"image@9")
        assert await store.read_snapshot(4) == (10, b"image@10")
        await store.write_snapshot(4, 2**40, b"image@2^40")
        assert await store.read_snapshot(4) == (2**40, b"image@2^40")
        await store.write_snapshot(4, 2**40, b"rewritten@2^40")
        assert await store.read_snapshot(4) == (2**40, b"rewritten@2^40")
        # Big-endian keys: 256 is newer than 255 although its first byte is smaller.
        await store.write_snapshot(5, 255, b"image@255")
        await store.write_snapshot(5, 256, b"image@256")
        await store.write_snapshot(5, 1, b"image@1")
        assert await store.read_snapshot(5) == (256, b"image@256")
        assert await store.read_snapshot(6) is None


@asyncio_test
async def test_the_directory_places_users_in_cells(engine: Engine) -> None:
    async with engine.opened() as store:
        for user_id, cell in [(1, "cell-a"), (2, "cell-a"), (3, "cell-b"), (U64_MAX, "cell-b")]:
            await store.set_cell(user_id, cell)
        assert await store.get_cell(1) == "cell-a"
        assert await store.count_users_by_cell() == {"cell-a": 2, "cell-b": 2}
        await store.set_cell(1, "cell-b")
        assert await store.get_cell(1) == "cell-b"
        assert await store.count_users_by_cell() == {"cell-a": 1, "cell-b": 3}
        assert await store.users_in_cell("cell-b") == [1, 3, U64_MAX]
        assert await store.users_in_cell("cell-a") == [2]
        assert await store.users_in_cell("cell-none") == []


@asyncio_test
async def test_placing_a_user_keeps_the_first_writers_cell(engine: Engine) -> None:
    async with engine.opened() as store:
        assert await store.place_cell(10, "cell-a") == "cell-a"
        assert await store.place_cell(10, "cell-b") == "cell-a"  # placed already: kept
        assert await store.get_cell(10) == "cell-a"
        # many placements of new users at once: each user ends in exactly one cell, the
        # same for every writer
        users = range(20, 40)
        answers = await asyncio.gather(
            *(store.place_cell(user, cell) for user in users for cell in ("cell-x", "cell-y"))
        )
        for index, user in enumerate(users):
            first, second = answers[2 * index], answers[2 * index + 1]
            assert first == second == await store.get_cell(user)
        with pytest.raises(BadRequest):
            await store.place_cell(-1, "cell-a")


@asyncio_test
async def test_friendships_are_mutual_and_idempotent(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.add_friend(1, 2)
        await store.add_friend(2, 1)
        await store.add_friend(1, 3)
        assert await store.friends(1) == {2, 3}
        assert await store.friends(2) == {1}
        assert await store.friends(3) == {1}
        await store.remove_friend(2, 1)
        await store.remove_friend(2, 1)
        assert await store.friends(1) == {3}
        assert await store.friends(2) == set()
        with pytest.raises(BadRequest):
            await store.add_friend(4, 4)
        assert await store.friends(4) == set()


@asyncio_test
async def test_revocations_are_kept_and_replaced_per_token(engine: Engine) -> None:
    async with engine.opened() as store:
        assert await store.revocations() == []
        await store.revoke(Revocation(7, "0123456789abcdef", 1_700_000_000.25))
        await store.revoke(Revocation(7, ALL_TOKENS, 1_700_000_100.0))
        await store.revoke(Revocation(2**64 - 1, "fedcba9876543210", 1_700_000_200.5))
        await store.revoke(Revocation(7, "0123456789abcdef", 1_700_000_300.0))  # again, later
        found = sorted(await store.revocations(), key=lambda r: (r.user_id, r.token_id))
        assert found == [
            Revocation(7, ALL_TOKENS, 1_700_000_100.0),
            Revocation(7, "0123456789abcdef", 1_700_000_300.0),
            Revocation(2**64 - 1, "fedcba9876543210", 1_700_000_200.5),
        ]
        with pytest.raises(BadRequest):
            await store.revoke(Revocation(-1, ALL_TOKENS, 1.0))


@asyncio_test
async def test_addresses_resolve_case_insensitively(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.add_address("Alice@Example.COM", 10)
        await store.add_address("+15551234567", 11)
        await store.add_address("Straße@example.org", 12)
        assert await store.resolve_address("alice@example.com") == 10
        assert await store.resolve_address("ALICE@EXAMPLE.COM") == 10
        assert await store.resolve_address("+15551234567") == 11
        assert await store.resolve_address("STRASSE@EXAMPLE.ORG") == 12
        assert await store.resolve_address("bob@example.com") is None
        await store.add_address("ALICE@example.com", 13)
        assert await store.resolve_address("alice@example.com") == 13
        with pytest.raises(BadRequest):
            await store.add_address("", 1)


@asyncio_test
async def test_user_ids_lists_users_with_a_log_in_numeric_order(engine: Engine) -> None:
    async with engine.opened() as store:
        for user_id in reversed(EXTREME_IDS):
            await store.append(appending(user_id, 0))
        await store.write_snapshot(555, 1, b"snapshot only")
        await store.set_cell(556, "cell-a")
        assert await store.user_ids() == list(EXTREME_IDS)


@asyncio_test
async def test_extreme_user_ids_keep_their_data_apart(engine: Engine) -> None:
    async with engine.opened() as store:
        for n, user_id in enumerate(EXTREME_IDS, start=1):
            await store.append(
                appending(
                    user_id, 0, count=n, messages={"m": entry(user_id, 0)}, terms=[("t", "m")]
                )
            )
            await store.write_snapshot(user_id, n, entry(user_id, n))
            await store.set_cell(user_id, f"cell-{n}")
            await store.add_address(f"user{n}@example.com", user_id)
        await store.add_friend(0, U64_MAX)
        for n, user_id in enumerate(EXTREME_IDS, start=1):
            assert await store.last_seq(user_id) == n
            assert await store.read_log(user_id) == [
                (s, entry(user_id, s)) for s in range(1, n + 1)
            ]
            assert await store.read_snapshot(user_id) == (n, entry(user_id, n))
            assert await store.get_messages(user_id, ["m"]) == {"m": entry(user_id, 0)}
            assert await store.search(user_id, ["t"]) == ["m"]
            assert await store.get_cell(user_id) == f"cell-{n}"
            assert await store.resolve_address(f"USER{n}@example.com") == user_id
        assert await store.friends(0) == {U64_MAX}
        assert await store.friends(U64_MAX) == {0}


@asyncio_test
async def test_ids_outside_the_u64_range_are_refused_before_any_write(engine: Engine) -> None:
    async with engine.opened() as store:
        for bad in (-1, 2**64):
            with pytest.raises(ValueError):
                await store.append(appending(bad, 0))
            with pytest.raises(ValueError):
                await store.last_seq(bad)
            with pytest.raises(ValueError):
                await store.set_cell(bad, "cell")
            with pytest.raises(ValueError):
                await store.add_friend(1, bad)
        with pytest.raises(ValueError):
            await store.append(LogAppend(1, U64_MAX, [b"one too many"]))
        with pytest.raises(TypeError):
            await store.append(LogAppend(1, 0, ["text, not bytes"]))  # type: ignore[list-item]
        assert await store.user_ids() == []
        assert await store.count_users_by_cell() == {}


@asyncio_test
async def test_big_records_messages_and_snapshots_round_trip(engine: Engine) -> None:
    record = os.urandom(2 << 20)
    body = os.urandom(6 << 20)
    image = os.urandom(12 << 20)
    async with engine.opened() as store:
        await store.append(LogAppend(8, 0, [record, b""], messages={"big": body}))
        await store.write_snapshot(8, 2, image)
        assert await store.read_log(8) == [(1, record), (2, b"")]
        assert await store.get_messages(8, ["big"]) == {"big": body}
        assert await store.read_snapshot(8) == (2, image)


@asyncio_test
async def test_reopening_keeps_everything(engine: Engine) -> None:
    async with engine.opened() as store:
        await store.append(appending(U64_MAX, 0, count=2, messages={"m": b"b"}, terms=[("t", "m")]))
        await store.write_snapshot(U64_MAX, 2, b"image")
        await store.set_cell(U64_MAX, "cell-z")
        await store.add_friend(U64_MAX, 0)
        await store.add_address("Z@example.com", U64_MAX)
    async with engine.opened() as store:
        assert await store.read_log(U64_MAX) == [(1, entry(U64_MAX, 1)), (2, entry(U64_MAX, 2))]
        assert await store.get_messages(U64_MAX, ["m"]) == {"m": b"b"}
        assert await store.search(U64_MAX, ["t"]) == ["m"]
        assert await store.read_snapshot(U64_MAX) == (2, b"image")
        assert await store.get_cell(U64_MAX) == "cell-z"
        assert await store.friends(0) == {U64_MAX}
        assert await store.resolve_address("z@EXAMPLE.com") == U64_MAX
        assert await store.user_ids() == [U64_MAX]
        await store.append(appending(U64_MAX, 2))


@asyncio_test
async def test_open_and_close_are_safe_twice_and_a_closed_store_refuses_work(
    engine: Engine,
) -> None:
    store = engine.new_store()
    with pytest.raises(StoreUnavailable):
        await store.last_seq(1)
    assert await store.healthy() is False
    await store.open()
    await store.open()
    assert await store.healthy() is True
    await store.append(appending(1, 0))
    await store.close()
    await store.close()
    assert await store.healthy() is False
    with pytest.raises(StoreUnavailable):
        await store.append(appending(1, 1))
    with pytest.raises(StoreUnavailable):
        await store.read_log(1)
    await store.open()
    assert await store.last_seq(1) == 1
    await store.close()


@asyncio_test
async def test_close_finishes_the_pending_writes_first(engine: Engine) -> None:
    store = engine.new_store()
    await store.open()
    pending = [asyncio.create_task(store.append(appending(u, 0))) for u in range(200)]
    await asyncio.sleep(0)  # every task has queued its write
    await store.close()
    assert [t.result() for t in pending] == [None] * 200
    async with engine.opened() as reopened:
        assert await reopened.user_ids() == list(range(200))


def test_appends_match_a_model_of_compare_and_set(engine: Engine) -> None:
    @settings(
        max_examples=engine.examples(25),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        st.lists(
            st.tuples(st.sampled_from([0, 3, U64_MAX]), st.integers(-1, 1), st.integers(0, 3)),
            max_size=12,
        )
    )
    def check(steps: list[tuple[int, int, int]]) -> None:
        asyncio.run(compare_and_set_scenario(engine, steps))

    check()


async def compare_and_set_scenario(engine: Engine, steps: list[tuple[int, int, int]]) -> None:
    model: dict[int, list[bytes]] = {}
    async with engine.opened(dataset=uuid.uuid4().hex) as store:
        for user_id, skew, count in steps:
            log = model.setdefault(user_id, [])
            expected = max(len(log) + skew, 0)
            write = LogAppend(user_id, expected, [os.urandom(4) for _ in range(count)])
            if expected == len(log):
                await store.append(write)
                log.extend(write.records)
            else:
                with pytest.raises(WriteConflict):
                    await store.append(write)
        for user_id, log in model.items():
            assert await store.read_log(user_id) == list(enumerate(log, start=1))
            assert await store.last_seq(user_id) == len(log)
        assert await store.user_ids() == sorted(u for u, log in model.items() if log)


def test_acknowledged_appends_survive_sigkill(engine: Engine) -> None:
    location = engine.location("crash")
    for _round in range(2):
        acked = crash_writer_acknowledgements(engine.name, location, wanted=300)
        assert len(acked) >= 300
        assert len(set(acked)) == len(acked), "an append was acknowledged twice"
        asyncio.run(check_crash_survivors(engine, acked))


def crash_writer_acknowledgements(
    engine_name: str, location: str, wanted: int
) -> list[tuple[int, int]]:
    """Run the crash writer, SIGKILL it after `wanted` acknowledgements; every (user, seq) acked."""
    writer = subprocess.Popen(
        [sys.executable, str(CRASH_WRITER), engine_name, location],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 15
    assert writer.stdout is not None
    while len(lines) < wanted and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if not line:
            break
        lines.append(line)
    writer.send_signal(signal.SIGKILL)
    rest, errors = writer.communicate()
    assert writer.returncode == -signal.SIGKILL, errors
    lines.extend(rest.splitlines(keepends=True))
    acked = []
    for line in lines:
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged yet
            user_id, first, last = map(int, line.split())
            acked.extend((user_id, seq) for seq in range(first, last + 1))
    return acked


async def check_crash_survivors(engine: Engine, acked: list[tuple[int, int]]) -> None:
    async with engine.opened("crash") as store:
        for user_id in {user_id for user_id, _ in acked}:
            log = await store.read_log(user_id)
            seqs = [seq for seq, _ in log]
            assert seqs == list(range(1, len(seqs) + 1)), f"a gap in the log of {user_id}"
            assert all(record == entry(user_id, seq) for seq, record in log)
            messages = await store.get_messages(user_id, [f"m{seq}" for seq in seqs])
            assert len(messages) == len(seqs), "an append was torn: log without its messages"
            assert max(seq for u, seq in acked if u == user_id) <= len(seqs), (
                f"an acknowledged append of user {user_id} was lost"
            )


# ---- SQLite engine: group commit, savepoints, fault injection ----


def test_the_sqlite_store_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        SQLiteStore(":memory:")
    assert SQLiteStore(tmp_path / "x.db", synchronous="normal").path == str(tmp_path / "x.db")


@asyncio_test
async def test_concurrent_writes_share_commits(sqlite_engine: Engine) -> None:
    async with sqlite_engine.opened() as store:
        assert isinstance(store, SQLiteStore)
        before_commits, before_writes = store.commits, store.writes

        async def user_writes(user_id: int) -> None:
            for seq in range(4):
                await store.append(appending(user_id, seq))

        await asyncio.gather(*(user_writes(u) for u in range(64)))
        commits = store.commits - before_commits
        assert store.writes - before_writes == 256
        assert commits <= 256 // 4, f"{commits} commits for 256 concurrent writes"


@asyncio_test
async def test_appends_of_one_batch_see_each_other(sqlite_engine: Engine) -> None:
    async with sqlite_engine.opened() as store:
        # Queued in order, so the writer runs them in order, whatever batches they fall in.
        results = await outcomes(*(store.append(appending(6, seq)) for seq in range(10)))
        assert results == [None] * 10
        assert [seq for seq, _ in await store.read_log(6)] == list(range(1, 11))


def install_fault(location: str, message_id: str) -> None:
    """A trigger that makes storing the message `message_id` fail inside SQLite."""
    with sqlite3.connect(location) as conn:
        conn.execute(
            "CREATE TRIGGER injected_fault BEFORE INSERT ON messages"
            f" WHEN NEW.message_id = '{message_id}'"
            " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
    conn.close()


@asyncio_test
async def test_a_failing_write_is_rolled_back_alone(sqlite_engine: Engine) -> None:
    async with sqlite_engine.opened() as store:
        install_fault(sqlite_engine.location(), "poison")
        results = await outcomes(
            store.append(appending(1, 0, messages={"fine": b"1"})),
            store.append(appending(2, 0, count=3, messages={"poison": b"2"}, terms=[("t", "x")])),
            store.append(appending(3, 0, messages={"fine": b"3"})),
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], StoreUnavailable)
        assert isinstance(results[1].__cause__, sqlite3.Error)
        # The log rows went in before the message failed; the savepoint took them out.
        assert await store.read_log(2) == []
        assert await store.search(2, ["t"]) == []
        assert await store.last_seq(1) == await store.last_seq(3) == 1
        await store.append(appending(2, 0, messages={"fine": b"2"}))


@asyncio_test
async def test_a_batch_run_again_after_a_failure_claims_once(sqlite_engine: Engine) -> None:
    # The failing write sends its whole batch back to run write by write; a claim in
    # that batch is made once, and answers the epoch that was committed.
    async with sqlite_engine.opened() as store:
        install_fault(sqlite_engine.location(), "poison")
        results = await asyncio.gather(
            store.claim(4),
            store.append(appending(2, 0, messages={"poison": b"2"})),
            store.append(appending(5, 0)),
            return_exceptions=True,
        )
        assert results[0] == 1 and results[2] is None
        assert isinstance(results[1], StoreUnavailable)
        assert await store.claim(4) == 2


@asyncio_test
async def test_a_failed_commit_fails_every_write_of_its_batch(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    first_commit_started, others_queued = threading.Event(), threading.Event()
    real_commit = SQLiteFile._commit

    def commit_then_fail(self: SQLiteFile, conn: sqlite3.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_commit_started.set()
            others_queued.wait(5)  # so the second batch holds every other write
            real_commit(self, conn)
        elif calls == 2:
            raise sqlite3.OperationalError("disk I/O error (injected)")
        else:
            real_commit(self, conn)

    monkeypatch.setattr(SQLiteFile, "_commit", commit_then_fail)
    async with sqlite_engine.opened() as store:
        first = asyncio.ensure_future(store.append(appending(0, 0)))
        assert await asyncio.to_thread(first_commit_started.wait, 5)
        others = [asyncio.ensure_future(store.append(appending(u, 0))) for u in range(1, 20)]
        await asyncio.sleep(0)  # every write is queued
        others_queued.set()
        results = await outcomes(first, *others)
        assert calls == 2
        assert results[0] is None
        for failure in results[1:]:
            assert isinstance(failure, StoreUnavailable)
            assert isinstance(failure.__cause__, sqlite3.OperationalError)
        assert await store.user_ids() == [0]
        failed = list(range(1, 20))
        # The writer goes on after a failed commit.
        await store.append(appending(failed[0], 0))
        assert await store.last_seq(failed[0]) == 1


@asyncio_test
async def test_reads_do_not_wait_behind_the_writer(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    committing = threading.Event()
    real_commit = SQLiteFile._commit

    def slow_commit(self: SQLiteFile, conn: sqlite3.Connection) -> None:
        committing.set()
        time.sleep(1.0)
        real_commit(self, conn)

    async with sqlite_engine.opened() as store:
        await store.append(appending(1, 0))
        monkeypatch.setattr(SQLiteFile, "_commit", slow_commit)
        write = asyncio.create_task(store.append(appending(1, 1)))
        assert await asyncio.to_thread(committing.wait, 5)
        started = time.monotonic()
        assert await store.last_seq(1) == 1  # the open transaction is not visible
        assert await store.read_log(1) == [(1, entry(1, 1))]
        assert time.monotonic() - started < 0.5
        assert not write.done()
        await write
        assert await store.last_seq(1) == 2


@asyncio_test
async def test_sqlite_errors_surface_as_store_unavailable(tmp_path: Path) -> None:
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is not an SQLite database file, " * 200)
    with pytest.raises(StoreUnavailable) as caught:
        await SQLiteStore(not_a_database).open()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert caught.value.code == "UNAVAILABLE"
    with pytest.raises(StoreUnavailable):
        await SQLiteStore(tmp_path / "no" / "such" / "dir.db").open()


@asyncio_test
async def test_users_are_keyed_by_8_big_endian_bytes(sqlite_engine: Engine) -> None:
    # The layout docs/storage.md describes, the HBase row key without its salt byte.
    async with sqlite_engine.opened() as store:
        await store.append(appending(2**64 - 2, 0, count=2))
    with sqlite3.connect(sqlite_engine.location()) as conn:
        rows = conn.execute("SELECT user, seq, record FROM log ORDER BY seq").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert rows == [
        (b"\xff" * 7 + b"\xfe", (1).to_bytes(8, "big"), entry(2**64 - 2, 1)),
        (b"\xff" * 7 + b"\xfe", (2).to_bytes(8, "big"), entry(2**64 - 2, 2)),
    ]
    assert mode == "wal"


@asyncio_test
async def test_a_version_1_file_is_brought_up_to_the_current_version(sqlite_engine: Engine) -> None:
    async with sqlite_engine.opened() as store:
        await store.append(appending(7, 0, count=2))
    # What version 1 was: the search index inside the data file.
    with sqlite3.connect(sqlite_engine.location()) as conn:
        conn.execute("CREATE TABLE terms (user BLOB, term TEXT, message_id TEXT)")
        conn.execute("INSERT INTO terms VALUES (?, 'old', 'm')", ((7).to_bytes(8, "big"),))
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with sqlite_engine.opened() as store:
        assert await store.last_seq(7) == 2
        assert await store.indexed_seq(7) == 0  # the index is derived again from the log
        await store.index_terms(7, 2, [("new", "m")])
        assert await store.search(7, ["new"]) == ["m"]
    with sqlite3.connect(sqlite_engine.location()) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "terms" not in tables and {"log", "revocations", "owners"} <= tables
    with sqlite3.connect(sqlite_engine.location()) as conn:
        conn.execute("PRAGMA user_version = 9")
    conn.close()
    with pytest.raises(StoreUnavailable, match="schema version 9"):
        async with sqlite_engine.opened():
            pass


@asyncio_test
async def test_a_damaged_search_index_is_started_afresh_and_the_data_kept(
    sqlite_engine: Engine,
) -> None:
    async with sqlite_engine.opened() as store:
        await store.append(appending(3, 0, messages={"m": b"body"}))
        await store.index_terms(3, 1, [("word", "m")])
    index = Path(index_path(sqlite_engine.location()))
    assert index.exists()
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    index.write_bytes(b"not an index at all " * 500)
    async with sqlite_engine.opened() as store:
        assert await store.read_log(3) == [(1, entry(3, 1))]
        assert await store.get_messages(3, ["m"]) == {"m": b"body"}
        assert await store.indexed_seq(3) == 0
        assert await store.search(3, ["word"]) == []
