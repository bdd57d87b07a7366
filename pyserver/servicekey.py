"""The trusted tiers' shared keys: made once per data folder, kept in `service.key`.

The file holds one key per line. The first is the current key: processes say it
in HELLO and sign user tokens with it. The others are still accepted, so keys
rotate without a restart or a failed request (docs/security.md): add a key
(accepted everywhere within a second), promote it (new connections and tokens
use it), retire the old one. `ServiceKeys` is a process's view of the file,
re-read when it changes. Servers check keys on HELLO
(`pyserver.app.auth.check_service_key`); the processes of a cell read them from
their data folder, and the terminal commands from the folder of the cell they
talk to.

May import: pyserver.errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from pyserver.errors import Unavailable

__all__ = [
    "SERVICE_KEY_FILE",
    "ServiceKey",
    "ServiceKeys",
    "as_service_keys",
    "current_key",
    "generate_service_key",
    "key_id",
    "load_or_create_service_key",
    "read_service_key",
    "write_service_keys",
]

log = logging.getLogger(__name__)

SERVICE_KEY_FILE = "service.key"
KEY_ID_LENGTH = 8  # hex digits of a key's id


def key_id(key: str) -> str:
    """A key's public name (in user tokens, logs and the rotation commands): the first
    hex digits of its SHA-256; says nothing usable about the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:KEY_ID_LENGTH]


def _parse_keys(text: str) -> list[str]:
    """The keys of a key file: one a line, blank lines and `#` comments skipped."""
    keys = [line.strip() for line in text.splitlines()]
    return [key for key in keys if key and not key.startswith("#")]


class ServiceKeys:
    """The service keys a process accepts, the first current; from a fixed list, or from
    a key file re-read (at most every `reload_every_s`) when it changes.

    A file that turns empty or unreadable keeps the keys last read (and logs why):
    a slip while editing it must not lock every tier out.
    """

    def __init__(
        self,
        keys: Sequence[str] = (),
        *,
        path: Path | None = None,
        reload_every_s: float = 1.0,
    ) -> None:
        self.path = path
        self._reload_every_s = reload_every_s
        self._keys = [key for key in keys if key]
        self._stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        if path is not None:
            self._reload(force=True)
        if not self._keys:
            raise ValueError(f"no service key in {path}" if path else "no service key given")

    @classmethod
    def from_file(cls, path: Path, reload_every_s: float = 1.0) -> ServiceKeys:
        return cls(path=path, reload_every_s=reload_every_s)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked_at < self._reload_every_s):
            return
        self._checked_at = now
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            keys = _parse_keys(self.path.read_text())
        except OSError as exc:
            if force:
                raise ValueError(f"cannot read the service keys in {self.path}: {exc}") from None
            log.warning("service keys kept: cannot read %s: %s", self.path, exc)
            return
        if not keys:
            if force:
                raise ValueError(f"{self.path} holds no key: delete it to have a new key made")
            log.warning("service keys kept: %s holds no key", self.path)
            return
        if keys != self._keys and self._keys:
            log.info("service keys reloaded ids=%s", ",".join(key_id(key) for key in keys))
        self._keys, self._stamp = keys, stamp

    @property
    def current(self) -> str:
        """The key this process says in HELLO and signs tokens with."""
        self._reload()
        return self._keys[0]

    def all(self) -> list[str]:
        """Every accepted key, the current first."""
        self._reload()
        return list(self._keys)

    def accepts(self, given: str) -> bool:
        """Whether `given` is one of the keys; every key compared, each in constant time."""
        encoded = given.encode("utf-8")
        found = False
        for key in self.all():
            found |= hmac.compare_digest(encoded, key.encode("utf-8"))
        return found

    def by_id(self, wanted: str) -> str | None:
        """The accepted key whose id is `wanted`, or None (a retired or unknown key)."""
        return next((key for key in self.all() if key_id(key) == wanted), None)


# Wherever a key is passed to a client or a server: one fixed key, or a process's keys
# (then the current one is used, re-read as it changes).
ServiceKey = str | ServiceKeys


def current_key(key: ServiceKey) -> str:
    """The key to say in HELLO (or sign with) now."""
    return key if isinstance(key, str) else key.current


def as_service_keys(key: ServiceKey) -> ServiceKeys:
    """`key` as a set of keys (a single fixed key as a set of one)."""
    return key if isinstance(key, ServiceKeys) else ServiceKeys([key])


def write_service_keys(path: Path, keys: Sequence[str]) -> None:
    """Replace the key file with `keys` (the first current) atomically, mode 0600: every
    process reading it sees the old list or the new one, never half of one."""
    if not keys:
        raise ValueError("a key file must keep at least one key")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{key}\n" for key in keys))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def generate_service_key(nbytes: int = 32) -> str:
    """A new random service key: `nbytes` bytes from the OS's CSPRNG, as hex."""
    if nbytes < 16:
        raise ValueError(f"a service key needs at least 16 random bytes, not {nbytes}")
    return secrets.token_hex(nbytes)


def load_or_create_service_key(data_dir: Path) -> str:
    """The current service key in data_dir/service.key, written (mode 0600) if there is
    none; ValueError if the file is there but holds no key."""
    path = data_dir / SERVICE_KEY_FILE
    try:
        keys = _parse_keys(path.read_text())
        key = keys[0] if keys else ""
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = generate_service_key()
        # O_EXCL: two processes starting at once must not end up with two keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_service_key(data_dir)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    if not key:
        raise ValueError(f"{path} is empty: delete it to have a new key made")
    return key


def read_service_key(data_dir: Path) -> str:
    """The current key of the cell on data_dir, for a command that talks to it;
    Unavailable if none."""
    path = data_dir / SERVICE_KEY_FILE
    try:
        keys = _parse_keys(path.read_text())
        if not keys:
            raise Unavailable(f"{path} holds no service key")
        return keys[0]
    except FileNotFoundError:
        raise Unavailable(
            f"no service key at {path}: run `pyserver run --data {data_dir}` once first"
        ) from None
