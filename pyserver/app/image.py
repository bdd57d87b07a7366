"""The user image: one user's whole recent mailbox, as the log makes it.

Owns the in-memory model of a mailbox (threads, messages, per-folder counts,
blocked senders, idempotency keys, each message's UID in its folder) and its
snapshot format. `UserImage.apply`
is the only way an image changes: it takes one decoded log entry
(docs/log-format.md, plus `folder_seen`) and, for `message_added`, the
message's body from the store's `m` family. Replaying a log from empty or from
any snapshot of it therefore gives the same image. Calls nothing but orjson
and the codec's vocabulary.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Iterable
from typing import Any

import orjson

from pyserver.errors import LogCorrupt
from pyserver.logcodec import CHANNELS, FOLDERS

__all__ = [
    "CHANNELS",
    "FOLDERS",
    "SNAPSHOT_VERSION",
    "Message",
    "SnapshotOutdated",
    "Thread",
    "UserImage",
    "scoped_key",
    "thread_id_for",
]

# 2: messages carry their UID in their folder, the image each folder's next UID
# 3: messages carry their MODSEQ (the log position that last changed them as IMAP sees it)
SNAPSHOT_VERSION = 3
# snapshots of these versions are sound but lack what this version derives: the image is
# made again from the log (once per user; the next snapshot is of this version)
_OLDER_VERSIONS = (1, 2)


class SnapshotOutdated(LogCorrupt):
    """A snapshot of an older format: replay the log instead (not a corruption)."""


# Rough CPython costs (object headers, slots, dict slots), so the cache's byte
# bound means something; the exact figure does not matter, its scale does.
_IMAGE_OVERHEAD = 2_000
_THREAD_OVERHEAD = 700
_MESSAGE_OVERHEAD = 450
_KEY_OVERHEAD = 250
_BLOCKED_OVERHEAD = 80
# What a message's summary (GET_THREAD, events) says of each attachment.
_ATTACHMENT_FIELDS = ("ref", "name", "type", "size")


def thread_id_for(participants: Iterable[int], outside: str | Iterable[str] | None = None) -> str:
    """The thread of a set of users and of the outside addresses in the conversation (an
    outside sender's, or those a user wrote to), if any.

    Deterministic and channel-blind, so chat, SMS and email between the same
    people land in one thread, in every participant's mailbox; addresses count
    case-insensitively.
    """
    canonical = ",".join(str(user) for user in sorted(set(participants)))
    addresses = [outside] if isinstance(outside, str) else list(outside or ())
    addresses = sorted({address.strip().lower() for address in addresses if address.strip()})
    if addresses:
        canonical += "|" + ",".join(addresses)
    return "t" + hashlib.blake2b(canonical.encode("utf-8"), digest_size=12).hexdigest()


def scoped_key(sender: int, key: str) -> str:
    """An idempotency key as the image stores it: scoped by the sender who chose it."""
    return f"{sender}:{key}"


class Message:
    """One message of a thread, as the user sees it."""

    __slots__ = (
        "channel",
        "extra",
        "message_id",
        "modseq",
        "sender",
        "sender_address",
        "seq",
        "snippet",
        "subject",
        "text",
        "thread_id",
        "ts",
        "uid",
        "unread",
    )

    def __init__(
        self,
        message_id: str,
        thread_id: str,
        sender: int,
        sender_address: str | None,
        channel: str,
        ts: int,
        subject: str,
        snippet: str,
        text: str,
        unread: bool,
        extra: dict[str, Any],
        seq: int,
    ) -> None:
        self.message_id = message_id
        self.thread_id = thread_id
        self.sender = sender
        self.sender_address = sender_address
        self.channel = channel
        self.ts = ts
        self.subject = subject
        # a short message's snippet is its text: share the string
        self.snippet = text if snippet == text else snippet
        self.text = text
        self.unread = unread
        self.extra = extra
        # the log position that added it: orders messages and pages threads
        self.seq = seq
        # the log position that last changed it as IMAP sees it (added, read or unread,
        # filed in a folder): its MODSEQ (RFC 7162)
        self.modseq = seq
        # its UID in its thread's folder (IMAP): given as the log files it there, from
        # the folder's counter, so stable and increasing, and the same on every replay
        self.uid = 0

    def to_dict(self, with_extra: bool = False) -> dict[str, Any]:
        """The message as docs/protocol.md shows it (GET_MESSAGE adds `extra`)."""
        out: dict[str, Any] = {
            "message_id": self.message_id,
            "thread_id": self.thread_id,
            "sender": self.sender,
            "from": self.sender_address,
            "channel": self.channel,
            "ts": self.ts,
            "subject": self.subject,
            "text": self.text,
            "unread": self.unread,
        }
        if with_extra:
            out["extra"] = self.extra
            return out
        if "from_name" in self.extra:  # an outside sender's name, as their mail gave it
            out["from_name"] = self.extra["from_name"]
        if "delivery" in self.extra:  # a mail to outside addresses: how each one went
            out["delivery"] = self.extra["delivery"]
        if "attachments" in self.extra:  # what a thread view lists to download
            out["attachments"] = [
                {key: file[key] for key in _ATTACHMENT_FIELDS if key in file}
                for file in self.extra["attachments"]
            ]
        return out

    def weight(self) -> int:
        extra = len(orjson.dumps(self.extra)) if self.extra else 0
        return (
            _MESSAGE_OVERHEAD
            + len(self.message_id)
            + len(self.sender_address or "")
            + len(self.subject)
            + (0 if self.snippet is self.text else len(self.snippet))
            + len(self.text)
            + extra
        )

    @classmethod
    def _from_row(cls, thread_id: str, row: list[Any]) -> Message:
        (
            mid,
            sender,
            address,
            channel,
            ts,
            subject,
            snippet,
            text,
            unread,
            extra,
            seq,
            uid,
            modseq,
        ) = row
        if channel not in CHANNELS or not isinstance(extra, dict):
            raise ValueError(f"message {mid!r} has a bad channel or extra")
        message = cls(
            str(mid), thread_id, int(sender), address, channel, int(ts), str(subject),
            str(text if snippet is None else snippet), str(text), bool(unread), extra, int(seq),
        )  # fmt: skip
        message.uid = int(uid)
        message.modseq = int(modseq)
        return message

    def _row(self) -> list[Any]:
        return [
            self.message_id,
            self.sender,
            self.sender_address,
            self.channel,
            self.ts,
            self.subject,
            None if self.snippet is self.text else self.snippet,
            self.text,
            self.unread,
            self.extra,
            self.seq,
            self.uid,
            self.modseq,
        ]


class Thread:
    """A conversation: its participants, folder, messages in log order, and their summary.

    `participants`, `folder`, `unseen` and `messages` are the state; the rest
    (subject, snippet, last_ts, last_seq, channels, unread, outside) is derived from
    the messages, kept up to date incrementally.
    """

    __slots__ = (
        "channels",
        "folder",
        "last_seq",
        "last_ts",
        "messages",
        "outside",
        "participants",
        "snippet",
        "subject",
        "thread_id",
        "unread",
        "unseen",
    )

    def __init__(self, thread_id: str, participants: list[int], folder: str) -> None:
        self.thread_id = thread_id
        self.participants = participants
        self.folder = folder
        # a message arrived since the folder was last marked seen
        self.unseen = False
        self.messages: dict[str, Message] = {}
        self.subject = ""
        self.snippet = ""
        self.last_ts = 0
        self.last_seq = 0
        self.channels: set[str] = set()
        # how many of its messages are unread
        self.unread = 0
        # the outside addresses its users wrote to and that wrote to them, by their lower
        # case, as first written (GET_THREAD's `addresses`: a walk of a long conversation
        # on every read of it, and on every write that refreshes a remembered read)
        self.outside: dict[str, str] = {}

    def add(self, message: Message) -> None:
        self.messages[message.message_id] = message
        if not self.subject:
            self.subject = message.subject
        self.snippet = message.snippet
        self.last_ts = message.ts
        self.last_seq = message.seq
        self.channels.add(message.channel)
        self.unread += message.unread
        self._note_outside(message)

    def _note_outside(self, message: Message) -> None:
        for address in message.extra.get("to_addresses", ()):
            self.outside.setdefault(address.lower(), address)
        if message.sender == 0 and message.sender_address:
            self.outside.setdefault(message.sender_address.lower(), message.sender_address)

    def outside_addresses(self) -> list[str]:
        """The outside addresses of the conversation: those its users wrote to and those
        that wrote to them."""
        return sorted(self.outside.values(), key=str.lower)

    def summarise(self) -> None:
        """Recompute the derived fields from the messages (after a deletion or a load)."""
        messages = list(self.messages.values())
        self.subject = next((m.subject for m in messages if m.subject), "")
        last = messages[-1] if messages else None
        self.snippet = last.snippet if last else ""
        self.last_ts = last.ts if last else 0
        self.last_seq = last.seq if last else 0
        self.channels = {m.channel for m in messages}
        self.unread = sum(m.unread for m in messages)
        self.outside = {}
        for message in messages:
            self._note_outside(message)

    def to_summary(self) -> dict[str, Any]:
        """The thread as LIST_THREADS shows it."""
        return {
            "thread_id": self.thread_id,
            "participants": self.participants,
            "folder": self.folder,
            "subject": self.subject,
            "snippet": self.snippet,
            "last_ts": self.last_ts,
            "messages": len(self.messages),
            "unread": self.unread,
            "channels": sorted(self.channels),
        }

    def weight(self) -> int:
        return _THREAD_OVERHEAD + len(self.thread_id) + 8 * len(self.participants)

    def _state(self) -> dict[str, Any]:
        return {
            "participants": self.participants,
            "folder": self.folder,
            "unseen": self.unseen,
            "messages": [m._row() for m in self.messages.values()],
            # derived, compared too so an incremental slip shows up as a difference
            "subject": self.subject,
            "snippet": self.snippet,
            "last_ts": self.last_ts,
            "last_seq": self.last_seq,
            "channels": sorted(self.channels),
            "unread": self.unread,
            "outside": self.outside,
        }


class UserImage:
    """One user's whole recent mailbox at log position `seq`.

    `snapshot_seq` is bookkeeping for the mailbox (the position of the latest
    snapshot known to be stored), not part of the image's state.
    """

    __slots__ = (
        "_by_folder",
        "_unread",
        "_unseen",
        "_weight",
        "blocked",
        "keys",
        "messages",
        "seq",
        "sms",
        "snapshot_seq",
        "threads",
        "uid_next",
    )

    def __init__(self) -> None:
        self.seq = 0
        self.snapshot_seq = 0
        self.threads: dict[str, Thread] = {}
        # every message by id, for GET_MESSAGE and searches
        self.messages: dict[str, Message] = {}
        self.blocked: set[int] = set()
        # the user's phone for texts and which messages go to it (`sms_set`); None: none
        self.sms: dict[str, str] | None = None
        # scoped idempotency key -> [message_id, thread_id, ts, folder] of its first use;
        # kept after the message is deleted, so a late retry is still a no-op
        self.keys: dict[str, list[Any]] = {}
        # per folder: threads with an unread message / with an unseen arrival
        self._unread = dict.fromkeys(FOLDERS, 0)
        self._unseen = dict.fromkeys(FOLDERS, 0)
        # per folder: its threads, least recently active first (by last_seq, which is unique)
        self._by_folder: dict[str, list[Thread]] = {folder: [] for folder in FOLDERS}
        # per folder: the UID the next message filed there gets (IMAP's UIDNEXT)
        self.uid_next = dict.fromkeys(FOLDERS, 1)
        self._weight = _IMAGE_OVERHEAD

    # ---- reading ----

    @property
    def weight(self) -> int:
        """Approximate memory held by the image, in bytes (the cache's bound)."""
        return self._weight

    def counts(self) -> dict[str, dict[str, int]]:
        """Per folder: threads with an unread message, threads with an unseen arrival."""
        return {
            folder: {"unread": self._unread[folder], "unseen": self._unseen[folder]}
            for folder in FOLDERS
        }

    def newest_threads(
        self, folder: str, limit: int, before: int | None = None
    ) -> tuple[list[Thread], bool]:
        """Up to `limit` threads of a folder, most recently active first, whose latest
        message is older than log position `before`; and whether older ones remain."""
        ordered = self._by_folder[folder]
        end = len(ordered) if before is None else bisect_left(ordered, before, key=_activity)
        start = max(0, end - limit)
        return ordered[start:end][::-1], start > 0

    def key_result(self, sender: int, key: str) -> list[Any] | None:
        """[message_id, thread_id, ts, folder] of the first message with this key, or None."""
        return self.keys.get(scoped_key(sender, key))

    def recount(self) -> dict[str, dict[str, int]]:
        """counts() computed from scratch (what the incremental counts must equal)."""
        unread = dict.fromkeys(FOLDERS, 0)
        unseen = dict.fromkeys(FOLDERS, 0)
        for thread in self.threads.values():
            unread[thread.folder] += thread.unread > 0
            unseen[thread.folder] += thread.unseen
        return {f: {"unread": unread[f], "unseen": unseen[f]} for f in FOLDERS}

    # ---- changing: apply() only ----

    def apply(self, entry: dict[str, Any], body: dict[str, Any] | None = None) -> None:
        """Apply the next log entry. `body` ({"text", "from", "extra"}) goes with message_added.

        An entry naming a thread or message the image no longer has changes
        nothing but `seq`: the log is the truth, and such an entry was valid
        when it was written. LogCorrupt if the entry is not the next one.
        """
        seq = entry["seq"]
        if seq != self.seq + 1:
            raise LogCorrupt(f"log entry {seq} does not follow entry {self.seq}")
        action = entry["action"]
        handler = _HANDLERS.get(action)
        if handler is None:
            raise LogCorrupt(f"log entry {seq}: unknown action {action!r}")
        handler(self, entry, body)
        self.seq = seq

    def folder_messages(self, folder: str, after_uid: int = 0) -> list[Message]:
        """The messages of the folder's threads with a UID above `after_uid`, by UID
        (IMAP's view of the folder)."""
        found = [
            m
            for thread in self._by_folder[folder]
            for m in thread.messages.values()
            if m.uid > after_uid
        ]
        found.sort(key=_uid)
        return found

    def _file(self, messages: Iterable[Message], folder: str, seq: int) -> None:
        """Give messages filed in `folder` (new, or moved there with their thread) the
        folder's next UIDs, in log order, and the MODSEQ of entry `seq`."""
        uid = self.uid_next[folder]
        for message in messages:
            message.uid = uid
            message.modseq = seq
            uid += 1
        self.uid_next[folder] = uid

    def _count(self, thread: Thread, sign: int) -> None:
        self._unread[thread.folder] += sign * (thread.unread > 0)
        self._unseen[thread.folder] += sign * thread.unseen

    def _unlist(self, thread: Thread) -> None:
        """Take the thread out of its folder's order (before its folder or last_seq changes)."""
        ordered = self._by_folder[thread.folder]
        index = bisect_left(ordered, thread.last_seq, key=_activity)
        if index < len(ordered) and ordered[index] is thread:
            del ordered[index]
        else:
            ordered.remove(thread)

    def _message_added(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        message_id = entry["message_id"]
        if message_id in self.messages:
            return
        thread_id = entry["thread_id"]
        thread = self.threads.get(thread_id)
        if thread is None:
            thread = Thread(thread_id, sorted(set(entry["participants"])), entry["folder"])
            self.threads[thread_id] = thread
            self._weight += thread.weight()
        else:
            self._count(thread, -1)
            self._unlist(thread)
            if thread.folder != entry["folder"]:  # the thread comes back: all of it
                thread.folder = entry["folder"]
                self._file(thread.messages.values(), thread.folder, entry["seq"])
        body = body or {}
        extra = body.get("extra") or {}
        if extra.get("outbound"):
            # the sender's copy of a mail to outside addresses: each address's delivery,
            # queued until an `outbound_settled` entry settles it
            queued = {address: {"state": "queued"} for address in extra["outbound"]}
            extra = {**extra, "delivery": queued}
        message = Message(
            message_id=message_id,
            thread_id=thread_id,
            sender=entry["sender"],
            sender_address=body.get("from"),
            channel=entry["channel"],
            ts=entry["ts"],
            subject=entry["subject"],
            snippet=entry["snippet"],
            # a body the store lost still leaves the snippet to show
            text=body.get("text", entry["snippet"]),
            unread=entry["unread"],
            extra=extra,
            seq=entry["seq"],
        )
        thread.add(message)
        self._file((message,), thread.folder, entry["seq"])
        if message.unread:
            thread.unseen = True
        # the newest entry of the log: the thread is now its folder's most recent
        self._by_folder[thread.folder].append(thread)
        self.messages[message_id] = message
        self._weight += message.weight()
        self._count(thread, +1)
        if entry["key"]:
            key = scoped_key(entry["sender"], entry["key"])
            if key not in self.keys:
                self.keys[key] = [message_id, thread_id, entry["ts"], entry["folder"]]
                self._weight += _KEY_OVERHEAD + len(key)

    def _marked(self, entry: dict[str, Any], unread: bool) -> None:
        thread = self.threads.get(entry["thread_id"])
        if thread is None:
            return
        if entry["message_id"]:
            message = thread.messages.get(entry["message_id"])
            targets = [message] if message is not None else []
        else:
            targets = list(thread.messages.values())
        self._count(thread, -1)
        for message in targets:
            if message.unread != unread:
                message.unread = unread
                message.modseq = entry["seq"]
                thread.unread += 1 if unread else -1
        self._count(thread, +1)

    def _marked_read(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        self._marked(entry, unread=False)

    def _marked_unread(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        self._marked(entry, unread=True)

    def _moved(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        thread = self.threads.get(entry["thread_id"])
        if thread is None:
            return
        self._count(thread, -1)
        self._unlist(thread)
        if thread.folder != entry["folder"]:
            thread.folder = entry["folder"]
            self._file(thread.messages.values(), thread.folder, entry["seq"])
        insort(self._by_folder[thread.folder], thread, key=_activity)
        self._count(thread, +1)

    def _message_deleted(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        thread = self.threads.get(entry["thread_id"])
        if thread is None or entry["message_id"] not in thread.messages:
            return
        if len(thread.messages) == 1:
            self._drop_thread(thread)
            return
        self._count(thread, -1)
        self._unlist(thread)
        message = thread.messages.pop(entry["message_id"])
        del self.messages[message.message_id]
        self._weight -= message.weight()
        thread.summarise()
        insort(self._by_folder[thread.folder], thread, key=_activity)
        self._count(thread, +1)

    def _thread_deleted(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        thread = self.threads.get(entry["thread_id"])
        if thread is not None:
            self._drop_thread(thread)

    def _drop_thread(self, thread: Thread) -> None:
        self._count(thread, -1)
        self._unlist(thread)
        for message_id, message in thread.messages.items():
            del self.messages[message_id]
            self._weight -= message.weight()
        del self.threads[thread.thread_id]
        self._weight -= thread.weight()

    def _sender_blocked(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        if entry["sender"] not in self.blocked:
            self.blocked.add(entry["sender"])
            self._weight += _BLOCKED_OVERHEAD

    def _sender_unblocked(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        if entry["sender"] in self.blocked:
            self.blocked.discard(entry["sender"])
            self._weight -= _BLOCKED_OVERHEAD

    def _folder_seen(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        folder = entry["folder"]
        if not self._unseen.get(folder):
            return
        for thread in self.threads.values():
            if thread.folder == folder and thread.unseen:
                self._count(thread, -1)
                thread.unseen = False
                self._count(thread, +1)

    def _sms_set(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        self.sms = {"phone": entry["phone"], "mode": entry["mode"]} if entry["phone"] else None

    def sms_phone_for(self, folder: str) -> str | None:
        """The phone a message someone else sent, filed in `folder`, is texted to by the
        user's setting (None: it is not texted)."""
        if self.sms is None:
            return None
        mode = self.sms["mode"]
        if mode == "all" or (mode == "inbox" and folder == "inbox"):
            return self.sms["phone"]
        return None

    def _outbound_settled(self, entry: dict[str, Any], body: dict[str, Any] | None) -> None:
        message = self.messages.get(entry["message_id"])
        if message is None or entry["address"] not in message.extra.get("delivery", {}):
            return
        self._weight -= message.weight()
        delivery = {
            **message.extra["delivery"],
            entry["address"]: {"state": entry["outcome"], "detail": entry["detail"]},
        }
        message.extra = {**message.extra, "delivery": delivery}
        self._weight += message.weight()

    def pending_outbound(self) -> list[tuple[str, list[str]]]:
        """(message id, addresses still queued) of each mail to outside addresses this user
        sent that is not settled yet, oldest first."""
        pending = []
        for message in self.messages.values():
            delivery = message.extra.get("delivery")
            if delivery:
                queued = [a for a, state in delivery.items() if state["state"] == "queued"]
                if queued:
                    pending.append((message.seq, message.message_id, queued))
        return [(message_id, queued) for _, message_id, queued in sorted(pending)]

    # ---- snapshots and comparison ----

    def _state(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "blocked": sorted(self.blocked),
            "sms": self.sms,
            "keys": self.keys,
            "threads": {tid: thread._state() for tid, thread in self.threads.items()},
            "uid_next": self.uid_next,
            # derived, compared too
            "counts": self.counts(),
            "order": {f: [t.thread_id for t in self._by_folder[f]] for f in FOLDERS},
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserImage):
            return NotImplemented
        return self._state() == other._state()

    def __repr__(self) -> str:
        return f"<UserImage seq={self.seq} threads={len(self.threads)} weight={self._weight}>"

    def differences(self, other: UserImage, limit: int = 50) -> list[str]:
        """What differs between two images, as readable paths (at most `limit` of them)."""
        out: list[str] = []
        _diff(self._state(), other._state(), "", out, limit)
        return out

    def to_snapshot(self) -> bytes:
        """The image as orjson bytes (derived fields and counts are recomputed on load)."""
        return orjson.dumps(
            {
                "version": SNAPSHOT_VERSION,
                "seq": self.seq,
                "blocked": sorted(self.blocked),
                "sms": self.sms,
                "keys": self.keys,
                "uid_next": self.uid_next,
                "threads": [
                    {
                        "id": thread.thread_id,
                        "participants": thread.participants,
                        "folder": thread.folder,
                        "unseen": thread.unseen,
                        "messages": [m._row() for m in thread.messages.values()],
                    }
                    for thread in self.threads.values()
                ],
            }
        )

    @classmethod
    def from_snapshot(cls, data: bytes | bytearray | memoryview) -> UserImage:
        """The image a snapshot holds; LogCorrupt if it is not one this version can read."""
        try:
            raw = orjson.loads(bytes(data))
        except orjson.JSONDecodeError as exc:
            raise LogCorrupt(f"snapshot is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != SNAPSHOT_VERSION:
            version = raw.get("version") if isinstance(raw, dict) else None
            if version in _OLDER_VERSIONS:
                raise SnapshotOutdated(f"snapshot version {version} predates {SNAPSHOT_VERSION}")
            raise LogCorrupt(f"snapshot version {version!r} is not {SNAPSHOT_VERSION}")
        try:
            return cls._from_state(raw)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise LogCorrupt(f"snapshot is malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_state(cls, raw: dict[str, Any]) -> UserImage:
        image = cls()
        image.seq = int(raw["seq"])
        image.blocked = {int(sender) for sender in raw["blocked"]}
        sms = raw["sms"]
        image.sms = {"phone": str(sms["phone"]), "mode": str(sms["mode"])} if sms else None
        image.keys = {str(key): list(result) for key, result in raw["keys"].items()}
        image.uid_next = {folder: int(raw["uid_next"][folder]) for folder in FOLDERS}
        image._weight += _BLOCKED_OVERHEAD * len(image.blocked)
        image._weight += sum(_KEY_OVERHEAD + len(key) for key in image.keys)
        for item in raw["threads"]:
            if item["folder"] not in image._unread:
                raise ValueError(f"unknown folder {item['folder']!r}")
            thread = Thread(item["id"], [int(p) for p in item["participants"]], item["folder"])
            thread.unseen = bool(item["unseen"])
            for row in item["messages"]:
                message = Message._from_row(thread.thread_id, row)
                thread.messages[message.message_id] = message
                image.messages[message.message_id] = message
                image._weight += message.weight()
            thread.summarise()
            image.threads[thread.thread_id] = thread
            image._weight += thread.weight()
            image._count(thread, +1)
            image._by_folder[thread.folder].append(thread)
        for ordered in image._by_folder.values():
            ordered.sort(key=_activity)
        return image


def _uid(message: Message) -> int:
    return message.uid


def _activity(thread: Thread) -> int:
    """Where a thread sorts in its folder: the log position of its latest message."""
    return thread.last_seq


_HANDLERS = {
    "message_added": UserImage._message_added,
    "marked_read": UserImage._marked_read,
    "marked_unread": UserImage._marked_unread,
    "moved": UserImage._moved,
    "message_deleted": UserImage._message_deleted,
    "thread_deleted": UserImage._thread_deleted,
    "sender_blocked": UserImage._sender_blocked,
    "sender_unblocked": UserImage._sender_unblocked,
    "folder_seen": UserImage._folder_seen,
    "outbound_settled": UserImage._outbound_settled,
    "sms_set": UserImage._sms_set,
}


def _diff(left: Any, right: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit or left == right:
        return
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(left.keys() | right.keys(), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in right:
                out.append(f"{where}: only in the first")
            elif key not in left:
                out.append(f"{where}: only in the second")
            else:
                _diff(left[key], right[key], where, out, limit)
            if len(out) >= limit:
                return
    elif isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            _diff(a, b, f"{path}[{index}]", out, limit)
    else:
        out.append(f"{path}: {_short(left)} != {_short(right)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
