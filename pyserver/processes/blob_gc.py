"""`pyserver admin blob-gc`: garbage-collect a single-node cell's blobs (pyserver.blobs.gc).

The references are read from the cell's store directly (every user's messages, as
the log and snapshots make them), which is safe while the cell runs: the store is the
truth, and whatever is committed after the collection started is protected by the
grace period (docs/operations.md). Prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pyserver.app.mailbox import Mailbox
from pyserver.blobs import BLOB_FOLDER
from pyserver.blobs.disk import DiskBlobStore
from pyserver.blobs.gc import DEFAULT_GRACE_S, GcReport, collect_garbage
from pyserver.processes.cell import open_store
from pyserver.userindex.local import LocalUserIndex

__all__ = ["add_admin_action", "collect_cell_blobs"]


async def collect_cell_blobs(
    data_dir: Path, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False
) -> GcReport:
    """Collect the blobs under data_dir/blobs no message of the cell's store references."""
    blobs = DiskBlobStore(data_dir / BLOB_FOLDER)
    await blobs.open()
    try:
        async with open_store(data_dir) as store:
            mailbox = Mailbox(store, LocalUserIndex(store))

            async def referenced() -> set[str]:
                refs: set[str] = set()
                for user in await store.user_ids():
                    refs |= await mailbox.blob_refs(user)
                return refs

            try:
                return await collect_garbage(blobs, referenced, grace_s=grace_s, dry_run=dry_run)
            finally:
                await mailbox.close()
    finally:
        await blobs.close()


async def _command(args: argparse.Namespace) -> int:
    if not (args.data / BLOB_FOLDER).is_dir():
        print(f"no blob folder under {args.data}", file=sys.stderr)
        return 2
    report = await collect_cell_blobs(args.data, grace_s=args.grace_s, dry_run=args.dry_run)
    print(json.dumps(report.as_dict(), indent=2))
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb} {report.removed} of {report.blobs} blobs ({report.removed_bytes} bytes); "
        f"{report.referenced} old ones still referenced, {report.refreshed} reused meanwhile",
        file=sys.stderr,
    )
    return 0


def add_admin_action(actions: Any, default_data: Path) -> None:
    """Add `blob-gc` to `pyserver admin`."""
    gc = actions.add_parser("blob-gc", help="remove the blobs no message references")
    gc.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
    gc.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        help="keep every blob stored or reused this recently (default: a day)",
    )
    gc.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    gc.set_defaults(handler=lambda args: asyncio.run(_command(args)))
