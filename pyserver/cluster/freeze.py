"""Users frozen in a cell while they move to another, kept in ZooKeeper.

Layout, under the chroot, beside the cell's nodes:

    /cells/<cell>/frozen                   persistent
    /cells/<cell>/frozen/<user>            persistent {"state": "frozen"|"moved", "to": CELL}
    /cells/<cell>/frozen/<user>/<node-id>  ephemeral: that app server refuses the user now

A user listed under a cell is not served by any app server of that cell: its
requests get UNAVAILABLE (clients ask discovery again and retry). "frozen"
means a move is under way; "moved" is the tombstone a finished move leaves, so
that a client with a stale route can never write to the old cell's copy of
the log. Moving the user back removes the tombstone.

`FreezeWatch` follows one cell's list. An app server runs one with a node id
and an `on_frozen` hook (`Mailbox.quiesce`): the moment a user is listed,
`holds(user)` is true (its ownership hooks refuse the user), then the hook
waits for the user's writes already under way and drops its cached image, and
only then does the watch acknowledge with its ephemeral child. The mover
(`pyserver.discovery.move`) copies the log only once every active node of the
cell has acknowledged, so no write can land in the old log after the copy.
Discovery runs one per cell without a node id, to know which users to look up
afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from pyserver.cluster import layout
from pyserver.cluster.zk import (
    CHILDREN_CHANGED,
    CREATED,
    DELETED,
    NodeExists,
    NoNode,
    ZooKeeper,
    ZooKeeperUnavailable,
)

__all__ = [
    "FreezeWatch",
    "acknowledgements",
    "freeze_user",
    "freeze_users",
    "frozen_path",
    "listed_users",
    "mark_all_moved",
    "mark_moved",
    "read_frozen",
    "thaw_user",
    "user_path",
]

log = logging.getLogger(__name__)

_EVENTS = (CHILDREN_CHANGED, DELETED, CREATED)
_RETRY_S = 0.5
# users a node quiesces and acknowledges at once
_ACK_AT_ONCE = 64

OnFrozen = Callable[[int], Awaitable[None]]


def frozen_path(cell: str) -> str:
    return f"{layout.cell_path(cell)}/frozen"


def user_path(cell: str, user_id: int) -> str:
    return f"{frozen_path(cell)}/{user_id}"


# ---- the mover's side ----


async def freeze_user(zk: ZooKeeper, cell: str, user_id: int, to: str) -> None:
    """List the user as frozen in `cell` (moving to `to`); idempotent."""
    data = orjson.dumps({"state": "frozen", "to": to, "since": time.time()})
    try:
        await zk.create(user_path(cell, user_id), data)
    except NoNode:  # the cell's first freeze: make its list, then list the user
        await zk.ensure_persistent(frozen_path(cell))
        try:
            await zk.create(user_path(cell, user_id), data)
        except NodeExists:
            await zk.set_data(user_path(cell, user_id), data)
    except NodeExists:
        await zk.set_data(user_path(cell, user_id), data)


async def freeze_users(zk: ZooKeeper, cell: str, moves: dict[int, str]) -> None:
    """List many users as frozen in `cell` (each moving to its cell in `moves`): one
    ZooKeeper transaction when none is listed yet, else one by one (`freeze_user`)."""
    now = time.time()
    creates = [
        (user_path(cell, user), orjson.dumps({"state": "frozen", "to": to, "since": now}))
        for user, to in moves.items()
    ]
    if creates and not await zk.commit(creates):
        for user, to in moves.items():
            await freeze_user(zk, cell, user, to)


async def mark_all_moved(zk: ZooKeeper, cell: str, moves: dict[int, str]) -> None:
    """`mark_moved` for many users: one transaction, else one by one."""
    now = time.time()
    sets = [
        (user_path(cell, user), orjson.dumps({"state": "moved", "to": to, "since": now}))
        for user, to in moves.items()
    ]
    if sets and not await zk.commit(sets=sets):
        for user, to in moves.items():
            await mark_moved(zk, cell, user, to)


async def mark_moved(zk: ZooKeeper, cell: str, user_id: int, to: str) -> None:
    """Turn the freeze into the tombstone of a finished move."""
    data = orjson.dumps({"state": "moved", "to": to, "since": time.time()})
    await zk.set_data(user_path(cell, user_id), data)


async def thaw_user(zk: ZooKeeper, cell: str, user_id: int) -> bool:
    """Unlist the user (its acknowledgements first); False if it was not listed."""
    path = user_path(cell, user_id)
    try:
        children = await zk.get_children(path)
    except NoNode:
        return False
    for child in children:
        with contextlib.suppress(NoNode):
            await zk.delete(f"{path}/{child}")
    try:
        await zk.delete(path)
    except NoNode:
        return False
    return True


async def acknowledgements(zk: ZooKeeper, cell: str, user_id: int) -> set[str]:
    """The ids of the app servers that refuse the user now."""
    try:
        return set(await zk.get_children(user_path(cell, user_id)))
    except NoNode:
        return set()


async def listed_users(zk: ZooKeeper, cell: str) -> set[int]:
    """The users listed under the cell (frozen or moved away), without their records."""
    try:
        children = await zk.get_children(frozen_path(cell))
    except NoNode:
        return set()
    return {int(child) for child in children if child.isdigit()}


async def read_frozen(zk: ZooKeeper, cell: str) -> dict[int, dict[str, object]]:
    """Every listed user of the cell with its record (tools, tests)."""
    try:
        children = await zk.get_children(frozen_path(cell))
    except NoNode:
        return {}
    records: dict[int, dict[str, object]] = {}
    for child in children:
        if not child.isdigit():
            continue
        with contextlib.suppress(NoNode, orjson.JSONDecodeError):
            data, _ = await zk.get(f"{frozen_path(cell)}/{child}")
            records[int(child)] = orjson.loads(data) if data else {}
    return records


# ---- the watching side ----


class FreezeWatch:
    """The users listed under one cell, followed in ZooKeeper (see the module docstring)."""

    def __init__(
        self,
        zk: ZooKeeper,
        cell: str,
        node_id: str | None = None,
        on_frozen: OnFrozen | None = None,
    ) -> None:
        self.zk = zk
        self.cell = cell
        self.node_id = node_id
        self._on_frozen = on_frozen
        self._users: frozenset[int] = frozenset()
        self._names: frozenset[str] = frozenset()  # the list's children, as read
        self._acked: set[int] = set()
        self._session: int | None = None
        self._dirty = asyncio.Event()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[frozenset[int]], None]] = []

    @property
    def users(self) -> frozenset[int]:
        """The users listed now."""
        return self._users

    def holds(self, user_id: int) -> bool:
        """True while the user is listed: no app server of this cell may serve it."""
        return user_id in self._users

    def subscribe(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call `listener(users)` after each change of the list."""
        self._listeners.append(listener)

    async def start(self, timeout_s: float = 10.0) -> frozenset[int]:
        """Read the list (and keep following it); ZooKeeperUnavailable past timeout_s."""
        path = frozen_path(self.cell)
        self.zk.add_watch(path, _EVENTS, self._on_event)
        self.zk.add_listener(self._on_session)
        self._session = self.zk.session_id
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(timeout_s):
                await self._loaded.wait()
        except TimeoutError:
            await self.close()
            raise ZooKeeperUnavailable(
                f"could not read cell {self.cell}'s frozen users within {timeout_s:g} s"
            ) from None
        return self._users

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.zk.remove_listener(self._on_session)
        with contextlib.suppress(RuntimeError):
            self.zk.remove_watch(frozen_path(self.cell), _EVENTS, self._on_event)

    def _on_event(self, _path: str) -> None:
        self._dirty.set()

    def _on_session(self, state: str, session_id: int | None) -> None:
        if state != "connected":
            return
        if session_id != self._session:
            self._session = session_id
            self._acked.clear()  # the old session's acknowledgements went with it
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            self._dirty.clear()
            try:
                await self._read()
            except ZooKeeperUnavailable as error:
                log.info("cell %s frozen users not read: %s", self.cell, error)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RETRY_S):
                        await self._dirty.wait()
                continue
            except Exception:
                log.exception("reading cell %s frozen users failed", self.cell)
                await asyncio.sleep(_RETRY_S)
                continue
            self._loaded.set()
            await self._dirty.wait()

    async def _read(self) -> None:
        path = frozen_path(self.cell)
        try:
            children = await self.zk.get_children(path, watch=True)
        except NoNode:
            children = []
            if await self.zk.exists(path, watch=True):
                self._dirty.set()  # created meanwhile: read again
        # The list holds every tombstone too (thousands after an evacuation): compare the
        # names, and turn only the ones that changed into user ids.
        names = frozenset(children)
        appeared, gone = names - self._names, self._names - names
        self._names = names
        added = frozenset(int(name) for name in appeared if name.isdigit())
        removed = {int(name) for name in gone if name.isdigit()}
        users = (self._users - removed) | added if appeared or gone else self._users
        changed = bool(added or removed)
        # Refused from this moment on: the ownership hooks read `holds` on every request.
        self._users = users
        self._acked &= users
        if changed:
            log.info("cell %s: %d users frozen or moved away", self.cell, len(users))
        for listener in list(self._listeners):
            try:
                listener(users)
            except Exception:
                log.exception("frozen-users listener failed cell=%s", self.cell)
        if self.node_id is None:
            return
        # Each user quiesced on its own (its writes, its image), many at once, then all of
        # them acknowledged in one transaction: a cell being evacuated freezes users by the
        # dozen, and one at a time the snapshots and ZooKeeper round trips would add up.
        slots = asyncio.Semaphore(_ACK_AT_ONCE)

        async def quiesce(user_id: int) -> None:
            async with slots:
                if user_id in added and self._on_frozen is not None:
                    await self._on_frozen(user_id)  # writes under way finish, the image goes

        pending = sorted(users - self._acked)
        outcomes = await asyncio.gather(*map(quiesce, pending), return_exceptions=True)
        ready = [user for user, outcome in zip(pending, outcomes, strict=True) if outcome is None]
        acks = [(f"{path}/{user_id}/{self.node_id}", b"") for user_id in ready]
        if acks and await self.zk.commit(acks, ephemeral=True):
            self._acked.update(ready)
        else:  # one of them acknowledged already, or thawed meanwhile: one by one
            for user_id in ready:
                try:
                    await self.zk.create(f"{path}/{user_id}/{self.node_id}", ephemeral=True)
                except NodeExists:
                    pass
                except NoNode:
                    continue  # thawed meanwhile
                self._acked.add(user_id)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # read again (the acknowledged ones are remembered)
