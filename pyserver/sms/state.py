"""What the SMS gateway remembers across a restart, in one SQLite file of its data folder.

Three things the SMSC's later messages refer to and nothing else holds: which
SMSC message ids make up which texted copy (a delivery receipt names only the id,
and may come hours after the submit); which conversation each phone was last
texted (a reply from the phone goes back into it); and when each text from a
phone was first seen (its key: an SMSC that sends a text again, its answer lost
in a crash, must find the same key so the mailbox stores it once). Each is
written before the gateway acts on it, so a receipt, a reply or a resend after a
restart still finds it; rows of a settled copy are deleted, phones' rows
replaced, texts' rows kept past their duplicate window only until the next.

Texted copies come a window at a time (the SMSC answers submits together): the
copies reported in one turn of the event loop are written as one write (one
statement per table, not per copy), and each caller returns once that write is
committed; the file's writer thread commits the writes queued meanwhile together.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pyserver.store.sqlite_file import Schema, SQLiteFile

__all__ = ["Copy", "SmsState"]

_SCHEMA = Schema(
    create="""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS parts (
    smsc_id    TEXT PRIMARY KEY,
    user       INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    phone      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS parts_of_copy ON parts (message_id, phone);
CREATE TABLE IF NOT EXISTS texted (
    phone     TEXT PRIMARY KEY,
    user      INTEGER NOT NULL,
    thread_id TEXT NOT NULL,
    at        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    fingerprint TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_by_time ON seen (first_seen);
PRAGMA user_version = 1;
COMMIT;
""",
    version=1,
)

# texts' sightings past their window are dropped once every this many new ones
_PRUNE_EVERY = 512

# (user, message id, phone, the SMSC ids of its parts not settled yet)
Copy = tuple[int, str, str, set[str]]


@dataclass(slots=True)
class _Copies:
    """The texted copies of one turn of the event loop, written together."""

    done: asyncio.Future[None]
    parts: list[tuple[str, int, str, str]] = field(default_factory=list)
    texted: list[tuple[str, int, str, float]] = field(default_factory=list)


class SmsState:
    """The gateway's file (module docstring); opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # WAL without an fsync per commit: a write survives the process (a crash, a
        # restart: what this file is for), not a power loss of the machine
        self._file = SQLiteFile(path, "SMS gateway state", _SCHEMA, synchronous="NORMAL")
        self._opening = asyncio.Lock()
        self._open = False
        self._sightings = 0
        self._copies: _Copies | None = None  # the batch callers of this turn join
        self._writing: set[asyncio.Task[None]] = set()

    async def _ready(self) -> SQLiteFile:
        if self._open:
            return self._file
        async with self._opening:
            if not self._open:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                await self._file.open()
                self._open = True
        return self._file

    async def close(self) -> None:
        if self._open:
            await self._file.close()
            self._open = False

    async def copy_of(self, smsc_id: str) -> Copy | None:
        """The copy an SMSC id is a part of, with its parts not settled yet."""
        return await (await self._ready()).read(_copy_of, smsc_id)

    async def settled(self, ids: list[str]) -> None:
        """These parts need no receipt any more (their copy is settled, or they are)."""
        await (await self._ready()).write(partial(_delete_parts, ids))

    async def last_texted(self, phone: str) -> tuple[int, str, float] | None:
        return await (await self._ready()).read(_last_texted, phone)

    async def sightings(self, since: float) -> dict[str, float]:
        """Every text first seen since `since`: fingerprint -> when (read once at start)."""
        return await (await self._ready()).read(_sightings, since)

    async def texted_copy(
        self, ids: list[str], user: int, message_id: str, phone: str, thread_id: str, at: float
    ) -> None:
        """A copy texted: its parts' SMSC ids and the phone's conversation; returns once
        committed (with the other copies of this turn of the event loop)."""
        file = await self._ready()
        batch = self._copies
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._copies = _Copies(loop.create_future())
            loop.call_soon(self._write_copies, file, batch)
        batch.parts += [(smsc_id, user, message_id, phone) for smsc_id in ids]
        batch.texted.append((phone, user, thread_id, at))
        await asyncio.shield(batch.done)

    def _write_copies(self, file: SQLiteFile, batch: _Copies) -> None:
        self._copies = None
        task = asyncio.get_running_loop().create_task(
            file.write(partial(_texted_copies, batch.parts, batch.texted))
        )

        def report(task: asyncio.Task[None]) -> None:
            if batch.done.done():
                return
            if task.cancelled():
                batch.done.cancel()
            elif (error := task.exception()) is not None:
                batch.done.set_exception(error)
            else:
                batch.done.set_result(None)

        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        task.add_done_callback(report)

    async def seen(self, fingerprint: str, first_seen: float, forget_before: float) -> None:
        """A text's first sighting (now and then, texts first seen before `forget_before`
        are dropped)."""
        self._sightings += 1
        prune = forget_before if self._sightings % _PRUNE_EVERY == 0 else None
        await (await self._ready()).write(partial(_upsert_seen, (fingerprint, first_seen), prune))


def _insert_parts(rows: list[tuple[str, int, str, str]], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO parts (smsc_id, user, message_id, phone) VALUES (?, ?, ?, ?)",
        rows,
    )


def _delete_parts(ids: list[str], conn: sqlite3.Connection) -> None:
    conn.executemany("DELETE FROM parts WHERE smsc_id = ?", [(i,) for i in ids])


def _upsert_texted(rows: list[tuple[str, int, str, float]], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO texted (phone, user, thread_id, at) VALUES (?, ?, ?, ?)", rows
    )


def _upsert_seen(
    row: tuple[str, float], forget_before: float | None, conn: sqlite3.Connection
) -> None:
    if forget_before is not None:
        conn.execute("DELETE FROM seen WHERE first_seen < ?", (forget_before,))
    conn.execute("INSERT OR REPLACE INTO seen (fingerprint, first_seen) VALUES (?, ?)", row)


def _sightings(conn: sqlite3.Connection, since: float) -> dict[str, float]:
    rows = conn.execute("SELECT fingerprint, first_seen FROM seen WHERE first_seen >= ?", (since,))
    return {str(fingerprint): float(at) for fingerprint, at in rows}


def _texted_copies(
    parts: list[tuple[str, int, str, str]],
    texted: list[tuple[str, int, str, float]],
    conn: sqlite3.Connection,
) -> None:
    _insert_parts(parts, conn)
    _upsert_texted(texted, conn)  # (in order: a phone texted twice keeps the later)


def _copy_of(conn: sqlite3.Connection, smsc_id: str) -> Copy | None:
    found = conn.execute(
        "SELECT user, message_id, phone FROM parts WHERE smsc_id = ?", (smsc_id,)
    ).fetchone()
    if found is None:
        return None
    user, message_id, phone = found
    parts = conn.execute(
        "SELECT smsc_id FROM parts WHERE message_id = ? AND phone = ?", (message_id, phone)
    ).fetchall()
    return int(user), str(message_id), str(phone), {str(part) for (part,) in parts}


def _last_texted(conn: sqlite3.Connection, phone: str) -> tuple[int, str, float] | None:
    found = conn.execute(
        "SELECT user, thread_id, at FROM texted WHERE phone = ?", (phone,)
    ).fetchone()
    return (int(found[0]), str(found[1]), float(found[2])) if found else None
