"""An mbox file (one user's mailbox) read message by message.

Messages are split on their "From " lines by the standard library's `mailbox`
module (mboxo and mboxrd quoting as it reads them). The read state is the
`Status` (and `X-Status`) header mail programs write: `R` is read. The time a
message without a Date header falls back to is that of its "From " line.
"""

from __future__ import annotations

import mailbox
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pyserver.importer.records import timestamp_us

__all__ = ["MailItem", "mbox_items", "read_flag"]

_STATUS = re.compile(rb"^(?:X-)?Status:[ \t]*([A-Za-z]*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class MailItem:
    """One stored mail: its bytes, the folder it is filed in, whether it was read, where."""

    raw: bytes
    folder: str
    read: bool
    where: str
    fallback_ts: int


def read_flag(raw: bytes) -> bool:
    """Whether the Status/X-Status headers of a mail say it was read."""
    end = _HEADER_END.search(raw)
    headers = raw[: end.start()] if end else raw
    return any(b"R" in flags.upper() for flags in _STATUS.findall(headers))


def mbox_items(path: str, folder: str = "inbox") -> Iterator[MailItem]:
    """The messages of the mbox at `path`, in file order. OSError if it cannot be read;
    a file that is no mbox at all yields nothing."""
    box = mailbox.mbox(path, create=False)
    try:
        for number, key in enumerate(box.iterkeys(), start=1):
            from_line, _, raw = box.get_bytes(key, from_=True).partition(b"\n")
            yield MailItem(raw, folder, read_flag(raw), f"{path}#{number}", _time_of(from_line))
    finally:
        box.close()


def _time_of(from_line: bytes) -> int:
    """The time an mbox "From sender date" line gives, in microseconds (0: none)."""
    parts = from_line.decode("latin-1").split(None, 2)
    return (timestamp_us(parts[2].strip()) or 0) if len(parts) == 3 else 0
