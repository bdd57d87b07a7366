"""One SQLite file in WAL mode: its connections, its writer thread (group commit) and its readers.

`pyserver.store.sqlite` keeps the store in two of these: the log, bodies and the other
tables that cannot be derived (fsynced on every commit), and the search index derived
from the log (committed without an fsync: after a power loss it is derived again).

Writes go through one writer thread that does group commit: it takes every
write queued at that moment, runs them in one transaction, commits once (one
fsync with `synchronous=FULL`) and only then resolves the callers' futures. A
write that fails is undone alone: most failures are refusals raised before the
write changed anything (`refusals`: a lost compare-and-set), which need no undo;
any other failure rolls the batch back and runs it again with each write in its
own SAVEPOINT. So the common batch costs no statement per write beyond the
write's own. Reads run on a small pool of read connections on worker threads; in
WAL mode they never wait behind the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyserver.store.base import StoreUnavailable

__all__ = ["SYNCHRONOUS_MODES", "SQLiteFile", "Schema", "WriteFn", "unavailable"]

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
READ_CONNECTIONS = 4
# Bounds one transaction's size and the latency of the first write in it.
MAX_BATCH = 1024
# How long a connection waits for another process's lock before giving up.
BUSY_TIMEOUT_S = 5.0
# Opening a file another process is opening too is tried this many times.
_OPEN_ATTEMPTS = 10

T = TypeVar("T")
# A write as the writer thread runs it: plain sqlite3 work on the writer connection.
WriteFn = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Schema:
    """A file's tables: the script that creates them (it sets `PRAGMA user_version` to
    `version`), and scripts that bring a file of an older version up to the next one."""

    create: str
    version: int
    migrations: dict[int, str] = field(default_factory=dict)


def _locked(error: StoreUnavailable) -> bool:
    cause = error.__cause__
    text = str(cause).lower()
    return isinstance(cause, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


# SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13


def unavailable(action: str, cause: BaseException) -> StoreUnavailable:
    reason = f"{type(cause).__name__}: {cause}"
    if getattr(cause, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
        # Nothing of the write is kept; SQLite takes writes again once space is freed.
        reason = "the disk is full; writes are refused until space is freed"
    error = StoreUnavailable(f"{action}: {reason}")
    error.__cause__ = cause
    return error


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


class SQLiteFile:
    """One SQLite file: a writer thread doing group commit, and a pool of readers.

    `role` names the file in errors and thread names ("store", "search index").
    `refusals`: the exceptions a write raises only before it changed anything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        role: str,
        schema: Schema,
        synchronous: str,
        refusals: tuple[type[Exception], ...] = (),
    ) -> None:
        self._path = os.fspath(path)
        if self._path == ":memory:" or self._path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file: its read and write connections share it")
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self._role = role
        self._schema = schema
        self._refusals = refusals
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
        """Open the connections (creating or upgrading the schema) and start the writer."""
        async with self._lifecycle:
            if self._open:
                return
            for attempt in range(1, _OPEN_ATTEMPTS + 1):
                try:
                    await asyncio.to_thread(self._connect_all)
                    break
                except StoreUnavailable as exc:
                    # Processes opening a new file at once race to make it WAL and create
                    # its schema; SQLite may answer "locked" without waiting its timeout.
                    if attempt == _OPEN_ATTEMPTS or not _locked(exc):
                        raise
                    await asyncio.sleep(0.05 * attempt)
            self._write_queue = queue.SimpleQueue()
            self._read_pool = ThreadPoolExecutor(
                max_workers=READ_CONNECTIONS, thread_name_prefix=f"sqlite-{self._role}-read"
            )
            self._writer = threading.Thread(
                target=self._run_writer, name=f"sqlite-{self._role}-writer", daemon=True
            )
            self._writer.start()
            self._open = True

    async def close(self) -> None:
        """Finish every write queued, then close the connections."""
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
                self._writer_conn.executescript(self._schema.create)
                version = self._schema.version
            while version in self._schema.migrations:
                self._writer_conn.executescript(self._schema.migrations[version])
                version += 1
            if version != self._schema.version:
                raise sqlite3.DatabaseError(
                    f"schema version {version}; this code knows version {self._schema.version}"
                )
            for _ in range(READ_CONNECTIONS):
                conn = self._connect()
                conn.execute("PRAGMA query_only=ON")
                self._all_read_conns.append(conn)
                self._read_conns.put(conn)
        except sqlite3.Error as exc:
            self._disconnect_all()
            raise unavailable(f"cannot open the SQLite {self._role} {self._path}", exc) from exc

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
            raise StoreUnavailable(f"the SQLite {self._role} {self._path} is not open")

    # ---- the writer thread: group commit ----

    async def write(self, apply: WriteFn) -> None:
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
        closed = [
            StoreUnavailable(f"the SQLite {self._role} {self._path} was closed") for _ in leftovers
        ]
        self._report(leftovers, closed)

    def _commit_batch(self, batch: list[_QueuedWrite]) -> None:
        conn = self._writer_conn
        assert conn is not None
        outcomes: list[BaseException | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = self._run_plain(conn, batch)
            if len(outcomes) < len(batch):
                # a write failed half done: undo the batch, then each write alone
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcomes = [self._run_in_savepoint(conn, write.apply) for write in batch]
            self._commit(conn)
        except Exception as exc:
            # Nothing of this batch is durable, so none of it may be acknowledged.
            self._rollback(conn)
            outcomes = [unavailable(f"the {self._role} transaction failed", exc) for _ in batch]
        else:
            self._commits += 1
            self._writes += outcomes.count(None)
        self._report(batch, outcomes)

    def _run_plain(
        self, conn: sqlite3.Connection, batch: list[_QueuedWrite]
    ) -> list[BaseException | None]:
        """Run the writes without savepoints; stops short at a write that failed other
        than by a refusal (the caller then undoes the batch)."""
        outcomes: list[BaseException | None] = []
        for write in batch:
            try:
                write.apply(conn)
            except self._refusals as refused:
                outcomes.append(refused)
            except Exception:
                break
            else:
                outcomes.append(None)
        return outcomes

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
                return unavailable("the write failed", exc)
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

    async def read(self, query: Callable[..., T], *args: Any) -> T:
        """Run `query(connection, *args)` on a read connection, on a worker thread."""
        self._ensure_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, self._run_read, query, args)

    def _run_read(self, query: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._read_conns.get()
        try:
            return query(conn, *args)
        except sqlite3.Error as exc:
            raise unavailable(f"the {self._role} read failed", exc) from exc
        finally:
            self._read_conns.put(conn)
