"""One mail's bytes into a record of a user's mailbox, the way the MTA proxy takes mail in.

The raw message, its attachments and a body over the inline limit go to the
blob store and the lightweight email object is built by the proxy's own code
(`pyserver.mta.intake.store_mail`); the From, To and Cc addresses are resolved
to users (`AddressBook`: the import's map, then the cell's address book, then
`u<user>@<mail domain>`). A mail from an address of a user is that user's
message (the operator vouches for the history it imports: no DKIM proof is
asked, unlike live mail), sent by the mailbox's own user it is filed in Sent.
"""

from __future__ import annotations

from typing import Any

from pyserver.blobs.base import BlobStore
from pyserver.importer.records import ImportRecord, Rejected, timestamp_us
from pyserver.mta.intake import MtaSettings, store_mail
from pyserver.mta.outbound import resolve_user
from pyserver.store.base import AddressStore

__all__ = ["AddressBook", "MailSource", "mail_record"]

# the users of one conversation at the most (a SEND's limit, the sender included)
_MAX_PARTICIPANTS = 101


class AddressBook:
    """Addresses to users: the import's own map first, then the cell's book, remembered."""

    def __init__(self, store: AddressStore, mail_domain: str, known: dict[str, int]) -> None:
        self._store = store
        self._mail_domain = mail_domain
        self._known: dict[str, int | None] = {a.casefold(): u for a, u in known.items()}

    async def user_of(self, address: str) -> int | None:
        folded = address.strip().strip("<>").strip().casefold()
        if folded in self._known:
            return self._known[folded]
        user = await resolve_user(folded, self._store, self._mail_domain) if folded else None
        if len(self._known) < 1_000_000:
            self._known[folded] = user
        return user


class MailSource:
    """What reading mail needs: the blob store, the address book and the proxy's settings."""

    def __init__(self, blobs: BlobStore, book: AddressBook, settings: MtaSettings) -> None:
        self.blobs = blobs
        self.book = book
        self.settings = settings


async def mail_record(
    raw: bytes,
    *,
    user: int,
    folder: str,
    read: bool,
    where: str,
    fallback_ts: int,
    source: MailSource,
) -> ImportRecord | Rejected:
    """The record of one mail of `user`'s mailbox, filed in `folder` and read or not."""
    if not raw.strip():
        return Rejected(where, "empty message")
    if len(raw) > source.settings.max_mail_bytes:
        return Rejected(
            where, f"{len(raw)} bytes, over the limit of {source.settings.max_mail_bytes}"
        )
    mail = await store_mail(raw, None, source.blobs, source.settings)
    extra: dict[str, Any] = mail.extra
    sender = await source.book.user_of(mail.sender) if "@" in mail.sender else None
    participants = {user}
    outside: dict[str, str] = {}
    if sender is not None:
        participants.add(sender)
    else:
        outside[mail.sender.casefold()] = mail.sender
    for address in [*extra.get("to", ()), *extra.get("cc", ())]:
        if len(participants) >= _MAX_PARTICIPANTS:
            break
        named = await source.book.user_of(address)
        if named is not None:
            participants.add(named)
        else:
            outside.setdefault(address.casefold(), address)
    ts = timestamp_us(extra.get("date")) or fallback_ts
    own = sender == user
    replying = [extra["in_reply_to"]] if extra.get("in_reply_to") else []
    return ImportRecord(
        user=user,
        key=mail.key,
        where=where,
        channel="email",
        sender=sender or 0,
        sender_address=mail.sender,
        participants=tuple(sorted(participants)),
        addresses=tuple(sorted(outside.values(), key=str.casefold)),
        folder="sent" if own and folder == "inbox" else folder,
        unread=not read and not own,
        ts=ts,
        subject=mail.subject,
        text=mail.text,
        extra=extra,
        reply_to=(*replying, *reversed(extra.get("references", ()))),
        size=len(raw),
    )
