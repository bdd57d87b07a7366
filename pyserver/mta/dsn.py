"""Bounces: what a delivery status notification (RFC 3464) says failed.

Mail out leaves with an envelope sender of its own per message
(`b-<user>-<message_id>@<mail_domain>`, pyserver.mta.outbound), so a bounce
comes back to an address that names the mail it is about. This module reads the
bounce: a `multipart/report; report-type=delivery-status` whose
`message/delivery-status` part lists, per recipient, its `Final-Recipient`,
`Action`, `Status` and `Diagnostic-Code`. Only `Action: failed` counts (a
`delayed` notice changes nothing). The standard library's `email` package
parses it; a mail that is no such report yields nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message

__all__ = ["Failure", "failed_recipients"]


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient a bounce reports as failed for good."""

    address: str
    status: str
    diagnostic: str

    @property
    def detail(self) -> str:
        return f"bounced: {self.status} {self.diagnostic}".strip()


def failed_recipients(raw: bytes) -> list[Failure]:
    """The failed recipients of a delivery status notification; [] for any other mail."""
    mail = message_from_bytes(raw, policy=policy.compat32)
    if mail.get_content_type() != "multipart/report":
        return []
    failures = []
    for part in mail.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks[1:]:  # the first block is about the message, the rest recipients
            failure = _failure(block)
            if failure is not None:
                failures.append(failure)
    return failures


def _failure(block: Message) -> Failure | None:
    if str(block.get("Action", "")).strip().lower() != "failed":
        return None
    recipient = str(block.get("Final-Recipient") or block.get("Original-Recipient") or "")
    _, _, address = recipient.partition(";")
    address = address.strip().strip("<>")
    if "@" not in address:
        return None
    status = str(block.get("Status", "")).strip()
    diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
    _, semicolon, text = diagnostic.partition(";")
    return Failure(address, status, (text if semicolon else diagnostic).strip()[:500])
