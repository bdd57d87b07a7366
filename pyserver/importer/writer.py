"""One user's new records appended to that user's log as one batch, threads rebuilt.

`UserWriter.write(user, records)` reads the user's image as the log makes it
(snapshot + replay, the app server's own code), leaves out every record the
mailbox already has (its key from the same sender, or its message id: an
import run twice, or a mail the cell received live), and turns the rest,
oldest first, into `message_added` entries:

* the thread: the one of the message it answers (In-Reply-To/References for
  mail, `in_reply_to` for JSON lines) when the mailbox has it, else the
  conversation of its users and outside addresses (`thread_id_for`, the same
  thread the app server puts live messages of the same people in, whatever the
  channel);
* the folder: every message of a thread is filed where its latest message
  from someone else was filed in the source (the user's own messages follow
  the thread; a thread of only the user's own messages is in Sent);
* unread as the source said; `ts` the message's own time; the message id the
  one a live delivery of it would get (`message_id_for(sender, key)`).

The entries and the bodies (`m` family) go in one `LogAppend`, a
compare-and-set on the user's last sequence number: a live server that owns
the user loses nothing (its next write finds the newer log and reloads), and a
write that loses the race is planned again on the newer log. An image that is
`snapshot_every` entries ahead of its snapshot gets a new one, so a server
loads the user without replaying the whole import. The search index is left
to the server, which indexes a log past its index mark before a search reads
it (pyserver.app.indexer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pyserver import logcodec
from pyserver.app.image import SnapshotOutdated, UserImage, thread_id_for
from pyserver.app.mailbox import message_id_for, snippet_of
from pyserver.app.residency import Residency
from pyserver.errors import LogCorrupt
from pyserver.importer.records import ImportRecord
from pyserver.store.base import LogAppend, LogStore, WriteConflict

__all__ = ["UserWriter", "Written"]

# Entries appended at once at the most (a user with more history gets several batches).
MAX_BATCH = 5_000
_ATTEMPTS = 5
_RECEIVED_FOLDERS = ("inbox", "other", "archived", "spam")


@dataclass(slots=True)
class Written:
    """What one user's write did."""

    added: int = 0
    skipped: int = 0
    bytes: int = 0


class UserWriter:
    """Writes users' records to a log store (see the module docstring)."""

    def __init__(self, store: LogStore, snapshot_every: int = 200) -> None:
        self._store = store
        self._snapshot_every = snapshot_every
        # the app server's loader, used for its replay only (no cache, no commits)
        self._residency = Residency(
            store,
            cache_max_users=1,
            cache_max_bytes=1 << 20,
            snapshot_every=snapshot_every,
            conflict_retries=0,
            clock=lambda: time.time_ns() // 1000,
            on_commit=lambda *_: None,
        )

    async def image(self, user: int) -> UserImage:
        """The user's image at the end of the log, from its snapshot and what follows it."""
        image = UserImage()
        if await self._store.last_seq(user) == 0:
            return image
        stored = await self._store.read_snapshot(user)
        if stored is not None:
            try:
                image = UserImage.from_snapshot(stored[1])
                image.snapshot_seq = image.seq
            except (SnapshotOutdated, LogCorrupt):
                image = UserImage()
        await self._residency.replay(user, image)
        return image

    async def write(self, user: int, records: Sequence[ImportRecord]) -> Written:
        """Append the records the user's mailbox lacks; what was added and skipped."""
        ordered = sorted(records, key=lambda record: record.ts)
        written = Written()
        for start in range(0, len(ordered), MAX_BATCH):
            batch = ordered[start : start + MAX_BATCH]
            for attempt in range(_ATTEMPTS):
                image = await self.image(user)
                base = image.seq
                plan = _plan(user, image, batch)
                if plan.entries:
                    try:
                        await self._store.append(
                            LogAppend(user, base, plan.records, messages=plan.bodies)
                        )
                    except WriteConflict:
                        if attempt + 1 == _ATTEMPTS:
                            raise
                        continue
                    if plan.last_seq - image.snapshot_seq >= self._snapshot_every:
                        for entry, body in zip(plan.entries, plan.body_dicts, strict=True):
                            image.apply(entry, body)
                        await self._store.write_snapshot(user, image.seq, image.to_snapshot())
                written.added += len(plan.entries)
                written.skipped += len(batch) - len(plan.entries)
                written.bytes += plan.bytes
                break
        return written

    async def write_many(
        self, items: Sequence[tuple[int, Sequence[ImportRecord]]]
    ) -> list[Written]:
        """`write` of several users at once, in order. Every user's batch is planned as if
        the user were new (an import's usual case) and appended at the log's start, all
        the appends handed to the store together (one group commit on the embedded
        store, in flight at once on a cluster's): nothing is read first. A user whose
        log is not empty loses that compare-and-set, and is written by `write` (planned
        on the image the log makes, so what the mailbox has is skipped), as is a user
        with more than one batch of records."""
        single: list[tuple[int, Sequence[ImportRecord]]] = []
        seen: set[int] = set()
        for user, records in items:
            if len(records) <= MAX_BATCH and user not in seen:
                seen.add(user)
                single.append((user, records))
        images = [UserImage() for _ in single]
        planned: dict[int, tuple[UserImage, _Plan, int]] = {}
        for (user, records), image in zip(single, images, strict=True):
            ordered = sorted(records, key=lambda record: record.ts)
            planned[user] = (image, _plan(user, image, ordered), len(ordered))
        outcomes = await asyncio.gather(
            *(
                self._store.append(LogAppend(user, image.seq, plan.records, messages=plan.bodies))
                for user, (image, plan, _) in planned.items()
                if plan.entries
            ),
            return_exceptions=True,
        )
        appended = [user for user, (_, plan, _) in planned.items() if plan.entries]
        lost: set[int] = set()
        for user, outcome in zip(appended, outcomes, strict=True):
            if isinstance(outcome, WriteConflict):
                lost.add(user)
            elif isinstance(outcome, BaseException):
                raise outcome
        snapshots = []
        for user in appended:
            image, plan, _ = planned[user]
            if user not in lost and plan.last_seq - image.snapshot_seq >= self._snapshot_every:
                for entry, body in zip(plan.entries, plan.body_dicts, strict=True):
                    image.apply(entry, body)
                snapshots.append(self._store.write_snapshot(user, image.seq, image.to_snapshot()))
        await asyncio.gather(*snapshots)
        results: list[Written] = []
        for user, records in items:
            if user in planned and user not in lost:
                _, plan, count = planned.pop(user)
                results.append(Written(len(plan.entries), count - len(plan.entries), plan.bytes))
            else:  # too many for one batch, or a live write came first: plan it again
                results.append(await self.write(user, records))
        return results


@dataclass(slots=True)
class _Plan:
    entries: list[dict[str, Any]]
    records: list[bytes]
    bodies: dict[str, bytes]
    body_dicts: list[dict[str, Any]]
    bytes: int
    last_seq: int


def _plan(user: int, image: UserImage, batch: Sequence[ImportRecord]) -> _Plan:
    """The entries of the batch's new records, to follow the image's last entry (the image
    is left as it is: it gets them only if a snapshot is written)."""
    answered = _answered(image)
    conversations: dict[tuple[tuple[int, ...], tuple[str, ...]], str] = {}
    fresh: list[tuple[ImportRecord, str, str]] = []  # (record, message id, thread id)
    seen: set[str] = set()
    for record in batch:
        message_id = message_id_for(record.sender, record.key)
        if (
            message_id in seen
            or message_id in image.messages
            or image.key_result(record.sender, record.key) is not None
        ):
            continue
        seen.add(message_id)
        thread_id = next((answered[r] for r in record.reply_to if r in answered), None)
        if thread_id is None:
            people = (record.participants, record.addresses)
            thread_id = conversations.get(people)
            if thread_id is None:
                thread_id = conversations[people] = thread_id_for(*people)
        answered.setdefault(record.key, thread_id)
        header = record.extra.get("message_id_header")
        if header:
            answered.setdefault(header, thread_id)
        fresh.append((record, message_id, thread_id))
    folders = _folders(user, image, fresh)
    plan = _Plan([], [], {}, [], 0, image.seq)
    for record, message_id, thread_id in fresh:
        entry = {
            "seq": plan.last_seq + 1,
            "ts": max(record.ts, 1),
            "action": "message_added",
            "message_id": message_id,
            "thread_id": thread_id,
            "sender": record.sender,
            "participants": list(record.participants),
            "channel": record.channel,
            "folder": folders[thread_id],
            "unread": record.unread,
            "subject": record.subject,
            "snippet": snippet_of(record.text),
            "body_ref": message_id,
            "key": record.key,
        }
        body = {"text": record.text, "from": record.sender_address, "extra": record.extra}
        plan.records.append(logcodec.encode(entry))
        plan.bodies[message_id] = orjson.dumps(body)
        plan.body_dicts.append(body)
        plan.entries.append(entry)
        plan.last_seq += 1
        plan.bytes += record.size
    return plan


def _answered(image: UserImage) -> dict[str, str]:
    """The threads of the messages the mailbox has, by key and by Message-ID header."""
    found: dict[str, str] = {}
    for scoped, (_, thread_id, _, _) in image.keys.items():
        found.setdefault(scoped.partition(":")[2], thread_id)
    for message in image.messages.values():
        header = message.extra.get("message_id_header")
        if header:
            found.setdefault(header, message.thread_id)
    return found


def _folders(
    user: int, image: UserImage, fresh: list[tuple[ImportRecord, str, str]]
) -> dict[str, str]:
    """Each thread's folder: where its latest message from someone else was filed."""
    folders: dict[str, str] = {}
    for thread_id, thread in image.threads.items():
        folders[thread_id] = thread.folder
    received: dict[str, str] = {}
    for record, _, thread_id in fresh:  # oldest first: the latest wins
        if record.sender != user or (
            record.folder in _RECEIVED_FOLDERS and record.folder != "inbox"
        ):
            received[thread_id] = record.folder if record.folder != "sent" else "inbox"
    for _, _, thread_id in fresh:
        if thread_id in received:
            folders[thread_id] = received[thread_id]
        else:
            folders.setdefault(thread_id, "sent")
    return folders
