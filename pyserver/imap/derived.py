"""What the IMAP gateway derives from a message's bytes, kept once per gateway.

A FETCH answer's costly parts are the message's bytes (two round trips to the
app servers) and what is parsed out of them (ENVELOPE, RFC822.SIZE). Neither
changes for the life of a message: mail that came in over SMTP is served byte
for byte from its blob, so its bytes, and what is derived from them, never
change. A rendered message (chat, SMS, mail written here) is drawn from its
thread (participants, addresses), which can change: a user's rendered entries
are dropped whenever the gateway hears that the user's mailbox changed
(`forget_rendered`, called by `UserFolders.mark_changed`).

`DerivedStore` (one per gateway, shared by every session) keeps, per (user,
message id):

- the bytes, most recently used first, up to `bytes_max` in all;
- `Facts`: the size and the ENVELOPE as ready-to-send bytes, up to
  `facts_max` messages (a few hundred bytes each).

Everything here is rebuilt from the bytes on demand: dropping it loses nothing.

May import: pymap and `pyserver.imap.structure` (the ENVELOPE as corrected
against Dovecot); nothing of the app servers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pymap.mime import MessageContent
from pymap.parsing.specials import FetchRequirement

from pyserver.imap.structure import LoadedMessage

__all__ = ["DerivedStore", "Facts", "facts_of"]


class Facts:
    """What a FETCH answer takes from a message's bytes, ready to send."""

    __slots__ = ("envelope", "size")

    def __init__(self, size: int, envelope: bytes) -> None:
        self.size = size
        self.envelope = envelope


def facts_of(message: Any, data: bytes) -> Facts:
    """A message's facts from its bytes, formatted exactly as pymap's general FETCH
    path formats them (the same `LoadedMessage`; ENVELOPE reads only the header
    lines, so only they are parsed)."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 4] if end >= 0 else data
    loaded = LoadedMessage(message, FetchRequirement.CONTENT, MessageContent.parse(head), head)
    return Facts(len(data), bytes(loaded.get_envelope_structure()))


_Key = tuple[int, str]


class DerivedStore:
    """Messages' bytes and facts for every session of one gateway (module docstring)."""

    def __init__(self, *, bytes_max: int = 64 << 20, facts_max: int = 200_000) -> None:
        self._bytes: OrderedDict[_Key, bytes] = OrderedDict()
        self._bytes_max = bytes_max
        self._held = 0
        self._facts: OrderedDict[_Key, Facts] = OrderedDict()
        self._facts_max = facts_max
        self._rendered: dict[int, set[str]] = {}  # user -> ids drawn from their threads

    @property
    def bytes_max(self) -> int:
        return self._bytes_max

    def held(self) -> int:
        """Bytes of message content kept now."""
        return self._held

    def average_size(self) -> int:
        return self._held // len(self._bytes) if self._bytes else 8 << 10

    def body(self, user: int, message_id: str) -> bytes | None:
        key = (user, message_id)
        data = self._bytes.get(key)
        if data is not None:
            self._bytes.move_to_end(key)
        return data

    def keep_body(self, user: int, message_id: str, data: bytes, *, rendered: bool) -> None:
        key = (user, message_id)
        if key in self._bytes:
            self._held -= len(self._bytes.pop(key))
        self._bytes[key] = data
        self._held += len(data)
        if rendered:
            self._rendered.setdefault(user, set()).add(message_id)
        while self._held > self._bytes_max and len(self._bytes) > 1:
            _, dropped = self._bytes.popitem(last=False)
            self._held -= len(dropped)

    def facts(self, user: int, message_id: str) -> Facts | None:
        return self._facts.get((user, message_id))

    def keep_facts(self, user: int, message_id: str, facts: Facts) -> None:
        self._facts[(user, message_id)] = facts
        while len(self._facts) > self._facts_max:
            self._facts.popitem(last=False)

    def forget_rendered(self, user: int) -> None:
        """The user's mailbox changed: what was drawn from their threads is redrawn."""
        for message_id in self._rendered.pop(user, ()):
            key = (user, message_id)
            data = self._bytes.pop(key, None)
            if data is not None:
                self._held -= len(data)
            self._facts.pop(key, None)
