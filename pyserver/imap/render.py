"""A message of any channel as the RFC 5322 message a mail client reads.

Mail that came in over SMTP keeps its raw bytes in the blob store and is served
as it came (`raw_ref`). Everything else (chat, SMS, mail written here) is
rendered: From, To, Date, Subject, Message-ID, and In-Reply-To/References
naming the conversation's own id, so mail clients thread a conversation's
messages together whatever their channel; the text as text/plain (UTF-8), and
attachments as MIME parts when their bytes are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from typing import Any

__all__ = ["address_of", "raw_ref", "render_message", "thread_reference"]

_SUBJECT_FROM_TEXT = 60


def address_of(user: int, domain: str) -> str:
    """A user's address in rendered messages (the same the MTA proxy takes mail at)."""
    return f"u{user}@{domain}"


def thread_reference(thread_id: str, domain: str) -> str:
    """The Message-ID the messages of a conversation all refer to."""
    return f"<{thread_id}@{domain}>"


def raw_ref(message: dict[str, Any]) -> str | None:
    """The blob holding a mail's bytes as received, if it has one."""
    raw = (message.get("extra") or {}).get("raw")
    return raw.get("ref") if isinstance(raw, dict) and isinstance(raw.get("ref"), str) else None


def render_message(
    message: dict[str, Any],
    participants: Sequence[int],
    outside: Sequence[str],
    domain: str,
    attachments: Sequence[tuple[dict[str, Any], bytes]] = (),
) -> bytes:
    """The message (GET_MESSAGE's reply) as RFC 5322 bytes, CRLF line ends.

    `participants` and `outside` are the conversation's users and outside addresses
    (GET_THREAD's); `attachments` each file's description and bytes.
    """
    mail = EmailMessage(policy=SMTP)
    sender = message.get("sender") or 0
    name = (message.get("extra") or {}).get("from_name") or ""
    from_address = message.get("from") or (address_of(sender, domain) if sender else "")
    mail["From"] = formataddr((name, from_address)) if from_address else f"unknown@{domain}"
    recipients = [address_of(u, domain) for u in participants if u != sender]
    recipients += [a for a in outside if a != from_address]
    if recipients:
        mail["To"] = ", ".join(recipients)
    when = datetime.fromtimestamp(int(message.get("ts") or 0) / 1_000_000, UTC)
    mail["Date"] = format_datetime(when)
    mail["Subject"] = _subject(message)
    mail["Message-ID"] = f"<{message['message_id']}@{domain}>"
    reference = thread_reference(str(message["thread_id"]), domain)
    mail["In-Reply-To"] = reference
    mail["References"] = reference
    mail["X-Pyserver-Channel"] = str(message.get("channel") or "chat")
    mail.set_content(str(message.get("text") or ""), charset="utf-8")
    for description, data in attachments:
        kind = str(description.get("type") or "application/octet-stream")
        maintype, _, subtype = kind.partition("/")
        if not subtype or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"
        mail.add_attachment(
            data,
            maintype=maintype,
            subtype=subtype,
            filename=str(description.get("name") or "attachment"),
        )
    return mail.as_bytes()


def _subject(message: dict[str, Any]) -> str:
    subject = str(message.get("subject") or "").strip()
    if subject:
        return subject
    first_line = str(message.get("text") or "").strip().splitlines()
    text = first_line[0] if first_line else ""
    if len(text) > _SUBJECT_FROM_TEXT:
        text = text[: _SUBJECT_FROM_TEXT - 1].rstrip() + "…"
    return text or f"({message.get('channel') or 'chat'})"
