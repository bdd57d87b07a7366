"""Which units of an import are done, in a file, so an interrupted import resumes.

A unit (one user's share of one source) is marked done once its batch is
durable in the store: a line with the unit's key is appended to the file and
flushed, which a killed process cannot take back. A resumed import skips the
units the file names; a unit whose line was lost (killed between the append
and the mark) is simply imported again, which adds nothing (the writer skips
what the log has). The file belongs to one import (its name is derived from the
command's sources, `default_path`) and is removed when that import completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO

__all__ = ["Checkpoint", "default_path"]


def default_path(data_dir: Path, what: list[str]) -> Path:
    """The checkpoint of the import of `what` (its kind and sources) into `data_dir`."""
    digest = hashlib.blake2b("\n".join(what).encode(), digest_size=8).hexdigest()
    return data_dir / "imports" / f"{digest}.checkpoint"


class Checkpoint:
    """The done units of one import (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            # a last line cut short by a kill is no key: it matches no unit
            self.done = {line for line in path.read_text("utf-8").split("\n") if line}
        self._file: IO[str] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close)
        if self.done:
            self._file.write("\n")  # a cut last line stays cut off from the next key

    def mark(self, key: str) -> None:
        """Unit `key` is durable in the store."""
        assert self._file is not None and "\n" not in key
        self._file.write(key + "\n")
        self._file.flush()
        self.done.add(key)

    def close(self, completed: bool) -> None:
        """Close the file; remove it when the import completed (nothing is left to resume)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if completed:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # other imports' checkpoints may be there
                os.rmdir(self.path.parent)
