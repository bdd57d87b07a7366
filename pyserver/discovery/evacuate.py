"""Emptying a cell: every user it holds moved to other cells, none lost (`pyserver cell evacuate`).

`evacuate_cell(...)`:

1. checks there is somewhere to go, then **disables** the cell
   (`pyserver.cluster.state.set_cell_state`), so discovery places no new user
   there from now on;
2. lists the users the directory places in the cell and **moves** each one with
   the ordinary move (`pyserver.discovery.move`: freeze, copy, flip, tombstone),
   `parallel` at a time and at most `rate` a second, in batches (`move_users`:
   one ZooKeeper transaction freezes a batch, one wait covers it, one writes its
   tombstones; each user is copied and flipped on its own), each to the enabled
   target cell with the fewest users so far (targets are the cell's
   enabled peers with an active app server, or the ones named);
3. retries a move that fails (UNAVAILABLE while a node restarts, a store
   hiccup) a few times with a pause, and then lists the cell again: a user a
   discovery instance placed just before it heard of the disable is moved too.
   It stops when the cell holds no user, or when a whole pass moved nothing
   (the users left are reported as failed: running it again resumes).

A move that fails before its flip leaves the user in the old cell, unfrozen
and whole, so an evacuation stopped half-way (Ctrl-C, a crash) loses nothing:
the users not moved yet are still served where they were. `on_progress` hears
of every finished move (an `EvacuationProgress`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyserver.cluster.state import active_nodes, cell_names, cell_record, set_cell_state
from pyserver.cluster.zk import ZooKeeper
from pyserver.discovery.directory import Directory
from pyserver.discovery.move import MoveReport, move_user, move_users
from pyserver.errors import BadRequest, NotFound, PyserverError, Unavailable
from pyserver.store.base import Store

__all__ = ["EvacuationProgress", "EvacuationReport", "evacuate_cell", "evacuation_targets"]

log = logging.getLogger(__name__)

_MAX_PASSES = 5
# users moved together: one freeze, one wait for the acknowledgements, one tombstone write
_BATCH = 32


@dataclass
class EvacuationProgress:
    """How far an evacuation is: users moved and failed of those listed so far."""

    cell: str
    total: int
    moved: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def users_per_s(self) -> float:
        return self.moved / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvacuationReport:
    cell: str
    moved: int
    # users still in the cell after the last pass, with the last error of each
    failed: dict[int, str]
    # users moved into each target cell
    to: dict[str, int]
    seconds: float
    users_per_s: float
    passes: int


async def evacuation_targets(zk: ZooKeeper, cell: str, named: Iterable[str] = ()) -> list[str]:
    """The cells `cell`'s users may go to: the named ones (each must exist, be enabled and
    not be `cell`), else every other enabled cell with an active app server."""
    wanted = list(named)
    if cell in wanted:
        raise BadRequest(f"cannot evacuate cell {cell} into itself")
    candidates = wanted or [name for name in await cell_names(zk) if name != cell]
    targets = []
    for name in candidates:
        record = await cell_record(zk, name)  # NotFound for a named cell that does not exist
        if record.get("state", "enabled") != "enabled":
            if wanted:
                raise BadRequest(f"cell {name} is disabled: enable it or name another")
            continue
        if not await active_nodes(zk, name):
            if wanted:
                raise Unavailable(f"cell {name} has no active app server")
            continue
        targets.append(name)
    if not targets:
        raise Unavailable(f"no enabled cell with an active app server to move {cell}'s users to")
    return targets


async def evacuate_cell(
    zk: ZooKeeper,
    directory: Directory,
    stores: dict[str, Store],
    cell: str,
    *,
    targets: Iterable[str] = (),
    parallel: int = 16,
    rate: float = 0.0,
    retries: int = 3,
    ack_timeout_s: float = 15.0,
    on_progress: Callable[[EvacuationProgress], None] | None = None,
) -> EvacuationReport:
    """Move every user of `cell` to other cells (module docstring). `stores` are the opened
    stores of the cell and of every target, by cell name; `rate` 0 means no limit."""
    if parallel < 1:
        raise BadRequest("parallel must be at least 1")
    if rate < 0:
        raise BadRequest("rate must not be negative")
    await cell_record(zk, cell)  # NotFound for a cell that does not exist
    chosen = await evacuation_targets(zk, cell, targets)
    missing = [name for name in (cell, *chosen) if name not in stores]
    if missing:
        raise NotFound(f"no store opened for cell(s) {', '.join(missing)}")
    await set_cell_state(zk, cell, "disabled")  # only once there is somewhere to go
    counts = await directory.counts()
    load = {name: counts.get(name, 0) for name in chosen}
    moved_to = dict.fromkeys(chosen, 0)
    progress = EvacuationProgress(cell, total=0)
    errors: dict[int, str] = {}  # each user's last failure
    slot = _RateLimit(rate)
    batch_size = min(_BATCH, parallel)
    passes = 0
    while passes < _MAX_PASSES:
        users = await directory.users_in(cell)
        if not users:
            break
        passes += 1
        progress.total = progress.moved + len(users)
        moved_before = progress.moved
        progress.failed = 0
        queue = list(reversed(users))

        def record(user: int, target: str, error: str | None) -> None:
            if error is None:
                moved_to[target] += 1
                progress.moved += 1
                errors.pop(user, None)
            else:
                load[target] -= 1
                errors[user] = error
                progress.failed += 1
            if on_progress is not None:
                on_progress(progress)

        async def worker(queue: list[int]) -> None:
            while queue:
                batch = [queue.pop() for _ in range(min(batch_size, len(queue)))]
                moves = {}
                for user in batch:
                    target = min(load, key=lambda name: (load[name], name))
                    load[target] += 1
                    moves[user] = target
                await slot.wait(len(batch))
                try:
                    outcomes: dict[int, Any] = await move_users(
                        zk, directory, stores, moves, ack_timeout_s=ack_timeout_s
                    )
                except PyserverError as failure:
                    outcomes = dict.fromkeys(moves, failure)
                for user, target in moves.items():
                    if isinstance(outcomes.get(user), MoveReport):
                        record(user, target, None)
                        continue
                    # this user's move failed in the batch: again, on its own
                    log.info("moving user %d: %s; retrying alone", user, outcomes.get(user))
                    error = await _move_with_retries(
                        zk, directory, stores, user, target, slot, retries, ack_timeout_s
                    )
                    record(user, target, error)

        workers = min(-(-parallel // batch_size), -(-len(users) // batch_size))
        await asyncio.gather(*(worker(queue) for _ in range(workers)))
        if progress.moved == moved_before:
            break  # a whole pass moved nothing: report what is left
    remaining = await directory.users_in(cell)
    failed = {user: errors.get(user, "still in the cell after the last pass") for user in remaining}
    seconds = progress.seconds
    return EvacuationReport(
        cell=cell,
        moved=progress.moved,
        failed=failed,
        to={name: n for name, n in moved_to.items() if n},
        seconds=seconds,
        users_per_s=progress.moved / seconds if seconds > 0 else 0.0,
        passes=passes,
    )


async def _move_with_retries(
    zk: ZooKeeper,
    directory: Directory,
    stores: dict[str, Store],
    user: int,
    target: str,
    slot: _RateLimit,
    retries: int,
    ack_timeout_s: float,
) -> str | None:
    """Move one user; None once moved, else the last error's text."""
    error = ""
    for attempt in range(retries + 1):
        await slot.wait()
        try:
            await move_user(zk, directory, stores, user, target, ack_timeout_s=ack_timeout_s)
        except PyserverError as failure:
            error = f"{failure.code}: {failure}"
        except KeyError as failure:  # moved meanwhile to a cell whose store is not opened
            error = f"the user is in cell {failure}, whose store is not opened"
            break
        else:
            return None
        log.warning("moving user %d to %s failed (attempt %d): %s", user, target, attempt, error)
        await asyncio.sleep(0.2 * (attempt + 1))
    return error


class _RateLimit:
    """At most `rate` starts a second, spread evenly (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0

    async def wait(self, starts: int = 1) -> None:
        """Until `starts` more moves may begin."""
        if not self.interval:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.next)
        self.next = start + self.interval * starts
        if start > now:
            await asyncio.sleep(start - now)
