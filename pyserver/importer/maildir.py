"""A Maildir (one user's mailbox, Maildir++ subfolders included) read message by message.

Each message is a file in `new/` or `cur/` of the top folder (the inbox) or of a
`.Name` subfolder. The flags after `:2,` in a file name say its state: `S` is
seen (read), `T` trashed. Subfolders are filed by their name: Sent, Archive,
Junk or Spam, and Trash (not imported: deleted mail); any other (a label the
user made) is filed in Archived. A message without a Date header falls back
to its file's modification time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pyserver.importer.mbox import MailItem
from pyserver.importer.records import Rejected

__all__ = ["folder_of", "maildir_items"]


def folder_of(name: str) -> str | None:
    """The mailbox folder of a Maildir++ subfolder name (".Sent", ".INBOX.Archive"); None
    for a trash folder."""
    last = name.strip(".").rsplit(".", 1)[-1].casefold()
    if "trash" in last or "deleted" in last or last == "bin":
        return None
    if "sent" in last:
        return "sent"
    if "junk" in last or "spam" in last:
        return "spam"
    if last in ("inbox", ""):
        return "inbox"
    return "archived"


def maildir_items(path: str) -> Iterator[MailItem | Rejected]:
    """The messages of the Maildir at `path`, oldest file first in each folder.

    OSError if `path` is no Maildir (no `cur` or `new` in it)."""
    root = Path(path)
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        raise NotADirectoryError(f"{path}: not a Maildir (no cur/ or new/ in it)")
    folders: list[tuple[Path, str]] = [(root, "inbox")]
    for sub in sorted(root.iterdir()):
        if sub.name.startswith(".") and sub.is_dir() and sub.name not in (".", ".."):
            folder = folder_of(sub.name)
            if folder is not None:
                folders.append((sub, folder))
    for folder_path, folder in folders:
        files: list[tuple[float, str, Path, str]] = []
        for part in ("new", "cur"):
            try:
                entries = list(os.scandir(folder_path / part))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_file() and not entry.name.startswith("."):
                    flags = entry.name.rpartition(":2,")[2] if ":2," in entry.name else ""
                    files.append((entry.stat().st_mtime, entry.name, Path(entry.path), flags))
        files.sort()
        for mtime, _, file, flags in files:
            if "T" in flags:
                continue  # trashed: deleted mail
            try:
                raw = file.read_bytes()
            except OSError as exc:
                yield Rejected(str(file), f"unreadable: {exc.strerror or exc}")
                continue
            yield MailItem(raw, folder, "S" in flags, str(file), int(mtime * 1e6))
