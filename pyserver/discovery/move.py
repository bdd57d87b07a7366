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
from pyserver.errors import BadRequest, Unavailable
from pyserver.store.base import USER_RECORDS, LogAppend, LogStore, Store
from pyserver.store.spec import open_store, parse_store_spec

__all__ = [
    "MoveReport",
    "active_nodes",
    "add_admin_actions",
    "cell_record",
    "move_user",
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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        missing = await active_nodes(zk, cell) - await freeze.acknowledgements(zk, cell, user)
        if not missing:
            return
        if loop.time() >= deadline:
            raise Unavailable(
                f"app servers {', '.join(sorted(missing))} of cell {cell} did not confirm "
                f"the freeze of user {user} within {timeout_s:g} s"
            )
        await asyncio.sleep(0.02)


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
