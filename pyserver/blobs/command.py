"""Blobs at the command line: `pyserver blob` writes one out, and the thread view lists them.

`pyserver blob --data DIR --user ID REF > file` fetches, through the running
cell (GET_BLOB, so only a blob one of the user's messages references), an
attachment, a long body or a raw mail, and writes its bytes to standard output
or `--out FILE`. `with_extras` and `attachment_lines` let `pyserver thread`
show each mail's attachments with the refs to fetch them by.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.client import Client
from pyserver.servicekey import read_service_key

__all__ = ["add_parser", "attachment_lines", "with_extras"]


async def with_extras(client: Any, user: int, thread: dict[str, Any]) -> dict[str, Any]:
    """A GET_THREAD reply whose email messages carry their `extra` (GET_MESSAGE has it)."""
    mails = [m for m in thread.get("messages", []) if m.get("channel") == "email"]
    full = await asyncio.gather(*(client.get_message(user, m["message_id"]) for m in mails))
    for message, complete in zip(mails, full, strict=True):
        message["extra"] = complete.get("extra", {})
    return thread


def attachment_lines(message: dict[str, Any]) -> list[str]:
    """Lines naming a message's attachments (and its whole body, when cut) with their refs."""
    extra = message.get("extra") or {}
    lines = []
    for attachment in extra.get("attachments", ()):
        lines.append(
            f"[attachment] {attachment.get('name')} ({attachment.get('type')}, "
            f"{attachment.get('size')} bytes) ref {attachment.get('ref')}"
        )
    body = extra.get("body")
    if isinstance(body, dict):
        lines.append(f"[whole body] {body.get('size')} bytes, ref {body.get('ref')}")
    raw = extra.get("raw")
    if isinstance(raw, dict):
        flag = " (malformed: kept as received)" if extra.get("malformed") else ""
        lines.append(f"[raw message] {raw.get('size')} bytes, ref {raw.get('ref')}{flag}")
    return lines


async def _write_blob(args: argparse.Namespace) -> int:
    host, port = endpoints.server_address(args.data, args.server)
    client = await Client.connect(host, port, service_key=read_service_key(args.data))
    try:
        if args.out is None:
            out = sys.stdout.buffer
            async for piece in client.get_blob(args.user, args.ref, message_id=args.message):
                out.write(piece)
            out.flush()
            return 0
        # Written beside the target, then renamed: a failed fetch leaves no half file.
        partial = Path(f"{args.out}.part")
        try:
            with open(partial, "wb") as out_file:
                async for piece in client.get_blob(args.user, args.ref, message_id=args.message):
                    out_file.write(piece)
            os.replace(partial, args.out)
        finally:
            partial.unlink(missing_ok=True)
        return 0
    finally:
        await client.close()


def add_parser(
    commands: Any, default_data: Path, user_id: Callable[[str], int]
) -> argparse.ArgumentParser:
    """Add `blob` to the `pyserver` command line."""
    blob = commands.add_parser(
        "blob", help="write out an attachment, a long body or a raw mail of a user's message"
    )
    blob.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
    blob.add_argument("--server", help="HOST:PORT (default: from the data folder)")
    blob.add_argument("--user", type=user_id, required=True, help="the user id")
    blob.add_argument("--message", help="the message that references it (faster)")
    blob.add_argument("--out", help="file to write (default: standard output)")
    blob.add_argument("ref", help="the blob's ref, as `pyserver thread` shows it")
    blob.set_defaults(handler=lambda args: asyncio.run(_write_blob(args)))
    return blob
