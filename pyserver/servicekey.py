"""The trusted tiers' shared key: made once per data folder, kept in `service.key`.

Servers check it on HELLO (`pyserver.app.auth.check_service_key`); the processes
of a cell read it from their data folder, and the terminal commands from the
folder of the cell they talk to.

May import: pyserver.errors.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pyserver.errors import Unavailable

__all__ = [
    "SERVICE_KEY_FILE",
    "generate_service_key",
    "load_or_create_service_key",
    "read_service_key",
]

SERVICE_KEY_FILE = "service.key"


def generate_service_key(nbytes: int = 32) -> str:
    """A new random service key: `nbytes` bytes from the OS's CSPRNG, as hex."""
    if nbytes < 16:
        raise ValueError(f"a service key needs at least 16 random bytes, not {nbytes}")
    return secrets.token_hex(nbytes)


def load_or_create_service_key(data_dir: Path) -> str:
    """The service key in data_dir/service.key, written (mode 0600) if there is none;
    ValueError if the file is there but empty."""
    path = data_dir / SERVICE_KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = generate_service_key()
        # O_EXCL: two processes starting at once must not end up with two keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    if not key:
        raise ValueError(f"{path} is empty: delete it to have a new key made")
    return key


def read_service_key(data_dir: Path) -> str:
    """The key of the cell on data_dir, for a command that talks to it; Unavailable if none."""
    path = data_dir / SERVICE_KEY_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise Unavailable(
            f"no service key at {path}: run `pyserver run --data {data_dir}` once first"
        ) from None
