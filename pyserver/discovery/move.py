"""Moving a user between cells with no message lost: `pyserver admin move-user`.

`move_user(...)`:

1. **freeze**: list the user under the old cell (`pyserver.cluster.freeze`);
   every app server of that cell refuses the user's requests with
   UNAVAILABLE from then on, lets the writes already under way finish, and
   acknowledges; the move waits for every active node's acknowledgement;
2. **copy** the log entries the new cell's store lacks (with the message
   bodies and search terms they refer to), then the latest snapshot;
3. **flip** the directory entry to the new cell (the commit point: discovery
   answers the new cell from now on), after clearing any tombstone an earlier
   move out of the new cell left there;
4. **unfreeze**: the old cell keeps the user listed as "moved" (a tombstone),
   so a client with a stale route is refused there and asks discovery again.

Clients retry UNAVAILABLE, so requests made during the move wait and then go
to the new cell; a SEND retried with its key is never applied twice, since
the key lives in the copied log. A failure before the flip unfreezes the user
in the old cell; running the command again resumes the copy where it stopped.

Each cell's store is named in its ZooKeeper record (`/cells/<cell>`, field
"store", as `pyserver cluster up` writes it) unless given explicitly; the
records are read and written through `pyserver.cluster.state` (`cell_record`,
`set_cell_record` and `active_nodes` are re-exported here for older callers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyserver import logcodec
from pyserver.cluster import freeze, layout
from pyserver.cluster.state import (
    active_nodes,
    add_cluster_arguments,
    cell_record,
    cluster_settings,
    set_cell_record,
)
from pyserver.cluster.zk import ZooKeeper
from pyserver.discovery.directory import Directory
from pyserver.errors import BadRequest, NotFound, Unavailable
from pyserver.store.base import USER_RECORDS, LogAppend, LogStore, Store
from pyserver.store.spec import open_store, parse_store_spec

__all__ = [
    "MoveReport",
    "active_nodes",
    "add_admin_actions",
    "cell_record",
    "move_user",
    "move_users",
    "set_cell_record",
]

log = logging.getLogger(__name__)

_COPY_PAGE = 500


@dataclass
class MoveReport:
    user: int
    source: str | None
    target: str
    copied: int  # log entries copied
    last_seq: int
    frozen_s: float  # how long the user's requests were refused
    seconds: float


# ---- the move ----


async def _wait_acknowledged(zk: ZooKeeper, cell: str, user: int, timeout_s: float) -> None:
    """Until every active app server of the cell refuses the user. The acknowledgements are
    polled, quickly at first; the cell's members are read at the start, every half second
    and once more when all of them have acknowledged (one that joined meanwhile counts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    active = await active_nodes(zk, cell)
    members_read = loop.time()
    pause = 0.002
    while True:
        acknowledged = await freeze.acknowledgements(zk, cell, user)
        if active <= acknowledged or loop.time() - members_read > 0.5:
            active = await active_nodes(zk, cell)
            members_read = loop.time()
            if active <= acknowledged:
                return
        if loop.time() >= deadline:
            raise Unavailable(
                f"app servers {', '.join(sorted(active - acknowledged))} of cell {cell} did not "
                f"confirm the freeze of user {user} within {timeout_s:g} s"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def copy_log(source: LogStore, target: LogStore, user: int) -> tuple[int, int]:
    """Append to `target` the user's entries it lacks from `source`; (copied, last seq)."""
    source_last = await source.last_seq(user)
    after = await target.last_seq(user)
    if after > source_last:
        raise BadRequest(
            f"user {user}: the target's log ends at {after}, after the source's ({source_last})"
        )
    if after:  # the target's log must be a prefix of the source's
        mine = await target.read_log(user, after - 1, 1)
        theirs = await source.read_log(user, after - 1, 1)
        if mine != theirs:
            raise BadRequest(f"user {user}: entry {after} differs between the two cells")
    copied = 0
    while after < source_last:
        page = await source.read_log(user, after, _COPY_PAGE)
        if not page:
            break
        entries = [logcodec.decode(record) for _, record in page]
        refs = [entry["body_ref"] for entry in entries if "body_ref" in entry]
        if page[-1][0] >= source_last:  # the records about the log go with its end
            refs += USER_RECORDS
        bodies = await source.get_messages(user, refs) if refs else {}
        # No search terms: the target's index is derived from the log it now holds.
        await target.append(
            LogAppend(
                user_id=user,
                expected_seq=after,
                records=[record for _, record in page],
                messages=bodies,
            )
        )
        copied += len(page)
        after = page[-1][0]
    snapshot = await source.read_snapshot(user)
    if snapshot is not None:
        await target.write_snapshot(user, *snapshot)
    return copied, after


async def move_user(
    zk: ZooKeeper,
    directory: Directory,
    stores: dict[str, Store],
    user: int,
    target: str,
    *,
    ack_timeout_s: float = 15.0,
) -> MoveReport:
    """Move the user to cell `target` (module docstring); `stores` are the opened stores
    of the user's current cell and of the target, by cell name."""
    started = time.monotonic()
    await cell_record(zk, target)  # NotFound for a cell that does not exist
    source = await directory.cell_of(user)
    if source is None or source == target:
        # nothing to copy: a new user, or one already there (maybe an interrupted move)
        await freeze.thaw_user(zk, target, user)
        if source is None:
            await directory.assign(user, target)
        seq = await stores[target].last_seq(user)
        return MoveReport(user, source, target, 0, seq, 0.0, time.monotonic() - started)
    flipped = False
    await freeze.freeze_user(zk, source, user, target)
    frozen_at = time.monotonic()
    try:
        await _wait_acknowledged(zk, source, user, ack_timeout_s)
        copied, last = await copy_log(stores[source], stores[target], user)
        await freeze.thaw_user(zk, target, user)
        await directory.assign(user, target)
        flipped = True
    finally:
        if not flipped:
            await freeze.thaw_user(zk, source, user)
    await freeze.mark_moved(zk, source, user, target)
    frozen_s = time.monotonic() - frozen_at
    return MoveReport(user, source, target, copied, last, frozen_s, time.monotonic() - started)


async def _wait_all_acknowledged(
    zk: ZooKeeper, cell: str, users: list[int], timeout_s: float
) -> tuple[set[int], set[str] | None]:
    """`_wait_acknowledged` for many users of one cell at once; the users every active app
    server acknowledged within `timeout_s` (the others are not), and the app servers that
    acknowledged them all if known (when every user was confirmed at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    active = await active_nodes(zk, cell)
    members_read = loop.time()
    waiting, done = set(users), set()
    pause = 0.002
    while waiting:
        # An app server acknowledges a batch in one transaction: one user's acknowledgements
        # stand for the others' until they are all there, then every user is checked.
        probe = min(waiting)
        if active <= await freeze.acknowledgements(zk, cell, probe):
            ordered = sorted(waiting)
            # every one of them at once (one round trip); a node that joined since the
            # members were read must have acknowledged too
            if (
                not done
                and await freeze.all_acknowledged(zk, cell, ordered, active)
                and await active_nodes(zk, cell) <= active
            ):
                return set(ordered), set(active)
            acks = await asyncio.gather(*(freeze.acknowledgements(zk, cell, u) for u in ordered))
            active = await active_nodes(zk, cell)  # one that joined meanwhile counts too
            members_read = loop.time()
            for user, acked in zip(ordered, acks, strict=True):
                if active <= acked:
                    waiting.discard(user)
                    done.add(user)
            if not waiting:
                break
        elif loop.time() - members_read > 0.5:
            active = await active_nodes(zk, cell)
            members_read = loop.time()
        if loop.time() >= deadline:
            break
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.01)
    return done, None


async def move_users(
    zk: ZooKeeper,
    directory: Directory,
    stores: dict[str, Store],
    moves: dict[int, str],
    *,
    ack_timeout_s: float = 15.0,
) -> dict[int, MoveReport | Exception]:
    """Move many users at once, each to its cell in `moves`: the same steps as `move_user`,
    each user on its own, but the freezes, the waits for the acknowledgements and the
    tombstones of the users leaving one cell batched (one ZooKeeper transaction each, one
    wait). Each user's report, or the error that left it where it was (unfrozen)."""
    results: dict[int, MoveReport | Exception] = {}
    for target in set(moves.values()):
        await cell_record(zk, target)  # NotFound for a cell that does not exist
    users = sorted(moves)
    sources = dict(zip(users, await asyncio.gather(*map(directory.cell_of, users)), strict=True))
    by_source: dict[str, list[int]] = {}
    for user in users:
        source = sources[user]
        if source is None or source == moves[user]:  # nothing to copy: as move_user does
            try:
                results[user] = await move_user(zk, directory, stores, user, moves[user])
            except Exception as error:  # reported per user
                results[user] = error
        elif source not in stores or moves[user] not in stores:
            results[user] = NotFound(f"user {user}: no store opened for cell {source}")
        else:
            by_source.setdefault(source, []).append(user)
    for source, leaving in by_source.items():
        results |= await _move_from(
            zk, directory, stores, source, {user: moves[user] for user in leaving}, ack_timeout_s
        )
    return results


async def _move_from(
    zk: ZooKeeper,
    directory: Directory,
    stores: dict[str, Store],
    source: str,
    moves: dict[int, str],
    ack_timeout_s: float,
) -> dict[int, MoveReport | Exception]:
    """`move_users` of users all leaving `source`."""
    started = time.monotonic()
    results: dict[int, MoveReport | Exception] = {}
    # the users whose directory entry points at their new cell (recorded at once: never
    # unfrozen in the old cell again, whatever happens after)
    flipped: dict[int, str] = {}
    acknowledged_by: set[str] | None = None
    try:
        await freeze.freeze_users(zk, source, moves)
        frozen_at = time.monotonic()
        # the users listed in each target cell (read once, not once per user, while the app
        # servers acknowledge)
        targets = sorted(set(moves.values()))
        (acknowledged, acknowledged_by), *lists = await asyncio.gather(
            _wait_all_acknowledged(zk, source, list(moves), ack_timeout_s),
            *(freeze.listed_users(zk, target) for target in targets),
        )
        listed = dict(zip(targets, lists, strict=True))

        async def copy_and_flip(user: int) -> MoveReport:
            if user not in acknowledged:
                raise Unavailable(
                    f"the app servers of cell {source} did not all confirm the freeze of "
                    f"user {user} within {ack_timeout_s:g} s"
                )
            target = moves[user]
            copied, last = await copy_log(stores[source], stores[target], user)
            if user in listed[target]:  # a tombstone of an earlier move out of the target
                await freeze.thaw_user(zk, target, user)
            await directory.assign(user, target)
            flipped[user] = target
            frozen_s = time.monotonic() - frozen_at
            return MoveReport(
                user, source, target, copied, last, frozen_s, time.monotonic() - started
            )

        outcomes = await asyncio.gather(*map(copy_and_flip, moves), return_exceptions=True)
        for user, outcome in zip(moves, outcomes, strict=True):
            if isinstance(outcome, MoveReport | Exception):
                results[user] = outcome
            else:
                raise outcome  # cancelled
    finally:
        for user in moves:
            if user not in flipped:  # not flipped: served in the old cell again
                with contextlib.suppress(Exception):
                    await freeze.thaw_user(zk, source, user)
        await freeze.mark_all_moved(zk, source, flipped, acknowledged_by)
    return results


# ---- the command line ----


async def _open_store(spec: str) -> Any:
    store = open_store(parse_store_spec(spec, Path(".")))
    await store.open()
    return store


async def _move_command(args: argparse.Namespace) -> int:
    settings = cluster_settings(args)
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    zk = settings.session(session_timeout_s=10.0)
    await zk.start(10.0)
    opened: list[Any] = []
    try:
        directory_store = await _open_store(settings.directory_store)
        opened.append(directory_store)
        directory = Directory(directory_store)
        source = await directory.cell_of(args.user)
        stores: dict[str, Store] = {}
        for cell in {args.to, *([source] if source else [])}:
            spec = (await cell_record(zk, cell)).get("store")
            if not isinstance(spec, str) or not spec:
                print(f"pyserver: cell {cell} names no store in ZooKeeper", file=sys.stderr)
                return 1
            stores[cell] = await _open_store(spec)
            opened.append(stores[cell])
        report = await move_user(
            zk, directory, stores, args.user, args.to, ack_timeout_s=args.ack_timeout
        )
    finally:
        for store in opened:
            await store.close()
        await zk.close()
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(
            f"user {report.user} moved from {report.source or '(nowhere)'} to {report.target}: "
            f"{report.copied} log entries copied (log ends at {report.last_seq}), "
            f"frozen {report.frozen_s:.2f} s"
        )
    return 0


async def _cell_command(args: argparse.Namespace) -> int:
    settings = cluster_settings(args)
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    zk = settings.session(session_timeout_s=10.0)
    await zk.start(10.0)
    try:
        fields: dict[str, Any] = {}
        if args.state:
            fields["state"] = args.state
        if args.store:
            fields["store"] = args.store
        record = (
            await set_cell_record(zk, args.name, **fields)
            if fields
            else await cell_record(zk, args.name)
        )
    finally:
        await zk.close()
    print(json.dumps({"cell": args.name, **record}))
    return 0


def add_admin_actions(actions: Any) -> None:
    """Add `move-user` and `cell` to `pyserver admin`."""

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        add_cluster_arguments(sub)
        return sub

    move = action("move-user", "move a user to another cell, no message lost")
    move.add_argument("--user", type=int, required=True, help="the user id")
    move.add_argument("--to", required=True, help="the target cell")
    move.add_argument("--directory", help="the directory's store (sqlite:PATH, hbase:H:P/ns)")
    move.add_argument(
        "--ack-timeout", type=float, default=15.0, help="seconds to wait for the old cell's nodes"
    )
    move.add_argument("--json", action="store_true", help="print one JSON object")
    move.set_defaults(handler=lambda args: asyncio.run(_move_command(args)))
    cell = action("cell", "show a cell's ZooKeeper record, or set its state or store")
    cell.add_argument("name", help="the cell")
    cell.add_argument("--state", choices=layout.CELL_STATES, help="enable or disable the cell")
    cell.add_argument("--store", help="the cell's store (sqlite:PATH, hbase:HOST:PORT/ns)")
    cell.set_defaults(handler=lambda args: asyncio.run(_cell_command(args)))
