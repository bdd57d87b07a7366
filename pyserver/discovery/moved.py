"""Moved markers, removed once every discovery instance has seen the move.

A finished move leaves its user listed as "moved" under the old cell
(`pyserver.cluster.freeze`), so that a discovery instance holding the old cell in its
cache drops it and reads the directory again. Without cleaning, those markers pile up
in ZooKeeper forever. Layout, beside the cells':

    /discovery/instances/<instance>                ephemeral: a discovery instance alive now
    /cells/<cell>/moved/<user>/seen.<instance>     ephemeral: that instance has seen the
                                                   user's tombstone (it dropped its cached
                                                   cell when the user was frozen)

How it goes, in every discovery instance (`MovedMarkers`):

1. It registers itself under `/discovery/instances` (again after a new session).
2. Whenever a cell's listed users change, it has already dropped their cached cell
   (`DiscoveryService._forget_frozen`, synchronously, and it never caches a cell that
   lists the user); it then records that it has seen each moved user's tombstone.
3. Every `sweep_s`, it removes each "moved" marker older than `grace_s` that every
   live instance has seen (a versioned delete: a marker changed meanwhile stays).

An instance whose session expires loses its records and its registration with it; on
its new session it drops its whole cache (it may have missed a move meanwhile), so an
instance either has seen a marker or holds no cached cell from before it. A new
instance starts with an empty cache. The grace period covers a LOOKUP that read the
directory before the move's flip and is still under way (it would cache the old cell).

An instance whose ZooKeeper identity is read-only (ACLs: `pyserver cluster up --tls`)
records nothing and removes nothing; the markers are then kept, as before. (All of a
cluster's discovery instances sign in alike.)

The old cell's app servers no longer refuse the user once the marker is gone: they
check the user's cell with discovery when they load its image (`pyserver.processes.node`),
so a client with a stale route is still refused there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import orjson

from pyserver.cluster import freeze
from pyserver.cluster.zk import (
    BadVersion,
    NodeExists,
    NoNode,
    ZooKeeper,
    ZooKeeperForbidden,
    ZooKeeperUnavailable,
)

__all__ = ["INSTANCES", "SEEN_PREFIX", "MovedMarkers", "seen_by"]

log = logging.getLogger(__name__)

INSTANCES = "/discovery/instances"
SEEN_PREFIX = "seen."


def seen_by(children: list[str]) -> set[str]:
    """The instances whose "seen" records are among a listed user's children."""
    return {child[len(SEEN_PREFIX) :] for child in children if child.startswith(SEEN_PREFIX)}


class MovedMarkers:
    """One discovery instance's part in removing moved markers (see the module docstring).

    `on_new_session()` is called when the instance's ZooKeeper session is a new one (it
    must forget every cached cell). With `grace_s` None the instance records what it
    sees but removes nothing.
    """

    def __init__(
        self,
        zk: ZooKeeper,
        cells: Callable[[], list[str]],
        on_new_session: Callable[[], None],
        *,
        grace_s: float | None = 3600.0,
        sweep_s: float = 30.0,
        instance_id: str | None = None,
    ) -> None:
        self.zk = zk
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self._cells = cells
        self._on_new_session = on_new_session
        self._grace_s = grace_s
        self._sweep_s = sweep_s
        self._session: int | None = None
        self._registered_in: int | None = None  # the session that holds our registration
        # (cell, user) recorded as seen in this session
        self._recorded: set[tuple[str, int]] = set()
        self._pending: dict[str, frozenset[int]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.removed = 0
        self.disabled = False  # a read-only ZooKeeper identity: markers are kept

    async def start(self) -> None:
        self._session = self.zk.session_id
        try:
            await self._register()
        except ZooKeeperForbidden as refused:
            # Discovery signed in read-only (ZooKeeper ACLs, `pyserver cluster up --tls`):
            # it can record nothing, so no instance may remove what it has not seen.
            log.warning("moved markers are kept: this instance may not write: %s", refused)
            self.disabled = True
            return
        self.zk.add_listener(self._on_session)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._record_changes()))
        if self._grace_s is not None:
            self._tasks.append(loop.create_task(self._sweep_periodically()))

    async def close(self) -> None:
        if self.disabled:
            return
        self.zk.remove_listener(self._on_session)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(ZooKeeperUnavailable, NoNode):
            await self.zk.delete(f"{INSTANCES}/{self.instance_id}")

    # ---- registration and sessions ----

    async def _register(self) -> None:
        session = self.zk.session_id
        await self.zk.ensure_persistent(INSTANCES)
        with contextlib.suppress(NodeExists):
            await self.zk.create(f"{INSTANCES}/{self.instance_id}", ephemeral=True)
        self._registered_in = session

    def _on_session(self, state: str, session_id: int | None) -> None:
        if state != "connected" or session_id == self._session:
            return
        # A new session: this instance's records and registration expired with the old
        # one, and it may have missed a move meanwhile.
        self._session = session_id
        self._on_new_session()
        self._recorded.clear()
        self._wake.set()

    # ---- what this instance has seen ----

    def on_frozen(self, cell: str, users: frozenset[int]) -> None:
        """A cell's listed users changed (called after the cache dropped them): `users` are
        the ones whose move is finished (their tombstones)."""
        if self.disabled:
            return
        self._pending[cell] = users
        self._wake.set()

    async def _record_changes(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            try:
                if self._registered_in != self.zk.session_id:
                    await self._register()
                for cell, users in pending.items():
                    await self._record(cell, users)
            except ZooKeeperForbidden as refused:
                log.warning("moved markers: this instance may not record them: %s", refused)
                self.disabled = True
                return
            except ZooKeeperUnavailable as error:
                log.info("moved markers: not recorded now: %s", error)
                self._pending = {**pending, **self._pending}
                self._registered_in = None
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _record(self, cell: str, users: frozenset[int]) -> None:
        self._recorded = {(c, u) for c, u in self._recorded if c != cell or u in users}
        for user in sorted(users):
            if (cell, user) in self._recorded:
                continue
            path = f"{freeze.moved_user_path(cell, user)}/{SEEN_PREFIX}{self.instance_id}"
            try:
                await self.zk.create(path, ephemeral=True)
            except NodeExists:
                pass
            except NoNode:
                continue  # thawed meanwhile
            self._recorded.add((cell, user))

    # ---- removing the markers every instance has seen ----

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                await self.sweep()
            except ZooKeeperUnavailable as error:
                log.info("moved markers: sweep skipped: %s", error)
            except Exception:
                log.exception("moved markers: sweep failed")

    async def sweep(self) -> int:
        """Remove every moved marker older than the grace period that all live instances
        have seen; how many were removed."""
        if self._grace_s is None:
            return 0
        try:
            live = set(await self.zk.get_children(INSTANCES))
        except NoNode:
            return 0
        removed = 0
        cutoff = time.time() - self._grace_s
        for cell in self._cells():
            for user, record in (await freeze.read_frozen(self.zk, cell)).items():
                if record.get("state") == "moved" and _since(record) < cutoff:
                    removed += await self._remove_if_seen(cell, user, live, cutoff)
        self.removed += removed
        return removed

    async def _remove_if_seen(self, cell: str, user: int, live: set[str], cutoff: float) -> int:
        path = freeze.moved_user_path(cell, user)
        try:
            data, stat = await self.zk.get(path)
            record = orjson.loads(data) if data else {}
            if record.get("state") != "moved" or _since(record) >= cutoff:
                return 0
            children = await self.zk.get_children(path)
        except (NoNode, orjson.JSONDecodeError):
            return 0
        missing = live - seen_by(children)
        if missing:
            log.debug("moved marker cell=%s user=%d not seen by %s", cell, user, sorted(missing))
            return 0
        for child in children:
            with contextlib.suppress(NoNode):
                await self.zk.delete(f"{path}/{child}")
        try:
            await self.zk.delete(path, version=stat.version)
        except (NoNode, BadVersion):
            return 0  # removed by another instance, or changed meanwhile: it stays
        log.info(
            "moved marker removed cell=%s user=%d (seen by %d instances)", cell, user, len(live)
        )
        return 1


def _since(record: dict[str, object]) -> float:
    since = record.get("since")
    return float(since) if isinstance(since, int | float) else 0.0
