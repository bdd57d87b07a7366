"""The embedded store: every `Store` method on the standard library `sqlite3`, in WAL mode.

Owns one SQLite file laid out like the HBase schema of DESIGN.md (docs/storage.md
has the tables and keys). Users are keyed by their id as 8 bytes big-endian, so
the full unsigned 64-bit range is stored losslessly and sorts numerically.

Writes go through one writer thread that does group commit: it takes every
write queued at that moment, runs them in one transaction (each in its own
SAVEPOINT, so one that loses its compare-and-set or fails is rolled back alone),
commits once (one fsync with `synchronous=FULL`) and only then resolves the
callers' futures. Reads run on a small pool of read connections on worker
threads; in WAL mode they never wait behind the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from pyserver.errors import BadRequest
from pyserver.store.base import LogAppend, Store, StoreUnavailable, WriteConflict

__all__ = ["SQLiteStore"]

SCHEMA_VERSION = 2
# One table per column family of `users` (l, s, m, x), then the other tables.
_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS log (
    user   BLOB NOT NULL,
    seq    BLOB NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    user  BLOB PRIMARY KEY,
    seq   BLOB NOT NULL,
    image BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    user       BLOB NOT NULL,
    message_id TEXT NOT NULL,
    body       BLOB NOT NULL,
    PRIMARY KEY (user, message_id)
);
CREATE TABLE IF NOT EXISTS terms (
    user       BLOB NOT NULL,
    term       TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (user, term, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS indexed (
    user BLOB PRIMARY KEY,
    seq  BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directory (
    user BLOB PRIMARY KEY,
    cell TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS social (
    user   BLOB NOT NULL,
    friend BLOB NOT NULL,
    PRIMARY KEY (user, friend)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    user    BLOB NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 2;
COMMIT;
"""
# Brings a store of the version in the key up to the next one.
_MIGRATIONS = {
    # 2: the search index's mark per user (terms are derived from the log since)
    1: """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS indexed (
    user BLOB PRIMARY KEY,
    seq  BLOB NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 2;
COMMIT;
""",
}

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
READ_CONNECTIONS = 4
# Bounds one transaction's size and the latency of the first write in it.
MAX_BATCH = 1024
# How long a connection waits for another process's lock before giving up.
BUSY_TIMEOUT_S = 5.0
# Stay far below SQLite's limit on bound parameters per statement.
IN_LIST_CHUNK = 500

U64_MAX = (1 << 64) - 1

T = TypeVar("T")
# A write as the writer thread runs it: plain sqlite3 work on the writer connection.
WriteFn = Callable[[sqlite3.Connection], None]


def _u64_key(value: int, what: str = "user id") -> bytes:
    """The lossless, order-preserving key of an unsigned 64-bit number: 8 bytes big-endian."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= U64_MAX:
        raise BadRequest(f"{what} {value} is outside the unsigned 64-bit range")
    return value.to_bytes(8, "big")


def _u64(key: bytes) -> int:
    return int.from_bytes(key, "big")


def _blob(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


def _address_key(address: str) -> str:
    key = _text(address, "address").casefold()
    if not key:
        raise BadRequest("an address cannot be empty")
    return key


def _unavailable(action: str, cause: BaseException) -> StoreUnavailable:
    error = StoreUnavailable(f"{action}: {type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _QueuedWrite:
    """One write waiting for the writer thread, and the future its caller awaits."""

    __slots__ = ("apply", "future", "loop")

    def __init__(
        self, apply: WriteFn, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]
    ) -> None:
        self.apply = apply
        self.loop = loop
        self.future = future


def _settle(outcomes: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """Runs on the caller's event loop: hand each caller its write's outcome."""
    for future, error in outcomes:
        if future.done():  # the caller was cancelled; the write's fate is as reported
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class SQLiteStore(Store):
    """The embedded store of a single-node cell, in one SQLite file (plus its -wal and -shm).

    A write returns once its transaction is committed; with `synchronous="FULL"`
    (or "EXTRA") that means fsynced, and concurrent writes share the commit.
    "NORMAL" and "OFF" trade that durability for speed (tests, bulk loads).
    `commits` counts committed transactions and `writes` the writes they
    acknowledged, so `writes / commits` is the mean group-commit batch size.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self._path = os.fspath(path)
        if self._path == ":memory:" or self._path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file: its read and write connections share it")
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self._synchronous = mode
        self._lifecycle = asyncio.Lock()
        self._open = False
        self._writer_conn: sqlite3.Connection | None = None
        # None, put there by close(), tells the writer to stop after what came before it.
        self._write_queue: queue.SimpleQueue[_QueuedWrite | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_conns: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_read_conns: list[sqlite3.Connection] = []
        self._read_pool: ThreadPoolExecutor | None = None
        self._commits = 0
        self._writes = 0

    @property
    def path(self) -> str:
        return self._path

    @property
    def commits(self) -> int:
        """Transactions the writer thread committed since this object was created."""
        return self._commits

    @property
    def writes(self) -> int:
        """Writes acknowledged as committed since this object was created."""
        return self._writes

    # ---- lifecycle ----

    async def open(self) -> None:
        async with self._lifecycle:
            if self._open:
                return
            await asyncio.to_thread(self._connect_all)
            self._write_queue = queue.SimpleQueue()
            self._read_pool = ThreadPoolExecutor(
                max_workers=READ_CONNECTIONS, thread_name_prefix="sqlite-store-read"
            )
            self._writer = threading.Thread(
                target=self._run_writer, name="sqlite-store-writer", daemon=True
            )
            self._writer.start()
            self._open = True

    async def close(self) -> None:
        async with self._lifecycle:
            if not self._open:
                return
            # Refuse new work first; the writer drains everything queued before the None.
            self._open = False
            self._write_queue.put(None)
            assert self._writer is not None and self._read_pool is not None
            await asyncio.to_thread(self._writer.join)
            await asyncio.to_thread(self._read_pool.shutdown, wait=True)
            self._writer = None
            self._read_pool = None
            self._disconnect_all()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: sqlite3 never opens transactions behind our back.
        return sqlite3.connect(
            self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )

    def _connect_all(self) -> None:
        try:
            self._writer_conn = self._connect()
            mode = self._writer_conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
            self._writer_conn.execute(f"PRAGMA synchronous={self._synchronous}")
            version = self._writer_conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._writer_conn.executescript(_SCHEMA)
            while version in _MIGRATIONS:
                self._writer_conn.executescript(_MIGRATIONS[version])
                version += 1
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version}; this code knows version {SCHEMA_VERSION}"
                )
            for _ in range(READ_CONNECTIONS):
                conn = self._connect()
                conn.execute("PRAGMA query_only=ON")
                self._all_read_conns.append(conn)
                self._read_conns.put(conn)
        except sqlite3.Error as exc:
            self._disconnect_all()
            raise _unavailable(f"cannot open the SQLite store {self._path}", exc) from exc

    def _disconnect_all(self) -> None:
        conns = [*self._all_read_conns, self._writer_conn]
        self._all_read_conns = []
        self._read_conns = queue.SimpleQueue()
        self._writer_conn = None
        for conn in conns:
            if conn is not None:
                conn.close()

    def _ensure_open(self) -> None:
        if not self._open:
            raise StoreUnavailable(f"the SQLite store {self._path} is not open")

    # ---- the writer thread: group commit ----

    async def _write(self, apply: WriteFn) -> None:
        """Queue a write for the writer thread; return once it is committed."""
        self._ensure_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._write_queue.put(_QueuedWrite(apply, loop, future))
        await future

    def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            first = self._write_queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._write_queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit_batch(batch)
        # Only a write racing close() can be left; it was never run.
        leftovers: list[_QueuedWrite] = []
        while True:
            try:
                item = self._write_queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        closed = [StoreUnavailable(f"the SQLite store {self._path} was closed") for _ in leftovers]
        self._report(leftovers, closed)

    def _commit_batch(self, batch: list[_QueuedWrite]) -> None:
        conn = self._writer_conn
        assert conn is not None
        outcomes: list[BaseException | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                outcomes.append(self._run_in_savepoint(conn, write.apply))
            self._commit(conn)
        except Exception as exc:
            # Nothing of this batch is durable, so none of it may be acknowledged.
            self._rollback(conn)
            outcomes = [_unavailable("the store transaction failed", exc) for _ in batch]
        else:
            self._commits += 1
            self._writes += outcomes.count(None)
        self._report(batch, outcomes)

    @staticmethod
    def _run_in_savepoint(conn: sqlite3.Connection, apply: WriteFn) -> BaseException | None:
        """Run one write; on failure undo it alone. Raises only if the transaction is lost."""
        conn.execute("SAVEPOINT write")
        try:
            apply(conn)
        except Exception as exc:
            # If SQLite already rolled the whole transaction back (I/O error, disk
            # full), this raises and the caller fails the whole batch.
            conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
            if isinstance(exc, sqlite3.Error):
                return _unavailable("the write failed", exc)
            return exc
        conn.execute("RELEASE write")
        return None

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # If even this fails, the next BEGIN reports the broken connection.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    @staticmethod
    def _report(batch: list[_QueuedWrite], outcomes: Sequence[BaseException | None]) -> None:
        """Resolve each caller's future on its own loop, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for write, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(write.loop, []).append((write.future, outcome))
        for loop, results in by_loop.items():
            # RuntimeError: that loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, results)

    # ---- read connections ----

    async def _read(self, query: Callable[..., T], *args: Any) -> T:
        self._ensure_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, self._run_read, query, args)

    def _run_read(self, query: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._read_conns.get()
        try:
            return query(conn, *args)
        except sqlite3.Error as exc:
            raise _unavailable("the store read failed", exc) from exc
        finally:
            self._read_conns.put(conn)

    # ---- per-user log, snapshots, messages, search ----

    async def append(self, write: LogAppend) -> None:
        user = _u64_key(write.user_id)
        expected = write.expected_seq
        _u64_key(expected, "expected_seq")
        records = [_blob(record, "a log record") for record in write.records]
        _u64_key(expected + len(records), "the last seq")
        log_rows = [
            (user, (expected + i).to_bytes(8, "big"), record)
            for i, record in enumerate(records, start=1)
        ]
        message_rows = [
            (user, _text(message_id, "a message id"), _blob(body, "a message body"))
            for message_id, body in write.messages.items()
        ]
        term_rows = [
            (user, _text(term, "a search term"), _text(message_id, "a message id"))
            for term, message_id in write.terms
        ]
        await self._write(
            partial(_apply_append, write.user_id, expected, log_rows, message_rows, term_rows)
        )

    async def last_seq(self, user_id: int) -> int:
        return await self._read(_last_seq, _u64_key(user_id))

    async def read_log(
        self, user_id: int, after_seq: int = 0, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        user = _u64_key(user_id)
        if (limit is not None and limit <= 0) or after_seq >= U64_MAX:
            return []
        after = max(after_seq, 0).to_bytes(8, "big")
        rows = await self._read(
            _fetch,
            "SELECT seq, record FROM log WHERE user = ? AND seq > ? ORDER BY seq LIMIT ?",
            (user, after, -1 if limit is None else limit),
        )
        return [(_u64(seq), record) for seq, record in rows]

    async def write_snapshot(self, user_id: int, seq: int, image: bytes) -> None:
        row = (_u64_key(user_id), _u64_key(seq, "snapshot seq"), _blob(image, "a snapshot"))
        await self._write(partial(_execute, _UPSERT_SNAPSHOT, [row]))

    async def read_snapshot(self, user_id: int) -> tuple[int, bytes] | None:
        rows = await self._read(
            _fetch, "SELECT seq, image FROM snapshots WHERE user = ?", (_u64_key(user_id),)
        )
        return (_u64(rows[0][0]), rows[0][1]) if rows else None

    async def get_messages(self, user_id: int, message_ids: Sequence[str]) -> dict[str, bytes]:
        user = _u64_key(user_id)
        ids = list(dict.fromkeys(_text(message_id, "a message id") for message_id in message_ids))
        if not ids:
            return {}
        return await self._read(_get_messages, user, ids)

    async def search(self, user_id: int, terms: Sequence[str]) -> list[str]:
        user = _u64_key(user_id)
        wanted = list(dict.fromkeys(_text(term, "a search term") for term in terms))
        if not wanted:
            return []
        marks = ", ".join("?" * len(wanted))
        rows = await self._read(
            _fetch,
            f"SELECT message_id FROM terms WHERE user = ? AND term IN ({marks})"
            " GROUP BY message_id HAVING COUNT(*) = ? ORDER BY message_id",
            (user, *wanted, len(wanted)),
        )
        return [message_id for (message_id,) in rows]

    # ---- the search index, derived from the log ----

    async def index_terms(
        self, user_id: int, indexed_seq: int, terms: Sequence[tuple[str, str]]
    ) -> None:
        user = _u64_key(user_id)
        mark = _u64_key(indexed_seq, "indexed_seq")
        term_rows = [
            (user, _text(term, "a search term"), _text(message_id, "a message id"))
            for term, message_id in terms
        ]
        await self._write(partial(_apply_index, user, mark, term_rows))

    async def indexed_seq(self, user_id: int) -> int:
        user = _u64_key(user_id)
        rows = await self._read(_fetch, "SELECT seq FROM indexed WHERE user = ?", (user,))
        return _u64(rows[0][0]) if rows else 0

    # ---- directory (user -> cell), global ----

    async def get_cell(self, user_id: int) -> str | None:
        rows = await self._read(
            _fetch, "SELECT cell FROM directory WHERE user = ?", (_u64_key(user_id),)
        )
        return rows[0][0] if rows else None

    async def set_cell(self, user_id: int, cell: str) -> None:
        row = (_u64_key(user_id), _text(cell, "cell"))
        await self._write(partial(_execute, _SET_CELL, [row]))

    async def count_users_by_cell(self) -> dict[str, int]:
        rows = await self._read(_fetch, "SELECT cell, COUNT(*) FROM directory GROUP BY cell", ())
        return dict(rows)

    # ---- social graph: mutual friendships ----

    async def friends(self, user_id: int) -> set[int]:
        rows = await self._read(
            _fetch, "SELECT friend FROM social WHERE user = ?", (_u64_key(user_id),)
        )
        return {_u64(friend) for (friend,) in rows}

    async def add_friend(self, user_id: int, friend_id: int) -> None:
        pair = self._friend_pair(user_id, friend_id)
        await self._write(partial(_execute, _ADD_FRIEND, pair))

    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        pair = self._friend_pair(user_id, friend_id)
        await self._write(partial(_execute, _REMOVE_FRIEND, pair))

    @staticmethod
    def _friend_pair(user_id: int, friend_id: int) -> list[tuple[bytes, bytes]]:
        user, friend = _u64_key(user_id), _u64_key(friend_id, "friend id")
        if user == friend:
            raise BadRequest(f"user {user_id} cannot be their own friend")
        return [(user, friend), (friend, user)]

    # ---- addresses: email address or phone number -> user ----

    async def resolve_address(self, address: str) -> int | None:
        rows = await self._read(
            _fetch, "SELECT user FROM addresses WHERE address = ?", (_address_key(address),)
        )
        return _u64(rows[0][0]) if rows else None

    async def add_address(self, address: str, user_id: int) -> None:
        row = (_address_key(address), _u64_key(user_id))
        await self._write(partial(_execute, _ADD_ADDRESS, [row]))

    async def user_ids(self) -> list[int]:
        rows = await self._read(_fetch, "SELECT DISTINCT user FROM log ORDER BY user", ())
        return [_u64(user) for (user,) in rows]


# ---- the SQL, as plain functions of a connection (run on the store's threads) ----

# Keep the stored snapshot when the new one is older (blob order is numeric order here).
_UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (user, seq, image) VALUES (?, ?, ?)"
    " ON CONFLICT (user) DO UPDATE SET seq = excluded.seq, image = excluded.image"
    " WHERE excluded.seq >= snapshots.seq"
)
_SET_CELL = "INSERT OR REPLACE INTO directory (user, cell) VALUES (?, ?)"
_ADD_FRIEND = "INSERT OR IGNORE INTO social (user, friend) VALUES (?, ?)"
_REMOVE_FRIEND = "DELETE FROM social WHERE user = ? AND friend = ?"
_ADD_ADDRESS = "INSERT OR REPLACE INTO addresses (address, user) VALUES (?, ?)"


def _last_seq(conn: sqlite3.Connection, user: bytes) -> int:
    row = conn.execute(
        "SELECT seq FROM log WHERE user = ? ORDER BY seq DESC LIMIT 1", (user,)
    ).fetchone()
    return _u64(row[0]) if row else 0


def _apply_append(
    user_id: int,
    expected_seq: int,
    log_rows: list[tuple[bytes, bytes, bytes]],
    message_rows: list[tuple[bytes, str, bytes]],
    term_rows: list[tuple[bytes, str, str]],
    conn: sqlite3.Connection,
) -> None:
    # The compare-and-set: inside the batch's transaction, so earlier appends
    # of the same batch are already counted.
    actual = _last_seq(conn, user_id.to_bytes(8, "big"))
    if actual != expected_seq:
        raise WriteConflict(user_id, expected_seq, actual)
    conn.executemany("INSERT INTO log (user, seq, record) VALUES (?, ?, ?)", log_rows)
    if message_rows:
        conn.executemany(
            "INSERT OR REPLACE INTO messages (user, message_id, body) VALUES (?, ?, ?)",
            message_rows,
        )
    if term_rows:
        conn.executemany(
            "INSERT OR IGNORE INTO terms (user, term, message_id) VALUES (?, ?, ?)", term_rows
        )


def _apply_index(
    user: bytes, mark: bytes, term_rows: list[tuple[bytes, str, str]], conn: sqlite3.Connection
) -> None:
    if term_rows:
        conn.executemany(
            "INSERT OR IGNORE INTO terms (user, term, message_id) VALUES (?, ?, ?)", term_rows
        )
    # 8-byte big-endian blobs compare as the numbers they hold: the mark only rises.
    conn.execute(
        "INSERT INTO indexed (user, seq) VALUES (?, ?) "
        "ON CONFLICT (user) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > indexed.seq",
        (user, mark),
    )


def _execute(sql: str, rows: list[tuple[Any, ...]], conn: sqlite3.Connection) -> None:
    conn.executemany(sql, rows)


def _fetch(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _get_messages(conn: sqlite3.Connection, user: bytes, ids: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for chunk in _chunks(ids, IN_LIST_CHUNK):
        marks = ", ".join("?" * len(chunk))
        found.update(
            conn.execute(
                f"SELECT message_id, body FROM messages WHERE user = ? AND message_id IN ({marks})",
                (user, *chunk),
            ).fetchall()
        )
    return found
