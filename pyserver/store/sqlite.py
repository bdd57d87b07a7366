"""The embedded store: every `Store` method on the standard library `sqlite3`, in WAL mode.

Owns two SQLite files (`pyserver.store.sqlite_file`, one writer thread with group
commit and a pool of readers each) laid out like the HBase schema of DESIGN.md
(docs/storage.md has the tables and keys): the data (log, snapshots, message bodies,
directory, social graph, addresses), fsynced on every commit with
`synchronous=FULL`; and beside it the search index (`<name>.index<ext>`), which is
derived from the log (`pyserver.app.indexer`) and so is committed without an fsync and
started afresh if it is ever damaged. Users are keyed by their id as 8 bytes
big-endian, so the full unsigned 64-bit range is stored losslessly and sorts
numerically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pyserver.errors import BadRequest
from pyserver.store.base import (
    Fenced,
    IndexMark,
    LogAppend,
    Revocation,
    Store,
    StoreUnavailable,
    WriteConflict,
)
from pyserver.store.sqlite_file import SYNCHRONOUS_MODES, Schema, SQLiteFile

__all__ = [
    "STORE_FILE", "SYNCHRONOUS_MODES", "SQLiteStore", "index_path", "open_cell_store", "store_path",
]  # fmt: skip

log = logging.getLogger(__name__)

# Each user's owner epoch (`claim`): the fencing token every owner's append checks.
_OWNERS_TABLE = """CREATE TABLE IF NOT EXISTS owners (
    user  BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
"""

_REVOCATIONS_TABLE = """CREATE TABLE IF NOT EXISTS revocations (
    user       BLOB NOT NULL,
    token      TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    PRIMARY KEY (user, token)
) WITHOUT ROWID;
"""

# One table per column family of `users` (l, s, m), then the other tables. The search
# index (family x) is in the index file.
_SCHEMA = Schema(
    create=f"""
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
{_REVOCATIONS_TABLE}{_OWNERS_TABLE}PRAGMA user_version = 4;
COMMIT;
""",
    version=4,
    migrations={
        # 2: the search index moved to its own file, derived again from the log there
        1: """
BEGIN IMMEDIATE;
DROP TABLE IF EXISTS terms;
DROP TABLE IF EXISTS indexed;
PRAGMA user_version = 2;
COMMIT;
""",
        # 3: revoked user tokens
        2: f"""
BEGIN IMMEDIATE;
{_REVOCATIONS_TABLE}PRAGMA user_version = 3;
COMMIT;
""",
        # 4: owner epochs (fencing tokens)
        3: f"""
BEGIN IMMEDIATE;
{_OWNERS_TABLE}PRAGMA user_version = 4;
COMMIT;
""",
    },
)

# The search index: the `x` family, and how far each user's log is indexed.
_INDEX_SCHEMA = Schema(
    create="""
BEGIN IMMEDIATE;
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
PRAGMA user_version = 1;
COMMIT;
""",
    version=1,
)

# Stay far below SQLite's limit on bound parameters per statement.
IN_LIST_CHUNK = 500

U64_MAX = (1 << 64) - 1

T = TypeVar("T")


# a single cell's store in its data folder
STORE_FILE = "store.sqlite3"


def store_path(data_dir: Path) -> Path:
    return data_dir / STORE_FILE


@asynccontextmanager
async def open_cell_store(data_dir: Path) -> AsyncIterator[SQLiteStore]:
    """The store of the cell on data_dir, for tools that work on it directly."""
    store = SQLiteStore(store_path(data_dir))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def index_path(path: str | os.PathLike[str]) -> str:
    """The search index file beside a store file: `cell.sqlite` -> `cell.index.sqlite`."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.index{ext}"


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


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SQLiteStore(Store):
    """The embedded store of a single-node cell: the data in one SQLite file (plus its
    -wal and -shm), and the search index derived from it in a second one beside it.

    A write returns once its transaction is committed; with `synchronous="FULL"`
    (or "EXTRA") that means fsynced, and concurrent writes share the commit.
    "NORMAL" and "OFF" trade that durability for speed (tests, bulk loads). The
    index file never fsyncs ("NORMAL", or "OFF" with an "OFF" store): what a crash
    takes from it, with its marks, is derived from the log again.
    `commits` counts the data file's committed transactions and `writes` the writes
    they acknowledged, so `writes / commits` is the mean group-commit batch size.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        # an append's compare-and-set refuses before it writes anything
        self._db = SQLiteFile(path, "store", _SCHEMA, synchronous, refusals=(WriteConflict,))
        index_mode = "OFF" if str(synchronous).upper() == "OFF" else "NORMAL"
        self._index = SQLiteFile(index_path(path), "search index", _INDEX_SCHEMA, index_mode)
        self._write = self._db.write
        self._read = self._db.read

    @property
    def path(self) -> str:
        return self._db.path

    @property
    def commits(self) -> int:
        """Transactions the data file's writer committed since this object was created."""
        return self._db.commits

    @property
    def writes(self) -> int:
        """Writes to the data file acknowledged since this object was created."""
        return self._db.writes

    # ---- lifecycle ----

    async def open(self) -> None:
        await self._db.open()
        try:
            await self._index.open()
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, sqlite3.DatabaseError) or isinstance(
                exc.__cause__, sqlite3.OperationalError
            ):
                await self._db.close()
                raise
            # A damaged index is derived data: start it afresh, the log rebuilds it.
            log.error("search index %s unreadable (%s): starting it afresh", self._index.path, exc)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._index.path + suffix)
            await self._index.open()

    async def close(self) -> None:
        await self._db.close()
        await self._index.close()

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
        epoch = write.owner_epoch
        await self._write(
            partial(_apply_append, write.user_id, expected, epoch, log_rows, message_rows)
        )
        if term_rows:  # derived: added once the records are committed
            await self._index.write(partial(_execute, _ADD_TERM, term_rows))

    async def claim(self, user_id: int) -> int:
        claimed: list[int] = []
        await self._write(partial(_claim, _u64_key(user_id), claimed))
        return claimed[0]

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
        # only "?" placeholders are formatted in; every value is a bound parameter
        rows = await self._index.read(
            _fetch,
            f"SELECT message_id FROM terms WHERE user = ? AND term IN ({marks})"  # nosec B608
            " GROUP BY message_id HAVING COUNT(*) = ? ORDER BY message_id",
            (user, *wanted, len(wanted)),
        )
        return [message_id for (message_id,) in rows]

    # ---- the search index, derived from the log ----

    async def index_terms(
        self, user_id: int, indexed_seq: int, terms: Sequence[tuple[str, str]]
    ) -> None:
        await self.index_terms_many([(user_id, indexed_seq, terms)])

    async def index_terms_many(self, marks: Sequence[IndexMark]) -> None:
        """Every user's terms and marks in one write of the index file."""
        term_rows: list[tuple[bytes, str, str]] = []
        mark_rows: list[tuple[bytes, bytes]] = []
        for user_id, indexed_seq, terms in marks:
            user = _u64_key(user_id)
            mark_rows.append((user, _u64_key(indexed_seq, "indexed_seq")))
            term_rows += [
                (user, _text(term, "a search term"), _text(message_id, "a message id"))
                for term, message_id in terms
            ]
        await self._index.write(partial(_apply_index_many, term_rows, mark_rows))

    async def indexed_seq(self, user_id: int) -> int:
        user = _u64_key(user_id)
        rows = await self._index.read(_fetch, "SELECT seq FROM indexed WHERE user = ?", (user,))
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

    async def place_cell(self, user_id: int, cell: str) -> str:
        row = (_u64_key(user_id), _text(cell, "cell"))
        await self._write(partial(_execute, _PLACE_CELL, [row]))
        placed = await self.get_cell(user_id)
        if placed is None:  # the insert was acknowledged, yet the row is not there
            raise StoreUnavailable(f"directory: user {user_id} not placed; retry")
        return placed

    async def count_users_by_cell(self) -> dict[str, int]:
        rows = await self._read(_fetch, "SELECT cell, COUNT(*) FROM directory GROUP BY cell", ())
        return dict(rows)

    async def users_in_cell(self, cell: str) -> list[int]:
        query = "SELECT user FROM directory WHERE cell = ? ORDER BY user"
        rows = await self._read(_fetch, query, (_text(cell, "cell"),))
        return [_u64(row[0]) for row in rows]

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

    # ---- revoked user tokens ----

    async def revoke(self, revocation: Revocation) -> None:
        row = (
            _u64_key(revocation.user_id),
            _text(revocation.token_id, "token id"),
            float(revocation.revoked_at),
        )
        await self._write(partial(_execute, _REVOKE, [row]))

    async def revocations(self) -> list[Revocation]:
        rows = await self._read(_fetch, "SELECT user, token, revoked_at FROM revocations", ())
        return [Revocation(_u64(user), token, at) for user, token, at in rows]

    async def user_ids(self) -> list[int]:
        rows = await self._read(_fetch, "SELECT DISTINCT user FROM log ORDER BY user", ())
        return [_u64(user) for (user,) in rows]


# ---- the SQL, as plain functions of a connection (run on the store's threads) ----

_ADD_TERM = "INSERT OR IGNORE INTO terms (user, term, message_id) VALUES (?, ?, ?)"

# Keep the stored snapshot when the new one is older (blob order is numeric order here).
_UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (user, seq, image) VALUES (?, ?, ?)"
    " ON CONFLICT (user) DO UPDATE SET seq = excluded.seq, image = excluded.image"
    " WHERE excluded.seq >= snapshots.seq"
)
_SET_CELL = "INSERT OR REPLACE INTO directory (user, cell) VALUES (?, ?)"
# the first writer wins: a user already placed keeps its cell
_PLACE_CELL = "INSERT OR IGNORE INTO directory (user, cell) VALUES (?, ?)"
_ADD_FRIEND = "INSERT OR IGNORE INTO social (user, friend) VALUES (?, ?)"
_REMOVE_FRIEND = "DELETE FROM social WHERE user = ? AND friend = ?"
_ADD_ADDRESS = "INSERT OR REPLACE INTO addresses (address, user) VALUES (?, ?)"
_REVOKE = "INSERT OR REPLACE INTO revocations (user, token, revoked_at) VALUES (?, ?, ?)"


# An append's compare-and-set in one query: the user's fencing epoch and last seq.
_EPOCH_AND_LAST_SEQ = (
    "SELECT (SELECT epoch FROM owners WHERE user = ?),"
    " (SELECT seq FROM log WHERE user = ? ORDER BY seq DESC LIMIT 1)"
)


def _last_seq(conn: sqlite3.Connection, user: bytes) -> int:
    row = conn.execute(
        "SELECT seq FROM log WHERE user = ? ORDER BY seq DESC LIMIT 1", (user,)
    ).fetchone()
    return _u64(row[0]) if row else 0


def _epoch(conn: sqlite3.Connection, user: bytes) -> int:
    row = conn.execute("SELECT epoch FROM owners WHERE user = ?", (user,)).fetchone()
    return int(row[0]) if row else 0


def _claim(user: bytes, claimed: list[int], conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO owners (user, epoch) VALUES (?, 1) "
        "ON CONFLICT (user) DO UPDATE SET epoch = epoch + 1",
        (user,),
    )
    claimed[:] = [_epoch(conn, user)]  # (a batch run again replaces its first answer)


def _apply_append(
    user_id: int,
    expected_seq: int,
    owner_epoch: int | None,
    log_rows: list[tuple[bytes, bytes, bytes]],
    message_rows: list[tuple[bytes, str, bytes]],
    conn: sqlite3.Connection,
) -> None:
    # The compare-and-set (and the fencing token's check): inside the batch's
    # transaction, so earlier appends and claims of the same batch are already counted.
    user = user_id.to_bytes(8, "big")
    current, last = conn.execute(_EPOCH_AND_LAST_SEQ, (user, user)).fetchone()
    if owner_epoch is not None and (current or 0) != owner_epoch:
        raise Fenced(user_id, expected_seq, owner_epoch, current or 0)
    actual = _u64(last) if last is not None else 0
    if actual != expected_seq:
        raise WriteConflict(user_id, expected_seq, actual)
    conn.executemany("INSERT INTO log (user, seq, record) VALUES (?, ?, ?)", log_rows)
    if message_rows:
        conn.executemany(
            "INSERT OR REPLACE INTO messages (user, message_id, body) VALUES (?, ?, ?)",
            message_rows,
        )


def _apply_index_many(
    term_rows: list[tuple[bytes, str, str]],
    mark_rows: list[tuple[bytes, bytes]],
    conn: sqlite3.Connection,
) -> None:
    if term_rows:
        conn.executemany(_ADD_TERM, term_rows)
    # 8-byte big-endian blobs compare as the numbers they hold: a mark only rises.
    conn.executemany(
        "INSERT INTO indexed (user, seq) VALUES (?, ?) "
        "ON CONFLICT (user) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > indexed.seq",
        mark_rows,
    )


def _execute(sql: str, rows: list[tuple[Any, ...]], conn: sqlite3.Connection) -> None:
    conn.executemany(sql, rows)


def _fetch(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _get_messages(conn: sqlite3.Connection, user: bytes, ids: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for chunk in _chunks(ids, IN_LIST_CHUNK):
        marks = ", ".join("?" * len(chunk))
        # only "?" placeholders are formatted in; every value is a bound parameter
        found.update(
            conn.execute(
                f"SELECT message_id, body FROM messages WHERE user = ? AND message_id IN ({marks})",  # nosec B608
                (user, *chunk),
            ).fetchall()
        )
    return found
