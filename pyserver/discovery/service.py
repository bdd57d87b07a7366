"""The discovery service: user -> cell (the directory) -> owning app server (the cell's ring).

`DiscoveryService` answers LOOKUP, CELL_RING and CELLS (docs/protocol.md,
"Discovery") behind `execute(op, payload)`, the shape the app server's
`Dispatcher` drives, so `pyserver.processes.discovery` serves it on the same
wire shell. It keeps:

* `CellsWatch`: the cells listed under `/cells` in ZooKeeper, each with a
  `RingWatch` (its state and active nodes) and a `FreezeWatch` (its users
  frozen for, or gone after, a move);
* the `Directory` (durable, in the store) and a bounded cache of it;
* the user counts per cell, read at start and every `counts_refresh_s`, plus
  this instance's own placements since.

LOOKUP of a user the directory does not have places the user in the enabled
cell (one with an active node) with the fewest users; the placement is a
conditional insert, so two instances placing the same new user at once both
answer the first writer's cell. A cached answer is used unless the user is
listed under its cached cell (moving or moved): then the directory is read
again. The service holds no state but that cache, so any number of instances
can run side by side; each records the moves it has seen, and the "moved"
markers every instance has seen are removed (`pyserver.discovery.moved`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from pyserver.cluster import layout
from pyserver.cluster.freeze import FreezeWatch
from pyserver.cluster.ringwatch import RingView, RingWatch
from pyserver.cluster.zk import (
    CHILDREN_CHANGED,
    CREATED,
    DELETED,
    NoNode,
    ZooKeeper,
    ZooKeeperUnavailable,
)
from pyserver.discovery.directory import Directory
from pyserver.discovery.moved import MovedMarkers
from pyserver.errors import BadRequest, NotFound, Unavailable
from pyserver.snapcache import SnapshotCache
from pyserver.userid import check_user_id
from pyserver.wire.ops import Op

__all__ = ["CellsWatch", "DiscoveryService", "ring_reply"]

log = logging.getLogger(__name__)

_EVENTS = (CHILDREN_CHANGED, CREATED, DELETED)
_RETRY_S = 0.5


class _Cell:
    """One cell as discovery follows it."""

    def __init__(self, zk: ZooKeeper, name: str) -> None:
        self.name = name
        self.ring = RingWatch(zk, name)
        self.frozen = FreezeWatch(zk, name)

    @property
    def view(self) -> RingView:
        return self.ring.view

    async def start(self, timeout_s: float) -> None:
        await self.ring.start(timeout_s)
        try:
            await self.frozen.start(timeout_s)
        except BaseException:
            await self.ring.close()
            raise

    async def close(self) -> None:
        await self.frozen.close()
        await self.ring.close()


class CellsWatch:
    """Every cell under `/cells`, each with its ring and its frozen users, kept current."""

    def __init__(self, zk: ZooKeeper) -> None:
        self.zk = zk
        self.cells: dict[str, _Cell] = {}
        self._dirty = asyncio.Event()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_frozen: list[Callable[[str, frozenset[int]], None]] = []

    def on_frozen(self, listener: Callable[[str, frozenset[int]], None]) -> None:
        """Call `listener(cell, changed)` whenever a cell's listed users change (`changed`:
        the users listed, let go, or moved away since the last call)."""
        self._on_frozen.append(listener)

    async def start(self, timeout_s: float = 10.0) -> None:
        self.zk.add_watch(layout.CELLS, _EVENTS, self._on_event)
        self.zk.add_listener(self._on_session)
        self._task = asyncio.get_running_loop().create_task(self._run(timeout_s))
        try:
            async with asyncio.timeout(timeout_s):
                await self._loaded.wait()
        except TimeoutError:
            await self.close()
            raise ZooKeeperUnavailable(f"could not read the cells within {timeout_s:g} s") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.zk.remove_listener(self._on_session)
        with contextlib.suppress(RuntimeError):
            self.zk.remove_watch(layout.CELLS, _EVENTS, self._on_event)
        cells, self.cells = list(self.cells.values()), {}
        for cell in cells:
            await cell.close()

    def _on_event(self, _path: str) -> None:
        self._dirty.set()

    def _on_session(self, state: str, _session: int | None) -> None:
        if state == "connected":
            self._dirty.set()

    async def _run(self, timeout_s: float) -> None:
        while True:
            self._dirty.clear()
            try:
                try:
                    names = set(await self.zk.get_children(layout.CELLS, watch=True))
                except NoNode:
                    names = set()
                    if await self.zk.exists(layout.CELLS, watch=True):
                        self._dirty.set()
                for name in sorted(names - set(self.cells)):
                    await self._add(name, timeout_s)
                for name in sorted(set(self.cells) - names):
                    log.info("cell %s is gone from ZooKeeper", name)
                    await self.cells.pop(name).close()
            except ZooKeeperUnavailable as error:
                log.info("cells not read from ZooKeeper: %s", error)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RETRY_S):
                        await self._dirty.wait()
                continue
            except Exception:
                log.exception("reading the cells failed")
                await asyncio.sleep(_RETRY_S)
                continue
            self._loaded.set()
            await self._dirty.wait()

    async def _add(self, name: str, timeout_s: float) -> None:
        try:
            layout.check_name("cell", name)
        except ValueError:
            return
        cell = _Cell(self.zk, name)
        await cell.start(timeout_s)
        cell.frozen.subscribe(lambda users, name=name: self._frozen_changed(name, users))
        self.cells[name] = cell
        if cell.frozen.users:  # what the first read found, which the subscription missed
            self._frozen_changed(name, cell.frozen.users)
        view = cell.view
        log.info("following cell %s: %s, %d active", name, view.cell_state, len(view.active))

    def moved(self, name: str) -> frozenset[int]:
        """The users whose move away from cell `name` is finished (its tombstones)."""
        cell = self.cells.get(name)
        return cell.frozen.moved if cell is not None else frozenset()

    def _frozen_changed(self, name: str, users: frozenset[int]) -> None:
        for listener in list(self._on_frozen):
            listener(name, users)

    def placeable(self) -> list[str]:
        """The enabled cells with at least one active app server, sorted by name."""
        return sorted(
            name
            for name, cell in self.cells.items()
            if cell.view.cell_state == "enabled" and cell.view.active
        )


def ring_reply(view: RingView) -> dict[str, Any]:
    """CELL_RING's reply for a cell's view: what a client needs to compute owners itself."""
    return {
        "cell": view.cell,
        "state": view.cell_state,
        "version": view.version,
        "tokens": view.ring.tokens_per_node,
        "nodes": [
            {"node": m.node_id, "addr": m.addr, "tokens": m.tokens, "state": m.state}
            for m in view.members.values()
        ],
    }


def _user(payload: dict[str, Any]) -> int:
    return check_user_id(payload.get("user"), "user")


def _flag(payload: dict[str, Any], name: str, default: bool) -> bool:
    value = payload.get(name, default)
    if type(value) is not bool:
        raise BadRequest(f"{name}: must be true or false, not {value!r}")
    return value


class DiscoveryService:
    """LOOKUP, CELL_RING and CELLS over the directory and the cells (see the module docstring)."""

    def __init__(
        self,
        zk: ZooKeeper,
        directory: Directory,
        *,
        cache_users: int = 1_000_000,
        counts_refresh_s: float = 30.0,
        moved_grace_s: float | None = None,
        moved_sweep_s: float = 30.0,
    ) -> None:
        self.zk = zk
        self.directory = directory
        self.cells = CellsWatch(zk)
        self.cells.on_frozen(self._forget_frozen)
        # user -> cell name, most recently used kept (the native LRU; weight 1 per entry).
        self._cache = SnapshotCache(max(1, cache_users), max(1, cache_users))
        # what this instance has seen of moves, and the removal of markers all have seen
        self.moved = MovedMarkers(
            zk,
            lambda: list(self.cells.cells),
            self._cache.clear,
            grace_s=moved_grace_s,
            sweep_s=moved_sweep_s,
        )
        # a tombstone is recorded as seen under itself: the users whose move is finished
        self.cells.on_frozen(
            lambda name, _users: self.moved.on_frozen(name, self.cells.moved(name))
        )
        self._counts: Counter[str] = Counter()
        self._counts_refresh_s = counts_refresh_s
        self._counts_task: asyncio.Task[None] | None = None
        # placements under way here, by user: concurrent LOOKUPs of one new user share one
        self._placing: dict[int, asyncio.Future[str]] = {}
        self._requests: Counter[str] = Counter()
        self._figures: Counter[str] = Counter()
        self._handlers: dict[Op, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            Op.LOOKUP: self._lookup,
            Op.CELL_RING: self._cell_ring,
            Op.CELLS: self._cells,
        }

    async def start(self, timeout_s: float = 10.0) -> None:
        await self.cells.start(timeout_s)
        try:
            await self.moved.start()
        except BaseException:
            await self.cells.close()
            raise
        await self._refresh_counts()
        self._counts_task = asyncio.get_running_loop().create_task(self._count_periodically())

    async def close(self) -> None:
        if self._counts_task is not None:
            self._counts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counts_task
        await self.moved.close()
        await self.cells.close()

    # ---- what the dispatcher asks of every service ----

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        handler = self._handlers.get(op)
        if handler is None:
            raise BadRequest(f"op: {op.name} is not an operation of the discovery service")
        self._requests[op.name] += 1
        return await handler(payload)

    def subscribe(self, user_id: int, callback: Callable[[dict[str, Any]], None]) -> Any:
        raise BadRequest("SUBSCRIBE: the discovery service has no mailboxes to watch")

    def unsubscribe(self, token: Any) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        """Requests by operation, cache and placement figures, the cells seen."""
        return {
            "requests": dict(self._requests),
            "cache_users": len(self._cache),
            **dict(self._figures),
            "moved_markers_removed": self.moved.removed,
            "cells": {
                name: {"state": cell.view.cell_state, "active": cell.view.active}
                for name, cell in sorted(self.cells.cells.items())
            },
        }

    # ---- operations ----

    async def _lookup(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p)
        place = _flag(p, "place", True)
        fresh = _flag(p, "fresh", False)
        cell_name = await self.cell_of(user, place=place, fresh=fresh)
        reply: dict[str, Any] = {"user": user, "cell": cell_name, "owner": None, "node": None}
        if cell_name is None:
            return reply
        cell = self.cells.cells.get(cell_name)
        if cell is None:
            reply.update(frozen=False, ring_version=0, cell_state="missing")
            return reply
        view = cell.view
        owner = view.owner(user)
        reply.update(
            owner=owner.addr if owner is not None else None,
            node=owner.node_id if owner is not None else None,
            frozen=cell.frozen.holds(user),
            ring_version=view.version,
            cell_state=view.cell_state,
        )
        return reply

    async def _cell_ring(self, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("cell")
        if not isinstance(name, str):
            raise BadRequest(f"cell: must be a cell name, not {name!r}")
        cell = self.cells.cells.get(name)
        if cell is None:
            raise NotFound(f"no cell {name!r}")
        return ring_reply(cell.view)

    async def _cells(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "cells": {
                name: {
                    "state": cell.view.cell_state,
                    "active": cell.view.active,
                    "users": self._counts.get(name, 0),
                    "frozen": len(cell.frozen.users),
                }
                for name, cell in sorted(self.cells.cells.items())
            }
        }

    # ---- the directory, cached ----

    async def cell_of(self, user: int, *, place: bool = True, fresh: bool = False) -> str | None:
        """The user's cell (placing a new user when `place`), the cache first unless `fresh`."""
        cached = None if fresh else self._cache.get(user)
        if cached is not None:
            cell = self.cells.cells.get(cached)
            if cell is not None and not cell.frozen.holds(user):
                self._figures["cache_hits"] += 1
                return cached
        self._figures["directory_reads"] += 1
        name = await self.directory.cell_of(user)
        if name is None:
            if not place:
                return None
            name = await self._place(user)
        self._remember(user, name)
        return name

    def _remember(self, user: int, name: str) -> None:
        cell = self.cells.cells.get(name)
        if cell is not None and not cell.frozen.holds(user):
            self._cache.put(user, name, 1)

    def _forget_frozen(self, name: str, users: frozenset[int]) -> None:
        for user in users:
            if self._cache.peek(user) == name:
                self._cache.pop(user)

    async def _place(self, user: int) -> str:
        pending = self._placing.get(user)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._placing[user] = future
        try:
            candidates = self.cells.placeable()
            if not candidates:
                raise Unavailable("no enabled cell with an active app server to place a user in")
            chosen = min(candidates, key=lambda name: (self._counts.get(name, 0), name))
            placed = await self.directory.place(user, chosen)
            if placed == chosen:
                self._counts[chosen] += 1
                self._figures["placed"] += 1
            else:
                self._figures["placed_elsewhere"] += 1  # another instance was first
            future.set_result(placed)
            return placed
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no warning when nobody else waits
            raise
        finally:
            del self._placing[user]

    async def _refresh_counts(self) -> None:
        counts = await self.directory.counts()
        self._counts = Counter(counts)

    async def _count_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._counts_refresh_s)
            try:
                await self._refresh_counts()
            except Unavailable as error:
                log.warning("user counts not refreshed: %s", error)
