"""A message's IMAP structure (BODYSTRUCTURE, body parts) as RFC 3501 and Dovecot give it.

The MIME tree is split here, on the message's own bytes (RFC 2046): a part of a
multipart lies between two delimiter lines, and the CRLF before a delimiter
belongs to the delimiter, so it is in no part; a part without a blank line after
its header lines has an empty body; an empty part (two delimiters in a row) is
an empty text/plain part; a part of a multipart/digest without a Content-Type is
message/rfc822. pymap 0.36 parses each part's header lines (`MessageContent`),
but its own split gets these cases wrong (a part's size counted with its
header, the boundary's CRLF kept, empty parts given the rest of the message),
as the comparisons with Dovecot found (tests/test_imap_dovecot.py).

Also: a part's size and lines are those of its body (body-fld-octets and
body-fld-lines, line ends counted); a text part without a charset says the
default, us-ascii (RFC 2045); ENVELOPE's addresses come from the headers' own
text (with `corrections`, an RFC 822 comment is the display name) and its date
is the Date header's text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from pymap.bytes import Writeable
from pymap.message import BaseLoadedMessage
from pymap.mime import MessageContent
from pymap.parsing.response.fetch import (
    BodyStructure,
    ContentBodyStructure,
    EnvelopeStructure,
    MessageBodyStructure,
    MultipartBodyStructure,
    TextBodyStructure,
)

__all__ = ["LoadedMessage", "body_of", "parts_of"]

_CRLF = b"\r\n"
_MAX_DEPTH = 50  # nesting deeper than this is answered as an opaque part


def body_of(raw: bytes) -> bytes:
    """A part's body: after the blank line ending its header lines (none: no body)."""
    if raw.startswith(_CRLF):
        return raw[2:]
    blank = raw.find(b"\r\n\r\n")
    return raw[blank + 4 :] if blank >= 0 else b""


def parts_of(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body: what lies between its delimiter lines, the CRLF
    before each delimiter left out (it belongs to the delimiter)."""
    if not boundary:
        return []
    marker = re.escape(boundary.encode("utf-8", "replace"))
    # a delimiter line, its line end not taken: it may be the CRLF of the next one
    delimiter = re.compile(rb"(?:^|\r\n)--" + marker + rb"(--)?[ \t]*(?=\r\n|$)")
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : max(start, match.start())])
        if match.group(1):  # the close delimiter: the rest is the epilogue
            return parts
        start = match.end() + 2  # past the delimiter line's CRLF
    if start is not None:  # no close delimiter: the last part runs to the end
        parts.append(body[start:])
    return parts


def _lines(data: bytes) -> int:
    """body-fld-lines: the line ends in the body (a last line without one does not
    count, as Dovecot counts)."""
    return data.count(b"\n")


def _envelope(raw: bytes, content: MessageContent | None = None) -> EnvelopeStructure:
    """ENVELOPE of a message (RFC 3501 7.4.2), addresses and date from the headers' text
    (`content`: the message parsed already)."""
    parsed = (content or MessageContent.parse(raw)).header.parsed
    head = raw[: raw.find(b"\r\n\r\n") + 4] if b"\r\n\r\n" in raw else raw
    fields = BytesHeaderParser(policy=compat32).parsebytes(head)

    def addresses(name: str) -> list[str] | None:
        found = fields.get_all(name)
        return [str(value) for value in found] if found else None

    envelope = EnvelopeStructure(
        parsed.date, parsed.subject, addresses("From"), addresses("Sender"),
        addresses("Reply-To"), addresses("To"), addresses("Cc"), addresses("Bcc"),
        parsed.in_reply_to, parsed.message_id,
    )  # fmt: skip
    date = fields.get("Date")
    envelope.raw_date = " ".join(str(date).split()) if date else None  # type: ignore[attr-defined]
    return envelope


class _Part:
    """One part of the tree: its bytes, its parsed header lines, its children."""

    def __init__(self, raw: bytes, default_type: str = "text/plain", depth: int = 0) -> None:
        self.raw = raw
        self.content = MessageContent.parse(raw)
        self.body = body_of(raw)
        kind = self.content.body.content_type
        self.explicit = self.content.header.parsed.content_type is not None
        if self.explicit:
            self.maintype, self.subtype = kind.maintype.lower(), kind.subtype.lower()
        else:
            self.maintype, self.subtype = default_type.split("/")
        self.params = dict(kind.params) if self.explicit else {}
        self.children: list[_Part] = []
        if depth >= _MAX_DEPTH:
            return
        if self.maintype == "multipart":
            inner = "message/rfc822" if self.subtype == "digest" else "text/plain"
            boundary = str(self.params.get("boundary", ""))
            self.children = [
                _Part(part, inner, depth + 1) for part in parts_of(self.body, boundary)
            ] or [_Part(b"", "text/plain", depth + 1)]
        elif (self.maintype, self.subtype) == ("message", "rfc822"):
            self.children = [_Part(self.body, "text/plain", depth + 1)]

    @property
    def encapsulates(self) -> bool:
        return (self.maintype, self.subtype) == ("message", "rfc822") and bool(self.children)


def _find(root: _Part, section: Sequence[int]) -> _Part:
    """The part a section names (RFC 3501 6.4.5); IndexError if there is none.

    A message's parts are its multipart's parts, or else its body alone (part 1); the
    parts of a message/rfc822 part are those of the message it holds.
    """
    message, part = root, root
    for depth, number in enumerate(section):
        if depth:
            if part.encapsulates:
                message = part.children[0]
            elif part.maintype == "multipart":
                message = part
            else:
                raise IndexError(number)
        parts = message.children if message.maintype == "multipart" else [message]
        if not 1 <= number <= len(parts):
            raise IndexError(number)
        part = parts[number - 1]
    return part


def _structure(part: _Part) -> BodyStructure:
    """BODYSTRUCTURE of a part (RFC 3501 7.4.2), sizes of its body."""
    parsed = part.content.header.parsed
    params = dict(part.params)
    disposition = parsed.content_disposition
    language = parsed.content_language
    location = parsed.content_location
    if part.maintype == "multipart":
        children = [_structure(child) for child in part.children]
        return MultipartBodyStructure(
            part.subtype, params, disposition, language, location, children
        )
    if part.maintype == "text" and not any(key.lower() == "charset" for key in params):
        params["charset"] = "us-ascii"
    body = part.body
    content_id = parsed.content_id
    description = parsed.content_description
    encoding = parsed.content_transfer_encoding or "7bit"
    if part.encapsulates:
        inner = part.children[0]
        return MessageBodyStructure(
            params, disposition, language, location, content_id, description, encoding,
            None, len(body), _lines(body), _envelope(inner.raw, inner.content),
            _structure(inner),
        )  # fmt: skip
    if part.maintype == "text":
        return TextBodyStructure(
            part.subtype, params, disposition, language, location, content_id, description,
            encoding, None, len(body), _lines(body),
        )  # fmt: skip
    return ContentBodyStructure(
        part.maintype, part.subtype, params, disposition, language, location, content_id,
        description, encoding, None, len(body),
    )  # fmt: skip


class LoadedMessage(BaseLoadedMessage):
    """pymap's loaded message answering from the tree of the module docstring; `raw` is
    the message's bytes (BODY[] and RFC822.SIZE are exactly those)."""

    def __init__(self, message: Any, requirement: Any, content: MessageContent | None,
                 raw: bytes | None = None) -> None:  # fmt: skip
        super().__init__(message, requirement, content)
        self._raw = raw
        self._tree: _Part | None = None

    @property
    def tree(self) -> _Part | None:
        if self._tree is None and self._raw is not None:
            self._tree = _Part(self._raw)
        return self._tree

    def get_envelope_structure(self) -> EnvelopeStructure:
        if self._raw is None:
            return super().get_envelope_structure()
        return _envelope(self._raw, self._content)

    def get_body_structure(self) -> BodyStructure:
        tree = self.tree
        return super().get_body_structure() if tree is None else _structure(tree)

    def get_message_text(self, section: Sequence[int] | None = None) -> Writeable:
        tree = self.tree
        if tree is None:
            return super().get_message_text(section)
        if not section:
            return Writeable.wrap(tree.body)
        try:
            part = _find(tree, section)
        except IndexError:
            return Writeable.empty()
        return Writeable.wrap(part.children[0].body) if part.encapsulates else Writeable.empty()

    def get_body(self, section: Sequence[int] | None = None, binary: bool = False) -> Writeable:
        tree = self.tree
        if tree is None or binary:
            return super().get_body(section, binary)
        if not section:
            return Writeable.wrap(tree.raw)
        try:
            part = _find(tree, section)
        except IndexError:
            return Writeable.empty()
        # a message/rfc822 part's body is the message it holds, whole
        return Writeable.wrap(part.body)

    def get_size(self, section: Sequence[int] | None = None) -> int:
        if self._raw is not None and not section:
            return len(self._raw)
        if self.tree is None:
            return super().get_size(section)
        return len(bytes(self.get_body(section)))
