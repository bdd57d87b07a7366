"""Telling the servers of imported users to drop their cached images (REFRESH).

The import appends to logs around the app servers (pyserver.importer.writer); a
server that had a user cached would show the import only at that user's next
write. After an import, each imported user's owner is asked to drop its copy, so
the next request loads the log with the import in it. A cell that is not running
needs nothing: it loads every user from the store when it starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.client import Client
from pyserver.config import load_config
from pyserver.errors import PyserverError
from pyserver.servicekey import read_service_key
from pyserver.wire.ops import Op

__all__ = ["refresh_cell", "refresh_users"]

Request = Callable[[Op, dict[str, Any]], Awaitable[dict[str, Any]]]

_IN_FLIGHT = 64


async def refresh_users(request: Request, users: Iterable[int]) -> list[str]:
    """REFRESH each user through `request` (routed to the user's owner); the failures."""
    failures: list[str] = []
    pending = sorted(set(users))
    for start in range(0, len(pending), _IN_FLIGHT):
        chunk = pending[start : start + _IN_FLIGHT]
        answers = await asyncio.gather(
            *(request(Op.REFRESH, {"user": user}) for user in chunk), return_exceptions=True
        )
        for user, answer in zip(chunk, answers, strict=True):
            if isinstance(answer, PyserverError | OSError | TimeoutError):
                failures.append(f"user {user}: {answer}")
            elif isinstance(answer, BaseException):
                raise answer
    return failures


async def refresh_cell(data_dir: Path, users: Iterable[int]) -> list[str]:
    """REFRESH the users on the cell serving `data_dir`, if one runs; the failures."""
    if endpoints.read_file(data_dir / endpoints.ENDPOINTS_FILE) is None:
        return []
    try:
        host, port = endpoints.server_address(data_dir)
        client = await Client.connect(
            host, port, service_key=read_service_key(data_dir), tls=load_config().client_tls()
        )
    except (PyserverError, OSError, TimeoutError) as exc:  # a stale endpoints file
        return [f"the cell on {data_dir} did not answer ({exc}); it loads users afresh at start"]
    try:
        return await refresh_users(client.request, users)
    finally:
        await client.close()
