"""The proxy's decisions for one SMTP transaction, without SMTP: who may receive, and what
becomes of a message. Every answer is an SMTP reply line.

`recipient(address)` resolves an address through the address book (RCPT:
250, 550 for an unknown address, 451 when the book cannot answer).
`accept(raw, mail_from, recipients)` keeps the raw message (unless it is
small enough to go with each copy: `mail_inline_raw_bytes`) and the message's
attachments (and a body over the inline limit) in the blob store, parses it,
builds the lightweight email object and delivers it to every recipient's owner
at once; it answers 250 only once every copy is durable,
451 when a blob or an owner could not be reached (a retry is a no-op for the
copies already made: the Message-ID is DELIVER's key), and 554 for what the
app server refuses for good. Malformed mail is delivered all the same, with
what could be read of it, marked `malformed`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyserver.blobs.base import BlobInfo, BlobStore
from pyserver.errors import BadRequest, PyserverError
from pyserver.mta.addresscache import AddressCache
from pyserver.mta.dsn import failed_recipients
from pyserver.mta.emailobject import EmailObject, StoredAttachment, build_email, sender_of
from pyserver.mta.outbound import (
    bounced_mail,
    resolve_user,
    thread_of_message_id,
    user_of_address,
)
from pyserver.mta.parse import ParsedMail, parse_mail
from pyserver.mta.route import OwnerRoute
from pyserver.mta.senders import DnsLookup, check_dkim
from pyserver.store.base import AddressStore
from pyserver.wire.ops import Op

__all__ = ["MailIntake", "MtaSettings", "store_mail", "store_mail_unsynced"]

log = logging.getLogger(__name__)

# DELIVER takes a raw message of at most this many bytes inline (docs/protocol.md).
MAX_INLINE_RAW_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class MtaSettings:
    """The proxy's knobs; `from_config` takes them from a `pyserver.config.Config`."""

    # the largest message accepted (SMTP SIZE; larger: 552)
    max_mail_bytes: int = 80 << 20
    # a body longer than this (UTF-8 bytes) is delivered cut, whole in the blob store
    mail_inline_text_bytes: int = 64 << 10
    # a mail of at most this many bytes is delivered with its raw bytes, which each owner
    # commits with its copy, instead of through the blob store (0: every raw is a blob)
    mail_inline_raw_bytes: int = 8 << 10
    max_recipients: int = 100
    # one delivery to an owner, connecting included; then 451
    mta_deliver_timeout_s: float = 10.0
    # messages at least this big are parsed on a worker thread, off the event loop
    parse_in_thread_bytes: int = 256 << 10
    # DKIM key lookups (name -> TXT record); None: the system's resolver (dnspython)
    dkim_dns: DnsLookup | None = None
    # this cell's own mail domain: u<user>@<mail_domain> is that user (mail out comes from it)
    mail_domain: str = "pyserver.localhost"

    def __post_init__(self) -> None:
        for name in ("max_mail_bytes", "mail_inline_text_bytes", "max_recipients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.mta_deliver_timeout_s <= 0:
            raise ValueError("mta_deliver_timeout_s must be positive")
        if not 0 <= self.mail_inline_raw_bytes <= MAX_INLINE_RAW_BYTES:
            raise ValueError(f"mail_inline_raw_bytes must be in 0..{MAX_INLINE_RAW_BYTES}")

    @classmethod
    def from_config(cls, config: Any) -> MtaSettings:
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})


class MailIntake:
    """Recipients and messages of the SMTP proxy (see the module docstring)."""

    def __init__(
        self,
        addresses: AddressStore,
        blobs: BlobStore,
        route: OwnerRoute,
        settings: MtaSettings | None = None,
    ) -> None:
        self._addresses = AddressCache(addresses)
        self._blobs = blobs
        self._route = route
        self.settings = settings or MtaSettings()
        self.counters: Counter[str] = Counter()

    # ---- RCPT ----

    def recipient_now(self, address: str) -> tuple[str, int | None] | None:
        """`recipient(address)` when it needs no lookup (a bounce address, a user's own
        address, one the address cache remembers), else None."""
        address = address.strip().strip("<>").strip()
        bounced = bounced_mail(address, self.settings.mail_domain)
        if bounced is not None:  # a bounce of a mail a user sent: read in accept()
            return "250 2.1.5 OK", bounced[0]
        own = user_of_address(address, self.settings.mail_domain)
        if own is None:
            known, own = self._addresses.remembered(address)
            if not known:
                return None
        return "250 2.1.5 OK", own

    async def recipient(self, address: str) -> tuple[str, int | None]:
        """(SMTP reply, user id or None) for one RCPT address."""
        answer = self.recipient_now(address)
        if answer is not None:
            return answer
        address = address.strip().strip("<>").strip()
        try:
            user = await resolve_user(address, self._addresses, self.settings.mail_domain)
        except PyserverError as exc:
            log.warning("address lookup failed address=%r error=%r", address, exc)
            return "451 4.3.0 Address lookup failed, try again later", None
        if user is None:
            self.counters["unknown_recipients"] += 1
            return f"550 5.1.1 <{address}>: no such user here", None
        return "250 2.1.5 OK", user

    # ---- DATA ----

    async def accept(self, raw: bytes, mail_from: str | None, recipients: Mapping[str, int]) -> str:
        """Store, parse and deliver one message to the resolved recipients; the SMTP reply."""
        bounces = {
            address: found
            for address in recipients
            if (found := bounced_mail(address, self.settings.mail_domain)) is not None
        }
        if bounces:
            reply = await self._settle_bounces(raw, bounces.values())
            recipients = {a: user for a, user in recipients.items() if a not in bounces}
            if not recipients or not reply.startswith("250"):
                return reply
        users = sorted(set(recipients.values()))
        if not users:
            return "554 5.5.1 No valid recipients"
        # A small mail is parsed here, so its From address's user is looked up while its
        # blobs are written (a big one is parsed on a worker thread, then looked up).
        parsed = parse_mail(raw) if len(raw) < self.settings.parse_in_thread_bytes else None
        sender: asyncio.Future[int | None] | None = None
        if parsed is not None:
            sender = self._sender_soon(sender_of(parsed, mail_from))
        try:
            email, durable = await store_mail_unsynced(
                raw, mail_from, self._blobs, self.settings, parsed=parsed,
                inline_raw_bytes=self.settings.mail_inline_raw_bytes,
            )  # fmt: skip
        except PyserverError as exc:
            if sender is not None:
                sender.cancel()
            return self._not_stored(raw, exc)
        except BaseException:
            if sender is not None:
                sender.cancel()
            raise
        try:
            user = await sender if sender is not None else await self._sender_user(email.sender)
            email = await self._attribute(raw, email, user)
            email = self._answering(email)
            participants = await self._participants(email, recipients)
            # The owners store their copies while the blobs pass their barrier: a crash
            # before both are durable answers nothing, and the sender's retry rewrites a
            # torn blob while DELIVER (keyed by Message-ID) finds its copy made.
            outcomes = await asyncio.gather(
                *(self._route.deliver(email.deliver_payload(u, participants)) for u in users),
                return_exceptions=True,
            )
            await durable
        except PyserverError as exc:
            return self._not_stored(raw, exc)
        finally:
            if not durable.done():
                durable.add_done_callback(_drop_outcome)
        failures = [
            (user, outcome)
            for user, outcome in zip(users, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]
        if not failures:
            self.counters["accepted"] += 1
            if email.extra.get("malformed"):
                self.counters["malformed"] += 1
            return f"250 2.0.0 OK delivered to {len(users)} recipient(s)"
        for user, failure in failures:
            log.warning("delivery failed user=%d key=%r error=%r", user, email.key, failure)
        permanent = [f for _, f in failures if isinstance(f, BadRequest)]
        if len(permanent) == len(failures):
            self.counters["refused"] += 1
            return f"554 5.6.0 Message refused: {_one_line(str(permanent[0]))[:200]}"
        unexpected = [f for _, f in failures if not isinstance(f, PyserverError | OSError)]
        if unexpected:
            log.error("unexpected delivery error", exc_info=unexpected[0])
        self.counters["deferred"] += 1
        return "451 4.4.1 A recipient's mailbox server could not be reached, try again later"

    def _not_stored(self, raw: bytes, exc: PyserverError) -> str:
        self.counters["deferred"] += 1
        log.warning("could not store a message of %d bytes: %r", len(raw), exc)
        return "451 4.3.0 Could not store the message, try again later"

    async def _settle_bounces(self, raw: bytes, mails: Iterable[tuple[int, str]]) -> str:
        """Record each failure a bounce reports on the mail it is about (OUTBOUND_SETTLE at
        the sender's owner); the SMTP reply."""
        failures = failed_recipients(raw)
        if not failures:
            self.counters["bounces_without_failures"] += 1
            return "250 2.0.0 OK (nothing failed)"
        try:
            for user, message_id in mails:
                for failure in failures:
                    payload = {"user": user, "message_id": message_id,
                               "address": failure.address, "outcome": "failed",
                               "detail": failure.detail}  # fmt: skip
                    await self._route.request(Op.OUTBOUND_SETTLE, payload)
        except BadRequest as exc:  # an address the mail was never sent to, a bad report
            self.counters["bounces_refused"] += 1
            return f"554 5.6.0 Bounce refused: {_one_line(str(exc))[:200]}"
        except PyserverError as exc:
            log.warning("could not record a bounce: %r", exc)
            return "451 4.4.1 Could not record the bounce, try again later"
        self.counters["bounces"] += 1
        return f"250 2.0.0 OK bounce of {len(failures)} recipient(s) recorded"

    def _answering(self, email: EmailObject) -> EmailObject:
        """The mail with the conversation it answers, when its In-Reply-To or References
        name a mail this cell sent (pyserver.mta.outbound)."""
        named = [email.extra.get("in_reply_to"), *reversed(email.extra.get("references", []))]
        for header in named:
            thread = thread_of_message_id(header, self.settings.mail_domain) if header else None
            if thread is not None:
                return dataclasses.replace(email, thread_hint=thread)
        return email

    def _sender_soon(self, address: str) -> asyncio.Future[int | None]:
        """`_sender_user(address)` as a future (done at once when the cache remembers)."""
        if "@" in address:
            known, user = self._addresses.remembered(address, absent_too=True)
            if not known:
                return asyncio.ensure_future(self._sender_user(address))
        else:
            user = None
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        future.set_result(user)
        return future

    async def _sender_user(self, address: str) -> int | None:
        """The registered user of a From address, if any (None also when the address book
        cannot answer: the mail is then delivered as from outside, nothing is lost)."""
        if "@" not in address:  # a bounce (MAILER-DAEMON) speaks for nobody
            return None
        try:
            return await self._addresses.sender_user(address)
        except PyserverError as exc:
            log.warning("sender lookup failed address=%r error=%r", address, exc)
            return None

    async def _attribute(self, raw: bytes, email: EmailObject, user: int | None) -> EmailObject:
        """The mail as its From address's user's message when that address is registered
        (`user`) and the mail proves it (`pyserver.mta.senders`); else as it is, marked
        unverified when it claims a registered address."""
        if user is None:
            return email
        proof = await check_dkim(raw, email.sender, self.settings.dkim_dns)
        if proof.verified:
            self.counters["senders_proved"] += 1
            return email.spoken_for(user, proof.detail)
        self.counters["senders_unverified"] += 1
        log.info("unverified sender address=%r: %s", email.sender, proof.detail)
        return email.unverified(proof.detail)

    async def _participants(self, email: EmailObject, recipients: Mapping[str, int]) -> set[int]:
        """Users of the conversation: the envelope's recipients are each one's own; every
        copy lists the users the To and Cc headers name (so all copies share one thread)."""
        known = {address.casefold(): user for address, user in recipients.items()}
        found: set[int] = set()
        named = [*email.extra.get("to", ()), *email.extra.get("cc", ())]
        most = self.settings.max_recipients - 1  # DELIVER's limit, the recipient included
        for address in named[: self.settings.max_recipients]:
            if len(found) >= most:
                break
            user = known.get(address.casefold(), -1)
            if user == -1:
                try:
                    user = await self._addresses.resolve_address(address)
                except PyserverError:
                    user = None  # the thread may differ; the delivery does not
                known[address.casefold()] = user
            if user is not None:
                found.add(user)
        return found

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


async def store_mail(
    raw: bytes,
    mail_from: str | None,
    blobs: BlobStore,
    settings: MtaSettings,
    *,
    parsed: ParsedMail | None = None,
) -> EmailObject:
    """Raw message, attachments and a long body into the blob store; the email object (what
    the proxy does with every message it accepts, and `pyserver import` with every mail).

    The raw message is written while the message is parsed (unless the caller parsed it
    already: `parsed`, `parse_mail(raw)`'s result). Every blob is durable on return.
    """
    email, durable = await store_mail_unsynced(raw, mail_from, blobs, settings, parsed=parsed)
    await durable
    return email


async def store_mail_unsynced(
    raw: bytes,
    mail_from: str | None,
    blobs: BlobStore,
    settings: MtaSettings,
    *,
    parsed: ParsedMail | None = None,
    inline_raw_bytes: int = 0,
) -> tuple[EmailObject, asyncio.Future[Any]]:
    """`store_mail`, with the blobs' durability left to a future (`BlobStore.put_unsynced`):
    the email object at once, and a future done once all its blobs are durable, so the
    caller may deliver meanwhile (and must wait for it before answering 250).

    A raw message of at most `inline_raw_bytes` is not put in the blob store: the email
    object carries it (`raw_inline`), for DELIVER to hand each owner, which commits it
    with the copy's log entry, so a small mail's durable path is that commit alone.
    """
    durables: list[asyncio.Future[None]] = []

    async def put(source: Any) -> BlobInfo:
        info, durable = await blobs.put_unsynced(source)
        durables.append(durable)
        return info

    # (0 turns it off: even an empty message is then a blob)
    raw_inline = raw if inline_raw_bytes > 0 and len(raw) <= inline_raw_bytes else None
    raw_info = None if raw_inline is None else BlobInfo(hashlib.sha256(raw).hexdigest(), len(raw))
    # A parsed (small) mail's raw bytes are written at once; a big one's while it is
    # parsed on a worker thread.
    raw_put = asyncio.ensure_future(put(raw)) if parsed is None and raw_info is None else None
    try:
        if parsed is not None:
            mail = parsed
            if raw_info is None:
                raw_info = await put(raw)
            stored = []
            if mail.attachments:
                stored = await asyncio.gather(*(put(a.pieces()) for a in mail.attachments))
        elif len(raw) >= settings.parse_in_thread_bytes:
            # A big mail is parsed and its attachments decoded on a worker thread.
            mail, decoded = await asyncio.to_thread(_parse_and_decode, raw)
            stored = await asyncio.gather(*(put(data) for data in decoded))
        else:
            mail = parse_mail(raw)
            stored = await asyncio.gather(*(put(a.pieces()) for a in mail.attachments))
        text, body = await _inline_text(mail, put, settings.mail_inline_text_bytes)
        if raw_put is not None:
            raw_info = await raw_put
    except BaseException:
        if raw_put is None:
            pass
        elif not raw_put.done():
            raw_put.cancel()
        elif not raw_put.cancelled():
            raw_put.exception()  # retrieved: a failure here is reported by the raise
        for durable in durables:  # nobody will wait for these: their outcome is dropped
            durable.add_done_callback(_drop_outcome)
        raise
    assert raw_info is not None
    attachments = [StoredAttachment(a, b) for a, b in zip(mail.attachments, stored, strict=True)]
    email = build_email(
        mail, raw=raw_info, mail_from=mail_from, text=text, body=body, attachments=attachments,
        raw_inline=raw_inline,
    )  # fmt: skip
    return email, durables[0] if len(durables) == 1 else asyncio.gather(*durables)


def _drop_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _inline_text(
    mail: ParsedMail, put: Callable[[bytes], Awaitable[BlobInfo]], limit: int
) -> tuple[str, BlobInfo | None]:
    """The body as delivered inline, and the blob holding all of it when it is cut."""
    if len(mail.text) * 4 <= limit:
        return mail.text, None
    encoded = mail.text_utf8 if mail.text_utf8 is not None else mail.text.encode("utf-8")
    if len(encoded) <= limit:
        return mail.text, None
    body = await put(encoded)
    return encoded[:limit].decode("utf-8", "ignore"), body


def _parse_and_decode(raw: bytes) -> tuple[ParsedMail, list[bytes]]:
    mail = parse_mail(raw)
    return mail, [b"".join(attachment.pieces()) for attachment in mail.attachments]


def _one_line(text: str) -> str:
    return " ".join(text.split())
