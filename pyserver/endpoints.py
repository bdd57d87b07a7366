"""Where a running process can be found: its addresses, in a JSON file it writes once it
serves.

`pyserver run` writes `endpoints.json` beside the store when it has bound its
ports (and removes it on a clean stop); the terminal commands read it, so
`--data DIR` is all they need. Every serving command also takes `--ready-file
PATH` and writes the same kind of file there (its role, `addr` and ports): the
launcher, the tests and the benchmarks wait for that file, not for a line of
output.

May import: pyserver.errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pyserver.errors import Unavailable

ENDPOINTS_FILE = "endpoints.json"


def write_file(path: Path, addresses: dict[str, Any]) -> None:
    """Write the addresses atomically (a reader never sees half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(addresses, indent=2) + "\n")
    os.replace(temporary, path)


def read_file(path: Path) -> dict[str, Any] | None:
    """The addresses a process wrote to `path`; None while it has not (or no longer)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def publish(data_dir: Path, addresses: dict[str, Any]) -> None:
    """The cell's addresses, in its data folder."""
    write_file(data_dir / ENDPOINTS_FILE, addresses)


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
