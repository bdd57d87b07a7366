"""A user's past, read from the log: the audit trail, the mailbox at a moment, the restore.

The per-user log is the truth (docs/log-format.md), and it is append-only, so it
holds every state the mailbox has been in. This module owns three readings of it
(docs/history.md is the reference):

1. **The audit trail** (`read_history`): each entry with its sequence number, its
   time, its action described in words, its channel (recorded on `message_added`
   entries only) and, when it was written by a restore, which restore. The log
   records no client or process: the trail cannot say who wrote an entry.
2. **The mailbox at a time** (`image_at`): the image rebuilt from the log's
   longest prefix whose entries all carry a time at or before TIME (entries are
   in sequence order; a later entry may carry an earlier time, e.g. a restored
   or imported message keeps its own date, and does not count before the entry
   ahead of it). Replay starts from the stored snapshot when that snapshot lies
   inside the prefix, else from the log's first entry; when the log's beginning
   is gone and no usable snapshot covers it, `PastUnavailable` names the
   earliest time that can be shown.
3. **The restore** (`plan_restore`, `restore_change`): the entries that bring the
   current mailbox back to the one at TIME for what a restore promises: every
   thread and message present then is present again, in the folder its thread
   was in, with the read state it had. Nothing that arrived later is removed.
   The entries are ordinary log entries appended after the others (a restored
   message keeps its own date); which entries a restore wrote is recorded in the
   same atomic append, in the user's `m` row `RESTORES_KEY`.

Calls the store's log, snapshot and `m` reads, the blob store (stat, read, put), the
image and the log codec; nothing above it (the mailbox calls it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from pyserver.app import inlineraw
from pyserver.app.image import FOLDERS, Message, UserImage
from pyserver.app.indexer import search_terms
from pyserver.app.residency import decode_stored_page
from pyserver.blobs import access as blob_access
from pyserver.blobs.base import BlobStore
from pyserver.errors import BadRequest, LogCorrupt, PyserverError
from pyserver.store.base import RESTORES_RECORD, LogStore

__all__ = [
    "RESTORES_KEY",
    "Past",
    "PastUnavailable",
    "RestorePlan",
    "describe",
    "format_time",
    "image_at",
    "parse_time",
    "plan_restore",
    "read_history",
    "restorable_view",
    "restore_change",
    "restores",
    "show",
]

# The `m` row (beside the message bodies; pyserver.store.base.USER_RECORDS) that lists
# the user's restores: {"restores": [{first_seq, last_seq, at, at_seq, ts, by}]}.
RESTORES_KEY = RESTORES_RECORD
# Log records read per store call.
_PAGE = 1_000
HISTORY_PAGE = (200, 1_000)
SHOW_THREADS = (50, 500)
# The bytes of entries or threads one reply carries at most (a frame holds 1 MiB by
# default); a page that reaches it ends early, and `next` or `more` says so.
REPLY_BUDGET = 512 << 10
_UNIX = re.compile(r"^\d+(\.\d+)?$")
# The largest time a u64 microsecond count holds.
_MAX_US = (1 << 64) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PastUnavailable(BadRequest):
    """The log no longer reaches back to that time (its beginning was compacted away)."""

    def __init__(self, user_id: int, first_seq: int, earliest_us: int | None) -> None:
        gone = f"at: the log of user {user_id} before seq {first_seq} was compacted away"
        if earliest_us is None:
            super().__init__(f"{gone} and no snapshot covers it: no time can be shown")
        else:
            super().__init__(
                f"{gone}; the earliest time that can be shown is {format_time(earliest_us)} "
                f"(unix {earliest_us / 1e6:.6f})"
            )
        self.earliest_us = earliest_us


# ---- times ----


def parse_time(value: Any, name: str = "at") -> int:
    """A moment as microseconds since the epoch: unix seconds (an int, a float or their
    decimal digits) or an ISO 8601 string (a time without a zone is UTC). Exact to the
    microsecond for digits and ISO strings. BadRequest otherwise."""
    if isinstance(value, bool):
        raise BadRequest(f"{name}: must be unix seconds or an ISO 8601 time, not a bool")
    if isinstance(value, int):
        us = value * 1_000_000
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BadRequest(f"{name}: {value!r} is not a time")
        us = round(value * 1_000_000)
    elif isinstance(value, str) and _UNIX.match(value.strip()):
        us = int((Decimal(value.strip()) * 1_000_000).to_integral_value())
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise BadRequest(
                f"{name}: {value!r} is neither unix seconds nor an ISO 8601 time"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        us = (moment - _EPOCH) // timedelta(microseconds=1)
    else:
        kind = type(value).__name__
        raise BadRequest(f"{name}: must be unix seconds or an ISO 8601 time, not {kind}")
    if not 0 <= us <= _MAX_US:
        raise BadRequest(f"{name}: {value!r} is out of range")
    return us


def format_time(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC (microseconds shown when not zero)."""
    moment = datetime.fromtimestamp(us / 1e6, UTC)
    spec = "microseconds" if us % 1_000_000 else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


# ---- reading the log ----


async def _pages(
    store: LogStore, user_id: int, after: int = 0, until: int | None = None
) -> AsyncIterator[list[dict[str, Any]]]:
    """The log's entries after seq `after` (up to `until`), decoded, a page at a time."""
    while until is None or after < until:
        limit = _PAGE if until is None else min(_PAGE, until - after)
        page = await store.read_log(user_id, after, limit)
        if not page:
            return
        yield decode_stored_page(page)
        after = page[-1][0]
        if len(page) < limit:
            return


async def _bodies(store: LogStore, user_id: int, refs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored bodies (JSON objects) of these refs that exist and parse."""
    refs = list(dict.fromkeys(refs))
    if not refs:
        return {}
    out = {}
    for ref, raw in (await store.get_messages(user_id, refs)).items():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict):
            out[ref] = body
    return out


async def restores(store: LogStore, user_id: int) -> list[dict[str, Any]]:
    """The user's restores, oldest first (the `RESTORES_KEY` row)."""
    row = (await _bodies(store, user_id, [RESTORES_KEY])).get(RESTORES_KEY) or {}
    found = row.get("restores")
    return found if isinstance(found, list) else []


# ---- 1. the audit trail ----


def describe(entry: dict[str, Any]) -> str:
    """One log entry in words."""
    action = entry["action"]
    if action == "message_added":
        sender = "an outside sender" if entry["sender"] == 0 else f"user {entry['sender']}"
        state = "unread" if entry["unread"] else "read"
        subject = f" {entry['subject']!r}" if entry["subject"] else ""
        return (
            f"message {entry['message_id']}{subject} from {sender} by {entry['channel']}, "
            f"{state}, filed in {entry['folder']} (thread {entry['thread_id']})"
        )
    if action in ("marked_read", "marked_unread"):
        which = f"message {entry['message_id']}" if entry["message_id"] else "every message"
        return f"{which} of thread {entry['thread_id']} marked {action[7:]}"
    if action == "moved":
        return f"thread {entry['thread_id']} moved to {entry['folder']}"
    if action == "message_deleted":
        return f"message {entry['message_id']} of thread {entry['thread_id']} deleted"
    if action == "thread_deleted":
        return f"thread {entry['thread_id']} deleted"
    if action in ("sender_blocked", "sender_unblocked"):
        return f"user {entry['sender']} {action[7:]}"
    if action == "folder_seen":
        return f"folder {entry['folder']} seen"
    if action == "outbound_settled":
        detail = f" ({entry['detail']})" if entry["detail"] else ""
        return f"message {entry['message_id']} to {entry['address']}: {entry['outcome']}{detail}"
    if action == "sms_set":
        if not entry["phone"]:
            return "texts turned off"
        return f"texts to {entry['phone']}: {entry['mode']}"
    return action


def _restore_of(seq: int, known: list[dict[str, Any]]) -> dict[str, Any] | None:
    for restore in known:
        if restore.get("first_seq", 0) <= seq <= restore.get("last_seq", -1):
            return restore
    return None


async def read_history(
    store: LogStore,
    user_id: int,
    after: int = 0,
    limit: int = HISTORY_PAGE[0],
    thread_id: str | None = None,
    since_us: int | None = None,
) -> dict[str, Any]:
    """A page of the audit trail: the entries among the `limit` after seq `after` that
    name thread `thread_id` and carry a time at or after `since_us` (when given), oldest
    first.

    Each item: seq, ts (microseconds) and time (ISO 8601), action, channel (None
    but for message_added), what (in words), fields (the entry's own), and
    restore (the restore that wrote it, or None). `next` is the seq to ask after
    for the next page (None at the end); a page may hold fewer items than it looked
    at, none even, when filtered.
    """
    known = await restores(store, user_id)
    items: list[dict[str, Any]] = []
    size = 0
    entries = [entry async for page in _pages(store, user_id, after, after + limit)
               for entry in page]  # fmt: skip
    scanned = after
    for entry in entries:
        if (thread_id is not None and entry.get("thread_id") != thread_id) or (
            since_us is not None and entry["ts"] < since_us
        ):
            scanned = entry["seq"]
            continue
        fields = {k: v for k, v in entry.items() if k not in ("seq", "ts", "action")}
        restore = _restore_of(entry["seq"], known)
        item = {
            "seq": entry["seq"],
            "ts": entry["ts"],
            "time": format_time(entry["ts"]),
            "action": entry["action"],
            "channel": entry.get("channel"),
            "what": describe(entry),
            "fields": fields,
            "restore": None
            if restore is None
            else {
                "at": format_time(restore["at"]),
                "at_seq": restore["at_seq"],
                "time": format_time(restore["ts"]),
                "by": restore.get("by", ""),
            },
        }
        size += len(orjson.dumps(item))
        if items and size > REPLY_BUDGET:
            break  # the rest on the next page: a reply stays well inside a frame
        items.append(item)
        scanned = entry["seq"]
    last_seq = await store.last_seq(user_id)
    return {
        "user": user_id,
        "last_seq": last_seq,
        "entries": items,
        "next": scanned if after < scanned < last_seq else None,
    }


# ---- 2. the mailbox at a time ----


@dataclass(slots=True)
class Past:
    """The image at a time and how it was made.

    `seq`: the last log entry it holds (the prefix's end); `start`: the snapshot's
    seq it was replayed from (0: the log's beginning); `added`: the message_added
    entries it replayed, by message id (those before a snapshot start are absent).
    """

    image: UserImage
    at: int
    seq: int
    start: int
    last_seq: int
    added: dict[str, dict[str, Any]] = field(default_factory=dict)


async def image_at(store: LogStore, user_id: int, at_us: int, use_snapshot: bool = True) -> Past:
    """The user's image as the log made it at `at_us` (see the module docstring).

    Two passes over the log, a page at a time (memory: a page and the image): the
    first finds where the log starts and where the prefix ends, the second replays
    the prefix from the snapshot (when `use_snapshot` and it lies inside the prefix,
    or when the log's beginning is gone) or from the log's first entry.
    """
    stored = await store.read_snapshot(user_id)
    snapshot_seq = stored[0] if stored is not None else -1
    first_seq: int | None = None
    cutoff = 0
    closed = False
    snapshot_ts = 0  # the latest time among the stored entries up to the snapshot
    async for page in _pages(store, user_id):
        for entry in page:
            if first_seq is None:
                first_seq, cutoff = entry["seq"], entry["seq"] - 1
            if not closed:
                if entry["ts"] <= at_us:
                    cutoff = entry["seq"]
                else:
                    closed = True
            if entry["seq"] <= snapshot_seq:
                snapshot_ts = max(snapshot_ts, entry["ts"])
        if closed and page[-1]["seq"] >= snapshot_seq:
            break
    first_seq = first_seq or 1
    trimmed = first_seq > 1
    snapshot = _snapshot_image(stored) if stored is not None else None
    covers = snapshot is not None and snapshot_seq >= first_seq - 1
    start_image = None
    if covers and (use_snapshot or trimmed) and snapshot_seq <= cutoff:
        start_image = snapshot
    if start_image is None and trimmed:
        raise PastUnavailable(user_id, first_seq, snapshot_ts if covers else None)
    image = start_image or UserImage()
    past = Past(image, at_us, cutoff, image.seq, await store.last_seq(user_id))
    async for page in _pages(store, user_id, image.seq, cutoff):
        bodies = await _bodies(store, user_id, (e["body_ref"] for e in page if "body_ref" in e))
        for entry in page:
            body = bodies.get(entry["body_ref"]) if "body_ref" in entry else None
            image.apply(entry, body)
            if entry["action"] == "message_added":
                past.added.setdefault(entry["message_id"], entry)
    return past


def _snapshot_image(stored: tuple[int, bytes]) -> UserImage | None:
    """The image a stored snapshot holds, or None if it is unreadable or not at its seq."""
    try:
        image = UserImage.from_snapshot(stored[1])
    except LogCorrupt:
        return None
    return image if image.seq == stored[0] else None


def show(past: Past, limit: int = SHOW_THREADS[0]) -> dict[str, Any]:
    """What `admin show` prints: counts and each folder's newest threads at that time."""
    image = past.image
    folders = {}
    size = 0
    for folder in FOLDERS:
        threads, more = image.newest_threads(folder, limit)
        summaries = []
        for thread in threads:
            summary = thread.to_summary()
            size += len(orjson.dumps(summary))
            if size > REPLY_BUDGET:
                more = True  # the reply stays well inside a frame
                break
            summaries.append(summary)
        folders[folder] = {
            "threads": summaries,
            "total": sum(1 for t in image.threads.values() if t.folder == folder),
            "more": more,
        }
    return {
        "at": format_time(past.at),
        "at_us": past.at,
        "seq": past.seq,
        "last_seq": past.last_seq,
        "replayed_from": past.start,
        "threads": len(image.threads),
        "messages": len(image.messages),
        "counts": image.counts(),
        "folders": folders,
    }


def restorable_view(image: UserImage) -> dict[str, Any]:
    """What a restore promises, as plain data: thread id -> its folder, participants and
    messages (id -> unread, sender, channel, ts, subject, text)."""
    return {
        thread.thread_id: {
            "folder": thread.folder,
            "participants": thread.participants,
            "messages": {
                m.message_id: {
                    "unread": m.unread,
                    "sender": m.sender,
                    "channel": m.channel,
                    "ts": m.ts,
                    "subject": m.subject,
                    "text": m.text,
                }
                for m in thread.messages.values()
            },
        }
        for thread in image.threads.values()
    }


# ---- 3. the restore ----


@dataclass(slots=True)
class RestorePlan:
    """The entries (without seq) that bring `current` back to `past`, and what they do."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    # ids of the messages added back, of the threads moved back, of the marks changed
    messages: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)


def _original_entry(image: UserImage, message: Message, known: dict[str, Any] | None) -> dict:
    """The message_added entry that added `message` (rebuilt from the image when the
    replay started from a snapshot: body_ref is the message id, as the mailbox writes it)."""
    if known is not None:
        return known
    key = ""
    for scoped, first in image.keys.items():
        if first[0] == message.message_id:
            key = scoped.split(":", 1)[1]
            break
    return {
        "ts": message.ts,
        "message_id": message.message_id,
        "sender": message.sender,
        "channel": message.channel,
        "subject": message.subject,
        "snippet": message.snippet,
        "body_ref": message.message_id,
        "key": key,
    }


def plan_restore(current: UserImage, past: Past) -> RestorePlan:
    """The compensating entries, in the order they must be applied:

    1. each thread of the past that exists now in another folder: `moved` back;
    2. each message of the past missing now: `message_added` again, with its own
       id, date, sender, channel, subject, body reference and key, its thread's
       past folder and participants, and its past read state;
    3. each message of the past present now with another read state: marked back.
    """
    plan = RestorePlan()
    then = past.image
    for thread in then.threads.values():
        now = current.threads.get(thread.thread_id)
        if now is not None and now.folder != thread.folder:
            plan.entries.append(
                {"action": "moved", "thread_id": thread.thread_id, "folder": thread.folder}
            )
            plan.moved.append(thread.thread_id)
    for thread in then.threads.values():
        for message in thread.messages.values():
            if message.message_id in current.messages:
                continue
            original = _original_entry(then, message, past.added.get(message.message_id))
            plan.entries.append(
                {
                    "ts": original["ts"],
                    "action": "message_added",
                    "message_id": message.message_id,
                    "thread_id": thread.thread_id,
                    "sender": original["sender"],
                    "participants": list(thread.participants),
                    "channel": original["channel"],
                    "folder": thread.folder,
                    "unread": message.unread,
                    "subject": original["subject"],
                    "snippet": original["snippet"],
                    "body_ref": original["body_ref"],
                    "key": original["key"],
                }
            )
            plan.messages.append(message.message_id)
    for thread in then.threads.values():
        for message in thread.messages.values():
            now_message = current.messages.get(message.message_id)
            if now_message is None or now_message.unread == message.unread:
                continue
            action = "marked_unread" if message.unread else "marked_read"
            plan.entries.append(
                {"action": action, "thread_id": thread.thread_id, "message_id": message.message_id}
            )
            plan.marked.append(message.message_id)
    return plan


async def _settlements(
    store: LogStore, user_id: int, after: int, message_ids: set[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The latest `outbound_settled` of each (message, address) among these messages in
    the log after seq `after`."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if not message_ids:
        return found
    async for page in _pages(store, user_id, after):
        for entry in page:
            if entry["action"] == "outbound_settled" and entry["message_id"] in message_ids:
                found[(entry["message_id"], entry["address"])] = entry
    return found


async def _keep_blob(blobs: BlobStore | None, ref: str) -> bool:
    """Whether a restored message's blob is still there; if so it is stored again (its
    bytes, read back), which refreshes its time as any writer of a message does before
    committing it, so a blob collection under way cannot take it (docs/operations.md)."""
    if blobs is None:
        return False
    try:
        if await blobs.stat(ref) is None:
            return False
        return (await blobs.put(blobs.read(ref))).ref == ref
    except PyserverError:  # gone meanwhile, or corrupt
        return False


async def restore_change(
    store: LogStore,
    blobs: BlobStore | None,
    user_id: int,
    at_us: int,
    current: UserImage,
    by: str,
    now_us: int,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[tuple[str, str]], dict[str, Any]]:
    """(entries, bodies, terms, report) of a restore of `current` to the mailbox at `at_us`.

    `bodies` are what the append writes to the `m` family: the restored messages'
    stored bodies (written again as they are) and the `RESTORES_KEY` row with this
    restore added (when there are entries). A message whose body the store lost
    comes back with its snippet as its text; blobs (attachments, a long body, the raw
    mail) that are gone are named in the report, and those still there are stored
    again first. A restored mail to outside addresses is never sent
    again: each address gets its latest settlement from the log, and one never
    settled is settled `failed` (the mail was deleted before it went out).
    """
    past = await image_at(store, user_id, at_us, use_snapshot=False)
    plan = plan_restore(current, past)
    entries = list(plan.entries)
    report: dict[str, Any] = {
        "user": user_id,
        "at": format_time(at_us),
        "at_seq": past.seq,
        "messages_restored": plan.messages,
        "threads_moved": plan.moved,
        "read_state_changed": plan.marked,
        "missing_bodies": [],
        "missing_blobs": [],
        "entries": len(entries),
    }
    if not entries:
        return [], {}, [], report
    added = [e for e in entries if e["action"] == "message_added"]
    stored = await _bodies(store, user_id, (e["body_ref"] for e in added))
    bodies: dict[str, dict[str, Any]] = {}
    terms: list[tuple[str, str]] = []
    outbound: set[str] = set()
    for entry in added:
        body = stored.get(entry["body_ref"])
        text = body.get("text") if body is not None else None
        words = search_terms(entry["subject"], text if isinstance(text, str) else entry["snippet"])
        terms.extend((word, entry["message_id"]) for word in words)
        if body is None:
            report["missing_bodies"].append(entry["message_id"])
            continue
        # the residency applies a change's bodies by message id
        bodies[entry["message_id"]] = body
        extra = body.get("extra") if isinstance(body.get("extra"), dict) else {}
        if extra.get("outbound"):
            outbound.add(entry["message_id"])
        for ref in blob_access.blob_refs(extra):
            if inlineraw.names_inline(extra, ref):  # its bytes come back with the body
                continue
            if ref and not await _keep_blob(blobs, ref):
                report["missing_blobs"].append({"message_id": entry["message_id"], "ref": ref})
    settled = await _settlements(store, user_id, 0, outbound)
    for message_id in sorted(outbound, key=plan.messages.index):
        for address in bodies[message_id]["extra"]["outbound"]:
            latest = settled.get((message_id, address))
            outcome, detail = (
                (latest["outcome"], latest["detail"])
                if latest is not None
                else ("failed", "deleted before it was sent; a restore sends nothing")
            )
            entries.append(
                {
                    "action": "outbound_settled",
                    "message_id": message_id,
                    "address": address,
                    "outcome": outcome,
                    "detail": detail,
                }
            )
    first_seq = current.seq + 1
    record = {
        "first_seq": first_seq,
        "last_seq": current.seq + len(entries),
        "at": at_us,
        "at_seq": past.seq,
        "ts": now_us,
        "by": by,
    }
    report["entries"] = len(entries)
    report["first_seq"] = record["first_seq"]
    report["last_seq"] = record["last_seq"]
    known = await restores(store, user_id)
    bodies[RESTORES_KEY] = {"restores": [*known, record]}
    return entries, bodies, terms, report
