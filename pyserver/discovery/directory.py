"""The durable user -> cell directory, over the store's global `directory` table.

`Directory(store)` reads and writes through the store's own directory methods
(`get_cell`, `set_cell`, `count_users_by_cell`) and adds what they lack: the
placement of a new user as a *conditional* insert, so that two discovery
instances placing the same new user at once both end up with the cell of the
first writer. The insert is the engine's own atomic primitive, on a connection
of this module's (the store's methods stay as they are):

* SQLite: `INSERT OR IGNORE` into the directory table, in one transaction;
* HBase: Thrift1 `checkAndPut` of `c:cell` expecting the cell to be absent.

Either way the winner's cell is read back and returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

from pyserver.errors import BadRequest, PyserverError
from pyserver.store.base import Store, StoreUnavailable
from pyserver.userid import is_user_id

__all__ = ["Directory"]

# SQLite: how long a placement waits for the file's write lock (the nodes write too).
_SQLITE_BUSY_S = 10.0
_HBASE_CONNECTIONS = 4
_HBASE_TIMEOUT_S = 10.0


def _check_user(user_id: Any) -> int:
    if not is_user_id(user_id, minimum=0):
        raise BadRequest(f"user: {user_id!r} is not a user id (0..2**64-1)")
    return user_id


class Directory:
    """User -> cell over an opened store (see the module docstring). Close it before the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._placer: _SQLitePlacer | _HBasePlacer = _placer_for(store)

    async def cell_of(self, user_id: int) -> str | None:
        """The user's cell, or None for a user not placed yet."""
        return await self.store.get_cell(_check_user(user_id))

    async def place(self, user_id: int, cell: str) -> str:
        """Put a new user in `cell` unless the directory has it already; the user's cell."""
        _check_user(user_id)
        if not isinstance(cell, str) or not cell:
            raise BadRequest(f"cell: {cell!r} is not a cell name")
        await self._placer.insert_if_absent(user_id, cell)
        placed = await self.store.get_cell(user_id)
        if placed is None:  # the insert answered, yet the row is not there
            raise StoreUnavailable(f"directory: user {user_id} not placed; retry")
        return placed

    async def assign(self, user_id: int, cell: str) -> None:
        """Point the user at `cell`, whatever it was (the flip of a move)."""
        await self.store.set_cell(_check_user(user_id), cell)

    async def counts(self) -> dict[str, int]:
        """How many users each cell has (a scan: call it rarely)."""
        return await self.store.count_users_by_cell()

    async def close(self) -> None:
        await self._placer.close()


def _placer_for(store: Store) -> _SQLitePlacer | _HBasePlacer:
    from pyserver.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return _SQLitePlacer(store.path)
    try:
        from pyserver.store.hbase import HBaseStore
    except ImportError:  # no HBase client installed: only SQLite can be used
        HBaseStore = None  # type: ignore[assignment,misc]
    if HBaseStore is not None and isinstance(store, HBaseStore):
        host, port = store.address
        return _HBasePlacer(host, port, store.table("directory"))
    raise TypeError(f"no conditional directory insert for {type(store).__name__}")


class _SQLitePlacer:
    """INSERT OR IGNORE on a connection of its own to the store's file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def _insert(self, user_id: int, cell: str) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(
                self._path, timeout=_SQLITE_BUSY_S, isolation_level=None, check_same_thread=False
            )
        self._conn.execute(
            "INSERT OR IGNORE INTO directory (user, cell) VALUES (?, ?)",
            (user_id.to_bytes(8, "big"), cell),
        )

    async def insert_if_absent(self, user_id: int, cell: str) -> None:
        async with self._lock:  # one connection, one statement at a time
            try:
                await asyncio.to_thread(self._insert, user_id, cell)
            except sqlite3.Error as error:
                raise StoreUnavailable(f"directory: placing user {user_id}: {error}") from error

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await asyncio.to_thread(conn.close)


class _HBasePlacer:
    """checkAndPut of the user's `c:cell`, expecting no value, on a small pool of its own."""

    def __init__(self, host: str, port: int, table: bytes) -> None:
        from pyserver.store.hbase_pool import ThriftPool

        self._pool = ThriftPool(host, port, _HBASE_CONNECTIONS, _HBASE_TIMEOUT_S)
        self._table = table

    async def insert_if_absent(self, user_id: int, cell: str) -> None:
        from Hbase_thrift import Mutation

        from pyserver.store.hbase_layout import DIRECTORY_CELL, user_row

        mutation = Mutation(column=DIRECTORY_CELL, value=cell.encode())
        try:
            async with asyncio.timeout(_HBASE_TIMEOUT_S), self._pool.borrow() as connection:
                # the answer (False: another writer placed the user first) is read back
                await connection.client.checkAndPut(
                    self._table, user_row(user_id), DIRECTORY_CELL, None, mutation, {}
                )
        except PyserverError:
            raise
        except Exception as error:
            raise StoreUnavailable(
                f"directory: placing user {user_id}: {type(error).__name__}: {error}"
            ) from error

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.close()
