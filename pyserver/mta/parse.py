"""Raw RFC 5322 / MIME bytes in, the parts of a message that the mailbox keeps out.

`parse_mail` reads a message with the standard library's `email` package
(policy `default`): headers with their encoded words decoded, the text body
(text/plain preferred, HTML turned into text otherwise, in its declared
charset, with fallbacks for wrong or unknown ones), nested multiparts, and
every attachment as a name, a type and a way to read its decoded bytes in
pieces. It never raises: what it cannot make sense of comes back with
`malformed` set and the defects named, and the caller keeps the raw bytes.
Sans I/O: no sockets, no store.
"""

from __future__ import annotations

import email
import logging
import mimetypes
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import errors as email_errors
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage, Message
from email.utils import getaddresses
from typing import Any

from pyserver.mta.htmltext import html_to_text
from pyserver.mta.skeleton import Skeleton, skeleton_of

__all__ = ["Attachment", "ParsedMail", "parse_mail"]

log = logging.getLogger(__name__)

_MAX_NAME_CHARS = 255
_MAX_DEFECTS = 20
_ADDRESS = re.compile(r"[^\s<>\"',;:()\[\]]+@[^\s<>\"',;:()\[\]]+")
_MESSAGE_ID = re.compile(r"<[^<>\s]*>")
# A CR that does not start a CRLF (one search: faster than counting CRs and CRLFs).
_BARE_CR = re.compile(rb"\r(?!\n)")
# Attached whole messages (kept as .eml files).
_MAIL_TYPES = ("message/rfc822", "message/global")
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f/\\]+")
# Charsets in which a CR or LF byte is always that character (line ends are made "\n"
# before decoding).
_ASCII_LINE_ENDS = frozenset(
    ["us-ascii", "ascii", "utf-8", "utf8", "iso-8859-1", "latin-1", "latin1", "iso-8859-15",
     "windows-1252", "cp1252", "unknown-8bit", "x-unknown"]
)  # fmt: skip
# Defects that mean the structure itself could not be read as MIME.
_STRUCTURAL = (
    email_errors.MissingHeaderBodySeparatorDefect,
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect,
    email_errors.InvalidMultipartContentTransferEncodingDefect,
)


class _RememberingHeaders(HeaderRegistry):
    """The default header registry, remembering what it parsed.

    `EmailMessage` parses a header again on every access, and the parser itself
    asks for Content-Type several times per part; the same header text always
    parses to the same immutable header object, so it is parsed once.
    """

    _MAX_ENTRIES = 4096
    _MAX_VALUE_CHARS = 1024

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], Any] = {}

    def __call__(self, name: str, value: str) -> Any:
        key = (name, value)
        header = self._parsed.get(key)
        if header is None:
            header = super().__call__(name, value)
            if len(value) <= self._MAX_VALUE_CHARS:
                if len(self._parsed) >= self._MAX_ENTRIES:
                    self._parsed.clear()
                self._parsed[key] = header
        return header


POLICY = policy.default.clone(header_factory=_RememberingHeaders())
# Writing an attached message back out: headers as they came, not refolded.
_AS_RECEIVED = POLICY.clone(refold_source="none")


@dataclass(slots=True)
class Attachment:
    """One attachment: what the message says of it, and its decoded bytes on demand."""

    name: str
    content_type: str
    inline: bool
    content_id: str | None
    pieces: Callable[[], Iterator[bytes]]


@dataclass(slots=True)
class ParsedMail:
    """What `parse_mail` makes of a message (every string is valid Unicode)."""

    subject: str = ""
    from_address: str | None = None
    from_name: str = ""
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    date: str | None = None
    text: str = ""
    text_from_html: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    malformed: bool = False
    # `text` as UTF-8 when the parser had those bytes at hand (an ASCII body): whoever
    # stores the text need not encode a big body again. None: encode `text`.
    text_utf8: bytes | None = None


def clean(text: str) -> str:
    """Valid Unicode: raw 8-bit bytes (kept as surrogates by the parser) read as UTF-8."""
    if text.isascii():  # known without a scan; spares a copy of a big body
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_mail(raw: bytes) -> ParsedMail:
    """The message's headers, text and attachments; never raises (see the module docstring)."""
    skeleton = skeleton_of(raw)
    try:
        message = email.message_from_bytes(skeleton.data, policy=POLICY)
        assert isinstance(message, EmailMessage)
        return _Reader(message, skeleton).read()
    except Exception as exc:
        log.warning("unparseable mail of %d bytes kept raw: %r", len(raw), exc)
        return ParsedMail(
            text=clean(raw[:4096].decode("utf-8", "replace")),
            defects=[f"ParseFailure: {type(exc).__name__}"],
            malformed=True,
        )


class _Reader:
    """Reads one parsed message tree into a ParsedMail."""

    def __init__(self, message: EmailMessage, skeleton: Skeleton) -> None:
        self.message = message
        self.skeleton = skeleton
        self.mail = ParsedMail()
        # the last text part read from ASCII bytes: (its text, those bytes)
        self._ascii_text: tuple[str, bytes] | None = None

    def read(self) -> ParsedMail:
        mail, message = self.mail, self.message
        mail.subject = _one_line(self._header("subject") or "")
        mail.from_name, mail.from_address = self._from()
        mail.to = self._addresses("to")
        mail.cc = self._addresses("cc")
        mail.reply_to = self._addresses("reply-to")
        # Ids and the date are kept as written: no need for the header parser.
        raw = self._raw_headers(("message-id", "in-reply-to", "references", "date"))
        mail.message_id = raw.get("message-id") or None
        in_reply_to = _MESSAGE_ID.findall(raw.get("in-reply-to", ""))
        mail.in_reply_to = in_reply_to[0] if in_reply_to else None
        mail.references = _MESSAGE_ID.findall(raw.get("references", ""))
        mail.date = raw.get("date") or None
        self._body_and_attachments()
        self._defects()
        if not any(True for _ in message.raw_items()):
            mail.malformed = True
            mail.defects.append("NoHeaders")
        return mail

    # ---- headers ----

    def _raw_headers(self, names: tuple[str, ...]) -> dict[str, str]:
        """The first raw value of each of these headers, unfolded and stripped."""
        found: dict[str, str] = {}
        for name, value in self.message.raw_items():
            key = name.lower()
            if key in names and key not in found:
                found[key] = " ".join(clean(str(value)).split())
        return found

    def _header(self, name: str) -> str | None:
        """A header's decoded value; its raw text if the header parser fails on it."""
        try:
            value = self.message.get(name)
        except Exception as exc:  # a header the parser chokes on: keep its raw text
            self.mail.defects.append(f"BadHeader: {name}: {type(exc).__name__}")
            value = next((v for k, v in self.message.raw_items() if k.lower() == name), None)
        return None if value is None else clean(str(value))

    def _from(self) -> tuple[str, str | None]:
        try:
            header = self.message.get("from")
            addresses = getattr(header, "addresses", ()) if header is not None else ()
            for address in addresses:
                if address.addr_spec and "@" in address.addr_spec:
                    return clean(address.display_name), clean(address.addr_spec)
        except Exception as exc:
            self.mail.defects.append(f"BadHeader: from: {type(exc).__name__}")
        raw = self._header("from") or ""
        found = _ADDRESS.search(raw)
        return ("", found.group(0)) if found else ("", None)

    def _addresses(self, name: str) -> list[str]:
        try:
            header = self.message.get(name)
            if header is None:
                return []
            found = [a.addr_spec for a in getattr(header, "addresses", ()) if a.addr_spec]
        except Exception:
            raw = [v for k, v in self.message.raw_items() if k.lower() == name]
            found = [address for _, address in getaddresses([str(v) for v in raw]) if address]
        return [clean(address) for address in found if "@" in address]

    # ---- body and attachments ----

    def _body_and_attachments(self) -> None:
        message, mail = self.message, self.mail
        body = None
        try:
            body = message.get_body(preferencelist=("plain", "html"))
        except Exception as exc:
            mail.defects.append(f"BadStructure: {type(exc).__name__}")
        alternatives = self._alternatives_of(body) if body is not None else set()
        texts: list[str] = []
        for part in self._leaves(message):
            maintype, subtype = part.get_content_maintype(), part.get_content_subtype()
            attached = part is not body and (part.is_attachment() or bool(_filename(part)))
            if not attached and maintype == "text" and subtype in ("plain", "html"):
                if part is not body and id(part) in alternatives:
                    continue  # another rendering of the body
                if not texts:
                    mail.text_from_html = subtype == "html"
                texts.append(self._text_of(part))
            elif maintype == "multipart":
                # a multipart whose parts could not be found: its text is the body
                mail.malformed = True
                payload = self.skeleton.restore(str(part.get_payload()))
                texts.append(_lines(clean(payload)))
            else:
                mail.attachments.append(self._attachment(part, len(mail.attachments) + 1))
        # isspace, not strip: a big body is not copied to be looked at
        kept = [text.strip("\n") for text in texts if text and not text.isspace()]
        mail.text = "\n\n".join(kept)
        if self._ascii_text is not None and mail.text == self._ascii_text[0]:
            mail.text_utf8 = self._ascii_text[1]  # ASCII: its UTF-8 is those very bytes

    def _leaves(self, part: Message) -> Iterator[Message]:
        """Leaf parts in order; a message/* part is one leaf (attached mail stays whole)."""
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            for sub in part.get_payload():
                yield from self._leaves(sub)
        else:
            yield part

    def _alternatives_of(self, body: Message) -> set[int]:
        """Ids of the leaves of the multipart/alternative parts that hold the body."""
        found: set[int] = set()

        def walk(part: Message, inside: bool) -> bool:
            """Whether `body` is under `part`; marks the text leaves of alternatives holding it."""
            if part is body:
                return True
            if part.get_content_maintype() != "multipart" or not part.is_multipart():
                return False
            alternative = part.get_content_subtype() == "alternative"
            holds = False
            for sub in part.get_payload():
                holds = walk(sub, inside or alternative) or holds
            if holds and alternative:
                found.update(id(leaf) for leaf in self._leaves(part))
            return holds

        walk(self.message, False)
        return found

    def _settle(self, part: Message) -> str | None:
        """The token of a set-aside base64 or whole plain body; otherwise puts any token in
        the part back."""
        payload = part.get_payload()
        if not isinstance(payload, str):
            return None
        token = self.skeleton.token_of(payload)
        if token is not None and (
            token in self.skeleton.plain or _transfer_encoding(part) == "base64"
        ):
            return token
        restored = self.skeleton.restore(payload)
        if restored is not payload:
            part.set_payload(restored)
        return None

    def _decoded(self, part: Message, trimmed: bool = False) -> bytes:
        """The part's decoded bytes (`trimmed`: maybe without some CR and LF bytes at its
        ends, for a caller that strips them anyway)."""
        token = self._settle(part)
        if token is not None:
            try:
                return self.skeleton.decode(token, trimmed)
            except ValueError:  # not whole quads: the email package decodes it, as it would
                part.set_payload(self.skeleton.restore(str(part.get_payload())))
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) else b""

    def _text_of(self, part: Message) -> str:
        """A text part's content as Unicode, HTML turned into text."""
        charset = part.get_content_charset() or "us-ascii"
        ascii_lines = charset.lower() in _ASCII_LINE_ENDS
        html = part.get_content_subtype() == "html"
        # The text's line ends at its ends are stripped (`_body_and_attachments`): a plain
        # text in such a charset may lose them before it is decoded, sparing a copy.
        data = self._decoded(part, trimmed=ascii_lines and not html)
        if ascii_lines and b"\r" in data:
            data = _byte_lines(data)  # cheaper on bytes than on the decoded text
        text = _lines(_decode_text(data, charset, self.mail.defects))
        if html:
            text = html_to_text(text)
        elif ascii_lines and text.isascii():
            # read in an ASCII-compatible charset (no other byte decodes to ASCII; no CR
            # left to change): the text is `data` itself (and str.isascii needs no scan)
            self._ascii_text = (text, data)
        return clean(text)

    def _attachment(self, part: Message, number: int) -> Attachment:
        content_type = part.get_content_type()
        name = _filename(part)
        if not name and content_type in _MAIL_TYPES:
            inner = part.get_payload(0) if part.is_multipart() else None
            subject = inner.get("subject") if isinstance(inner, Message) else None
            name = f"{_one_line(clean(str(subject))) if subject else 'message'}.eml"
        elif not name and part.get_content_maintype() == "message":
            name = f"attachment-{number}.txt"
        if not name:
            extension = mimetypes.guess_extension(content_type) or ".bin"
            name = f"attachment-{number}{extension}"
        content_id = part.get("content-id")
        return Attachment(
            name=_safe_name(name),
            content_type=content_type,
            inline=part.get_content_disposition() == "inline",
            content_id=clean(str(content_id)).strip() if content_id else None,
            pieces=self._pieces_of(part),
        )

    def _pieces_of(self, part: Message) -> Callable[[], Iterator[bytes]]:
        if part.get_content_maintype() == "message" and part.is_multipart():
            return lambda: iter([self._message_bytes(part)])
        return lambda: iter([self._decoded(part)])

    def _message_bytes(self, part: Message) -> bytes:
        """An attached message as bytes, with every token inside it put back."""
        for leaf in part.walk():
            payload = leaf.get_payload()
            if isinstance(payload, str):
                restored = self.skeleton.restore(payload)
                if restored is not payload:
                    leaf.set_payload(restored)
        blocks = part.get_payload()
        try:
            if part.get_content_type() in _MAIL_TYPES:
                return blocks[0].as_bytes(policy=_AS_RECEIVED)
            # message/delivery-status and kin: blocks of header fields
            return b"\n".join(block.as_bytes(policy=_AS_RECEIVED) for block in blocks)
        except Exception:
            return bytes(str(blocks[0]), "utf-8", "surrogateescape")

    def _defects(self) -> None:
        mail = self.mail
        for part in self.message.walk():
            for defect in part.defects:
                if isinstance(defect, _STRUCTURAL) and part is self.message:
                    mail.malformed = True
                if len(mail.defects) < _MAX_DEFECTS:
                    mail.defects.append(type(defect).__name__)


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        return ""
    return clean(name) if name else ""


def _safe_name(name: str) -> str:
    """A file name with no path, no control characters, of a sane length."""
    name = _NAME_JUNK.sub("_", name).strip(" .") or "attachment"
    return name[:_MAX_NAME_CHARS]


def _lines(text: str) -> str:
    """Text with its line ends made "\\n"."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _byte_lines(data: bytes) -> bytes:
    """`_lines` on the bytes of an ASCII-compatible charset (CR and LF are single bytes that
    are never part of another character)."""
    if _BARE_CR.search(data) is None:
        # every CR ends a CRLF: deleting them is enough (replace finds them with memchr,
        # several times faster than translate's byte-by-byte table)
        return data.replace(b"\r", b"")
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _transfer_encoding(part: Message) -> str:
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _decode_text(data: bytes, charset: str, defects: list[str]) -> str:
    """Bytes in a declared charset; mail that lies about its charset is read as UTF-8 or cp1252."""
    charset = charset.lower()
    if charset in ("us-ascii", "ascii", "unknown-8bit", "x-unknown") and not data.isascii():
        charset = "utf-8"
    try:
        return data.decode(charset)
    except LookupError:
        defects.append(f"UnknownCharset: {charset[:40]}")
    except UnicodeDecodeError:
        defects.append(f"BadBytesForCharset: {charset[:40]}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")
