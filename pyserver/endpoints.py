"""Where a running cell can be found: its addresses and service key, in its data folder.

`pyserver run` writes `endpoints.json` beside the store when it has bound its
ports (and removes it on a clean stop); the terminal commands read it, so
`--data DIR` is all they need.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pyserver.errors import Unavailable

ENDPOINTS_FILE = "endpoints.json"


def publish(data_dir: Path, addresses: dict[str, Any]) -> None:
    """Write the addresses atomically (a reader never sees half a file)."""
    path = data_dir / ENDPOINTS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(addresses, indent=2) + "\n")
    os.replace(temporary, path)


def withdraw(data_dir: Path) -> None:
    (data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)


def read(data_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((data_dir / ENDPOINTS_FILE).read_text())
    except FileNotFoundError:
        raise Unavailable(
            f"no cell is running on {data_dir} ({ENDPOINTS_FILE} is missing): "
            "start one with `pyserver run`, or give --server HOST:PORT"
        ) from None


def server_address(data_dir: Path, explicit: str | None = None) -> tuple[str, int]:
    """(host, port) of the binary protocol: `explicit` HOST:PORT, else the running cell's."""
    if explicit:
        host, _, port = explicit.rpartition(":")
        return host or "127.0.0.1", int(port)
    server = read(data_dir)["server"]
    return server["host"], server["port"]
