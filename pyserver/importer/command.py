"""`pyserver import mbox|maildir|jsonl|tree ...`: the command line of the import.

Each sub-command plans its units (pyserver.importer.run), opens the cell's
embedded store and blob store on `--data` (the folder `pyserver run` serves;
it may be running: appends are compare-and-set), or with `--cluster DIR` the
stores of a cluster's cells, its directory store and blob store (each user's
cell named by discovery), and runs the import with a checkpoint under that
folder's imports/, so the same command run again after a crash
or Ctrl-C resumes where it stopped. Progress goes to standard error; the
report to standard output, as one JSON object on the last line with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pyserver.blobs import BLOB_FOLDER, DiskBlobStore, blob_store_for
from pyserver.cluster.state import add_cluster_folder_argument, read_state
from pyserver.config import Config
from pyserver.discovery.client import connect_to_cluster
from pyserver.errors import PyserverError
from pyserver.importer.checkpoint import Checkpoint, default_path
from pyserver.importer.live import refresh_cell, refresh_users
from pyserver.importer.progress import progress_bar
from pyserver.importer.report import ImportReport
from pyserver.importer.run import ImportPlan, plan_jsonl, plan_mailbox, plan_tree, run_import
from pyserver.importer.throttle import Pace
from pyserver.importer.workers import run_in_processes
from pyserver.store.spec import open_store as open_store_spec
from pyserver.store.spec import parse_store_spec
from pyserver.store.sqlite import open_cell_store as open_store
from pyserver.userid import user_id_argument

__all__ = ["add_parser", "main"]


def add_parser(commands: Any, default_data: Path) -> None:
    """Add `import` and its sub-commands to the `pyserver` command line."""
    parser = commands.add_parser(
        "import", help="import existing history (mbox, Maildir, JSON lines)"
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="FORMAT")

    def kind(name: str, help_text: str, source: str) -> argparse.ArgumentParser:
        sub = kinds.add_parser(name, help=help_text)
        sub.add_argument("source", type=Path, metavar=source)
        sub.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
        add_cluster_folder_argument(sub)
        sub.add_argument("--json", action="store_true", help="the report as JSON, last line")
        sub.add_argument("--jobs", type=int, default=16, help="users at once per process")
        sub.add_argument(
            "--workers", type=int, default=1, help="processes sharing the users (one per core)"
        )
        sub.add_argument(
            "--rate",
            type=float,
            help="messages per second at most (and less while a cell"
            " serving --data answers slower than at rest)",
        )
        sub.add_argument("--checkpoint", type=Path, help="where to keep progress for resuming")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        sub.set_defaults(handler=_run)
        return sub

    for name, text in (("mbox", "one user's mbox file"), ("maildir", "one user's Maildir")):
        sub = kind(name, f"import {text}", "FILE" if name == "mbox" else "DIR")
        sub.add_argument("--user", type=user_id_argument, required=True, help="whose mailbox it is")
        sub.add_argument(
            "--address", action="append", default=[], help="an address of the user (repeatable)"
        )
    kind("jsonl", "import JSON lines of messages of any channel", "FILE")
    tree = kind("tree", "import a folder of mbox files and Maildirs named by address", "DIR")
    tree.add_argument("--map", type=Path, required=True, help="CSV of address,user rows")


def main(argv: list[str]) -> int:
    """`pyserver import ...` alone (argv starts with "import"), without loading every other
    command of `pyserver` (pyserver/__main__.py): an import is often started by scripts."""
    parser = argparse.ArgumentParser(prog="pyserver")
    add_parser(parser.add_subparsers(dest="command", required=True), Config().data_dir)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except PyserverError as exc:
        print(f"pyserver: {exc.code}: {exc}", file=sys.stderr)
        return 1


def _plan(args: argparse.Namespace) -> tuple[ImportPlan, list[str]]:
    """The plan, and what names this import (for its checkpoint)."""
    source = args.source
    if args.kind in ("mbox", "maildir"):
        plan = plan_mailbox(args.kind, source, args.user, args.address)
        return plan, [args.kind, str(source.resolve()), str(args.user)]
    if args.kind == "jsonl":
        return plan_jsonl(source), ["jsonl", str(source.resolve())]
    plan = plan_tree(source, args.map)
    return plan, ["tree", str(source.resolve()), str(args.map.resolve())]


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if not args.source.exists():
        print(f"pyserver: {args.source}: no such file or folder", file=sys.stderr)
        return 2
    try:
        plan, what = _plan(args)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"pyserver: cannot read the import's input: {exc}", file=sys.stderr)
        return 2
    if args.cluster is not None and args.workers > 1:
        print("pyserver: --workers goes with --data (a cell), not --cluster", file=sys.stderr)
        return 2
    home = args.cluster if args.cluster is not None else args.data
    home.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(args.checkpoint or default_path(home, what))
    resumed = bool(checkpoint.done)
    if resumed:
        print(f"resuming: {len(checkpoint.done)} users done already", file=sys.stderr)
    checkpoint.open()
    completed = False
    try:
        with progress_bar(plan.total, quiet=args.quiet or not sys.stderr.isatty()) as advance:
            if args.workers > 1:
                asyncio.run(_register(args, plan))
                report = run_in_processes(
                    plan, data_dir=args.data, checkpoint=checkpoint, workers=args.workers,
                    jobs=args.jobs, progress=advance, rate=args.rate,
                )  # fmt: skip
            elif args.cluster is not None:
                report = asyncio.run(_import_cluster(args, plan, checkpoint, advance))
            else:
                report = asyncio.run(_import(args, plan, checkpoint, advance))
            if args.cluster is None:  # (into a cluster, _import_cluster refreshed them)
                report.refresh_failures = asyncio.run(refresh_cell(args.data, _users(plan)))
        completed = True
        report.started = started  # the run's time includes reading the plan
    except KeyboardInterrupt:
        print("pyserver: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        checkpoint.close(completed)
    for item in report.rejected:
        print(f"rejected {item.where}: {item.reason}", file=sys.stderr)
    for failure in report.refresh_failures:
        print(f"pyserver: a server may show the old state of {failure} until its next write",
              file=sys.stderr)  # fmt: skip
    print(report.summary(), file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    return 0


async def _register(args: argparse.Namespace, plan: ImportPlan) -> None:
    """Put the plan's addresses in the cell's address book (before workers read mail)."""
    async with open_store(args.data) as store:
        for address, user in plan.addresses.items():
            await store.add_address(address, user)


async def _import(args: argparse.Namespace, plan: ImportPlan, checkpoint: Checkpoint, advance: Any):
    blobs = DiskBlobStore(args.data / BLOB_FOLDER)
    await blobs.open()
    try:
        async with open_store(args.data) as store:
            return await run_import(
                plan, store=store, blobs=blobs, checkpoint=checkpoint, jobs=args.jobs,
                progress=advance, pace=Pace(args.rate), probe=args.data,
            )  # fmt: skip
    finally:
        await blobs.close()


async def _import_cluster(
    args: argparse.Namespace, plan: ImportPlan, checkpoint: Checkpoint, advance: Any
) -> ImportReport:
    """Into a cluster: each user's log in the store of the cell discovery names (placing a
    new user as for any request), addresses in the directory store, blobs in the cluster's
    blob store (the directory store's, where its MTA proxy writes them)."""
    state = read_state(args.cluster)
    directory = open_store_spec(parse_store_spec(state["directory_store"], args.cluster))
    cells = {
        name: open_store_spec(parse_store_spec(spec, args.cluster))
        for name, spec in state["cells"].items()
    }
    where = SimpleNamespace(blob_store=state["directory_store"], data_dir=args.cluster / "data")
    blobs = blob_store_for(where)
    opened: list[Any] = []
    try:
        for part in (directory, *cells.values(), blobs):
            await part.open()
            opened.append(part)
        async with await connect_to_cluster(args.cluster) as discovery:

            async def store_of(user: int) -> Any:
                return cells[await discovery.cell_of(user)]

            report = await run_import(
                plan, store=directory, blobs=blobs, checkpoint=checkpoint, jobs=args.jobs,
                progress=advance, pace=Pace(args.rate), store_of=store_of,
            )  # fmt: skip
            report.refresh_failures = await refresh_users(discovery.request, _users(plan))
            return report
    finally:
        for part in reversed(opened):
            await part.close()


def _users(plan: ImportPlan) -> set[int]:
    """Every user of the plan (those done by an earlier, interrupted run too)."""
    return {unit.user for unit in plan.units}
