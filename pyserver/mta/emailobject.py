"""The lightweight email object: what the proxy hands every recipient's owner with DELIVER.

A parsed message whose bulk (attachments, a long body, the raw original) is
in the blob store becomes a few fields DELIVER takes (`from`, `subject`,
`text`, `key`) and an `extra` object with the rest: the mail headers that
thread and answer it, and references to the blobs. docs/protocol.md
("Email messages") describes `extra`; it always fits DELIVER's 64 KiB. A small
mail's raw bytes are no blob: they go with DELIVER (`raw`), and each owner keeps
them in the copy's body, committed with its log entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64

from pyserver.blobs.base import BlobInfo
from pyserver.mta.parse import Attachment, ParsedMail

__all__ = ["EmailObject", "StoredAttachment", "build_email", "sender_of"]

# DELIVER's limits (docs/protocol.md): subject, from and key at most 4 KiB, extra 64 KiB.
MAX_FIELD_BYTES = 4 << 10
MAX_EXTRA_BYTES = 64 << 10
# What an envelope sender of "<>" (a bounce) is shown as.
NULL_SENDER = "MAILER-DAEMON"


@dataclass(frozen=True, slots=True)
class StoredAttachment:
    """An attachment whose bytes are in the blob store."""

    attachment: Attachment
    blob: BlobInfo

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ref": self.blob.ref,
            "name": self.attachment.name,
            "type": self.attachment.content_type,
            "size": self.blob.size,
        }
        if self.attachment.inline:
            out["inline"] = True
        if self.attachment.content_id:
            out["content_id"] = self.attachment.content_id[:256]
        return out


@dataclass(frozen=True, slots=True)
class EmailObject:
    """One inbound message, ready to be delivered to any of its recipients."""

    sender: str
    subject: str
    text: str
    key: str
    extra: dict[str, Any]
    # the registered user the mail proved to speak for; 0: a sender from outside
    sender_user: int = 0
    # the conversation the mail answers, from its In-Reply-To (a mail this cell sent)
    thread_hint: str | None = None
    # a small mail's bytes as received, kept with each copy's body instead of as a blob
    # (`extra.raw.inline`); None: the raw message is the blob `extra.raw.ref`
    raw_inline: bytes | None = None

    def deliver_payload(self, user: int, participants: Iterable[int]) -> dict[str, Any]:
        """DELIVER's payload for one recipient (a sender from outside: `sender` 0)."""
        sender = [self.sender_user] if self.sender_user else []
        optional: dict[str, Any] = {"thread": self.thread_hint} if self.thread_hint else {}
        if self.raw_inline is not None:
            optional["raw"] = pybase64.b64encode_as_string(self.raw_inline)
        return {
            **optional,
            "user": user,
            "sender": self.sender_user,
            "from": self.sender,
            "participants": sorted({user, *participants, *sender}),
            "text": self.text,
            "subject": self.subject,
            "channel": "email",
            "key": self.key,
            "extra": self.extra,
        }

    @property
    def attachments(self) -> list[dict[str, Any]]:
        return list(self.extra.get("attachments", ()))

    def spoken_for(self, user: int, proof: str) -> EmailObject:
        """This mail as registered user `user`'s message, `proof` saying how it was shown
        (`extra.sender_proof`, e.g. "dkim:example.org")."""
        extra = {**self.extra, "sender_proof": _cut(proof, 256)}
        _fit(extra)
        return dataclasses.replace(self, sender_user=user, extra=extra)

    def unverified(self, why: str) -> EmailObject:
        """This mail, still from outside, marked as claiming a registered address it did not
        prove (`extra.sender_unverified`: why not)."""
        extra = {**self.extra, "sender_unverified": _cut(why, 256)}
        _fit(extra)
        return dataclasses.replace(self, extra=extra)


def sender_of(mail: ParsedMail, mail_from: str | None) -> str:
    """Who a mail is from: its From address, else the envelope sender, else MAILER-DAEMON."""
    return mail.from_address or (mail_from or "").strip("<> ") or NULL_SENDER


def build_email(
    mail: ParsedMail,
    *,
    raw: BlobInfo,
    mail_from: str | None,
    text: str,
    body: BlobInfo | None,
    attachments: list[StoredAttachment],
    raw_inline: bytes | None = None,
) -> EmailObject:
    """The email object of a parsed message whose blobs are stored.

    `text` is the body as delivered inline (cut to the inline limit when
    `body` holds the whole of it). `raw_inline`: the raw message's bytes when they go
    with every copy instead of into the blob store (`raw` then names them all the same).
    """
    envelope_sender = (mail_from or "").strip("<> ") or None
    sender = sender_of(mail, mail_from)
    named_raw: dict[str, Any] = {"ref": raw.ref, "size": raw.size}
    if raw_inline is not None:
        named_raw["inline"] = True
    extra: dict[str, Any] = {
        "message_id_header": mail.message_id,
        "in_reply_to": mail.in_reply_to,
        "references": mail.references,
        "from_name": mail.from_name,
        "to": mail.to,
        "cc": mail.cc,
        "reply_to": mail.reply_to,
        "date": mail.date,
        "mail_from": envelope_sender,
        "raw": named_raw,
        "attachments": [stored.to_json() for stored in attachments],
    }
    if body is not None:
        extra["body"] = {"ref": body.ref, "size": body.size, "type": "text/plain; charset=utf-8"}
    if mail.text_from_html:
        extra["html"] = True
    if mail.malformed:
        extra["malformed"] = True
    if mail.defects:
        extra["defects"] = mail.defects
    extra = {name: value for name, value in extra.items() if value not in (None, "", [])}
    _fit(extra)
    return EmailObject(
        sender=_cut(sender, MAX_FIELD_BYTES),
        subject=_cut(mail.subject, MAX_FIELD_BYTES),
        text=text,
        key=_key(mail.message_id, raw.ref),
        extra=extra,
        raw_inline=raw_inline,
    )


def _key(message_id: str | None, raw_ref: str) -> str:
    """DELIVER's idempotency key: the Message-ID (so a resent message is a no-op), else the
    raw message's hash (a retry of the same bytes)."""
    if not message_id:
        return f"sha256:{raw_ref}"
    if len(message_id.encode("utf-8")) > MAX_FIELD_BYTES:
        return "message-id-sha256:" + hashlib.sha256(message_id.encode("utf-8")).hexdigest()
    return message_id


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most max_bytes of UTF-8, on a character boundary."""
    if len(text) * 4 <= max_bytes:
        return text
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def _fit(extra: dict[str, Any]) -> None:
    """Shrink `extra` until it fits DELIVER's limit: long header lists first, then names,
    then (only for absurd messages) the attachment list itself, counting what was left out."""
    if len(orjson.dumps(extra)) <= MAX_EXTRA_BYTES:
        return
    for name, keep in (("defects", 5), ("references", 10), ("to", 20), ("cc", 20),
                       ("reply_to", 5)):  # fmt: skip
        if name in extra:
            extra[name] = extra[name][-keep:] if name == "references" else extra[name][:keep]
    for name in ("message_id_header", "in_reply_to", "from_name", "date", "mail_from"):
        if name in extra:
            extra[name] = _cut(extra[name], 512)
    extra["references"] = [_cut(ref, 512) for ref in extra.get("references", [])]
    extra["to"] = [_cut(address, 256) for address in extra.get("to", [])]
    extra["cc"] = [_cut(address, 256) for address in extra.get("cc", [])]
    for attachment in extra.get("attachments", []):
        attachment["name"] = attachment["name"][:100]
        attachment["type"] = attachment["type"][:100]
    attachments = extra.get("attachments", [])
    while attachments and len(orjson.dumps(extra)) > MAX_EXTRA_BYTES:
        drop = max(1, len(attachments) // 10)
        del attachments[-drop:]
        extra["attachments_left_out"] = extra.get("attachments_left_out", 0) + drop
