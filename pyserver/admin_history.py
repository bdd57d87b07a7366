"""`pyserver admin history|show|restore`: a user's past, from the log (docs/history.md).

`history` and `show` only read the log, so they open the cell's store directly
(`--data`, safe while the cell runs) or ask the user's owner in a cluster
(`--cluster`, the HISTORY and SHOW_AT operations). `restore` writes, so it goes
through the app server that owns the user whenever one runs, which appends the
compensating entries under the user's lock and serves them at once: the owner
in a cluster, else the cell running on `--data` (its endpoints file), else a
mailbox opened on the stopped cell's store and blob folder. The logic is `pyserver.app.history`.

May import: any of pyserver but pyserver.cli, pyserver.admin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.app import history
from pyserver.app.mailbox import Mailbox
from pyserver.blobs import BLOB_FOLDER
from pyserver.blobs.disk import DiskBlobStore
from pyserver.client import Client
from pyserver.cluster.state import add_cluster_folder_argument
from pyserver.config import load_config
from pyserver.discovery.client import connect_to_cluster
from pyserver.errors import PyserverError
from pyserver.processes.cell import open_store
from pyserver.servicekey import read_service_key
from pyserver.userindex.local import LocalUserIndex
from pyserver.wire.ops import Op

__all__ = ["add_admin_actions"]


async def _on_cluster(folder: Path, work: Callable[[Any], Awaitable[Any]]) -> Any:
    cluster = await connect_to_cluster(folder)
    try:
        return await work(cluster)
    finally:
        await cluster.close()


# ---- history ----


async def _history_pages(args: argparse.Namespace) -> dict[str, Any]:
    """Every entry after `--after` that passes the filters (at most `--limit`), page by
    page."""
    wanted = args.limit
    entries: list[dict[str, Any]] = []
    after = args.after
    since_us = history.parse_time(args.since, "since") if args.since is not None else None
    filters: dict[str, Any] = {}
    if args.thread is not None:
        filters["thread_id"] = args.thread
    if args.since is not None:
        filters["since"] = args.since

    async def pages(read: Callable[[int, int], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        nonlocal after
        page: dict[str, Any] = {}
        while wanted is None or len(entries) < wanted:
            size = history.HISTORY_PAGE[1]
            if wanted is not None:
                size = min(size, wanted - len(entries))
            page = await read(after, size)
            entries.extend(page["entries"])
            if page["next"] is None:
                break
            after = page["next"]
        return {"user": args.user, "last_seq": page.get("last_seq", 0), "entries": entries}

    if args.cluster is not None:

        async def work(cluster: Any) -> dict[str, Any]:
            return await pages(
                lambda after, size: cluster.request(
                    Op.HISTORY, {**filters, "user": args.user, "after": after, "limit": size}
                )
            )

        return await _on_cluster(args.cluster, work)
    async with open_store(args.data) as store:
        return await pages(
            lambda after, size: history.read_history(
                store, args.user, after, size, args.thread, since_us
            )
        )


def _print_history(report: dict[str, Any]) -> None:
    if not report["entries"]:
        print(f"user {report['user']}: no log entry")
        return
    for item in report["entries"]:
        channel = item["channel"] or "-"
        line = f"{item['seq']:>6}  {item['time']}  {channel:<5}  {item['what']}"
        if item["restore"] is not None:
            restore = item["restore"]
            by = f" by {restore['by']}" if restore["by"] else ""
            line += f"  [restore to {restore['at']}, written {restore['time']}{by}]"
        print(line)


async def _history(args: argparse.Namespace) -> int:
    report = await _history_pages(args)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_history(report)
    return 0


# ---- show ----


async def _show(args: argparse.Namespace) -> int:
    at = history.parse_time(args.at)
    if args.cluster is not None:
        payload = {"user": args.user, "at": args.at, "limit": args.limit}
        report = await _on_cluster(args.cluster, lambda c: c.request(Op.SHOW_AT, payload))
    else:
        async with open_store(args.data) as store:
            report = history.show(await history.image_at(store, args.user, at), args.limit)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(
        f"user {args.user} at {report['at']}: log entries 1..{report['seq']} of "
        f"{report['last_seq']}, {report['threads']} threads, {report['messages']} messages"
    )
    for folder, shown in report["folders"].items():
        counts = report["counts"][folder]
        print(
            f"{folder:<9} {shown['total']:>4} threads  unread {counts['unread']:<4} "
            f"unseen {counts['unseen']}"
        )
        for thread in shown["threads"]:
            unread = f"{thread['unread']} unread" if thread["unread"] else "read"
            print(
                f"    {thread['thread_id']}  {thread['messages']} msg, {unread}  "
                f"{thread['subject'] or thread['snippet']!r}"
            )
        if shown["more"]:
            print(f"    ... ({shown['total'] - len(shown['threads'])} older)")
    return 0


# ---- restore ----


async def _restore_report(args: argparse.Namespace) -> dict[str, Any]:
    history.parse_time(args.at)  # a bad time is refused before anything is opened
    payload = {"user": args.user, "at": args.at, "by": args.by}
    if args.cluster is not None:
        return await _on_cluster(args.cluster, lambda c: c.request(Op.RESTORE, payload))
    if endpoints.read_file(args.data / endpoints.ENDPOINTS_FILE) is not None:
        host, port = endpoints.server_address(args.data)
        client = await Client.connect(
            host, port, service_key=read_service_key(args.data), tls=load_config().client_tls()
        )
        try:
            return await client.request(Op.RESTORE, payload)
        finally:
            await client.close()
    return await _restore_stopped_cell(args.data, payload)


async def _restore_stopped_cell(data: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The restore on a mailbox opened on a stopped cell's store and blob folder."""
    folder = data / BLOB_FOLDER
    blobs = DiskBlobStore(folder) if folder.is_dir() else None
    if blobs is not None:
        await blobs.open()
    try:
        async with open_store(data) as store:
            mailbox = Mailbox(store, LocalUserIndex(store), blobs=blobs)
            try:
                return await mailbox.execute(Op.RESTORE, payload)
            finally:
                await mailbox.close()
    finally:
        if blobs is not None:
            await blobs.close()


async def _restore(args: argparse.Namespace) -> int:
    report = await _restore_report(args)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    if not report["entries"]:
        print(f"user {args.user}: nothing to restore, the mailbox already holds its state at "
              f"{report['at']}")  # fmt: skip
        return 0
    print(
        f"user {args.user} restored to {report['at']} (log entry {report['at_seq']}): "
        f"{len(report['messages_restored'])} messages back, "
        f"{len(report['threads_moved'])} threads moved back, "
        f"{len(report['read_state_changed'])} read states reset; "
        f"log entries {report['first_seq']}..{report['last_seq']}"
    )
    for message_id in report["missing_bodies"]:
        print(f"  message {message_id}: its body is gone, its snippet stands in", file=sys.stderr)
    for missing in report["missing_blobs"]:
        print(
            f"  message {missing['message_id']}: attachment {missing['ref']} is gone",
            file=sys.stderr,
        )
    return 0


def _run(work: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[..., int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(work(args))
        except PyserverError as error:
            print(f"pyserver: {error}", file=sys.stderr)
            return 2

    return handler


def _count(text: str) -> int:
    """A positive whole number (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seq(text: str) -> int:
    """A log sequence number, 0 or more (argparse type)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_admin_actions(actions: Any, default_data: Path, user_id: Callable[[str], int]) -> None:
    """Add `history`, `show` and `restore` to `pyserver admin`."""

    def action(name: str, help_text: str, run: Callable[..., Any]) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
        add_cluster_folder_argument(sub)
        sub.add_argument("--user", type=user_id, required=True, help="the user id")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.set_defaults(handler=_run(run))
        return sub

    trail = action("history", "a user's log as an audit trail", _history)
    trail.add_argument("--after", type=_seq, default=0, help="only entries after this seq")
    trail.add_argument("--limit", type=_count, help="at most this many entries")
    trail.add_argument("--thread", help="only the entries naming this thread")
    trail.add_argument("--since", help="only the entries of this time or later")
    at_help = "ISO 8601 (UTC unless a zone is given) or unix seconds"
    shown = action("show", "a user's threads and counts as they were at a time", _show)
    shown.add_argument("--at", required=True, help=at_help)
    shown.add_argument(
        "--limit", type=_count, default=history.SHOW_THREADS[0], help="threads shown per folder"
    )
    restore = action("restore", "bring a user's mailbox back to its state at a time", _restore)
    restore.add_argument("--at", required=True, help=at_help)
    restore.add_argument(
        "--by", default="pyserver admin restore", help="who asks (kept in the history)"
    )
