"""The HBase store from the inside: its layout, its compare-and-set, its pool, the gateway restart.

The store contract runs on HBase in tests/test_store.py; these tests check what
only the HBase engine has. The layout tests at the top need no HBase; the others
use the real engine (`scripts/engines up hbase`) through the `hbase_thrift`
fixture, each in namespaces of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohappybase
import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver.store.base import LogAppend, StoreUnavailable, WriteConflict
from pyserver.store.hbase import (
    INLINE_BATCH_BYTES,
    HBaseStore,
    parse_thrift_address,
)
from pyserver.store.hbase_layout import (
    HEAD,
    MAX_TIMESTAMP,
    POSTINGS_CELL_BYTES,
    TABLES,
    Batch,
    Head,
    Staged,
    check_namespace,
    group_by_size,
    index_pairs,
    join_staged,
    postings_cells,
    postings_column,
    snapshot_timestamp,
    split_parts,
    split_term_qualifier,
    table_name,
    term_column,
    user_row,
)
from pyserver.store.hbase_pool import ThriftPool
from pyserver.store.spec import StoreSpec, parse_store_spec

REPO = Path(__file__).resolve().parent.parent
ENGINES_SCRIPT = REPO / "scripts" / "engines"
CRASH_WRITER = Path(__file__).with_name("store_crash_writer.py")
U64_MAX = 2**64 - 1


def asyncio_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop, with a deadline (fixtures pass through)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 240))

    return run


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables(_hbase_drops_finished: None) -> Iterator[None]:
    yield
    drop_made()  # in the background, while the next module runs


@pytest.fixture(scope="session")
def _hbase_drops_finished() -> Iterator[None]:
    yield
    wait_for_drops()


@pytest.fixture
def commit_port(hbase_thrift2: tuple[str, int]) -> int:
    """The Thrift2 gateway's port, for stores whose appends go through it."""
    return hbase_thrift2[1]


@pytest.fixture
def new_store(hbase_thrift: tuple[str, int]) -> Callable[..., HBaseStore]:
    """Build stores on HBase: `new_store()` in a fresh namespace, `new_store(ns)` in that one."""
    host, port = hbase_thrift

    def build(namespace: str | None = None, **options: Any) -> HBaseStore:
        return HBaseStore(host, port, namespace=namespace or fresh_namespace(host, port), **options)

    return build


@contextlib.asynccontextmanager
async def opened(store: HBaseStore) -> AsyncIterator[HBaseStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def raw_client(store: HBaseStore) -> AsyncIterator[Any]:
    """A plain Thrift client on the store's gateway, to look at the cells themselves."""
    host, port = store.address
    connection = aiohappybase.Connection(host, port, timeout=30_000)
    await connection.open()
    try:
        yield connection.client
    finally:
        connection.close()


async def cells_of(client: Any, table: bytes, row: bytes) -> dict[bytes, tuple[bytes, int]]:
    """column -> (value, timestamp) of every cell of a row."""
    results = await client.getRow(table, row, {})
    if not results:
        return {}
    return {c: (cell.value, cell.timestamp) for c, cell in results[0].columns.items()}


async def outcomes(*writes: Awaitable[None]) -> list[BaseException | None]:
    results = await asyncio.gather(*writes, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


# ---- the layout: pure data ----


def test_row_keys_are_a_salt_byte_then_the_id_big_endian() -> None:
    assert user_row(0) == b"\x00" + bytes(8)
    assert user_row(258) == b"\x02" + (258).to_bytes(8, "big")
    assert user_row(U64_MAX) == b"\xff" * 9
    assert user_row(2**63) == b"\x00\x80" + bytes(7)


def test_table_names_carry_the_namespace() -> None:
    assert table_name("pyserver", "users") == b"pyserver_users"
    assert table_name("ops:cell-1", "users") == b"ops:cell-1_users"
    assert set(TABLES) == {"users", "directory", "social", "addresses", "revocations"}
    assert TABLES["users"] == ("l", "s", "m", "x")
    for bad in ("", "has space", "a:b:c", "semi;colon", 7):
        with pytest.raises(ValueError):
            check_namespace(bad)  # type: ignore[arg-type]


def test_parse_thrift_address() -> None:
    assert parse_thrift_address("127.0.0.1:9091") == ("127.0.0.1", 9091)
    assert parse_thrift_address("hbase.local") == ("hbase.local", 9090)
    for bad in (":9090", "host:port", "host:0", "host:70000"):
        with pytest.raises(ValueError):
            parse_thrift_address(bad)


def test_a_store_setting_names_the_thrift2_gateway_after_a_plus() -> None:
    here = Path(".")
    assert parse_store_spec("hbase:h:9090/ns", here) == StoreSpec("hbase", None, "h", 9090, "ns")
    spec = parse_store_spec("hbase:h:9090+9092/ns", here)
    assert spec == StoreSpec("hbase", None, "h", 9090, "ns", commit_port=9092)
    assert str(spec) == "hbase:h:9090+9092/ns"
    assert parse_store_spec("hbase:h:9090+9092", here).namespace == "pyserver"
    for bad in ("hbase:h:9090+", "hbase:h:9090+x/ns", "hbase:h:9090+70000", "hbase:h:+9092"):
        with pytest.raises(ValueError, match=r"\+PORT2"):
            parse_store_spec(bad, here)


def test_term_qualifiers_split_exactly_whatever_the_bytes() -> None:
    for term, message_id in [(b"a", b"b"), (b"", b"m"), (b"a\x00b", b"'"), (b"x" * 300, b"")]:
        column = term_column(term, message_id)
        assert column.startswith(b"x:")
        assert split_term_qualifier(column[2:]) == (term, message_id)
    # a term is never a prefix of another term's cells
    assert not term_column(b"ab", b"c").startswith(term_column(b"a", b""))


def test_a_postings_cell_holds_one_terms_message_ids() -> None:
    ids = [b"m1", b"", b"m\x00'2", b"x" * 300]
    [(column, value)] = postings_cells(b"hello", 7, ids)
    assert column == (
        b"x:\xff\xff\xff\xfe" + (5).to_bytes(4, "big") + b"hello"
        + (7).to_bytes(8, "big") + (0).to_bytes(4, "big")
    )  # fmt: skip
    assert column == postings_column(b"hello", 7, 0)
    assert index_pairs(column[2:], value) == [(b"hello", mid) for mid in ids]
    assert index_pairs(column[2:], b"") == []
    for cut in (value[:-1], value[:2]):
        with pytest.raises(ValueError, match="a postings cell is cut short"):
            index_pairs(column[2:], cut)
    # a term cell (one message, empty value) reads as before
    assert index_pairs(term_column(b"hello", b"m1")[2:], b"") == [(b"hello", b"m1")]


def test_big_postings_are_cut_in_parts() -> None:
    ids = [b"%04d" % n + b"x" * 996 for n in range(200)]  # 1,004 bytes each, with length
    cells = postings_cells(b"t", 3, ids)
    assert [column for column, _ in cells] == [postings_column(b"t", 3, p) for p in range(4)]
    assert all(len(value) <= POSTINGS_CELL_BYTES for _, value in cells)
    found = [mid for column, value in cells for _, mid in index_pairs(column[2:], value)]
    assert found == ids
    # an id bigger than a part still gets a cell, of its own
    huge = b"h" * POSTINGS_CELL_BYTES
    assert [len(v) for _, v in postings_cells(b"t", 3, [b"a", huge, b"b"])] == [5, len(huge) + 4, 5]


batches = st.builds(
    Batch,
    st.lists(st.binary(max_size=40), max_size=4).map(tuple),
    st.lists(st.tuples(st.binary(max_size=10), st.binary(max_size=40)), max_size=3).map(tuple),
    st.lists(st.tuples(st.binary(max_size=10), st.binary(max_size=10)), max_size=3).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(batches, max_size=3), st.integers(0, U64_MAX), st.integers(0, MAX_TIMESTAMP))
def test_heads_round_trip(tail: list[Batch], seq: int, version: int) -> None:
    for batch in tail:
        assert Batch.decode(batch.encode()) == batch
    head = Head(seq, version, tail=tuple(batch.encode() for batch in tail))
    assert Head.decode(head.encode()) == head
    assert head.compact == (not tail)
    staged = Head(seq, version, staged=Staged(b"t" * 16, 3, 12345))
    assert Head.decode(staged.encode()) == staged
    assert Head.decode(head.compacted().encode()) == Head(seq, version)
    assert Head.decode(head.compacted().encode()).compact
    assert Head.decode(b"") == Head(0, 0)


def test_a_tail_merges_into_one_batch_in_commit_order() -> None:
    first = Batch((b"r1",), ((b"m", b"draft"), (b"n", b"kept")), ((b"t", b"m"),))
    second = Batch((b"r2", b"r3"), ((b"m", b"final"),), ((b"t", b"m"), (b"u", b"m")))
    merged = Head(3, 7, tail=(first.encode(), second.encode())).pending()
    assert merged == Batch(
        (b"r1", b"r2", b"r3"),
        ((b"m", b"final"), (b"n", b"kept")),
        ((b"t", b"m"), (b"u", b"m")),
    )
    assert Head(3, 7).pending() is None


def test_a_batch_materializes_into_its_cells() -> None:
    batch = Batch((b"r9", b"r10"), ((b"m1", b"body"),), ((b"hello", b"m1"),))
    assert list(batch.mutations(10)) == [
        (b"l:" + (9).to_bytes(8, "big"), b"r9"),
        (b"l:" + (10).to_bytes(8, "big"), b"r10"),
        (b"m:m1", b"body"),
        (term_column(b"hello", b"m1"), b""),
    ]


def test_damaged_heads_and_batches_are_refused() -> None:
    good = Head(3, 4, tail=(Batch((b"r",)).encode(),)).encode()
    for bad in (good[:10], good[:-1], good + b"x", good[:16] + b"\x09" + good[17:]):
        with pytest.raises(ValueError):
            Head.decode(bad)


def test_values_are_split_in_parts_and_groups() -> None:
    assert split_parts(b"") == [b""]
    assert split_parts(b"abcdefg", 3) == [b"abc", b"def", b"g"]
    cells = [(b"a", b"x" * 5), (b"b", b"x" * 5), (b"c", b"x" * 20), (b"d", b"")]
    assert [[c for c, _ in g] for g in group_by_size(cells, 10)] == [[b"a", b"b"], [b"c"], [b"d"]]
    by_count = [[c for c, _ in g] for g in group_by_size(cells, 100, max_cells=3)]
    assert by_count == [[b"a", b"b", b"c"], [b"d"]]
    batch = Batch((b"record",), ((b"m", b"body"),))
    data = batch.encode()
    staged = Staged(b"k" * 16, 2, len(data))
    columns = staged.columns()
    assert join_staged(staged, {columns[0]: data[:5], columns[1]: data[5:]}) == batch
    with pytest.raises(ValueError):
        join_staged(staged, {columns[0]: data[:5]})
    with pytest.raises(ValueError):
        join_staged(staged, {columns[0]: data[:5], columns[1]: data[5:-1]})


# ---- the pool: no HBase needed ----


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@asyncio_test
async def test_a_call_that_times_out_discards_its_connection() -> None:
    with silent_server() as port:
        pool = ThriftPool("127.0.0.1", port, size=1, socket_timeout_s=30)
        seen = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3), pool.borrow() as connection:
                seen.append(connection)
                await connection.client.getTableNames()
        assert seen[0].client is None  # closed, not handed to the next borrower as is
        async with pool.borrow() as again:  # the one connection came back to the pool
            assert again is seen[0] and again.client is not None
        pool.close()


@asyncio_test
async def test_a_store_without_a_gateway_is_unavailable_within_its_timeout() -> None:
    with silent_server() as port:
        store = HBaseStore("127.0.0.1", port, namespace="nowhere", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.open()  # its table check gets no answer
        assert time.monotonic() - started < 5
        with pytest.raises(StoreUnavailable):
            await store.last_seq(1)  # not open
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        await HBaseStore("127.0.0.1", closed_port, namespace="nowhere", timeout_s=2).open()
    assert caught.value.code == "UNAVAILABLE"


# ---- on the real HBase ----


@asyncio_test
async def test_create_tables_is_safe_twice(new_store: Callable[..., HBaseStore]) -> None:
    store = new_store()
    names = {f"{store.namespace}_{table}" for table in TABLES}
    assert set(await store.create_tables()) == names
    assert await store.create_tables() == []
    async with opened(store), raw_client(store) as client:  # open() finds them all there
        tables = set(await client.getTableNames())
        assert {name.encode() for name in names} <= tables
        for table, families in TABLES.items():
            found = await client.getColumnDescriptors(store.table(table))
            assert sorted(found) == sorted(f"{f}:".encode() for f in families)
            for descriptor in found.values():
                assert descriptor.maxVersions == 1
                assert descriptor.timeToLive == 2**31 - 1  # forever


@asyncio_test
async def test_the_users_table_has_the_documented_layout(
    new_store: Callable[..., HBaseStore],
) -> None:
    user = 2**64 - 2
    row = b"\xfe" + user.to_bytes(8, "big")
    # A tail of one commit: each append materializes the one before.
    async with opened(new_store(tail_commits=1)) as store, raw_client(store) as client:
        await store.append(
            LogAppend(user, 0, [b"one", b"two"], messages={"m1": b"body"}, terms=[("hi", "m1")])
        )
        await store.append(LogAppend(user, 2, [b"three"]))
        await store.write_snapshot(user, 2, b"image")
        await store.set_cell(user, "cell-9")
        await store.add_friend(user, 5)
        await store.add_address("Who@Example.org", user)
        cells = await cells_of(client, store.table("users"), row)
        head = Head.decode(cells.pop(HEAD)[0])
        assert head == Head(3, 2, tail=(Batch((b"three",)).encode(),))
        snapshot_meta, _ = cells.pop(b"s:seq")
        assert snapshot_meta[:12] == (2).to_bytes(8, "big") + (1).to_bytes(4, "big")
        image, image_ts = cells.pop(b"s:image0")
        assert image.endswith(b"image") and image_ts == 2  # stamped with its log position
        # The first commit's cells, stamped with the version of the head that held it.
        assert cells == {
            b"l:" + (1).to_bytes(8, "big"): (b"one", 1),
            b"l:" + (2).to_bytes(8, "big"): (b"two", 1),
            b"m:m1": (b"body", 1),
            b"x:" + (2).to_bytes(4, "big") + b"hi" + b"m1": (b"", 1),
        }
        directory = await cells_of(client, store.table("directory"), row)
        assert {c: v for c, (v, _) in directory.items()} == {b"c:cell": b"cell-9"}
        social = await cells_of(client, store.table("social"), b"\x05" + (5).to_bytes(8, "big"))
        assert {c: v for c, (v, _) in social.items()} == {b"f:" + user.to_bytes(8, "big"): b"\x01"}
        address = await cells_of(client, store.table("addresses"), b"who@example.org")
        assert {c: v for c, (v, _) in address.items()} == {b"u:user": user.to_bytes(8, "big")}


@asyncio_test
async def test_an_index_flush_writes_one_postings_cell_per_term(
    new_store: Callable[..., HBaseStore],
) -> None:
    async with opened(new_store(tail_commits=1)) as store, raw_client(store) as client:
        row = user_row(6)
        pairs = [("hello", "m1"), ("hello", "m2"), ("world", "m1"), ("hello", "m1")]
        await store.index_terms(6, 7, pairs)
        cells = await cells_of(client, store.table("users"), row)
        stamp = snapshot_timestamp(7)
        assert cells == {
            **{c: (v, stamp) for c, v in postings_cells(b"hello", 7, [b"m1", b"m2"])},
            **{c: (v, stamp) for c, v in postings_cells(b"world", 7, [b"m1"])},
            b"x:\xff\xff\xff\xffindexed": ((7).to_bytes(8, "big"), stamp),
        }
        # A later flush adds cells of its own; a batch's term cells are found beside them.
        await store.index_terms(6, 9, [("hello", "m3")])
        await store.append(LogAppend(6, 0, [b"r1"], terms=[("hello", "m4")]))
        await store.append(LogAppend(6, 1, [b"r2"]))  # materializes the first commit
        cells = await cells_of(client, store.table("users"), row)
        assert cells[term_column(b"hello", b"m4")] == (b"", 1)
        assert await store.search(6, ["hello"]) == ["m1", "m2", "m3", "m4"]
        assert await store.search(6, ["hello", "world"]) == ["m1"]
        assert await store.indexed_seq(6) == 9
        # More message ids than one cell holds: parts of one term, all found.
        many = [f"n{i:05d}" for i in range(POSTINGS_CELL_BYTES // 10 + 1)]  # 10 bytes each
        await store.index_terms(6, 11, [("many", mid) for mid in many])
        cells = await cells_of(client, store.table("users"), row)
        assert postings_column(b"many", 11, 1) in cells
        assert postings_column(b"many", 11, 2) not in cells
        assert await store.search(6, ["many"]) == many


@asyncio_test
async def test_two_stores_racing_for_each_entry_one_wins_each(
    new_store: Callable[..., HBaseStore],
) -> None:
    first = new_store()
    async with opened(first) as a, opened(new_store(first.namespace)) as b:
        for seq in range(1, 21):
            results = await outcomes(
                a.append(LogAppend(9, seq - 1, [b"a%d" % seq])),
                b.append(LogAppend(9, seq - 1, [b"b%d" % seq])),
            )
            assert results.count(None) == 1, results
            loser = next(r for r in results if r is not None)
            assert isinstance(loser, WriteConflict) and loser.actual_seq == seq
        log = await a.read_log(9)
        assert [seq for seq, _ in log] == list(range(1, 21))
        assert await b.read_log(9) == log


def test_two_processes_appending_to_the_same_users_never_share_an_entry(
    new_store: Callable[..., HBaseStore],
) -> None:
    store = new_store()
    host, port = store.address
    asyncio.run(store.create_tables())
    location = f"{host}:{port}/{store.namespace}"
    writers = [
        subprocess.Popen(
            [sys.executable, str(CRASH_WRITER), "hbase", location],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(6)
    acked: list[list[tuple[int, int]]] = []
    for writer in writers:
        writer.send_signal(signal.SIGKILL)
        out, errors = writer.communicate(timeout=30)
        assert writer.returncode == -signal.SIGKILL, errors
        lines = [line.split() for line in out.splitlines(keepends=True) if line.endswith("\n")]
        acked.append(
            [(int(u), seq) for u, first, last in lines for seq in range(int(first), int(last) + 1)]
        )
    assert all(len(a) > 20 for a in acked), [len(a) for a in acked]
    assert not set(acked[0]) & set(acked[1]), "two processes both appended one entry"

    async def check() -> None:
        async with opened(new_store(store.namespace)) as reader:
            for user_id in {u for a in acked for u, _ in a}:
                log = await reader.read_log(user_id)
                assert [s for s, _ in log] == list(range(1, len(log) + 1))
                assert all(record == f"{user_id}:{s}".encode() for s, record in log)
                assert max(s for a in acked for u, s in a if u == user_id) <= len(log)

    asyncio.run(check())


def skip_materialize(store: HBaseStore) -> list[tuple[Any, ...]]:
    """Make `store` stop right after each commit (as a writer that dies there would).

    Returns the list where the skipped materializations are kept, to run them late.
    """
    skipped: list[tuple[Any, ...]] = []

    async def later(client: Any, row: bytes, head: Head, batch: Batch) -> None:
        skipped.append((row, head, batch))

    async def no_compaction(*_: Any) -> None:
        return None

    store._materialize = later  # type: ignore[method-assign]
    store._compact = no_compaction  # type: ignore[method-assign]
    return skipped


@asyncio_test
async def test_commits_wait_in_the_head_until_the_next_writer_copies_them(
    new_store: Callable[..., HBaseStore],
) -> None:
    first = new_store()
    async with opened(first):  # a writer that appends once, then goes away
        await first.append(
            LogAppend(4, 0, [b"r1", b"r2"], messages={"m": b"draft"}, terms=[("word", "m")])
        )
    store = new_store(first.namespace, tail_commits=3)
    async with opened(store), raw_client(store) as client:
        row = user_row(4)
        assert set(await cells_of(client, store.table("users"), row)) == {HEAD}
        # Readers see the committed batch through the head.
        assert await store.last_seq(4) == 2
        assert await store.read_log(4) == [(1, b"r1"), (2, b"r2")]
        assert await store.read_log(4, after_seq=1) == [(2, b"r2")]
        assert await store.get_messages(4, ["m"]) == {"m": b"draft"}
        assert await store.search(4, ["word"]) == ["m"]
        assert await store.user_ids() == [4]
        # The head carries up to 3 commits; the 4th append copies them into their cells.
        await store.append(LogAppend(4, 2, [b"r3"], messages={"m": b"final"}))
        await store.append(LogAppend(4, 3, [b"r4"]))
        assert store.materializations == 0
        assert set(await cells_of(client, store.table("users"), row)) == {HEAD}
        await store.append(LogAppend(4, 4, [b"r5"], terms=[("later", "m")]))
        assert store.materializations == 1
        cells = await cells_of(client, store.table("users"), row)
        assert Head.decode(cells[HEAD][0]).tail == (
            Batch((b"r5",), terms=((b"later", b"m"),)).encode(),
        )
        assert {c: cells[c] for c in cells if c.startswith(b"l:\x00")} == {
            b"l:" + (seq).to_bytes(8, "big"): (b"r%d" % seq, 3) for seq in (1, 2, 3, 4)
        }
        assert cells[b"m:m"] == (b"final", 3)  # the later body of the two
        assert await store.read_log(4) == [(s, b"r%d" % s) for s in range(1, 6)]
        assert await store.get_messages(4, ["m"]) == {"m": b"final"}
        assert await store.search(4, ["word", "later"]) == ["m"]


@asyncio_test
async def test_a_late_materialization_never_hides_a_newer_body(
    new_store: Callable[..., HBaseStore],
) -> None:
    slow = new_store()
    fast = new_store(slow.namespace, tail_commits=1)
    async with opened(slow), opened(fast), raw_client(slow) as client:
        row = user_row(6)
        await slow.append(LogAppend(6, 0, [b"r1"], messages={"m": b"draft"}))
        stalled = Head.decode(await slow._read_head(client, row))  # a copy that will stall
        await fast.append(LogAppend(6, 1, [b"r2"], messages={"m": b"final"}))
        await fast.append(LogAppend(6, 2, [b"r3"]))  # materializes "final"; the head drops it
        assert (await cells_of(client, fast.table("users"), row))[b"m:m"] == (b"final", 2)
        # The stalled copy of the first head lands only now.
        pending = stalled.pending()
        assert pending is not None
        await HBaseStore._materialize(slow, client, row, stalled, pending)
        assert (await cells_of(client, fast.table("users"), row))[b"m:m"] == (b"final", 2)
        assert await fast.get_messages(6, ["m"]) == {"m": b"final"}
        assert await fast.read_log(6) == [(1, b"r1"), (2, b"r2"), (3, b"r3")]


@asyncio_test
async def test_a_big_batch_is_staged_then_compacted(new_store: Callable[..., HBaseStore]) -> None:
    body = bytes(range(256)) * ((INLINE_BATCH_BYTES // 256) + 10)
    async with opened(new_store()) as store, raw_client(store) as client:
        await store.append(LogAppend(3, 0, [b"r1"], messages={"big": body}, terms=[("t", "big")]))
        cells = await cells_of(client, store.table("users"), user_row(3))
        assert Head.decode(cells[HEAD][0]) == Head(1, 1)  # compact: no staging left behind
        assert not [c for c in cells if c.startswith(b"l:stage")]
        assert await store.get_messages(3, ["big"]) == {"big": body}
        # A staged commit whose writer died: readers follow the head to its staging cells.
        skip_materialize(store)
        store._heads.clear()
        await store.append(LogAppend(3, 1, [b"r2"], messages={"big2": body}))
    async with opened(new_store(store.namespace)) as reader, raw_client(reader) as client:
        assert Head.decode(await reader._read_head(client, user_row(3))).staged is not None
        assert await reader.get_messages(3, ["big", "big2"]) == {"big": body, "big2": body}
        assert await reader.read_log(3) == [(1, b"r1"), (2, b"r2")]
        await reader.append(LogAppend(3, 2, [b"r3"]))
        cells = await cells_of(client, reader.table("users"), user_row(3))
        assert not [c for c in cells if c.startswith(b"l:stage")]
        assert cells[b"m:big2"][0] == body


@asyncio_test
async def test_through_thrift2_an_append_puts_its_cells_with_a_compact_head(
    new_store: Callable[..., HBaseStore], commit_port: int
) -> None:
    store = new_store(commit_port=commit_port)
    async with opened(store), raw_client(store) as client:
        row = user_row(4)
        await store.append(
            LogAppend(4, 0, [b"r1", b"r2"], messages={"m": b"draft"}, terms=[("word", "m")])
        )
        await store.append(LogAppend(4, 2, [b"r3"], messages={"m": b"final"}))
        cells = await cells_of(client, store.table("users"), row)
        assert Head.decode(cells[HEAD][0]) == Head(3, 2)  # compact, two commits
        # Each cell written once, stamped with its commit's version, as a materialization.
        log = {c: cells[c] for c in cells if c.startswith(b"l:\x00")}
        assert log == {
            b"l:" + (1).to_bytes(8, "big"): (b"r1", 1),
            b"l:" + (2).to_bytes(8, "big"): (b"r2", 1),
            b"l:" + (3).to_bytes(8, "big"): (b"r3", 2),
        }
        assert cells[b"m:m"] == (b"final", 2)
        assert cells[term_column(b"word", b"m")] == (b"", 1)
        assert store.materializations == 0 and store.commits == 2
        assert await store.read_log(4) == [(1, b"r1"), (2, b"r2"), (3, b"r3")]
        assert await store.get_messages(4, ["m"]) == {"m": b"final"}
        assert await store.search(4, ["word"]) == ["m"]
        with pytest.raises(WriteConflict):  # the compare-and-set still guards the log
            await store.append(LogAppend(4, 2, [b"stale"]))
        assert await store.read_log(4, after_seq=2) == [(3, b"r3")]


@asyncio_test
async def test_thrift1_and_thrift2_writers_share_a_user(
    new_store: Callable[..., HBaseStore], commit_port: int
) -> None:
    old = new_store(tail_commits=3)  # appends through Thrift1: batches wait in the head
    new = new_store(old.namespace, commit_port=commit_port)
    async with opened(old), opened(new), raw_client(old) as client:
        row, users = user_row(5), old.table("users")
        await old.append(LogAppend(5, 0, [b"r1"], messages={"m": b"draft"}))
        await old.append(LogAppend(5, 1, [b"r2"], terms=[("word", "m")]))
        assert set(await cells_of(client, users, row)) == {HEAD}
        # The Thrift2 writer puts the tail's cells (stamped with that head's version)
        # with its own in the same compare-and-set.
        await new.append(LogAppend(5, 2, [b"r3"], messages={"m": b"final"}))
        cells = await cells_of(client, users, row)
        assert Head.decode(cells[HEAD][0]) == Head(3, 3)
        assert cells[b"l:" + (1).to_bytes(8, "big")] == (b"r1", 2)
        assert cells[b"l:" + (3).to_bytes(8, "big")] == (b"r3", 3)
        assert cells[b"m:m"] == (b"final", 3)
        assert new.materializations == 1
        # The Thrift1 writer's cached head is stale: it reads the head again and goes on.
        await old.append(LogAppend(5, 3, [b"r4"]))
        head = Head.decode((await cells_of(client, users, row))[HEAD][0])
        assert (head.seq, head.version, len(head.tail)) == (4, 4, 1)
        for store in (old, new):
            assert await store.read_log(5) == [(s, b"r%d" % s) for s in range(1, 5)]
            assert await store.get_messages(5, ["m"]) == {"m": b"final"}
            assert await store.search(5, ["word"]) == ["m"]


@asyncio_test
async def test_through_thrift2_a_big_batch_is_staged_and_a_staged_head_rolled_forward(
    new_store: Callable[..., HBaseStore], commit_port: int
) -> None:
    body = bytes(range(256)) * ((INLINE_BATCH_BYTES // 256) + 10)
    store = new_store(commit_port=commit_port)
    async with opened(store), raw_client(store) as client:
        await store.append(LogAppend(3, 0, [b"r1"], messages={"big": body}))
        cells = await cells_of(client, store.table("users"), user_row(3))
        assert Head.decode(cells[HEAD][0]) == Head(1, 1)
        assert not [c for c in cells if c.startswith(b"l:stage")]
        # A Thrift1 writer dies between its staged commit and its materialization ...
        dead = new_store(store.namespace)
        async with opened(dead):
            skip_materialize(dead)
            await dead.append(LogAppend(3, 1, [b"r2"], messages={"big2": body}))
        # ... and the next Thrift2 append rolls that head forward before its own.
        store._heads.clear()
        await store.append(LogAppend(3, 2, [b"r3"], messages={"small": b"s"}))
        assert store.roll_forwards == 1
        cells = await cells_of(client, store.table("users"), user_row(3))
        assert Head.decode(cells[HEAD][0]).compact
        assert not [c for c in cells if c.startswith(b"l:stage")]
        assert cells[b"m:big2"][0] == body
        assert await store.read_log(3) == [(1, b"r1"), (2, b"r2"), (3, b"r3")]


@asyncio_test
async def test_a_store_whose_thrift2_gateway_does_not_answer_does_not_open(
    new_store: Callable[..., HBaseStore],
) -> None:
    with silent_server() as port:
        store = new_store(commit_port=port, timeout_s=0.5)
        with pytest.raises(StoreUnavailable, match="Thrift2 gateway"):
            await store.open()
        with pytest.raises(StoreUnavailable):
            await store.append(LogAppend(1, 0, [b"r"]))  # not open


@asyncio_test
async def test_snapshots_in_parts_replace_each_other_by_position(
    new_store: Callable[..., HBaseStore],
) -> None:
    big = bytes(range(256)) * (9 << 12)  # 9 MiB: three parts
    async with opened(new_store()) as store:
        await store.write_snapshot(1, 5, big)
        assert await store.read_snapshot(1) == (5, big)
        await store.write_snapshot(1, 5, b"small")  # same position: replaces
        assert await store.read_snapshot(1) == (5, b"small")
        await store.write_snapshot(1, 4, big)  # older: ignored
        assert await store.read_snapshot(1) == (5, b"small")
        await store.write_snapshot(1, U64_MAX, big)
        assert await store.read_snapshot(1) == (U64_MAX, big)


def engines(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENGINES_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Stopping the shared gateway fails whatever else uses it meanwhile: CI (which runs
# one suite at a time) runs this test; elsewhere it runs when asked for.
RESTARTS_ALLOWED = any(
    os.environ.get(name, "") not in ("", "0")
    for name in ("PYSERVER_REQUIRE_ENGINES", "PYSERVER_RESTART_ENGINES")
)


@pytest.mark.skipif(
    not RESTARTS_ALLOWED,
    reason="restarts the shared Thrift gateway: set PYSERVER_RESTART_ENGINES=1 (CI always runs it)",
)
def test_the_store_rides_out_a_gateway_restart(
    new_store: Callable[..., HBaseStore], commit_port: int
) -> None:
    # Both gateways restart: reads go through Thrift1, appends through Thrift2.
    store = new_store(timeout_s=5, commit_port=commit_port)

    async def before() -> None:
        await store.open()
        for seq in range(10):
            await store.append(LogAppend(1, seq, [b"%d" % (seq + 1)]))
        assert await store.last_seq(1) == 10

    async def while_down() -> None:
        for call in (
            lambda: store.append(LogAppend(1, 10, [b"lost"])),
            lambda: store.read_log(1),
            lambda: store.last_seq(1),
            lambda: store.get_messages(1, ["m"]),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 6

    async def after() -> None:
        # The same store object, never reopened: its first call already succeeds.
        assert [s for s, _ in await store.read_log(1)] == list(range(1, 11))
        await store.append(LogAppend(1, 10, [b"11"]))
        assert await store.last_seq(1) == 11
        await store.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(before())
        stopped = engines("down", "thrift", timeout=120)
        try:
            assert stopped.returncode == 0, stopped.stderr
            loop.run_until_complete(while_down())
        finally:
            started = engines("up", "thrift", timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        loop.run_until_complete(after())
    finally:
        loop.close()
