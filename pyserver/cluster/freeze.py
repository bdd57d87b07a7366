"""Users frozen in a cell while they move to another, or moved away, kept in ZooKeeper.

Layout, under the chroot, beside the cell's nodes:

    /cells/<cell>/frozen                   persistent: moves under way (a few at a time)
    /cells/<cell>/frozen/<user>            persistent {"state": "frozen", "to": CELL}
    /cells/<cell>/frozen/<user>/<node-id>  ephemeral: that app server refuses the user now
    /cells/<cell>/moved                    persistent: finished moves (thousands after an
    /cells/<cell>/moved/<user>             evacuation) {"state": "moved", "to": CELL}

A user listed under a cell, in either list, is not served by any app server of that
cell: its requests get UNAVAILABLE (clients ask discovery again and retry). "frozen"
means a move is under way; "moved" is the tombstone a finished move leaves, so that a
client with a stale route can never write to the old cell's copy of the log. Moving
the user back removes the tombstone.

The two lists are kept apart so that following them stays cheap: an evacuation
freezes thousands of users a few dozen at a time, and every app server must read the
list of moves under way after each freeze, before it can acknowledge. A finished move
goes from `frozen` to `moved` (the tombstone is written first, then the freeze
removed), so at every instant the user is in one list or both.

`FreezeWatch` follows one cell's lists. An app server runs one with a node id
and an `on_frozen` hook (`Mailbox.quiesce`): the moment a user is listed,
`holds(user)` is true (its ownership hooks refuse the user), then the hook
waits for the user's writes already under way and drops its cached image, and
only then does the watch acknowledge with its ephemeral child. The mover
(`pyserver.discovery.move`) copies the log only once every active node of the
cell has acknowledged, so no write can land in the old log after the copy.
The watch reads `frozen` after each change; a user leaving it is checked in
`moved` (one read each) before it is let go, so a tombstone is held from the
moment its freeze is. `moved` itself is read whole when the watch starts, on a
new session, and after it changes at most once every `MOVED_REREAD_S` (that is
how a tombstone removed, by a move back or the sweep of
`pyserver.discovery.moved`, is let go). Discovery runs one per cell without a
node id, to know which users to look up afresh.
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
    NotEmpty,
    ZooKeeper,
    ZooKeeperUnavailable,
)

__all__ = [
    "FreezeWatch",
    "acknowledgements",
    "all_acknowledged",
    "freeze_user",
    "freeze_users",
    "frozen_path",
    "listed_users",
    "mark_all_moved",
    "mark_moved",
    "moved_path",
    "moved_user_path",
    "read_frozen",
    "thaw_user",
    "user_path",
]

log = logging.getLogger(__name__)

_EVENTS = (CHILDREN_CHANGED, DELETED, CREATED)
_RETRY_S = 0.5
# users a node quiesces and acknowledges at once
_ACK_AT_ONCE = 64
# the list of finished moves is read whole at most this often
MOVED_REREAD_S = 1.0

OnFrozen = Callable[[int], Awaitable[None]]


def frozen_path(cell: str) -> str:
    return f"{layout.cell_path(cell)}/frozen"


def user_path(cell: str, user_id: int) -> str:
    """The user's freeze (a move under way)."""
    return f"{frozen_path(cell)}/{user_id}"


def moved_path(cell: str) -> str:
    return f"{layout.cell_path(cell)}/moved"


def moved_user_path(cell: str, user_id: int) -> str:
    """The user's tombstone (a finished move)."""
    return f"{moved_path(cell)}/{user_id}"


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


async def all_acknowledged(zk: ZooKeeper, cell: str, users: list[int], nodes: set[str]) -> bool:
    """Whether every one of these app servers acknowledged the freeze of every one of these
    users: one ZooKeeper round trip (a transaction of existence checks)."""
    checks = [f"{user_path(cell, user)}/{node}" for user in users for node in sorted(nodes)]
    return not checks or await zk.commit(checks=checks)


async def mark_all_moved(
    zk: ZooKeeper, cell: str, moves: dict[int, str], acknowledged_by: set[str] | None = None
) -> None:
    """`mark_moved` for many users. With `acknowledged_by` (the app servers known to have
    acknowledged every one of them: their freezes' only children), the tombstones written
    and the freezes removed in one transaction; else, or where that fails, the tombstones
    in one transaction, then the freezes (each one's acknowledgements read) in another, or
    one by one."""
    if not moves:
        return
    now = time.time()
    creates = [
        (moved_user_path(cell, user), orjson.dumps({"state": "moved", "to": to, "since": now}))
        for user, to in moves.items()
    ]
    users = list(moves)
    if acknowledged_by is not None:
        freezes = _freeze_trees(cell, users, [sorted(acknowledged_by)] * len(users))
        if await zk.commit(creates, deletes=freezes):
            return
    if not await zk.commit(creates):
        await zk.ensure_persistent(moved_path(cell))
        if not await zk.commit(creates):
            for user, to in moves.items():
                await mark_moved(zk, cell, user, to)
            return
    children = await asyncio.gather(*(_children(zk, user_path(cell, u)) for u in users))
    freezes = _freeze_trees(cell, users, children)
    if freezes and not await zk.commit(deletes=freezes):
        for user in users:  # one acknowledged meanwhile, or is gone already
            await _remove_tree(zk, user_path(cell, user))


def _freeze_trees(cell: str, users: list[int], children: list[list[str] | None]) -> list[str]:
    """The paths to delete, in order, to remove these users' freezes with their children."""
    paths: list[str] = []
    for user, names in zip(users, children, strict=True):
        if names is not None:
            paths += [f"{user_path(cell, user)}/{name}" for name in names]
            paths.append(user_path(cell, user))
    return paths


async def mark_moved(zk: ZooKeeper, cell: str, user_id: int, to: str) -> None:
    """Turn the freeze into the tombstone of a finished move: the tombstone written first,
    then the freeze removed, so the user is never in neither list."""
    data = orjson.dumps({"state": "moved", "to": to, "since": time.time()})
    path = moved_user_path(cell, user_id)
    try:
        await zk.create(path, data)
    except NoNode:  # the cell's first tombstone: make its list
        await zk.ensure_persistent(moved_path(cell))
        try:
            await zk.create(path, data)
        except NodeExists:
            await zk.set_data(path, data)
    except NodeExists:
        await zk.set_data(path, data)
    await _remove_tree(zk, user_path(cell, user_id))


async def _children(zk: ZooKeeper, path: str) -> list[str] | None:
    try:
        return await zk.get_children(path)
    except NoNode:
        return None


async def _remove_tree(zk: ZooKeeper, path: str) -> bool:
    """Delete a user's node with its children (acknowledgements, records of having seen
    it); False if it was not there. A child added meanwhile is deleted too."""
    for _ in range(10):
        children = await _children(zk, path)
        if children is None:
            return False
        for child in children:
            with contextlib.suppress(NoNode):
                await zk.delete(f"{path}/{child}")
        try:
            await zk.delete(path)
        except NoNode:
            return False
        except NotEmpty:
            continue
        return True
    raise ZooKeeperUnavailable(f"{path} keeps gaining children; not removed")


async def thaw_user(zk: ZooKeeper, cell: str, user_id: int) -> bool:
    """Unlist the user, frozen or moved (its acknowledgements first); False if it was not
    listed."""
    frozen = await _remove_tree(zk, user_path(cell, user_id))
    moved = await _remove_tree(zk, moved_user_path(cell, user_id))
    return frozen or moved


async def acknowledgements(zk: ZooKeeper, cell: str, user_id: int) -> set[str]:
    """The ids of the app servers that refuse the user now."""
    try:
        return set(await zk.get_children(user_path(cell, user_id)))
    except NoNode:
        return set()


async def _listed(zk: ZooKeeper, path: str) -> set[int]:
    try:
        children = await zk.get_children(path)
    except NoNode:
        return set()
    return {int(child) for child in children if child.isdigit()}


async def listed_users(zk: ZooKeeper, cell: str) -> set[int]:
    """The users listed under the cell (frozen or moved away), without their records."""
    return await _listed(zk, frozen_path(cell)) | await _listed(zk, moved_path(cell))


async def read_frozen(zk: ZooKeeper, cell: str) -> dict[int, dict[str, object]]:
    """Every listed user of the cell (frozen or moved away) with its record (tools, tests);
    a user in both lists (a move finishing now) with its tombstone."""
    records: dict[int, dict[str, object]] = {}
    for path in (frozen_path(cell), moved_path(cell)):
        for user in sorted(await _listed(zk, path)):
            with contextlib.suppress(NoNode, orjson.JSONDecodeError):
                data, _ = await zk.get(f"{path}/{user}")
                records[user] = orjson.loads(data) if data else {}
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
        self._frozen: frozenset[int] = frozenset()  # moves under way
        self._moved: frozenset[int] = frozenset()  # finished moves (tombstones)
        self._users: frozenset[int] = frozenset()  # both
        self._acked: set[int] = set()
        self._session: int | None = None
        self._dirty = asyncio.Event()
        self._moved_dirty = True  # read the tombstones whole (at the start, after a change)
        self._moved_read_at = -MOVED_REREAD_S
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[frozenset[int]], None]] = []

    @property
    def users(self) -> frozenset[int]:
        """The users listed now (frozen or moved away)."""
        return self._users

    @property
    def moved(self) -> frozenset[int]:
        """The users whose move away from this cell is finished (their tombstones)."""
        return self._moved

    def holds(self, user_id: int) -> bool:
        """True while the user is listed: no app server of this cell may serve it."""
        return user_id in self._users

    def subscribe(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call `listener(changed)` after each change: the users listed or let go since the
        last call, or whose move has finished (not every user listed: after an evacuation
        that is thousands, and the list changes with every batch)."""
        self._listeners.append(listener)

    async def start(self, timeout_s: float = 10.0) -> frozenset[int]:
        """Read the lists (and keep following them); ZooKeeperUnavailable past timeout_s."""
        self.zk.add_watch(frozen_path(self.cell), _EVENTS, self._on_event)
        self.zk.add_watch(moved_path(self.cell), _EVENTS, self._on_moved_event)
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
        with contextlib.suppress(RuntimeError):
            self.zk.remove_watch(moved_path(self.cell), _EVENTS, self._on_moved_event)

    def _on_event(self, _path: str) -> None:
        self._dirty.set()

    def _on_moved_event(self, _path: str) -> None:
        self._moved_dirty = True
        self._dirty.set()

    def _on_session(self, state: str, session_id: int | None) -> None:
        if state != "connected":
            return
        if session_id != self._session:
            self._session = session_id
            self._acked.clear()  # the old session's acknowledgements went with it
            self._moved_read_at = -MOVED_REREAD_S  # read the tombstones whole, now
        self._moved_dirty = True
        self._dirty.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
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
            if self._moved_dirty:  # the tombstones changed: read them again, but not yet
                wait_s = self._moved_read_at + MOVED_REREAD_S - loop.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait_s, 0.0)):
                        await self._dirty.wait()
                continue
            await self._dirty.wait()

    async def _read_names(self, path: str) -> frozenset[int]:
        try:
            children = await self.zk.get_children(path, watch=True)
        except NoNode:
            children = []
            if await self.zk.exists(path, watch=True):
                self._dirty.set()  # created meanwhile: read again
        return frozenset(int(name) for name in children if name.isdigit())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        before, moved_before = self._users, self._moved
        frozen = await self._read_names(frozen_path(self.cell))
        moved = self._moved
        if self._moved_dirty and loop.time() - self._moved_read_at >= MOVED_REREAD_S:
            # read after `frozen`: a move finishing meanwhile is in one of the two reads
            self._moved_dirty = False
            self._moved_read_at = loop.time()
            moved = await self._read_names(moved_path(self.cell))
        left = sorted(self._frozen - frozen - moved)
        # Moved away (held on), or thawed (let go)? The tombstone is written first. Usually
        # all of them moved: one round trip says so, else each is looked up.
        paths = [moved_user_path(self.cell, user) for user in left]
        if paths and await self.zk.commit(checks=paths):
            moved = moved | frozenset(left)
        elif paths:
            tombstones = await asyncio.gather(*map(self.zk.exists, paths))
            moved = moved | {user for user, there in zip(left, tombstones, strict=True) if there}
        added = frozen - self._frozen
        # Refused from this moment on: the ownership hooks read `holds` on every request.
        self._frozen, self._moved = frozen, moved
        self._users = frozen | moved
        self._acked &= frozen
        # the users listed or let go, or whose move finished, since the last read
        changed = (self._users ^ before) | (moved ^ moved_before)
        if changed:
            log.info("cell %s: %d users frozen, %d moved away", self.cell, len(frozen), len(moved))
            for listener in list(self._listeners):
                try:
                    listener(changed)
                except Exception:
                    log.exception("frozen-users listener failed cell=%s", self.cell)
        if self.node_id is None:
            return
        await self._acknowledge(frozen, added)

    async def _acknowledge(self, frozen: frozenset[int], added: frozenset[int]) -> None:
        """Each user quiesced on its own (its writes, its image), many at once, then all of
        them acknowledged in one transaction: a cell being evacuated freezes users by the
        dozen, and one at a time the snapshots and ZooKeeper round trips would add up."""
        path = frozen_path(self.cell)
        slots = asyncio.Semaphore(_ACK_AT_ONCE)

        async def quiesce(user_id: int) -> None:
            async with slots:
                if user_id in added and self._on_frozen is not None:
                    await self._on_frozen(user_id)  # writes under way finish, the image goes

        pending = sorted(frozen - self._acked)
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
                    continue  # thawed (or moved away) meanwhile
                self._acked.add(user_id)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # read again (the acknowledged ones are remembered)
