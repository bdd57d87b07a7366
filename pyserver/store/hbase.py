"""The HBase store: every `Store` method on HBase, through its Thrift gateways.

Owns the store's tables in one namespace (a table-name prefix: `<ns>_users`,
`<ns>_directory`, `<ns>_social`, `<ns>_addresses`; `<ns>_blobs` is the blob
store's). `pyserver.store.hbase_layout` has the bytes; docs/storage.md ("The
HBase store") the design.

A user's append is a real compare-and-set: Thrift1's `checkAndPut` swaps the
user's head cell `l:last` from the exact bytes the writer last saw to a new
head holding the new last seq, a commit counter and the batches (records,
messages, terms) of the latest commits. The swap is the commit, and one Thrift
call: readers overlay the head's batches on the other cells, so a commit is
whole the moment the swap succeeds, whoever crashes afterwards. Every few
commits the writer copies the head's batches into their `l`/`m`/`x` cells
("materializes" them, one more call), stamped with the head's version as the
cell timestamp, before it swaps them out of the head.

With a Thrift2 gateway beside it (`commit_port`), an append is instead one
Thrift2 `checkAndPut`: it compares the head cell alone and, in the same atomic
row mutation, puts the new head (without a tail) and the batch's cells, stamped
as a materialization would stamp them. The head stays a few bytes, each cell is
written once, and no materialization follows. Both kinds of writer can share a
user: a Thrift2 commit puts the cells of any tail a Thrift1 writer left in the
head, and readers, which read through Thrift1, see the same cells either way.

Every call runs under a deadline on a pooled connection of its own; any failure
of HBase or of the gateway comes out as `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import aiohappybase  # noqa: F401  (loads the Hbase_thrift module below)
from Hbase_thrift import AlreadyExists, BatchMutation, ColumnDescriptor, Mutation, TScan
from Hbase_thrift import IOError as ThriftIOError
from thriftpy2.transport import TTransportException

from pyserver.errors import BadRequest, PyserverError
from pyserver.store.base import (
    Fenced,
    LogAppend,
    Revocation,
    Store,
    StoreUnavailable,
    WriteConflict,
)
from pyserver.store.hbase_layout import (
    ADDRESS_USER,
    DIRECTORY_CELL,
    FRIEND_FAMILY,
    FRIEND_NO,
    FRIEND_YES,
    HEAD,
    INDEX_MARK,
    REVOCATION_FAMILY,
    SNAPSHOT_SEQ,
    STAGE_TOKEN_BYTES,
    TABLES,
    U64_MAX,
    Batch,
    Head,
    Staged,
    address_key,
    blob,
    friend_column,
    group_by_size,
    index_pairs,
    join_staged,
    log_column,
    message_column,
    postings_cells,
    postings_prefix,
    snapshot_part_column,
    snapshot_timestamp,
    split_parts,
    table_name,
    term_prefix,
    text,
    u64,
    user_of_row,
    user_row,
)
from pyserver.store.hbase_pool import ThriftPool
from pyserver.store.hbase_thrift import THRIFT2, thrift2_types

__all__ = [
    "HBaseStore",
    "column_descriptors",
    "ensure_tables",
    "parse_thrift_address",
    "unavailable_error",
]

T = TypeVar("T")

DEFAULT_PORT = 9090
# Creating a table takes HBase about a second; give table administration longer.
ADMIN_TIMEOUT_S = 120.0
# A batch bigger than this is staged in cells of its own before the commit.
INLINE_BATCH_BYTES = 1 << 20
# The head carries at most this many commits, this many bytes of batches (or one
# batch of any size up to INLINE_BATCH_BYTES, materialized right after it).
TAIL_COMMITS = 8
TAIL_BYTES = 32 << 10
# Bytes of cell values per write call when materializing or staging.
WRITE_CALL_BYTES = 32 << 20
# Columns per read call, and how many log entries the first read of read_log asks for.
COLUMNS_PER_GET = 1000
FIRST_LOG_PAGE = 64
ROWS_PER_SCAN_CALL = 1000
# Cells of one index_terms call per Thrift mutation.
_INDEX_CELLS_PER_CALL = 1000
# Bounds on retries: an append whose head keeps changing under it, a read racing a writer.
MAX_COMMIT_ATTEMPTS = 32
MAX_READ_ATTEMPTS = 5
SNAPSHOT_TOKEN_BYTES = 8
_EMPTY_BATCH = Batch().encode()
# Every family keeps one version, forever (HBase's FOREVER): materialized cells
# carry small timestamps (commit counters), which any finite TTL would expire.
FOREVER = 2**31 - 1


def parse_thrift_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "host" (port 9090)."""
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise BadRequest(f"Thrift address {address!r}: the port is not a number") from None
    if not host or not 0 < number < 65536:
        raise BadRequest(f"Thrift address {address!r}: expected host:port")
    return host, number


def unavailable_error(action: str, cause: BaseException) -> StoreUnavailable:
    """A Thrift or HBase failure as StoreUnavailable, its first line kept (the blob store
    reports its own the same way)."""
    detail = getattr(cause, "message", None) or str(cause) or type(cause).__name__
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    first_line = str(detail).strip().splitlines()[0] if str(detail).strip() else ""
    error = StoreUnavailable(f"HBase: {action}: {type(cause).__name__}: {first_line}")
    error.__cause__ = cause
    return error


class _Signal(Exception):
    """Raised inside a store call for the call itself to handle; never leaves the store."""


class _Moved(_Signal):
    """A read raced a writer (a staged batch or snapshot part went away); read again."""


class _Corrupt(_Signal):
    """Stored bytes break the layout's invariants."""


class _HeadCache:
    """The head this store last wrote or read, by user, least recently used first.

    Only a hint: an append that trusts a stale entry loses its compare-and-set
    and reads the head again. It saves the append of the owning node a read.
    """

    def __init__(self, max_bytes: int = 64 << 20, max_users: int = 100_000) -> None:
        self._heads: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_users = max_users

    def get(self, user_id: int) -> bytes | None:
        raw = self._heads.get(user_id)
        if raw is not None:
            self._heads.move_to_end(user_id)
        return raw

    def put(self, user_id: int, raw: bytes) -> None:
        self.forget(user_id)
        if len(raw) > TAIL_BYTES + 1024:
            return
        self._heads[user_id] = raw
        self._bytes += len(raw)
        while self._bytes > self._max_bytes or len(self._heads) > self._max_users:
            _, evicted = self._heads.popitem(last=False)
            self._bytes -= len(evicted)

    def forget(self, user_id: int) -> None:
        raw = self._heads.pop(user_id, None)
        if raw is not None:
            self._bytes -= len(raw)

    def clear(self) -> None:
        self._heads.clear()
        self._bytes = 0


_THRIFT2 = thrift2_types()
# The head cell as Thrift2 names a cell: family, qualifier.
_HEAD_FAMILY, _, _HEAD_QUALIFIER = HEAD.partition(b":")


def _fits_inline(batch: Batch) -> bool:
    """Whether a batch is small enough to commit in one call (else it is staged first)."""
    size = sum(map(len, batch.records))
    size += sum(len(a) + len(b) for pairs in (batch.messages, batch.terms) for a, b in pairs)
    return size <= INLINE_BATCH_BYTES


def _value(column: bytes, value: bytes, timestamp: int | None = None) -> Any:
    """A Thrift2 cell to put: `column` as "family:qualifier", HBase's time if no timestamp."""
    family, _, qualifier = column.partition(b":")
    return _THRIFT2.TColumnValue(
        family=family, qualifier=qualifier, value=value, timestamp=timestamp
    )


def _cells(results: Sequence[Any]) -> dict[bytes, bytes]:
    """column -> value of a getRow* answer (one row, or none)."""
    if not results or not results[0].columns:
        return {}
    return {column: cell.value for column, cell in results[0].columns.items()}


def column_descriptors(families: Iterable[str]) -> list[ColumnDescriptor]:
    """How this store creates column families: one version each, kept forever."""
    return [
        ColumnDescriptor(
            name=f"{family}:".encode(),
            maxVersions=1,
            timeToLive=FOREVER,
            bloomFilterType=b"ROW",
            blockCacheEnabled=True,
        )
        for family in families
    ]


async def ensure_tables(
    pool: ThriftPool,
    tables: Mapping[bytes, Sequence[ColumnDescriptor]],
    *,
    answer_within_s: float,
) -> list[bytes]:
    """Create the missing tables (name -> column descriptors), check the others; safe twice.

    The gateway must answer its first call within `answer_within_s`; tables are
    then created concurrently, each on a connection of its own. Returns the
    names created. A table that exists without a family it needs, or with a
    family that expires or drops versions it needs, is an error: StoreUnavailable.
    """

    async def call(query: Callable[[Any], Awaitable[T]]) -> T:
        async with pool.borrow() as connection:
            return await query(connection.client)

    async with asyncio.timeout(answer_within_s):
        existing = set(await call(lambda client: client.getTableNames()))
    missing = [name for name in tables if name not in existing]

    async def create(name: bytes) -> bytes | None:
        try:
            await call(lambda client: client.createTable(name, list(tables[name])))
        except AlreadyExists:
            return None  # made by someone else meanwhile
        except ThriftIOError as error:
            # Two processes creating the table at once: the gateway reports the loser's
            # attempt as an IOError wrapping TableExistsException, not as AlreadyExists.
            if "TableExistsException" in str(error):
                return None
            raise
        return name

    created = [name for name in await asyncio.gather(*map(create, missing)) if name]
    for name, wanted in tables.items():
        found = await call(lambda client, name=name: client.getColumnDescriptors(name))
        for descriptor in wanted:
            have = found.get(descriptor.name)
            if have is None:
                raise StoreUnavailable(
                    f"HBase table {name.decode()} has no column family {descriptor.name.decode()}"
                )
            if have.timeToLive != descriptor.timeToLive or have.maxVersions < 1:
                raise StoreUnavailable(
                    f"HBase table {name.decode()}, family {descriptor.name.decode()}: TTL"
                    f" {have.timeToLive} s, {have.maxVersions} version(s); this store needs"
                    f" TTL {descriptor.timeToLive} (forever)"
                )
    return created


class HBaseStore(Store):
    """The store of a cell on HBase, through one Thrift1 gateway, in one namespace.

    `commit_port`: the port of a Thrift2 gateway on the same host, which then
    takes every append (one multi-cell compare-and-set each; batches over
    INLINE_BATCH_BYTES are staged through Thrift1 as before). `pool_size`
    connections (to each gateway) are shared by the store's concurrent calls, one
    call per connection at a time; every call gets `timeout_s` seconds in all
    (waiting for a connection included). One store object serves one event
    loop at a time (the one that opened it). `tail_commits`: how many commits
    the head carries before they are copied into their cells.

    Counters of what this object did: `commits`, `conflicts` (appends refused
    with WriteConflict), `lost_swaps` (compare-and-sets another writer won
    first), `materializations`, `roll_forwards` (staged heads other writers
    left behind).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        namespace: str = "pyserver",
        pool_size: int = 16,
        timeout_s: float = 10.0,
        tail_commits: int = TAIL_COMMITS,
        commit_port: int | None = None,
    ) -> None:
        if not isinstance(pool_size, int) or pool_size <= 0:
            raise ValueError("pool_size must be a positive int")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if not isinstance(tail_commits, int) or tail_commits <= 0:
            raise ValueError("tail_commits must be a positive int")
        if commit_port is not None and not 0 < int(commit_port) < 65536:
            raise ValueError(f"commit_port {commit_port!r}: not a port")
        self._host, self._port = host, int(port)
        self._commit_port = None if commit_port is None else int(commit_port)
        self._namespace = namespace
        self._tables = {table: table_name(namespace, table) for table in TABLES}
        self._users = self._tables["users"]
        self._pool_size = pool_size
        self._timeout_s = float(timeout_s)
        self._pool: ThriftPool | None = None
        self._commit_pool: ThriftPool | None = None
        self._lifecycle = asyncio.Lock()
        self._open = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._heads = _HeadCache()
        self._tail_commits = tail_commits
        self.commits = 0
        self.conflicts = 0
        self.lost_swaps = 0
        self.materializations = 0
        self.roll_forwards = 0

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self._port

    @property
    def commit_port(self) -> int | None:
        """The Thrift2 gateway's port, if appends go through one."""
        return self._commit_port

    def table(self, name: str) -> bytes:
        """The HBase name of one of this store's tables ("users", "directory", ...)."""
        return self._tables[name]

    # ---- lifecycle ----

    async def open(self) -> None:
        async with self._lifecycle:
            if self._open:
                return
            pool = ThriftPool(self._host, self._port, self._pool_size, ADMIN_TIMEOUT_S)
            commit_pool = None
            if self._commit_port is not None:
                commit_pool = ThriftPool(
                    self._host, self._commit_port, self._pool_size, ADMIN_TIMEOUT_S, THRIFT2
                )
            try:
                await self._ensure_tables(pool)
                if commit_pool is not None:
                    await self._check_commit_gateway(commit_pool)
            except BaseException:
                pool.close()
                if commit_pool is not None:
                    commit_pool.close()
                raise
            self._pool, self._commit_pool = pool, commit_pool
            self._heads.clear()
            self._open = True

    async def close(self) -> None:
        async with self._lifecycle:
            if not self._open:
                return
            self._open = False  # refuse new calls; let the running ones finish
            await self._idle.wait()
            assert self._pool is not None
            self._pool.close()
            self._pool = None
            if self._commit_pool is not None:
                self._commit_pool.close()
                self._commit_pool = None

    async def create_tables(self) -> list[str]:
        """Create this namespace's tables that are missing (safe to run twice); the ones made."""
        pool = self._pool or ThriftPool(self._host, self._port, len(TABLES), ADMIN_TIMEOUT_S)
        try:
            return [name.decode() for name in await self._ensure_tables(pool)]
        finally:
            if pool is not self._pool:
                pool.close()

    async def drop_tables(self) -> list[str]:
        """Disable and delete this namespace's store tables (tests, tools); the ones dropped."""
        pool = ThriftPool(self._host, self._port, len(TABLES), ADMIN_TIMEOUT_S)

        async def call(query: Callable[[Any], Awaitable[T]]) -> T:
            async with pool.borrow() as connection:
                return await query(connection.client)

        async def drop(name: bytes) -> None:
            if await call(lambda client: client.isTableEnabled(name)):
                await call(lambda client: client.disableTable(name))
            await call(lambda client: client.deleteTable(name))

        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                existing = set(await call(lambda client: client.getTableNames()))
                names = [name for name in self._tables.values() if name in existing]
                # Every drop finishes (or fails) before this returns: no task outlives it.
                for result in await asyncio.gather(*map(drop, names), return_exceptions=True):
                    if isinstance(result, BaseException):
                        raise result
        except PyserverError:
            raise
        except TimeoutError as exc:
            raise StoreUnavailable("HBase: dropping tables took too long") from exc
        except Exception as exc:
            raise unavailable_error("drop tables", exc) from exc
        finally:
            pool.close()
        self._heads.clear()
        return [name.decode() for name in names]

    async def _ensure_tables(self, pool: ThriftPool) -> list[bytes]:
        wanted = {name: column_descriptors(TABLES[table]) for table, name in self._tables.items()}
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                return await ensure_tables(pool, wanted, answer_within_s=self._timeout_s)
        except PyserverError:
            raise
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"HBase at {self._host}:{self._port}: creating tables took too long"
            ) from exc
        except Exception as exc:
            raise unavailable_error(f"open tables at {self._host}:{self._port}", exc) from exc

    async def _check_commit_gateway(self, pool: ThriftPool) -> None:
        """Read one head through the Thrift2 gateway: it answers, and sees the users table."""
        where = f"the Thrift2 gateway at {self._host}:{self._commit_port}"
        try:
            async with asyncio.timeout(self._timeout_s), pool.borrow() as connection:
                await self._read_head_cells(connection.client, user_row(0))
        except TimeoutError as exc:
            raise StoreUnavailable(f"HBase: {where} did not answer") from exc
        except Exception as exc:
            raise unavailable_error(f"open {where}", exc) from exc

    # ---- calls: one connection, one deadline, engine failures as StoreUnavailable ----

    @contextlib.asynccontextmanager
    async def _session(self, action: str, commits: bool = False) -> AsyncIterator[Any]:
        """A Thrift client for this task alone, for one store call (`commits`: a client of
        the Thrift2 gateway)."""
        # Counted before the first await, so close() waits for a call that started.
        pool = self._commit_pool if commits else self._pool
        if not self._open or pool is None:
            raise StoreUnavailable(f"the HBase store {self._namespace} is not open")
        self._in_flight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with pool.borrow() as connection:
                    yield connection.client
        except (PyserverError, _Signal):
            raise
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"HBase: {action}: no answer within {self._timeout_s:g} s"
            ) from exc
        except Exception as exc:
            raise unavailable_error(action, exc) from exc
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _read(self, action: str, query: Callable[[Any], Awaitable[T]]) -> T:
        """Run a read; again when it raced a writer, or once more on a broken connection."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._session(action) as client:
                    return await query(client)
            except _Moved:
                if attempt >= MAX_READ_ATTEMPTS:
                    raise StoreUnavailable(f"HBase: {action}: the data kept moving") from None
            except StoreUnavailable as exc:
                broken = isinstance(exc.__cause__, TTransportException | ConnectionError | EOFError)
                if attempt >= 2 or not broken:
                    raise

    async def _get(
        self, client: Any, table: bytes, row: bytes, columns: Sequence[bytes]
    ) -> dict[bytes, bytes]:
        cells: dict[bytes, bytes] = {}
        for start in range(0, len(columns), COLUMNS_PER_GET):
            part = list(columns[start : start + COLUMNS_PER_GET])
            cells.update(_cells(await client.getRowWithColumns(table, row, part, {})))
        return cells

    async def _scan(
        self, client: Any, table: bytes, scan: TScan
    ) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
        """(row, {column: value}) of every row (or piece of a row) a scan finds."""
        scanner = await client.scannerOpenWithScan(table, scan, {})
        try:
            while results := await client.scannerGetList(scanner, ROWS_PER_SCAN_CALL):
                for result in results:
                    yield result.row, {c: cell.value for c, cell in (result.columns or {}).items()}
        finally:
            await client.scannerClose(scanner)

    async def _write_row(
        self, client: Any, table: bytes, row: bytes, cells: Iterable[tuple[bytes, bytes]]
    ) -> None:
        await client.mutateRow(table, row, [Mutation(column=c, value=v) for c, v in cells], {})

    # ---- the head: commit, materialize, compact ----

    async def _read_head(self, client: Any, row: bytes) -> bytes:
        return (await self._get(client, self._users, row, [HEAD])).get(HEAD, b"")

    async def _pending_batch(self, client: Any, row: bytes, head: Head) -> Batch | None:
        """What the head holds that may not be materialized yet, as one batch (or None)."""
        if head.staged is None:
            return head.pending()
        cells = await self._get(client, self._users, row, head.staged.columns())
        try:
            return join_staged(head.staged, cells)
        except ValueError:
            raise _Moved() from None  # compacted and cleaned up since we read the head

    async def _materialize(self, client: Any, row: bytes, head: Head, batch: Batch) -> None:
        """Copy the head's batch into its cells, stamped with the head's version.

        Idempotent, and harmless when late: a cell that a later head rewrote
        carries that head's higher version, so this copy never shows through.
        """
        self.materializations += 1
        cells = list(batch.mutations(head.seq))
        for group in group_by_size(cells, WRITE_CALL_BYTES):
            mutations = [Mutation(column=column, value=value) for column, value in group]
            await client.mutateRowTs(self._users, row, mutations, head.version, {})

    async def _compact(self, client: Any, row: bytes, raw: bytes, head: Head) -> bytes | None:
        """Swap a materialized head for its compact form; then drop its staging cells.

        Returns the compact head, or None if the head had moved on.
        """
        compact = head.compacted().encode()
        swapped = await client.checkAndPut(
            self._users, row, HEAD, raw, Mutation(column=HEAD, value=compact), {}
        )
        if head.staged is not None and swapped:
            await self._drop_staging(client, row, head.staged)
        return compact if swapped else None

    async def _drop_staging(self, client: Any, row: bytes, staged: Staged) -> None:
        # Staging cells have unique names, so these deletes can never hide a later write.
        deletes = [Mutation(isDelete=True, column=column) for column in staged.columns()]
        await client.mutateRow(self._users, row, deletes, {})

    async def _settle(self, client: Any, row: bytes) -> bytes | None:
        """The head, without a staged batch; its bytes, or None if it moved meanwhile.

        A staged head (its writer may have died before compacting it) is
        materialized and compacted here: only a head with a tail or none is
        carried into the next commit.
        """
        raw = await self._read_head(client, row)
        head = Head.decode(raw)
        if head.staged is None:
            return raw
        batch = await self._pending_batch(client, row, head)
        assert batch is not None
        self.roll_forwards += 1
        await self._materialize(client, row, head, batch)
        return await self._compact(client, row, raw, head)

    async def _stage(self, client: Any, row: bytes, data: bytes) -> Staged:
        """Write a big batch to staging cells of its own, for a head to refer to."""
        parts = split_parts(data)
        staged = Staged(os.urandom(STAGE_TOKEN_BYTES), len(parts), len(data))
        cells = list(zip(staged.columns(), parts, strict=True))
        for group in group_by_size(cells, WRITE_CALL_BYTES):
            await self._write_row(client, self._users, row, group)
        return staged

    async def _commit(
        self, client: Any, user_id: int, expected: int, batch: Batch, epoch: int | None = None
    ) -> int | None:
        """Append `batch` after log position `expected` (by the owner of `epoch`, if given)
        through the Thrift1 gateway: the batch rides in the head's tail. None if committed,
        else the last seq; `Fenced` if another owner claimed the user."""
        row = user_row(user_id)
        encoded = batch.encode()
        staged = (
            await self._stage(client, row, encoded) if len(encoded) > INLINE_BATCH_BYTES else None
        )
        last = expected + len(batch.records)

        async def swap(known: bytes, head: Head) -> bytes | None:
            new, flush = self._next_head(head, last, encoded, staged)
            if flush:
                # Those commits leave the head: their cells must be in place first.
                pending = head.pending()
                assert pending is not None
                await self._materialize(client, row, head, pending)
            raw = new.encode()
            if not await client.checkAndPut(
                self._users, row, HEAD, known or None, Mutation(column=HEAD, value=raw), {}
            ):
                return None
            if staged is not None or (len(new.tail) == 1 and len(raw) > TAIL_BYTES):
                # One big batch: materialize it now rather than carry it around.
                await self._materialize(client, row, new, batch)
                raw = await self._compact(client, row, raw, new) or b""
            return raw

        try:
            actual = await self._swap_head(
                user_id, expected, epoch, lambda: self._settle(client, row), swap
            )
        except Fenced:
            if staged is not None:
                await self._drop_staging(client, row, staged)
            raise
        if actual is not None and staged is not None:
            # Not committed, so nothing refers to them. (After a failed call they stay
            # behind, unreferenced: that connection cannot be trusted with more.)
            await self._drop_staging(client, row, staged)
        return actual

    async def _commit_cells(
        self, client: Any, user_id: int, expected: int, batch: Batch, epoch: int | None = None
    ) -> int | None:
        """`_commit` through the Thrift2 gateway: one compare-and-set of the head that also
        puts the batch's cells (and those of a tail a Thrift1 writer left), stamped as a
        materialization would stamp them, so the head stays compact."""
        row = user_row(user_id)
        last = expected + len(batch.records)

        async def read_head() -> bytes | None:
            raw = await self._read_head_cells(client, row)
            if Head.decode(raw).staged is None:
                return raw
            async with self._session("append") as settling:  # rare: a staged head left behind
                return await self._settle(settling, row)

        async def swap(known: bytes, head: Head) -> bytes | None:
            assert head.staged is None  # read_head settles staged heads; the cache has none
            new = Head(last, head.version + 1, epoch=head.epoch)
            raw = new.encode()
            values = [_value(HEAD, raw)]
            pending = head.pending()
            if pending is not None:
                values += (_value(c, v, head.version) for c, v in pending.mutations(head.seq))
            values += (_value(c, v, new.version) for c, v in batch.mutations(last))
            put = _THRIFT2.TPut(row=row, columnValues=values)
            if not await client.checkAndPut(
                self._users, row, _HEAD_FAMILY, _HEAD_QUALIFIER, known or None, put
            ):
                return None
            self.materializations += pending is not None
            return raw

        return await self._swap_head(user_id, expected, epoch, read_head, swap)

    async def _read_head_cells(self, client: Any, row: bytes) -> bytes:
        """The head cell, read through the Thrift2 gateway."""
        column = _THRIFT2.TColumn(family=_HEAD_FAMILY, qualifier=_HEAD_QUALIFIER)
        result = await client.get(self._users, _THRIFT2.TGet(row=row, columns=[column]))
        return result.columnValues[0].value if result.columnValues else b""

    def _next_head(
        self, head: Head, last: int, encoded: bytes, staged: Staged | None
    ) -> tuple[Head, bool]:
        """The head after `head` with one more commit (ending the log at `last`).

        And whether `head`'s tail leaves the head, so must be materialized first.
        """
        version, epoch = head.version + 1, head.epoch
        if staged is not None:
            return Head(last, version, staged=staged, epoch=epoch), bool(head.tail)
        added = (encoded,) if encoded != _EMPTY_BATCH else ()
        tail = head.tail + added
        if len(tail) > self._tail_commits or sum(map(len, tail)) > TAIL_BYTES:
            return Head(last, version, tail=added, epoch=epoch), bool(head.tail)
        return Head(last, version, tail=tail, epoch=epoch), False

    async def _swap_head(
        self,
        user_id: int,
        expected: int,
        epoch: int | None,
        read_head: Callable[[], Awaitable[bytes | None]],
        swap: Callable[[bytes, Head], Awaitable[bytes | None]],
    ) -> int | None:
        """The compare-and-set loop on the head; None once committed, else the actual last seq.

        `read_head()` gives the head's bytes with no staged batch (None: it moved, read
        again); `swap(known, head)` makes one compare-and-set from `known` and gives the
        bytes now in the head (b"": not worth caching), or None if another writer won.
        With `epoch`, the head must also hold that owner epoch (else `Fenced`): the swap
        compares the whole head, epoch included, so a claim in between fails it."""
        # The head as this store last saw it, or a guess (no head at all for a new log).
        known = self._heads.get(user_id)
        if known is None and expected == 0:
            known = b""
        trusted = False
        for _ in range(MAX_COMMIT_ATTEMPTS):
            if known is None:
                try:
                    known = await read_head()
                except _Moved:
                    continue
                if known is None:
                    continue
                trusted = True
            head = Head.decode(known)
            if head.seq != expected or (epoch is not None and head.epoch != epoch):
                if trusted:
                    self._heads.put(user_id, known)
                    if head.seq == expected and epoch is not None:
                        raise Fenced(user_id, expected, epoch, head.epoch)
                    return head.seq
                known = None  # a stale cache entry or a wrong guess: read the head
                continue
            raw = await swap(known, head)
            if raw is None:
                self.lost_swaps += 1
                self._heads.forget(user_id)
                known, trusted = None, False
                continue
            if raw:
                self._heads.put(user_id, raw)
            self.commits += 1
            return None
        raise StoreUnavailable(f"HBase: the head of user {user_id} kept changing; retry")

    # ---- per-user log, snapshots, messages, search ----

    async def append(self, write: LogAppend) -> None:
        user_id = u64(write.user_id)
        expected = u64(write.expected_seq, "expected_seq")
        records = tuple(blob(record, "a log record") for record in write.records)
        u64(expected + len(records), "the last seq")
        messages = tuple(
            (text(message_id, "a message id").encode(), blob(body, "a message body"))
            for message_id, body in write.messages.items()
        )
        terms = tuple(
            (text(term, "a search term").encode(), text(message_id, "a message id").encode())
            for term, message_id in write.terms
        )
        batch = Batch(records, messages, terms)
        by_cells = self._commit_pool is not None and _fits_inline(batch)
        try:
            async with self._session("append", commits=by_cells) as client:
                commit = self._commit_cells if by_cells else self._commit
                actual = await commit(client, user_id, expected, batch, write.owner_epoch)
        except BaseException:
            self._heads.forget(user_id)  # the outcome is unknown
            raise
        if actual is not None:
            self.conflicts += 1
            raise WriteConflict(user_id, expected, actual)

    async def claim(self, user_id: int) -> int:
        user_id = u64(user_id)
        row = user_row(user_id)

        async def swap(client: Any) -> int:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                try:
                    raw = await self._settle(client, row)
                except _Moved:
                    continue
                if raw is None:
                    continue
                head = Head.decode(raw)
                claimed = replace(head, epoch=head.epoch + 1).encode()
                if await client.checkAndPut(
                    self._users, row, HEAD, raw or None, Mutation(column=HEAD, value=claimed), {}
                ):
                    self._heads.put(user_id, claimed)
                    return head.epoch + 1
                self.lost_swaps += 1
            raise StoreUnavailable(f"HBase: the head of user {user_id} kept changing; retry")

        try:
            async with self._session("claim") as client:
                return await swap(client)
        except BaseException:
            self._heads.forget(user_id)
            raise

    async def last_seq(self, user_id: int) -> int:
        row = user_row(u64(user_id))

        async def query(client: Any) -> int:
            raw = await self._read_head(client, row)
            head = Head.decode(raw)
            if head.compact and raw:
                self._heads.put(user_id, raw)
            return head.seq

        return await self._read("last_seq", query)

    async def read_log(
        self, user_id: int, after_seq: int = 0, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        row = user_row(u64(user_id))
        if (limit is not None and limit <= 0) or after_seq >= U64_MAX:
            return []
        after = max(after_seq, 0)

        async def query(client: Any) -> list[tuple[int, bytes]]:
            first_page = min(limit or FIRST_LOG_PAGE, FIRST_LOG_PAGE, U64_MAX - after)
            columns = [log_column(seq) for seq in range(after + 1, after + first_page + 1)]
            cells = await self._get(client, self._users, row, [HEAD, *columns])
            head = Head.decode(cells.get(HEAD, b""))
            pending = await self._pending_batch(client, row, head)
            end = head.seq if limit is None else min(head.seq, after + limit)
            # Entries from `overlay` on are the head's batch, maybe not materialized yet.
            overlay = head.seq - len(pending.records) + 1 if pending else head.seq + 1
            out: list[tuple[int, bytes]] = []
            seq = after + 1
            while seq <= end:
                if seq >= overlay:
                    assert pending is not None
                    out.append((seq, pending.records[seq - overlay]))
                    seq += 1
                    continue
                column = log_column(seq)
                if column not in cells:
                    page_end = min(end, overlay - 1, seq + COLUMNS_PER_GET - 1)
                    wanted = [log_column(s) for s in range(seq, page_end + 1)]
                    cells = await self._get(client, self._users, row, wanted)
                    if column not in cells:
                        raise _Corrupt(f"the log of user {user_id} has no entry {seq}")
                out.append((seq, cells[column]))
                seq += 1
            return out

        try:
            return await self._read("read_log", query)
        except _Corrupt as exc:
            raise StoreUnavailable(f"HBase: {exc}") from exc

    async def write_snapshot(self, user_id: int, seq: int, image: bytes) -> None:
        row = user_row(u64(user_id))
        u64(seq, "snapshot seq")
        image = blob(image, "a snapshot")
        token = os.urandom(SNAPSHOT_TOKEN_BYTES)
        parts = split_parts(image)
        meta = seq.to_bytes(8, "big") + len(parts).to_bytes(4, "big") + token
        mutations = [Mutation(column=SNAPSHOT_SEQ, value=meta)]
        mutations += [
            Mutation(column=snapshot_part_column(i), value=token + part)
            for i, part in enumerate(parts)
        ]
        # One row mutation, stamped with the snapshot's position: the newest wins
        # every read whatever order the writes land in; an equal one replaces it.
        async with self._session("write_snapshot") as client:
            await client.mutateRowTs(self._users, row, mutations, snapshot_timestamp(seq), {})

    async def read_snapshot(self, user_id: int) -> tuple[int, bytes] | None:
        row = user_row(u64(user_id))

        async def query(client: Any) -> tuple[int, bytes] | None:
            cells = await self._get(
                client, self._users, row, [SNAPSHOT_SEQ, snapshot_part_column(0)]
            )
            meta = cells.get(SNAPSHOT_SEQ)
            if meta is None:
                return None
            seq = int.from_bytes(meta[:8], "big")
            parts = int.from_bytes(meta[8:12], "big")
            token = meta[12:]
            if parts > 1:
                columns = [SNAPSHOT_SEQ, *(snapshot_part_column(i) for i in range(1, parts))]
                more = await self._get(client, self._users, row, columns)
                if more.get(SNAPSHOT_SEQ) != meta:
                    raise _Moved()  # a newer snapshot landed between the two reads
                cells.update(more)
            pieces = [cells.get(snapshot_part_column(i), b"") for i in range(parts)]
            if any(piece[: len(token)] != token for piece in pieces):
                raise _Moved()
            return seq, b"".join(piece[len(token) :] for piece in pieces)

        return await self._read("read_snapshot", query)

    async def get_messages(self, user_id: int, message_ids: Sequence[str]) -> dict[str, bytes]:
        row = user_row(u64(user_id))
        wanted = {
            text(message_id, "a message id").encode(): message_id for message_id in message_ids
        }
        if not wanted:
            return {}

        async def query(client: Any) -> dict[str, bytes]:
            # The head last: its batch is then at least as new as every cell read.
            columns = [*(message_column(key) for key in wanted), HEAD]
            cells = await self._get(client, self._users, row, columns)
            found = {
                wanted[key]: cells[message_column(key)]
                for key in wanted
                if message_column(key) in cells
            }
            pending = await self._pending_batch(client, row, Head.decode(cells.get(HEAD, b"")))
            for key, body in pending.messages if pending else ():
                if key in wanted:
                    found[wanted[key]] = body
            return found

        return await self._read("get_messages", query)

    async def search(self, user_id: int, terms: Sequence[str]) -> list[str]:
        row = user_row(u64(user_id))
        wanted = list(dict.fromkeys(text(term, "a search term").encode() for term in terms))
        if not wanted:
            return []
        wanted_set = set(wanted)
        prefixes = ", ".join(
            "'" + prefix.replace(b"'", b"''").decode("latin-1") + "'"
            for term in wanted
            for prefix in (term_prefix(term), postings_prefix(term))
        )
        scan = TScan(
            startRow=row,
            stopRow=row + b"\x00",
            columns=[b"x"],
            filterString=f"MultipleColumnPrefixFilter({prefixes})".encode("latin-1"),
            batchSize=10_000,
        )

        async def query(client: Any) -> list[str]:
            found: set[tuple[bytes, bytes]] = set()
            async for _, cells in self._scan(client, self._users, scan):
                for column, value in cells.items():
                    found.update(index_pairs(column[2:], value))
            pending = await self._pending_batch(
                client, row, Head.decode(await self._read_head(client, row))
            )
            if pending:
                found.update(pending.terms)
            hits = Counter(message_id for term, message_id in found if term in wanted_set)
            return sorted(m.decode() for m, count in hits.items() if count == len(wanted))

        return await self._read("search", query)

    # ---- the search index, derived from the log ----

    async def index_terms(
        self, user_id: int, indexed_seq: int, terms: Sequence[tuple[str, str]]
    ) -> None:
        row = user_row(u64(user_id))
        u64(indexed_seq, "indexed_seq")
        postings: dict[bytes, dict[bytes, None]] = {}
        for term, mid in terms:
            by_term = postings.setdefault(text(term, "a search term").encode(), {})
            by_term[text(mid, "a message id").encode()] = None
        # One cell per term (more when it is big), named by this flush's mark: a later
        # flush adds cells of its own, and a retry of this one rewrites the same.
        cells = [
            cell
            for term, mids in postings.items()
            for cell in postings_cells(term, indexed_seq, mids)
        ]
        # The mark goes last, stamped with its position: the highest mark wins every
        # read whatever order the writes land in, so it never goes down.
        cells.append((INDEX_MARK, indexed_seq.to_bytes(8, "big")))
        async with self._session("index_terms") as client:
            for group in group_by_size(cells, WRITE_CALL_BYTES, _INDEX_CELLS_PER_CALL):
                mutations = [Mutation(column=column, value=value) for column, value in group]
                await client.mutateRowTs(
                    self._users, row, mutations, snapshot_timestamp(indexed_seq), {}
                )

    async def indexed_seq(self, user_id: int) -> int:
        row = user_row(u64(user_id))

        async def query(client: Any) -> int:
            cells = await self._get(client, self._users, row, [INDEX_MARK])
            mark = cells.get(INDEX_MARK)
            return int.from_bytes(mark, "big") if mark else 0

        return await self._read("indexed_seq", query)

    # ---- directory (user -> cell), global ----

    async def get_cell(self, user_id: int) -> str | None:
        row = user_row(u64(user_id))
        table = self._tables["directory"]

        async def query(client: Any) -> str | None:
            cell = (await self._get(client, table, row, [DIRECTORY_CELL])).get(DIRECTORY_CELL)
            return None if cell is None else cell.decode()

        return await self._read("get_cell", query)

    async def set_cell(self, user_id: int, cell: str) -> None:
        row = user_row(u64(user_id))
        value = text(cell, "cell").encode()
        async with self._session("set_cell") as client:
            await self._write_row(client, self._tables["directory"], row, [(DIRECTORY_CELL, value)])

    async def place_cell(self, user_id: int, cell: str) -> str:
        row = user_row(u64(user_id))
        mutation = Mutation(column=DIRECTORY_CELL, value=text(cell, "cell").encode())
        async with self._session("place_cell") as client:
            # expecting no value: False means another writer placed the user first
            await client.checkAndPut(
                self._tables["directory"], row, DIRECTORY_CELL, None, mutation, {}
            )
        placed = await self.get_cell(user_id)
        if placed is None:  # the insert was acknowledged, yet the cell is not there
            raise StoreUnavailable(f"directory: user {user_id} not placed; retry")
        return placed

    async def count_users_by_cell(self) -> dict[str, int]:
        table = self._tables["directory"]

        async def query(client: Any) -> dict[str, int]:
            counts: Counter[str] = Counter()
            scan = TScan(columns=[DIRECTORY_CELL], caching=ROWS_PER_SCAN_CALL)
            async for _, cells in self._scan(client, table, scan):
                if DIRECTORY_CELL in cells:
                    counts[cells[DIRECTORY_CELL].decode()] += 1
            return dict(counts)

        return await self._read("count_users_by_cell", query)

    async def users_in_cell(self, cell: str) -> list[int]:
        table = self._tables["directory"]
        wanted = text(cell, "cell").encode()

        async def query(client: Any) -> list[int]:
            scan = TScan(columns=[DIRECTORY_CELL], caching=ROWS_PER_SCAN_CALL)
            return sorted(
                [
                    user_of_row(row)
                    async for row, cells in self._scan(client, table, scan)
                    if cells.get(DIRECTORY_CELL) == wanted
                ]
            )

        return await self._read("users_in_cell", query)

    # ---- social graph: mutual friendships ----

    async def friends(self, user_id: int) -> set[int]:
        row = user_row(u64(user_id))
        table = self._tables["social"]

        async def query(client: Any) -> set[int]:
            cells = await self._get(client, table, row, [FRIEND_FAMILY])
            return {
                int.from_bytes(column[2:], "big")
                for column, value in cells.items()
                if value == FRIEND_YES
            }

        return await self._read("friends", query)

    async def add_friend(self, user_id: int, friend_id: int) -> None:
        await self._set_friendship(user_id, friend_id, FRIEND_YES)

    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        # A "no longer friends" cell, not a delete: an HBase delete would hide a
        # re-add stamped in the same millisecond.
        await self._set_friendship(user_id, friend_id, FRIEND_NO)

    async def _set_friendship(self, user_id: int, friend_id: int, value: bytes) -> None:
        u64(user_id)
        u64(friend_id, "friend id")
        if user_id == friend_id:
            raise BadRequest(f"user {user_id} cannot be their own friend")
        batches = [
            BatchMutation(
                row=user_row(a), mutations=[Mutation(column=friend_column(b), value=value)]
            )
            for a, b in ((user_id, friend_id), (friend_id, user_id))
        ]
        async with self._session("friendship") as client:
            await client.mutateRows(self._tables["social"], batches, {})

    # ---- addresses: email address or phone number -> user ----

    async def resolve_address(self, address: str) -> int | None:
        key = address_key(address)
        table = self._tables["addresses"]

        async def query(client: Any) -> int | None:
            value = (await self._get(client, table, key, [ADDRESS_USER])).get(ADDRESS_USER)
            return None if value is None else int.from_bytes(value, "big")

        return await self._read("resolve_address", query)

    async def add_address(self, address: str, user_id: int) -> None:
        key = address_key(address)
        value = u64(user_id).to_bytes(8, "big")
        async with self._session("add_address") as client:
            await self._write_row(client, self._tables["addresses"], key, [(ADDRESS_USER, value)])

    # ---- revoked user tokens ----

    async def revoke(self, revocation: Revocation) -> None:
        row = user_row(u64(revocation.user_id))
        column = REVOCATION_FAMILY + b":" + text(revocation.token_id, "token id").encode()
        at = round(revocation.revoked_at * 1_000_000).to_bytes(8, "big")
        async with self._session("revoke") as client:
            await self._write_row(client, self._tables["revocations"], row, [(column, at)])

    async def revocations(self) -> list[Revocation]:
        table = self._tables["revocations"]
        scan = TScan(columns=[REVOCATION_FAMILY], caching=ROWS_PER_SCAN_CALL)

        async def query(client: Any) -> list[Revocation]:
            return [
                Revocation(
                    user_of_row(row),
                    column[len(REVOCATION_FAMILY) + 1 :].decode(),
                    int.from_bytes(value, "big") / 1_000_000,
                )
                async for row, cells in self._scan(client, table, scan)
                for column, value in cells.items()
            ]

        return await self._read("revocations", query)

    async def user_ids(self) -> list[int]:
        # Heads whose last seq (their first 8 bytes) is not 0, without their values.
        has_log = "ValueFilter(!=, 'binaryprefix:" + "\x00" * 8 + "') AND KeyOnlyFilter()"
        scan = TScan(columns=[HEAD], caching=ROWS_PER_SCAN_CALL, filterString=has_log.encode())

        async def query(client: Any) -> list[int]:
            return sorted(
                [user_of_row(row) async for row, _ in self._scan(client, self._users, scan)]
            )

        return await self._read("user_ids", query)
