"""The mailbox: the business logic of every per-user operation of docs/protocol.md.

Owns the rules between a request and the user's log: payload validation,
threads keyed by participant set across channels, idempotent SEND and DELIVER,
blocking, inbox/other routing through the user index, and subscription events.
Each write is decided against the user's current image and handed to the
residency (`pyserver.app.residency`), which serialises the user's writes,
commits them to the log, retries a lost compare-and-set and keeps the images,
their snapshots and the search index true to the log. Calls the residency,
the store's search, the blob store and the user index; nothing above it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from pyserver.app import history, inlineraw
from pyserver.app.image import CHANNELS, FOLDERS, Message, Thread, UserImage, thread_id_for
from pyserver.app.indexer import search_terms
from pyserver.app.residency import Change, Residency
from pyserver.blobs import access as blob_access
from pyserver.blobs.base import BlobStore, check_ref
from pyserver.errors import BadRequest, NotFound, TooLarge
from pyserver.store.base import Store
from pyserver.userid import MAX_USER_ID, check_user_id
from pyserver.userindex import RELATIONS, UserIndex
from pyserver.userindex.local import LocalUserIndex
from pyserver.wire.ops import Op

__all__ = ["Delivery", "Mailbox", "MailboxSettings", "search_terms"]

log = logging.getLogger(__name__)

# Page sizes and limits of the reads (docs/protocol.md).
_THREADS_PAGE = (20, 200)
_MESSAGES_PAGE = (50, 200)
_SEARCH_PAGE = (20, 200)
_FOLDER_PAGE = (1000, 5000)
# IMAP's UIDVALIDITY of every folder: UIDs come from the log by one rule (pyserver.app.image)
# and are the same on every replay; this changes only if that rule ever does
UID_VALIDITY = 1
_MAX_QUERY_WORDS = 16
_SNIPPET_CHARS = 100
# Log actions that never change a folder's counts (no counts_changed report).
_COUNTS_UNCHANGED = frozenset({"sender_blocked", "sender_unblocked"})
# Reads whose replies the reply table keeps (their first pages only).
_REMEMBERED_READS = frozenset({Op.COUNTS, Op.LIST_THREADS, Op.GET_THREAD})
_MISSING: Any = object()

Event = dict[str, Any]
EventCallback = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class MailboxSettings:
    """The mailbox's knobs; `from_config` takes them from the process's `Config`."""

    cache_max_users: int = 100_000
    cache_max_bytes: int = 512 << 20
    # write a snapshot once an image is this many log entries ahead of its last one
    snapshot_every: int = 200
    max_text_bytes: int = 256 << 10
    # folder of a new thread when the user index cannot answer in time
    default_folder: str = "inbox"
    max_recipients: int = 100
    # subject, from, key
    max_field_bytes: int = 4 << 10
    max_extra_bytes: int = 64 << 10
    # DELIVER's `raw`: a small mail's bytes, kept in its copy's body (pyserver.app.inlineraw)
    max_inline_raw_bytes: int = 64 << 10
    conflict_retries: int = 3
    user_index_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.default_folder not in FOLDERS:
            raise ValueError(f"default_folder must be one of {', '.join(FOLDERS)}")
        for name in ("cache_max_users", "cache_max_bytes", "snapshot_every", "max_text_bytes",
                     "max_recipients", "max_field_bytes", "max_extra_bytes",
                     "max_inline_raw_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.conflict_retries < 0 or self.user_index_timeout_s <= 0:
            raise ValueError("conflict_retries must be >= 0 and user_index_timeout_s > 0")

    @classmethod
    def from_config(cls, config: Any) -> MailboxSettings:
        """The settings named alike on a `pyserver.config.Config` (others keep their default)."""
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way into mailboxes: what every participant's copy is made of."""

    message_id: str
    thread_id: str
    sender: int
    sender_address: str | None
    participants: tuple[int, ...]
    channel: str
    subject: str
    text: str
    key: str
    extra: dict[str, Any]
    # the outside addresses the conversation includes (a SEND to email addresses)
    addresses: tuple[str, ...] = ()
    # a small mail's bytes as received, kept in the body (DELIVER's `raw`)
    raw: bytes | None = None

    def entry(self, folder: str, unread: bool) -> dict[str, Any]:
        """The message_added fields of a copy (the log entry without seq and ts)."""
        return {
            "action": "message_added",
            "message_id": self.message_id,
            "thread_id": self.thread_id,
            "sender": self.sender,
            "participants": list(self.participants),
            "channel": self.channel,
            "folder": folder,
            "unread": unread,
            "subject": self.subject,
            "snippet": snippet_of(self.text),
            "body_ref": self.message_id,
            "key": self.key,
        }

    def body(
        self,
        outbound: bool = False,
        mail_to: list[str] | None = None,
        notify: list[str] | None = None,
    ) -> dict[str, Any]:
        """What the `m` family keeps of the message, under its id; the sender's copy of a
        mail to outside addresses (`outbound`) also lists them, and `mail_to` (users who
        take part by email), as to be sent, which makes it the durable outbound queue (the
        image tracks each address's delivery)."""
        extra = self.extra
        if self.addresses:
            extra = {**extra, "to_addresses": list(self.addresses)}
        send_to = [*self.addresses, *(mail_to or [])] if outbound else []
        send_to += notify or []
        if send_to:
            extra = {**extra, "outbound": send_to}
        body = {"text": self.text, "from": self.sender_address, "extra": extra}
        if self.raw is not None:
            body[inlineraw.BODY_FIELD] = inlineraw.body_field(self.raw)
        return body

    def copy_request(self, recipient: int) -> dict[str, Any]:
        """The DELIVER_COPY payload of one recipient's copy (docs/protocol.md)."""
        payload: dict[str, Any] = {
            "user": recipient,
            "message_id": self.message_id,
            "thread_id": self.thread_id,
            "sender": self.sender,
            "participants": list(self.participants),
            "channel": self.channel,
            "subject": self.subject,
            "text": self.text,
            "key": self.key,
        }
        if self.sender_address is not None:
            payload["from"] = self.sender_address
        if self.extra:
            payload["extra"] = self.extra
        if self.addresses:
            payload["addresses"] = list(self.addresses)
        return payload


def snippet_of(text: str) -> str:
    """The start of a message's text with its whitespace collapsed, for thread lists."""
    return " ".join(text[: _SNIPPET_CHARS * 4].split())[:_SNIPPET_CHARS]


def message_id_for(sender: int, key: str) -> str:
    """A message's id: derived from the sender's idempotency key when there is one, so every
    retry and every copy agrees; random otherwise."""
    if not key:
        return "m" + secrets.token_hex(12)
    digest = hashlib.blake2b(f"{sender}\n{key}".encode(), digest_size=12).hexdigest()
    return "m" + digest


def _now_us() -> int:
    return time.time_ns() // 1_000


class Mailbox:
    """Every per-user operation of docs/protocol.md, behind `execute(op, payload)`.

    `owns(user_id)` says whether this server may serve a user now; when it
    may not, `owner_of(user_id)` names the owner ("host:port", for NOT_OWNER)
    or None (UNAVAILABLE). Both default to a single node that owns everyone.
    `serving()` says whether the server may serve anyone now (a cluster node that is
    fenced or not yet synced may not); the table of ready-made replies is used only then.
    """

    def __init__(
        self,
        store: Store,
        user_index: UserIndex | None = None,
        settings: MailboxSettings | None = None,
        *,
        owns: Callable[[int], bool] | None = None,
        owner_of: Callable[[int], str | None] | None = None,
        relay: Callable[[int, Delivery], Awaitable[dict[str, Any]]] | None = None,
        clock: Callable[[], int] = _now_us,
        counts_changed: Callable[[int], None] | None = None,
        blobs: BlobStore | None = None,
        in_other_cell: Callable[[int], Awaitable[bool]] | None = None,
        serving: Callable[[], bool] | None = None,
        outbound_queued: Callable[[int, str], None] | None = None,
        check_load: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        # told (after the commit) of each SEND to outside addresses: (sender, message id),
        # for the outbox (pyserver.app.outbox); it must not block
        self._outbound_queued = outbound_queued
        self._serving = serving
        # told (after the commit) of each write that may change a user's counts: the
        # dirty reporter (pyserver.dirty.reporter); it must not block
        self._counts_changed = counts_changed
        self._index = user_index if user_index is not None else LocalUserIndex(store)
        self._settings = settings or MailboxSettings()
        self._owns = owns
        self._owner_of = owner_of
        # hands a SEND's copy to the owner of a recipient this server does not serve
        # (pyserver.cluster: DELIVER_COPY on that server); None: every recipient is local
        self._relay = relay
        # attachments, long bodies and raw mail, for GET_BLOB (None: no blob is readable)
        self._blobs = blobs
        # says whether a recipient lives in another cell, whose owner gets the copy through
        # `relay` (pyserver.discovery); None: every user is in this cell
        self._in_other_cell = in_other_cell
        self._resident = Residency(
            store,
            cache_max_users=self._settings.cache_max_users,
            cache_max_bytes=self._settings.cache_max_bytes,
            snapshot_every=self._settings.snapshot_every,
            conflict_retries=self._settings.conflict_retries,
            clock=clock,
            on_commit=self._committed,
            owns=owns,
            owner_of=owner_of,
            answer_again=self._answer_again,
            check_load=check_load,
        )
        self._subscribers: dict[int, dict[int, EventCallback]] = {}
        self._subscription_users: dict[int, int] = {}
        self._tokens = itertools.count(1)
        self._counters = dict.fromkeys(("index_failures",), 0)
        self._handlers: dict[Op, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            Op.SEND: self._send,
            Op.DELIVER: self._deliver,
            Op.DELIVER_COPY: self._deliver_copy_request,
            Op.OUTBOUND_SETTLE: self._outbound_settle,
            Op.LIST_THREADS: self._list_threads,
            Op.GET_THREAD: self._get_thread,
            Op.GET_MESSAGE: self._get_message,
            Op.FOLDER_MESSAGES: self._folder_messages,
            Op.GET_BLOB: self._get_blob,
            Op.COUNTS: self._counts,
            Op.SEARCH: self._search,
            Op.MARK_READ: self._mark_read,
            Op.MARK_UNREAD: self._mark_unread,
            Op.MOVE: self._move,
            Op.DELETE: self._delete,
            Op.MARK_SEEN: self._mark_seen,
            Op.SET_SMS: self._set_sms,
            Op.BLOCK: self._block,
            Op.UNBLOCK: self._unblock,
            Op.FRIEND_ADD: self._friend_add,
            Op.FRIEND_REMOVE: self._friend_remove,
            Op.FRIENDS: self._friends,
            Op.HISTORY: self._history,
            Op.SHOW_AT: self._show_at,
            Op.RESTORE: self._restore,
            Op.REFRESH: self._refresh,
        }
        # The reads `answer_cached` can answer at once from a cached image.
        self._cached_reads: dict[Op, Callable[[UserImage, dict[str, Any]], dict[str, Any]]] = {
            Op.LIST_THREADS: self._list_threads_of,
            Op.GET_THREAD: self._get_thread_of,
            Op.GET_MESSAGE: self._get_message_of,
            Op.COUNTS: self._counts_of,
        }

    @property
    def cached_read_ops(self) -> frozenset[Op]:
        """The operations `answer_cached` can answer."""
        return frozenset(self._cached_reads)

    def reply_table(self) -> Any:
        """The table of ready-made replies (pyserver.wire.replies), or None when this
        server may not serve now and every read must go through the ownership checks."""
        if self._serving is not None and not self._serving():
            return None
        return self._resident.replies

    def remember_reply(self, op: Op, payload: dict[str, Any], raw: bytes, reply: bytes) -> None:
        """Keep the reply to a read `answer_cached` just answered, for the reply table.

        Only COUNTS and first pages (no `before` cursor) are kept: the reads a client
        repeats. `raw` is the request's payload bytes, the table's key.
        """
        if op not in _REMEMBERED_READS or "before" in payload:
            return
        table = self.reply_table()
        if table is not None:
            table.put(payload["user"], op.value, raw, reply)

    def _answer_again(self, op: int, raw: bytes, image: UserImage) -> bytes | None:
        """A held reply answered from the user's new image (write-through); None if that
        read now fails (a thread deleted: NOT_FOUND), so its reply is dropped."""
        try:
            return orjson.dumps(self._cached_reads[Op(op)](image, orjson.loads(raw)))
        except Exception:
            return None

    def reply_hits(self) -> dict[int, int]:
        """Requests the reply table answered, by op code."""
        return self._resident.replies.hits()

    def forget_replies(self, user_ids: Iterable[int]) -> None:
        """Drop these users' ready-made replies (they are frozen: reads must be refused)."""
        self._resident.forget_replies(user_ids)

    @property
    def settings(self) -> MailboxSettings:
        return self._settings

    # ---- the entry point ----

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one operation and return its reply; raises the typed errors of pyserver.errors."""
        handler = self._handlers.get(op)
        if handler is None:
            raise BadRequest(f"op: {op!r} is not a mailbox operation")
        if not isinstance(payload, dict):
            raise BadRequest(f"payload: must be a JSON object, not {type(payload).__name__}")
        return await handler(payload)

    # ---- sending and delivering ----

    async def _send(self, p: dict[str, Any]) -> dict[str, Any]:
        sender = _user(p, "sender")
        recipients, addresses = _recipients(p, sender, self._settings.max_recipients)
        text = _text(p, "text", self._settings.max_text_bytes)
        channel = _choice(p, "channel", CHANNELS)
        subject = _text(p, "subject", self._settings.max_field_bytes, default="")
        key = _text(p, "key", self._settings.max_field_bytes, default="")
        attachments = _attachments(p, "attachments", self._settings.max_extra_bytes)
        # a mail a client sent already, filed by the IMAP gateway (APPEND to Sent): its
        # email object kept with the sender's copy only, and nothing relayed out again
        own_extra = _extra(p, "extra", self._settings.max_extra_bytes)
        relay = _flag(p, "relay", True)
        self._resident.check_owner(sender)
        if self._relay is None:
            # No other server to hand copies to: refuse before writing anything.
            for recipient in recipients:
                self._resident.check_owner(recipient)
        participants = tuple(sorted({sender, *recipients}))
        delivery = Delivery(
            message_id=message_id_for(sender, key),
            thread_id=thread_id_for(participants, addresses),
            sender=sender,
            sender_address=None,
            participants=participants,
            channel="email" if addresses else channel,
            subject=subject,
            text=text,
            key=key,
            extra={"attachments": attachments} if attachments else {},
            addresses=addresses,
        )

        def copies() -> list[Coroutine[Any, Any, dict[str, Any]]]:
            return [self._deliver_copy(r, delivery) for r in recipients]

        # A retry of a SEND whose sender's copy is there: the copies are written
        # concurrently, so a failure may have come between them; make sure every
        # recipient has theirs (each copy is idempotent), then answer the first result.
        if key:
            first = (await self._resident.read(sender)).key_result(sender, key)
            if first is not None:
                _raise_first(await asyncio.gather(*copies(), return_exceptions=True))
                return _send_reply(first, duplicate=True)

        mirrored: list[str] = []

        async def decide(image: UserImage) -> Change:
            first = image.key_result(sender, key) if key else None
            if first is not None:
                return Change(result=_send_reply(first, duplicate=True))
            # recipients who take part in this conversation by email get a mail too
            if relay:
                mirrored[:] = _mail_readers(image, delivery.thread_id, recipients)
            thread = image.threads.get(delivery.thread_id)
            if thread is None:
                folder = "sent"
            else:
                folder = "inbox" if thread.folder == "archived" else thread.folder
            own = (
                dataclasses.replace(delivery, extra={**delivery.extra, **own_extra})
                if own_extra
                else delivery
            )
            return _adding(own, folder, unread=False, outbound=relay, mail_to=mirrored)

        # Every copy at once: one round of group commits instead of two. All of them
        # settle before the reply, so nothing is still being written after an error.
        outcomes = await _settle_together(self._resident.update(sender, decide), copies())
        _raise_first(outcomes)
        change, _ = outcomes[0]
        if change.result:
            return change.result
        if relay and (addresses or mirrored) and self._outbound_queued is not None:
            self._outbound_queued(sender, delivery.message_id)
        return {
            "message_id": delivery.message_id,
            "thread_id": delivery.thread_id,
            "ts": change.entries[0]["ts"],
            "duplicate": False,
        }

    async def _deliver(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        sender = _user(p, "sender", minimum=0)
        address = _text(p, "from", self._settings.max_field_bytes, default=None)
        if sender == 0 and not address:
            raise BadRequest("from: required when sender is 0 (a sender from outside)")
        listed = _user_list(p, "participants", self._settings.max_recipients, default=[])
        participants = tuple(sorted({user, *listed, *([sender] if sender else [])}))
        text = _text(p, "text", self._settings.max_text_bytes)
        channel = _choice(p, "channel", CHANNELS)
        subject = _text(p, "subject", self._settings.max_field_bytes, default="")
        key = _text(p, "key", self._settings.max_field_bytes, default="")
        extra = _extra(p, "extra", self._settings.max_extra_bytes)
        raw = inlineraw.from_deliver(p, extra, self._settings.max_inline_raw_bytes)
        hint = _text(p, "thread", self._settings.max_field_bytes, default=None)
        # a new thread's folder when the mail is filed by its own user (IMAP APPEND)
        folder = _choice(p, "folder", FOLDERS) if p.get("folder") is not None else None
        delivery = Delivery(
            message_id=message_id_for(sender, key),
            thread_id=thread_id_for(participants, None if sender else address),
            sender=sender,
            sender_address=address,
            participants=participants,
            channel=channel,
            subject=subject,
            text=text,
            key=key,
            extra=extra,
            raw=raw,
        )
        return await self._write_copy(user, delivery, hint, folder)

    async def _deliver_copy_request(self, p: dict[str, Any]) -> dict[str, Any]:
        """DELIVER_COPY: one recipient's copy of a SEND, from the sender's owner."""
        user = _user(p, "user")
        sender = _user(p, "sender")
        message_id = _text(p, "message_id", self._settings.max_field_bytes)
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes)
        listed = _user_list(p, "participants", self._settings.max_recipients + 1)
        participants = tuple(sorted(set(listed)))
        if user not in participants or sender not in participants:
            raise BadRequest("participants: must include user and sender")
        if not message_id:
            raise BadRequest("message_id: must not be empty")
        addresses = _addresses(p, "addresses", self._settings.max_recipients, default=[])
        if thread_id != thread_id_for(participants, addresses):
            raise BadRequest("thread_id: is not the participants' thread")
        delivery = Delivery(
            message_id=message_id,
            thread_id=thread_id,
            sender=sender,
            sender_address=_text(p, "from", self._settings.max_field_bytes, default=None),
            participants=participants,
            channel=_choice(p, "channel", CHANNELS),
            subject=_text(p, "subject", self._settings.max_field_bytes, default=""),
            text=_text(p, "text", self._settings.max_text_bytes),
            key=_text(p, "key", self._settings.max_field_bytes, default=""),
            extra=_extra(p, "extra", self._settings.max_extra_bytes),
            addresses=tuple(addresses),
        )
        return await self._write_copy(user, delivery)

    async def _deliver_copy(self, recipient: int, delivery: Delivery) -> dict[str, Any]:
        """One recipient's copy of a SEND: written here when this server serves the
        recipient, else handed to the recipient's owner (DELIVER_COPY there)."""
        if self._relay is not None and self._owns is not None and not self._owns(recipient):
            return await self._relay(recipient, delivery)
        if (
            self._relay is not None
            and self._in_other_cell is not None
            and await self._in_other_cell(recipient)
        ):
            return await self._relay(recipient, delivery)
        return await self._write_copy(recipient, delivery)

    async def _write_copy(
        self,
        recipient: int,
        delivery: Delivery,
        thread_hint: str | None = None,
        filed_in: str | None = None,
    ) -> dict[str, Any]:
        """Write one recipient's copy to that recipient's own log; DELIVER's reply.

        A copy already there (the same key from the same sender, or the same
        message id: a retried relay) is not written again. `thread_hint`: the
        conversation a mail answers (from its In-Reply-To), used when the recipient
        has it; it only ever chooses among the recipient's own threads. `filed_in`: the
        folder of a new thread (else the user index chooses); an existing thread then
        keeps its folder, whatever it is.
        """

        async def decide(image: UserImage) -> Change:
            nonlocal delivery
            if thread_hint and thread_hint in image.threads:
                delivery = dataclasses.replace(delivery, thread_id=thread_hint)
            reply = {"message_id": None, "thread_id": delivery.thread_id, "folder": None,
                     "duplicate": False, "dropped": False}  # fmt: skip
            first = image.key_result(delivery.sender, delivery.key) if delivery.key else None
            if first is not None:
                reply.update(message_id=first[0], thread_id=first[1], folder=first[3])
                reply["duplicate"] = True
                return Change(result=reply)
            known = image.messages.get(delivery.message_id)
            if known is not None:
                thread = image.threads.get(known.thread_id)
                reply.update(message_id=known.message_id, thread_id=known.thread_id)
                reply.update(folder=thread.folder if thread else None, duplicate=True)
                return Change(result=reply)
            if delivery.sender in image.blocked:
                reply["dropped"] = True
                return Change(result=reply)
            thread = image.threads.get(delivery.thread_id)
            if thread is None:
                folder = filed_in or await self._route(recipient, delivery.sender)
            elif filed_in:
                folder = thread.folder
            elif thread.folder in ("archived", "sent"):
                folder = "inbox"
            else:
                folder = thread.folder
            reply.update(message_id=delivery.message_id, folder=folder)
            # the recipient's own text coming back would be texted to the same phone
            phone = image.sms_phone_for(folder)
            if phone and delivery.sender_address == phone:
                phone = None
            change = _adding(delivery, folder, unread=True, notify=[phone] if phone else [])
            change.result = reply
            texted[:] = [phone] if phone else []
            return change

        texted: list[str] = []
        change, _ = await self._resident.update(recipient, decide)
        if texted and self._outbound_queued is not None:
            self._outbound_queued(recipient, change.result["message_id"])
        return change.result

    async def _route(self, recipient: int, sender: int) -> str:
        """The folder of a new thread: friends and their friends to inbox, anyone else to other."""
        if sender == 0:
            return "other"
        try:
            relation = await asyncio.wait_for(
                self._index.relation(recipient, sender), self._settings.user_index_timeout_s
            )
            if relation not in RELATIONS:
                raise ValueError(f"unknown relation {relation!r}")
        except Exception as exc:
            # The message must not be lost because the index is slow or down.
            self._counters["index_failures"] += 1
            log.warning(
                "user index failed recipient=%d sender=%d error=%r; folder %s",
                recipient, sender, exc, self._settings.default_folder,
            )  # fmt: skip
            return self._settings.default_folder
        return "other" if relation == "stranger" else "inbox"

    # ---- the outbound queue: mail to outside addresses (pyserver.app.outbox) ----

    async def pending_outbound(self, user_id: int) -> list[tuple[str, list[str]]]:
        """(message id, addresses still queued) of the user's unsettled mail to outside
        addresses, oldest first."""
        return (await self._resident.read(user_id)).pending_outbound()

    async def outbound_message(self, user_id: int, message_id: str) -> dict[str, Any] | None:
        """What the outbox needs to send one of the user's mails: the message (with its
        extra) and its thread's subject and earlier mail headers (none when every address
        is a phone); None if it is gone."""
        image = await self._resident.read(user_id)
        message = image.messages.get(message_id)
        thread = image.threads.get(message.thread_id) if message is not None else None
        if message is None or thread is None:
            return None
        # the earlier mail headers matter to mail only (a walk over the whole conversation)
        mailed = any(not _is_phone(address) for address in message.extra.get("delivery", ()))
        references = [
            m.extra["message_id_header"]
            for m in thread.messages.values()
            if m.seq < message.seq and m.extra.get("message_id_header")
        ] if mailed else []  # fmt: skip
        return {
            **message.to_dict(with_extra=True),
            "thread_subject": thread.subject,
            "references": references,
        }

    async def _outbound_settle(self, p: dict[str, Any]) -> dict[str, Any]:
        """OUTBOUND_SETTLE: how one address's copy of a user's mail ended, as a bounce said."""
        user = _user(p, "user")
        message_id = _text(p, "message_id", self._settings.max_field_bytes)
        address = _field(p, "address", _MISSING)
        if not (isinstance(address, str) and _is_phone(address)):
            address = _email_address(address, "address")
        outcome = _choice(p, "outcome", ("sent", "delivered", "failed"))
        detail = _text(p, "detail", self._settings.max_field_bytes, default="")
        settled = await self.settle_outbound(user, message_id, address, outcome, detail)
        return {"settled": settled}

    async def settle_outbound(
        self, user_id: int, message_id: str, address: str, outcome: str, detail: str
    ) -> bool:
        """Record how one address's copy of the user's mail ended ("sent", "delivered" or
        "failed"): a queued copy settles any way, a sent one can still be delivered (an
        SMS receipt) or fail (a bounce); False if nothing changed (settled already, or the
        message is gone)."""
        if outcome not in ("sent", "delivered", "failed"):
            raise ValueError(f"outcome: {outcome!r} is not sent, delivered or failed")
        entry = {"action": "outbound_settled", "message_id": message_id, "address": address,
                 "outcome": outcome, "detail": detail[:1000]}  # fmt: skip

        async def decide(image: UserImage) -> Change:
            message = image.messages.get(message_id)
            state = message.extra.get("delivery", {}).get(address) if message else None
            # queued -> any; sent -> delivered or failed (a receipt, a bounce, after the
            # relay or the SMSC took it)
            if state is None or not (
                state["state"] == "queued" or (state["state"] == "sent" and outcome != "sent")
            ):
                return Change(result={"settled": False})
            return Change(entries=[dict(entry)], result={"settled": True})

        change, _ = await self._resident.update(user_id, decide)
        return bool(change.result["settled"])

    # ---- reads: served from the image, no store read when it is cached ----

    def answer_cached(self, op: Op, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The reply to a read of a cached user, computed now; None when it needs to wait.

        Reads of cached users touch no store and never wait, so the server answers them
        without a task. Anything else (a write, a user not cached) returns None and goes
        through `execute`. Raises the same typed errors as `execute`.
        """
        answer = self._cached_reads.get(op)
        if answer is None:
            return None
        user = _user(payload, "user")
        self._resident.check_owner(user)
        image = self._resident.cached(user)
        if image is None:
            return None  # `execute` loads it (and counts the miss)
        return answer(image, payload)

    async def _read(
        self, p: dict[str, Any], answer: Callable[[UserImage, dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        return answer(await self._resident.read(_user(p, "user")), p)

    async def _list_threads(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._read(p, self._list_threads_of)

    async def _get_thread(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._read(p, self._get_thread_of)

    async def _get_message(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._read(p, self._get_message_of)

    async def _folder_messages(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._read(p, self._folder_messages_of)

    async def _counts(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._read(p, self._counts_of)

    def _list_threads_of(self, image: UserImage, p: dict[str, Any]) -> dict[str, Any]:
        folder = _choice(p, "folder", FOLDERS, default="inbox")
        limit = _limit(p, *_THREADS_PAGE)
        before = _cursor(p, "before")
        page, more = image.newest_threads(folder, limit, before)
        return {
            "threads": [thread.to_summary() for thread in page],
            "next": str(page[-1].last_seq) if more else None,
        }

    def _get_thread_of(self, image: UserImage, p: dict[str, Any]) -> dict[str, Any]:
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes)
        limit = _limit(p, *_MESSAGES_PAGE)
        before = _cursor(p, "before")
        thread = _thread(image, thread_id)
        # newest first, one more than a page to know whether there is a next one
        older = (m for m in reversed(thread.messages.values()) if m.seq < before)
        newest = list(itertools.islice(older, limit + 1))
        page = newest[:limit][::-1]
        return {
            "thread_id": thread.thread_id,
            "participants": thread.participants,
            "addresses": thread.outside_addresses(),
            "folder": thread.folder,
            "messages": [message.to_dict() for message in page],
            "next": str(page[0].seq) if len(newest) > limit else None,
        }

    def _folder_messages_of(self, image: UserImage, p: dict[str, Any]) -> dict[str, Any]:
        """A folder's messages by UID, from `after_uid` on (IMAP's view of the folder)."""
        folder = _choice(p, "folder", FOLDERS, default="inbox")
        limit = _limit(p, *_FOLDER_PAGE)
        after = _field(p, "after_uid", 0)
        if type(after) is not int or after < 0:
            raise BadRequest(f"after_uid: must be a UID (an integer >= 0), not {after!r}")
        messages = image.folder_messages(folder, after)
        page = messages[:limit]
        return {
            "folder": folder,
            "uid_validity": UID_VALIDITY,
            "uid_next": image.uid_next[folder],
            "seq": image.seq,
            "messages": [
                {
                    "uid": m.uid,
                    "message_id": m.message_id,
                    "thread_id": m.thread_id,
                    "unread": m.unread,
                    "ts": m.ts,
                    "channel": m.channel,
                    "modseq": m.modseq,
                }
                for m in page
            ],
            "more": len(messages) > limit,
        }

    def _get_message_of(self, image: UserImage, p: dict[str, Any]) -> dict[str, Any]:
        message_id = _text(p, "message_id", self._settings.max_field_bytes)
        message = image.messages.get(message_id)
        if message is None:
            raise NotFound(f"message_id: user {p['user']} has no message {message_id!r}")
        return message.to_dict(with_extra=True)

    async def _get_blob(self, p: dict[str, Any]) -> dict[str, Any]:
        """A range of a blob referenced by one of the user's messages (pyserver.blobs.access)."""
        user = _user(p, "user")
        request = blob_access.BlobRange.from_payload(p)
        image = await self._resident.read(user)
        message_id = blob_access.find_reference(image.messages, request.ref, request.message_id)
        if message_id is not None and inlineraw.names_inline(
            image.messages[message_id].extra, request.ref
        ):
            whole = await inlineraw.read(self._store, user, message_id, request.ref)
            return blob_access.range_of(request, message_id, whole)
        if message_id is None or self._blobs is None:
            raise NotFound(f"ref: user {user} has no message with blob {request.ref}")
        return await blob_access.read_range(self._blobs, request, message_id)

    def _counts_of(self, image: UserImage, p: dict[str, Any]) -> dict[str, Any]:
        return {"folders": image.counts()}

    async def _search(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        query = _text(p, "query", self._settings.max_field_bytes)
        limit = _limit(p, *_SEARCH_PAGE)
        words = search_terms(query)
        if not words:
            raise BadRequest("query: has no word to search for")
        if len(words) > _MAX_QUERY_WORDS:
            raise TooLarge(f"query: {len(words)} words, over the limit of {_MAX_QUERY_WORDS}")
        image = await self._resident.read(user)
        # Everything in the image is in the index before it is read.
        await self._resident.indexer.caught_up(user, image.seq)
        # The store's term index finds candidates; the image drops deleted messages.
        found: list[Message] = []
        for message_id in await self._store.search(user, words):
            message = image.messages.get(message_id)
            if message is not None:
                found.append(message)
        found.sort(key=lambda m: m.seq, reverse=True)
        return {"messages": [message.to_dict() for message in found[:limit]]}

    # ---- writes to the user's own mailbox ----

    async def _mark_read(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._mark(p, unread=False)

    async def _mark_unread(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._mark(p, unread=True)

    async def _mark(self, p: dict[str, Any], unread: bool) -> dict[str, Any]:
        user = _user(p, "user")
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes)
        message_id = _text(p, "message_id", self._settings.max_field_bytes, default="")

        async def decide(image: UserImage) -> Change:
            thread = _thread(image, thread_id)
            if message_id:
                targets = [_message(thread, message_id)]
            else:
                targets = list(thread.messages.values())
            if all(message.unread == unread for message in targets):
                return Change()
            action = "marked_unread" if unread else "marked_read"
            return Change([{"action": action, "thread_id": thread_id, "message_id": message_id}])

        return await self._seq_reply(user, decide)

    async def _move(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes)
        folder = _choice(p, "folder", FOLDERS)

        async def decide(image: UserImage) -> Change:
            if _thread(image, thread_id).folder == folder:
                return Change()
            return Change([{"action": "moved", "thread_id": thread_id, "folder": folder}])

        return await self._seq_reply(user, decide)

    async def _delete(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes)
        message_id = _text(p, "message_id", self._settings.max_field_bytes, default="")

        async def decide(image: UserImage) -> Change:
            thread = _thread(image, thread_id)
            if not message_id:
                return Change([{"action": "thread_deleted", "thread_id": thread_id}])
            _message(thread, message_id)
            return Change(
                [{"action": "message_deleted", "thread_id": thread_id, "message_id": message_id}]
            )

        return await self._seq_reply(user, decide)

    async def _mark_seen(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        folder = _choice(p, "folder", FOLDERS, default="inbox")

        async def decide(image: UserImage) -> Change:
            if image.counts()[folder]["unseen"] == 0:
                return Change()
            return Change([{"action": "folder_seen", "folder": folder}])

        return await self._seq_reply(user, decide)

    async def _set_sms(self, p: dict[str, Any]) -> dict[str, Any]:
        """SET_SMS: the phone the user's messages are texted to, and which ones."""
        user = _user(p, "user")
        mode = _choice(p, "mode", SMS_MODES)
        phone = _text(p, "phone", 32, default="")
        if phone and not _is_phone(phone):
            raise BadRequest(f"phone: {phone!r} is not + and 8-15 digits")
        if mode != "off" and not phone:
            raise BadRequest(f"phone: required for mode {mode!r}")

        async def decide(image: UserImage) -> Change:
            if image.sms == ({"phone": phone, "mode": mode} if phone else None):
                return Change()
            return Change([{"action": "sms_set", "phone": phone, "mode": mode}])

        return await self._seq_reply(user, decide)

    async def _block(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._blocking(p, block=True)

    async def _unblock(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._blocking(p, block=False)

    async def _blocking(self, p: dict[str, Any], block: bool) -> dict[str, Any]:
        user = _user(p, "user")
        sender = _user(p, "sender")
        if sender == user:
            raise BadRequest(f"sender: user {user} cannot block themself")

        async def decide(image: UserImage) -> Change:
            if (sender in image.blocked) == block:
                return Change()
            action = "sender_blocked" if block else "sender_unblocked"
            return Change([{"action": action, "sender": sender}])

        return await self._seq_reply(user, decide)

    async def _seq_reply(
        self, user_id: int, decide: Callable[[UserImage], Awaitable[Change]]
    ) -> dict[str, Any]:
        change, image = await self._resident.update(user_id, decide)
        return {"seq": change.entries[-1]["seq"] if change.entries else image.seq}

    # ---- the user's past, from the log (pyserver.app.history) ----

    async def _history(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        after = _field(p, "after", 0)
        if type(after) is not int or not 0 <= after < 1 << 64:
            raise BadRequest(f"after: must be a log sequence number, not {after!r}")
        limit = _limit(p, *history.HISTORY_PAGE)
        thread_id = _text(p, "thread_id", self._settings.max_field_bytes, default=None)
        since = p.get("since")
        since_us = history.parse_time(since, "since") if since is not None else None
        self._resident.check_owner(user)
        return await history.read_history(self._store, user, after, limit, thread_id, since_us)

    async def _show_at(self, p: dict[str, Any]) -> dict[str, Any]:
        user = _user(p, "user")
        at = history.parse_time(_field(p, "at", _MISSING))
        limit = _limit(p, *history.SHOW_THREADS)
        self._resident.check_owner(user)
        return history.show(await history.image_at(self._store, user, at), limit)

    async def _restore(self, p: dict[str, Any]) -> dict[str, Any]:
        """RESTORE: compensating entries that bring the user's mailbox back to its state
        at `at` (pyserver.app.history), appended like any write of the user."""
        user = _user(p, "user")
        at = history.parse_time(_field(p, "at", _MISSING))
        by = _text(p, "by", self._settings.max_field_bytes, default="")

        async def decide(image: UserImage) -> Change:
            entries, bodies, terms, report = await history.restore_change(
                self._store, self._blobs, user, at, image, by, _now_us()
            )
            return Change(entries=entries, bodies=bodies, terms=terms, result=report)

        change, image = await self._resident.update(user, decide)
        return {**change.result, "seq": image.seq}

    async def _refresh(self, p: dict[str, Any]) -> dict[str, Any]:
        """REFRESH: drop the cached image, outdated by entries appended around this server."""
        user = _user(p, "user")
        return {"user": user, "dropped": await self._resident.drop_cached(user)}

    # ---- the social graph (through the user index) ----

    async def _friend_add(self, p: dict[str, Any]) -> dict[str, Any]:
        user, friend = self._friend_pair(p)
        await self._index.add_friend(user, friend)
        return {}

    async def _friend_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        user, friend = self._friend_pair(p)
        await self._index.remove_friend(user, friend)
        return {}

    async def _friends(self, p: dict[str, Any]) -> dict[str, Any]:
        """The user's friends, as the user index service answers FRIENDS (the web tier's
        friends page asks the user's app server, which holds the index or reaches it)."""
        user = _user(p, "user")
        self._resident.check_owner(user)
        return {"friends": sorted(await self._index.friends(user))}

    def _friend_pair(self, p: dict[str, Any]) -> tuple[int, int]:
        user = _user(p, "user")
        friend = _user(p, "friend")
        if friend == user:
            raise BadRequest(f"friend: user {user} cannot befriend themself")
        self._resident.check_owner(user)
        return user, friend

    # ---- subscriptions ----

    def subscribe(self, user_id: int, callback: EventCallback) -> int:
        """Call `callback(event)` after each commit to the user's log, in log order.

        The callback runs on the event loop and must not block; an exception it
        raises is logged and ignored. Returns the token for `unsubscribe`. Only the
        user's owner takes a subscription (NotOwner elsewhere): events come from the
        server that commits the user's writes.
        """
        self._resident.check_owner(user_id)
        token = next(self._tokens)
        self._subscribers.setdefault(user_id, {})[token] = callback
        self._subscription_users[token] = user_id
        return token

    def owns(self, user_id: int) -> bool:
        """Whether this server serves the user now (a node of a cell: by its ring)."""
        return self._resident.owns(user_id)

    def unsubscribe(self, token: int) -> None:
        """End a subscription (safe to repeat)."""
        user_id = self._subscription_users.pop(token, None)
        if user_id is None:
            return
        callbacks = self._subscribers.get(user_id)
        if callbacks is not None:
            callbacks.pop(token, None)
            if not callbacks:
                del self._subscribers[user_id]

    def _committed(self, user_id: int, image: UserImage, entries: list[dict[str, Any]]) -> None:
        """A write is durable and in the image: tell the subscribers and the dirty hook."""
        if self._counts_changed is not None and any(
            entry["action"] not in _COUNTS_UNCHANGED for entry in entries
        ):
            try:
                self._counts_changed(user_id)
            except Exception:
                log.exception("counts_changed hook failed user=%d", user_id)
        callbacks = self._subscribers.get(user_id)
        if not callbacks:
            return
        for entry in entries:
            event = _event(user_id, image, entry)
            for callback in list(callbacks.values()):
                try:
                    callback(event)
                except Exception:
                    log.exception("subscriber failed user=%d seq=%d", user_id, entry["seq"])

    # ---- images: the cache, loading, committing ----

    # ---- images: everything goes through the residency ----

    def release(self, keep: Callable[[int], bool] | None = None) -> int:
        """Drop the cached images of users this server no longer serves; how many went
        (every image when `keep` is None, else those for which `keep(user_id)` is false)."""
        return self._resident.release(keep)

    async def quiesce(self, user_id: int) -> None:
        """Let the user's writes under way finish, then drop its cached image."""
        await self._resident.quiesce(user_id)

    async def drain(self) -> None:
        """Wait until every background snapshot and search index write has finished."""
        await self._resident.drain()

    async def close(self) -> None:
        """Finish background writes, then snapshot every image ahead of its last one.

        The store stays open: whoever opened it closes it.
        """
        await self._resident.close()

    # ---- admin: rebuild, export, import, stats ----

    async def rebuild(self, user_id: int) -> dict[str, Any]:
        """Regenerate the user's image from the log alone; report how the snapshot differs."""
        return await self._resident.rebuild(user_id)

    async def blob_refs(self, user_id: int) -> set[str]:
        """Every blob ref the user's messages reference (blob garbage collection keeps them)."""
        image = await self._resident.read(user_id)
        return {
            ref
            for message in image.messages.values()
            if message.extra
            for ref in blob_access.blob_refs(message.extra)
        }

    async def export_log(self, user_id: int) -> list[dict[str, Any]]:
        """The user's whole log as JSON-able dicts, bodies included."""
        return await self._resident.export_log(user_id)

    async def import_log(self, user_id: int, entries: Iterable[dict[str, Any]]) -> int:
        """Append exported entries to the user's log; returns how many were appended."""
        return await self._resident.import_log(user_id, entries)

    def stats(self) -> dict[str, Any]:
        """The residency's figures (cache, reply table, search index, writes) and ours."""
        return {
            **self._resident.stats(),
            "subscriptions": len(self._subscription_users),
            **self._counters,
        }


# ---- payload checks: BadRequest names the field; TooLarge says the limit ----


async def _settle_together(
    first: Awaitable[Any], others: list[Coroutine[Any, Any, Any]]
) -> list[Any]:
    """The outcomes (results or exceptions) of `first` and `others` run concurrently, as
    `asyncio.gather(first, *others, return_exceptions=True)` gives them, but `first` runs
    in the calling task: one task and the gather's bookkeeping less for every SEND. All
    settle before this returns; cancelled, it cancels the others and waits for none."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(other) for other in others]
    outcomes: list[Any] = []
    try:
        try:
            outcomes.append(await first)
        except Exception as exc:
            outcomes.append(exc)
        for task in tasks:
            try:
                outcomes.append(await task)
            except Exception as exc:
                outcomes.append(exc)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return outcomes


def _raise_first(outcomes: list[Any]) -> None:
    """Raise the first exception among gathered outcomes (return_exceptions=True)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _field(p: dict[str, Any], name: str, default: Any) -> Any:
    value = p.get(name)
    if value is None:
        if default is _MISSING:
            raise BadRequest(f"{name}: required")
        return default
    return value


def _user(p: dict[str, Any], name: str, minimum: int = 1) -> int:
    value = _field(p, name, _MISSING)
    return check_user_id(value, name, minimum)


def _user_list(p: dict[str, Any], name: str, most: int, default: Any = _MISSING) -> list[int]:
    value = _field(p, name, default)
    if not isinstance(value, list):
        raise BadRequest(f"{name}: must be a list of user ids")
    if len(value) > most:
        raise TooLarge(f"{name}: {len(value)} users, over the limit of {most}")
    for user in value:
        check_user_id(user, name)
    return value


def _recipients(p: dict[str, Any], sender: int, most: int) -> tuple[list[int], tuple[str, ...]]:
    """SEND's recipients: user ids and email addresses, (users but the sender, addresses)."""
    value = _field(p, "recipients", _MISSING)
    if not isinstance(value, list):
        raise BadRequest("recipients: must be a list of user ids and email addresses")
    if len(value) > most:
        raise TooLarge(f"recipients: {len(value)} recipients, over the limit of {most}")
    users = [item for item in value if not isinstance(item, str)]
    for user in users:
        check_user_id(user, "recipients")
    addresses = tuple(sorted({_email_address(item, "recipients") for item in value
                              if isinstance(item, str)}, key=str.lower))  # fmt: skip
    others = sorted(set(users) - {sender})
    if not others and not addresses:
        raise BadRequest("recipients: must name at least one user other than the sender")
    return others, addresses


def _addresses(p: dict[str, Any], name: str, most: int, default: Any = _MISSING) -> list[str]:
    value = _field(p, name, default)
    if not isinstance(value, list) or len(value) > most:
        raise BadRequest(f"{name}: must be a list of at most {most} email addresses")
    return [_email_address(item, name) for item in value]


SMS_MODES = ("off", "all", "inbox")


def _is_phone(value: str) -> bool:
    """E.164 as the SMS gateway keys phones: `+` and 8-15 ASCII digits."""
    digits = value[1:]
    return value[:1] == "+" and 8 <= len(digits) <= 15 and digits.isascii() and digits.isdigit()


def _email_address(value: Any, name: str) -> str:
    """An email address as a recipient: local@domain, no spaces, brackets or separators."""
    if not isinstance(value, str):
        raise BadRequest(f"{name}: {value!r} is neither a user id nor an email address")
    address = value.strip()
    local, at, domain = address.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain
        or len(address) > 254
        or any(c.isspace() or c in '<>,;"()[]\\' or ord(c) < 32 for c in address)
    ):
        raise BadRequest(f"{name}: {value!r} is not an email address")
    return address


def _text(p: dict[str, Any], name: str, max_bytes: int, default: Any = _MISSING) -> Any:
    value = _field(p, name, default)
    if value is default:
        return value
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string, not {type(value).__name__}")
    # A character is at most 4 bytes of UTF-8: most strings need no encoding to check.
    if len(value) * 4 > max_bytes:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest(f"{name}: not valid Unicode text") from None
        if size > max_bytes:
            raise TooLarge(f"{name}: {size} bytes, over the limit of {max_bytes}")
    return value


def _choice(p: dict[str, Any], name: str, allowed: tuple[str, ...], default: Any = _MISSING) -> str:
    value = _field(p, name, default)
    if value not in allowed:
        raise BadRequest(f"{name}: must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _limit(p: dict[str, Any], default: int, most: int) -> int:
    value = _field(p, "limit", default)
    if type(value) is not int or not 1 <= value <= most:
        raise BadRequest(f"limit: must be an integer in 1..{most}, not {value!r}")
    return value


def _cursor(p: dict[str, Any], name: str) -> int:
    """A page cursor (a `next` of a previous page) as a log position; none: past the end."""
    value = _field(p, name, None)
    if value is None:
        return MAX_USER_ID + 1
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 20:
        raise BadRequest(f"{name}: {value!r} is not a cursor this server gave")
    return int(value)


def _attachments(p: dict[str, Any], name: str, max_bytes: int) -> list[dict[str, Any]]:
    """SEND's attachments: files already in the blob store, `{"ref", "name", "type",
    "size"}` each (as the MTA proxy lists a received mail's)."""
    value = _field(p, name, [])
    if not isinstance(value, list) or len(value) > 100:
        raise BadRequest(f"{name}: must be a list of at most 100 attachments")
    found = []
    for item in value:
        if not isinstance(item, dict):
            raise BadRequest(f"{name}: {item!r} is not an attachment object")
        ref = check_ref(item.get("ref"), f"{name}.ref")
        filename, kind, size = item.get("name", ""), item.get("type", ""), item.get("size")
        if not isinstance(filename, str) or not isinstance(kind, str) or len(filename) > 255:
            raise BadRequest(f"{name}: name and type must be strings (name up to 255)")
        if type(size) is not int or size < 0:
            raise BadRequest(f"{name}.size: must be a byte count")
        found.append({"ref": ref, "name": filename, "type": kind[:255] or
                      "application/octet-stream", "size": size})  # fmt: skip
    if len(orjson.dumps(found)) > max_bytes:
        raise TooLarge(f"{name}: the list is over {max_bytes} bytes")
    return found


def _flag(p: dict[str, Any], name: str, default: bool) -> bool:
    value = _field(p, name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{name}: must be true or false")
    return value


def _extra(p: dict[str, Any], name: str, max_bytes: int) -> dict[str, Any]:
    value = _field(p, name, {})
    if not isinstance(value, dict):
        raise BadRequest(f"{name}: must be a JSON object")
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:
        raise BadRequest(f"{name}: not JSON: {exc}") from None
    if size > max_bytes:
        raise TooLarge(f"{name}: {size} bytes, over the limit of {max_bytes}")
    return value


def _thread(image: UserImage, thread_id: str) -> Thread:
    thread = image.threads.get(thread_id)
    if thread is None:
        raise NotFound(f"thread_id: no thread {thread_id!r}")
    return thread


def _message(thread: Thread, message_id: str) -> Message:
    message = thread.messages.get(message_id)
    if message is None:
        raise NotFound(f"message_id: thread {thread.thread_id!r} has no message {message_id!r}")
    return message


# ---- small pieces ----


def _mail_readers(image: UserImage, thread_id: str, recipients: Iterable[int]) -> list[str]:
    """The addresses of the recipients who take part in this conversation by email: whose
    latest message in it is a mail that proved to come from them (pyserver.mta.senders).
    They get a SEND there by mail as well, answering theirs."""
    thread = image.threads.get(thread_id)
    # a conversation with no mail in it (most: chat, SMS) is not read message by message
    if thread is None or "email" not in thread.channels:
        return []
    wanted = set(recipients)
    latest: dict[int, Message] = {}
    for message in thread.messages.values():  # in log order: the last one wins
        if message.sender in wanted:
            latest[message.sender] = message
    return sorted(
        message.sender_address
        for message in latest.values()
        if message.channel == "email"
        and message.extra.get("sender_proof")
        and message.sender_address
    )


@functools.lru_cache(maxsize=256)
def _terms_of(subject: str, text: str) -> tuple[str, ...]:
    """A message's search terms; a SEND's copies (the sender's and each recipient's) are
    indexed under the same words, found once."""
    return tuple(search_terms(subject, text))


def _adding(
    delivery: Delivery,
    folder: str,
    unread: bool,
    outbound: bool = False,
    mail_to: list[str] | None = None,
    notify: list[str] | None = None,
) -> Change:
    """The change that adds one copy of a delivery to a mailbox (`outbound`: the sender's
    copy, which queues the mail to outside addresses, and to `mail_to`: users' addresses;
    `notify`: the phone a recipient's copy is texted to, queued the same way)."""
    words = _terms_of(delivery.subject, delivery.text)
    return Change(
        entries=[delivery.entry(folder, unread)],
        bodies={delivery.message_id: delivery.body(outbound, mail_to or [], notify or [])},
        terms=[(word, delivery.message_id) for word in words],
    )


def _send_reply(first: list[Any], duplicate: bool) -> dict[str, Any]:
    message_id, thread_id, ts, _folder = first
    return {"message_id": message_id, "thread_id": thread_id, "ts": ts, "duplicate": duplicate}


def _event(user_id: int, image: UserImage, entry: dict[str, Any]) -> Event:
    """The SUBSCRIBE event of one committed log entry."""
    event: Event = {"user": user_id, "seq": entry["seq"], "event": entry["action"]}
    if entry["action"] == "message_added":
        event["thread_id"] = entry["thread_id"]
        message = image.messages.get(entry["message_id"])
        event["message"] = message.to_dict() if message is not None else None
        event["folder"] = entry["folder"]
    else:
        event.update((k, v) for k, v in entry.items() if k not in ("seq", "ts", "action"))
    return event
