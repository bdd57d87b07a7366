"""The normalised record every source makes of a message, and a rejected item.

A record is one message as one user's mailbox keeps it: whose mailbox, its
idempotency key (a mail's Message-ID, a JSON-lines record's id), who sent it
(a user, or 0 and an outside address), the users and outside addresses of the
conversation, the folder and read state the source gave it, when it was
written, and what the mailbox shows of it. Nothing here touches a store.
"""

from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImportRecord", "Rejected", "timestamp_us"]


@dataclass(slots=True)
class ImportRecord:
    """One message for one user's mailbox (see the module docstring)."""

    user: int
    key: str
    # where it came from, for reports ("FILE:line 3", "DIR/cur/NAME")
    where: str
    channel: str
    sender: int
    sender_address: str | None
    participants: tuple[int, ...]
    addresses: tuple[str, ...]
    # the folder the source filed it in (inbox, other, archived, sent, spam)
    folder: str
    unread: bool
    ts: int
    subject: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)
    # what it answers: a Message-ID header (mail) or another record's id (JSON lines)
    reply_to: tuple[str, ...] = ()
    # its size in the source, for the report
    size: int = 0


@dataclass(frozen=True, slots=True)
class Rejected:
    """An item of the input that was not imported, and why."""

    where: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"item": self.where, "reason": self.reason}


def timestamp_us(value: Any) -> int | None:
    """Microseconds since the epoch of a time a source gives: Unix seconds (a number), an
    ISO 8601 string, or an RFC 5322 date; None if it is none of these (or before 1970)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        moment = _parse_time(value.strip())
        if moment is None:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        seconds = moment.timestamp()
    else:
        return None
    if not 0 < seconds < 2**63 / 1e6:
        return None
    return int(seconds * 1_000_000)


def _parse_time(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
