"""Mail out: a user's message to outside addresses, as a MIME mail handed to the relay.

`RelaySender` is the outbox's `send` (pyserver.app.outbox): it writes the mail
with the standard library's `email` package and gives it to the configured
smart host over SMTP (aiosmtplib), on sessions it keeps open between mails.
The mail is From the user's address in the cell's mail domain
(`u<user>@<mail_domain>`, which the MTA proxy takes back in: replies reach the
user), with an envelope sender naming the message (its bounces come back to
it: pyserver.mta.dsn). Its Message-ID names the message and its conversation
(`<message_id.thread_id@mail_domain>`), so a reply's In-Reply-To or
References brings the answer back into the same conversation; its own
In-Reply-To and References carry the conversation's earlier mail headers.

With a DKIM key (`dkim_key_file`, PEM), every mail is signed for the mail
domain (selector `dkim_selector`), so receivers can tell it really comes from
this cell; publish the key's public half as `<selector>._domainkey.<domain>`.

Outcomes per address: the relay's acceptance is "sent"; a permanent refusal
(5xx) is "failed"; anything else (4xx, no connection, a timeout) is "retry".
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime
from email.header import Header
from email.utils import encode_rfc2231, format_datetime
from typing import Any

import aiosmtplib
import dkim
import pybase64

from pyserver.blobs.base import BlobStore
from pyserver.errors import NotFound, PyserverError
from pyserver.mta.addresscache import AddressCache
from pyserver.store.base import AddressStore

__all__ = [
    "RelaySender",
    "bounce_address",
    "bounced_mail",
    "resolve_user",
    "thread_of_message_id",
    "user_address",
    "user_of_address",
]

_USER_ADDRESS = re.compile(r"^u(\d{1,20})$")
_BOUNCE_ADDRESS = re.compile(r"^b-(\d{1,20})-(m[0-9a-f]{24})$")
# the headers a signature covers (those present; From always is)
_SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"in-reply-to",
                   b"references"]  # fmt: skip
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")
_OUR_MESSAGE_ID = re.compile(r"<?m[0-9a-f]{24}\.(t[0-9a-f]{24})@([^>\s]+)>?")


def user_address(user_id: int, mail_domain: str) -> str:
    """The address a user's mail goes out from (and replies come back to)."""
    return f"u{user_id}@{mail_domain}"


def user_of_address(address: str, mail_domain: str) -> int | None:
    """The user of one of this cell's own addresses (`u<user>@<mail_domain>`), else None."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    match = _USER_ADDRESS.match(local.lower()) if at else None
    if match is None or domain.lower().rstrip(".") != mail_domain.lower():
        return None
    return int(match.group(1))


async def resolve_user(
    address: str, addresses: AddressStore | AddressCache, mail_domain: str
) -> int | None:
    """The user an address reaches: `u<user>@<mail_domain>`, else the one it is registered
    to (the store's address book); None for nobody here."""
    address = address.strip().strip("<>").strip()
    own = user_of_address(address, mail_domain)
    if own is not None:
        return own
    return await addresses.resolve_address(address) if address else None


def bounce_address(user_id: int, message_id: str, mail_domain: str) -> str:
    """The envelope sender of one outgoing mail: its bounces come back to it, naming it."""
    return f"b-{user_id}-{message_id}@{mail_domain}"


def bounced_mail(address: str, mail_domain: str) -> tuple[int, str] | None:
    """(user, message id) a bounce address names, else None."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    match = _BOUNCE_ADDRESS.match(local.lower()) if at else None
    if match is None or domain.lower().rstrip(".") != mail_domain.lower():
        return None
    return int(match.group(1)), match.group(2)


def thread_of_message_id(header: str, mail_domain: str) -> str | None:
    """The conversation a Message-ID this cell wrote names (`<m….t…@mail_domain>`), else None."""
    match = _OUR_MESSAGE_ID.fullmatch(header.strip())
    if match is None or match.group(2).lower() != mail_domain.lower():
        return None
    return match.group(1)


class RelaySender:
    """Sends the outbox's mail through the smart host at host:port."""

    def __init__(
        self,
        host: str,
        port: int,
        mail_domain: str,
        timeout_s: float = 30.0,
        *,
        dkim_key: bytes | None = None,
        dkim_selector: str = "pyserver",
        blobs: BlobStore | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.mail_domain = mail_domain
        self._timeout_s = timeout_s
        self._dkim_key = dkim_key
        self._dkim_selector = dkim_selector.encode()
        # where attachments' bytes are (the cell's blob store)
        self._blobs = blobs
        # sessions to the relay kept open between mails (one per outbox worker at most)
        self._idle: list[aiosmtplib.SMTP] = []

    def wire(self, mail: dict[str, Any], files: list[bytes] | None = None) -> bytes:
        """The bytes handed to the relay: the composed mail, DKIM-signed when a key is set."""
        data = self.compose(mail, files)
        if self._dkim_key is None:
            return data
        present = [h for h in _SIGNED_HEADERS if h in _header_names(data)]
        signature = dkim.sign(
            data, self._dkim_selector, self.mail_domain.encode(), self._dkim_key,
            include_headers=present,
        )  # fmt: skip
        return signature + data

    def compose(self, mail: dict[str, Any], files: list[bytes] | None = None) -> bytes:
        """The MIME mail of one outgoing message (see the module docstring), CRLF.

        Written here rather than with `EmailMessage`: the email package's header
        registry and generator cost about 2 ms a mail, most of mail out's time. The
        encodings are still the standard library's: RFC 2047 words (`email.header`)
        for a header that is not ASCII, quoted-printable (`binascii`) for a body
        that is not short-lined ASCII. With attachments (`files`: their bytes, in the order
        of `mail["attachments"]`), a multipart/mixed of the text and each file in base64.
        """
        when = format_datetime(datetime.fromtimestamp(mail["ts"] / 1_000_000, UTC))
        lines = [
            f"From: {user_address(mail['user'], self.mail_domain)}",
            "To: " + ",\r\n ".join(mail["addresses"]),
            "Subject: " + _header_text(mail["subject"]),
            f"Date: {when}",
            f"Message-ID: <{mail['message_id']}.{mail['thread_id']}@{self.mail_domain}>",
        ]
        references = [_one_id(ref) for ref in mail.get("references", ()) if _one_id(ref)]
        if references:
            lines.append(f"In-Reply-To: {references[-1]}")
            lines.append("References: " + "\r\n ".join(references[-20:]))
        lines.append("MIME-Version: 1.0")
        text_headers, text = _text_part(mail["text"])
        if not files:
            return ("\r\n".join(lines + text_headers) + "\r\n\r\n").encode("ascii") + text
        boundary = f"=_pyserver_{mail['message_id']}"
        lines.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        parts = [("\r\n".join(text_headers) + "\r\n\r\n").encode("ascii") + text]
        for meta, data in zip(mail["attachments"], files, strict=True):
            parts.append(_file_part(meta, data))
        separator = f"--{boundary}\r\n".encode()
        body = b"".join(separator + part for part in parts) + f"--{boundary}--\r\n".encode()
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body

    async def __call__(self, mail: dict[str, Any]) -> dict[str, tuple[str, str]]:
        addresses = list(mail["addresses"])
        try:
            files = await self._files(mail.get("attachments", []))
        except NotFound as error:  # a file gone from the blob store: it can never go out
            return dict.fromkeys(addresses, ("failed", f"attachment: {error}"))
        except PyserverError as error:  # the blob store down: later
            return dict.fromkeys(addresses, ("retry", f"attachment: {error}"))
        message = self.wire(mail, files)
        sender = bounce_address(mail["user"], mail["message_id"], self.mail_domain)
        smtp: aiosmtplib.SMTP | None = None
        try:
            smtp, reused = await self._connection()
            try:
                refused, reply = await smtp.sendmail(sender, addresses, message)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                if not reused:
                    raise
                # the relay closed the idle session meanwhile: once more on a new one
                await _discard(smtp)
                smtp = None
                smtp, _ = await self._connection(fresh=True)
                refused, reply = await smtp.sendmail(sender, addresses, message)
        except aiosmtplib.SMTPRecipientsRefused as error:
            await _discard(smtp)
            answers = {r.recipient: r for r in error.recipients}
            return {a: _refusal(answers.get(a)) for a in addresses}
        except aiosmtplib.SMTPResponseException as error:
            await _discard(smtp)
            outcome = "failed" if 500 <= error.code < 600 else "retry"
            return dict.fromkeys(addresses, (outcome, f"{error.code} {error.message}"))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            await _discard(smtp)
            return dict.fromkeys(addresses, ("retry", f"{type(error).__name__}: {error}"))
        self._idle.append(smtp)  # a session that went well carries the next mail
        outcomes = {}
        for address in addresses:
            if address in refused:
                outcomes[address] = _refusal(refused[address])
            else:
                outcomes[address] = ("sent", reply[:500])
        return outcomes

    async def _files(self, attachments: list[dict[str, Any]]) -> list[bytes]:
        if attachments and self._blobs is None:
            raise PyserverError("no blob store to read attachments from")
        return [await self._blobs.get(a["ref"]) for a in attachments] if self._blobs else []

    async def _connection(self, fresh: bool = False) -> tuple[aiosmtplib.SMTP, bool]:
        """An idle session to the relay (and True), or a new one (and False)."""
        while self._idle and not fresh:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp, True
        smtp = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, timeout=self._timeout_s, start_tls=False
        )
        await smtp.connect()
        return smtp, False

    async def close(self) -> None:
        """Say goodbye on every idle session."""
        idle, self._idle = self._idle, []
        for smtp in idle:
            await _discard(smtp, polite=True)


async def _discard(smtp: aiosmtplib.SMTP | None, polite: bool = False) -> None:
    """Close a session (QUIT first when `polite`), whatever state it is in (None: none)."""
    if smtp is None:
        return
    try:
        if polite and smtp.is_connected:
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    smtp.close()


def _text_part(text: str) -> tuple[list[str], bytes]:
    """The headers and CRLF body of the text: 7bit when short-lined ASCII, else
    quoted-printable."""
    body = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = ["Content-Type: text/plain; charset=utf-8"]
    if body.isascii() and all(len(line) <= 900 for line in body.split("\n")):
        headers.append("Content-Transfer-Encoding: 7bit")
        encoded = body.encode("ascii")
    else:
        headers.append("Content-Transfer-Encoding: quoted-printable")
        encoded = binascii.b2a_qp(body.encode("utf-8"), istext=True)
    encoded = encoded.replace(b"\n", b"\r\n")
    if not encoded.endswith(b"\r\n"):
        encoded += b"\r\n"
    return headers, encoded


def _file_part(meta: dict[str, Any], data: bytes) -> bytes:
    """One attachment: its type and file name (RFC 2231 when not plain ASCII), base64."""
    kind = meta.get("type") or ""
    if not _CONTENT_TYPE.fullmatch(kind):
        kind = "application/octet-stream"
    name = " ".join(str(meta.get("name") or "attachment").split())[:255] or "attachment"
    if name.isascii() and '"' not in name and "\\" not in name:
        param = f'filename="{name}"'
    else:
        param = f"filename*={encode_rfc2231(name, 'utf-8')}"
    encoded = pybase64.b64encode(data)
    lines = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    head = (f"Content-Type: {kind}\r\nContent-Disposition: attachment; {param}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + lines + b"\r\n"


def _header_text(value: str) -> str:
    """A header's text: as it is when short ASCII, else RFC 2047 encoded words, folded."""
    value = " ".join(value.split())
    if value.isascii() and len(value) <= 900:
        return value
    return Header(value, "utf-8", maxlinelen=76).encode(linesep="\r\n")


def _one_id(reference: str) -> str:
    """A Message-ID as a header may carry it (`<...>`, no spaces), else ""."""
    reference = reference.strip()
    ok = reference.startswith("<") and reference.endswith(">") and reference.isascii()
    return reference if ok and len(reference) <= 500 and " " not in reference else ""


def _header_names(data: bytes) -> set[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return {line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")
            if line and not line[:1].isspace()}  # fmt: skip


def _refusal(answer: Any) -> tuple[str, str]:
    """(outcome, detail) of a refused recipient: aiosmtplib gives a response or an error."""
    if answer is None:
        return "retry", "no answer for this address"
    code = getattr(answer, "code", 0)
    detail = f"{code} {getattr(answer, 'message', answer)}"
    return ("failed" if 500 <= code < 600 else "retry"), detail[:500]
