"""Where user images live: loaded, cached, written through, snapshotted, given back.

`Residency` owns one app server's images of its users (`pyserver.app.image.UserImage`)
and everything about keeping them true to the log: the write-through cache with the
reply table beside it (`pyserver.app.imagecache`), one lock per user, loading (snapshot
plus log replay), the commit of a write (the compare-and-set append, then the image),
background snapshots, giving users back when ownership moves, and the search index
derived from the log (`pyserver.app.indexer`). The operations (`pyserver.app.mailbox`)
see one narrow interface: `check_owner`, `cached`, `read`, `update` with a `Change`
decided against the current image, and the admin calls (rebuild, export, import).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pyserver import logcodec
from pyserver.app.image import SnapshotOutdated, UserImage
from pyserver.app.imagecache import AnswerAgain, ImageCache
from pyserver.app.indexer import SearchIndexer, search_terms
from pyserver.errors import BadRequest, LogCorrupt, NotOwner, Unavailable
from pyserver.store.base import LogAppend, LogStore, WriteConflict

__all__ = ["Change", "Residency"]

log = logging.getLogger(__name__)

# Log records read per store call while replaying or exporting.
_REPLAY_PAGE = 1_000
_IMPORT_BATCH = 500

# (user id, the image after the write, the entries written): told after each commit.
OnCommit = Callable[[int, UserImage, list[dict[str, Any]]], None]
# Writes of one user appended together at the most.
_MAX_GROUP = 256
# A large image is snapshotted again once this fraction (1/n) of its messages is newer.
_SNAPSHOT_FRACTION = 4


@dataclass(slots=True)
class Change:
    """What an operation decided to write (nothing, if `entries` is empty) and answer."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    terms: list[tuple[str, str]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Waiting:
    """A write waiting for its user's next group."""

    decide: Callable[[UserImage], Awaitable[Change]]
    # None for the write its own caller runs at once (`update`)
    future: asyncio.Future[tuple[Change, UserImage]] | None


def _settle(group: list[_Waiting], outcomes: list[Any]) -> None:
    """Hand each waiting write its outcome (a result, or the exception to raise)."""
    for waiting, outcome in zip(group, outcomes, strict=True):
        if waiting.future is None or waiting.future.done():  # its caller gave up
            continue
        if isinstance(outcome, BaseException):
            waiting.future.set_exception(outcome)
        else:
            waiting.future.set_result(outcome)


class Residency:
    """The user images of one app server (see the module docstring).

    `owns(user_id)` says whether this server may serve a user now; when it may not,
    `owner_of(user_id)` names the owner ("host:port", for NOT_OWNER) or None
    (UNAVAILABLE). Both default to a single node that owns everyone.
    """

    def __init__(
        self,
        store: LogStore,
        *,
        cache_max_users: int,
        cache_max_bytes: int,
        snapshot_every: int,
        conflict_retries: int,
        clock: Callable[[], int],
        on_commit: OnCommit,
        owns: Callable[[int], bool] | None = None,
        owner_of: Callable[[int], str | None] | None = None,
        answer_again: AnswerAgain | None = None,
        check_load: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        # asked before a user's image is loaded; raises when this server may not serve
        # that user (moved to another cell: pyserver.discovery.moved)
        self._check_load = check_load
        self._snapshot_every = snapshot_every
        self._conflict_retries = conflict_retries
        self._clock = clock
        self._on_commit = on_commit
        self._owns = owns
        self._owner_of = owner_of
        # the images, and beside them the replies the server answers without Python
        # (answer_again: the operations' read code, which keeps those replies current)
        self._cache = ImageCache(cache_max_users, cache_max_bytes, answer_again)
        # search terms are derived from the log, written off the durable path of a write
        self.indexer = SearchIndexer(store, self.terms_of_log)
        # one lock per user with a write or a load under way; gone when nobody holds it
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._snapshot_tasks: set[asyncio.Task[None]] = set()
        self._snapshotting: set[int] = set()
        # writes waiting for their user's next group, the task committing each user's
        # groups, and the users whose image is out of the cache while a group changes it
        self._waiting: dict[int, list[_Waiting]] = {}
        self._leaders: dict[int, asyncio.Task[None] | None] = {}
        self._hidden: set[int] = set()
        # the owner epoch this server claimed when it last loaded each user (its fencing
        # token: the store refuses its appends once another server claimed the user)
        self._epochs: dict[int, int] = {}
        self._counters = dict.fromkeys(("conflicts", "snapshots", "snapshot_failures", "loads"), 0)

    @property
    def replies(self) -> Any:
        """The reply table that mirrors the cached images (pyserver.wire.replies)."""
        return self._cache.replies

    def forget_replies(self, user_ids: Iterable[int]) -> None:
        """Drop these users' ready-made replies, keeping their images."""
        self._cache.forget_replies(user_ids)

    def cached(self, user_id: int) -> UserImage | None:
        """The user's cached image (counted as a cache hit), or None without counting a
        miss: the caller then goes through `read`, which loads it and counts the miss."""
        if self._cache.peek(user_id) is None:
            return None
        return self._cache.get(user_id)

    def owns(self, user_id: int) -> bool:
        """Whether this server serves the user now (always, outside a cluster)."""
        return self._owns is None or self._owns(user_id)

    def check_owner(self, user_id: int) -> None:
        if self.owns(user_id):
            return
        owner = self._owner_of(user_id) if self._owner_of is not None else None
        if owner:
            raise NotOwner(f"user {user_id} is served by {owner}", owner)
        raise Unavailable(f"this server does not serve user {user_id} now")

    def _lock(self, user_id: int) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    async def read(self, user_id: int) -> UserImage:
        """The user's image for a read: the cached one, else loaded (under the user's lock)."""
        self.check_owner(user_id)
        image = self._cache.get(user_id)
        if image is not None:
            return image
        async with self._lock(user_id):
            image = self._cache.peek(user_id)
            return image if image is not None else await self._load(user_id)

    async def update(
        self, user_id: int, decide: Callable[[UserImage], Awaitable[Change]]
    ) -> tuple[Change, UserImage]:
        """Decide a write against the current image and commit it; (change, image).

        Writes of one user run one group at a time, in arrival order: a write that
        finds nothing under way lets the event loop turn once, and leads a group of
        itself and the writes that arrived meanwhile; those that arrive while a
        group commits form the next one, decided one after another
        against the image (each sees the ones before it) and appended together in
        one compare-and-set (group commit per user). A lost compare-and-set (another
        writer appended first) drops the image, re-checks ownership, reloads and
        decides the group again, a few times, before the WriteConflict (CONFLICT)
        reaches the callers.
        """
        self.check_owner(user_id)
        loop = asyncio.get_running_loop()
        if user_id in self._leaders:  # a group is under way: join the next one
            future: asyncio.Future[tuple[Change, UserImage]] = loop.create_future()
            self._waiting.setdefault(user_id, []).append(_Waiting(decide, future))
            return await future
        # Nothing under way: this call leads the next group. It lets the event loop
        # turn once first, so writes of this user that came in the same reads (a
        # pipelined connection's frames, a relay link's copies) join it.
        self._leaders[user_id] = None
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._hand_over(user_id)
            raise
        if self._waiting.get(user_id):
            # Others came: one task commits them all, this write first, so no
            # caller's cancellation reaches the writes of the others.
            future = loop.create_future()
            self._waiting[user_id].insert(0, _Waiting(decide, future))
            self._leaders[user_id] = loop.create_task(self._lead(user_id))
            return await future
        # Alone: written at once, as a group of one; whatever queues meanwhile goes
        # to a task that goes on group after group.
        try:
            outcome = (await self._write_group(user_id, [_Waiting(decide, None)]))[0]
        finally:
            self._hand_over(user_id)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _hand_over(self, user_id: int) -> None:
        """The leader is done: a task commits what queued meanwhile, if anything did."""
        if self._waiting.get(user_id):
            self._leaders[user_id] = asyncio.get_running_loop().create_task(self._lead(user_id))
        else:
            del self._leaders[user_id]

    async def _lead(self, user_id: int) -> None:
        """Commit the user's waiting writes, group after group, until none is left."""
        try:
            while waiting := self._waiting.pop(user_id, None):
                group = [entry for entry in waiting if entry.future and not entry.future.done()]
                if not group:  # every caller of these gave up
                    continue
                if len(group) > _MAX_GROUP:
                    self._waiting.setdefault(user_id, [])[:0] = group[_MAX_GROUP:]
                    group = group[:_MAX_GROUP]
                try:
                    outcomes = await self._write_group(user_id, group)
                except BaseException as exc:
                    outcomes = [exc] * len(group)
                    if isinstance(exc, asyncio.CancelledError):
                        _settle(group, outcomes)
                        raise
                _settle(group, outcomes)
        finally:
            self._leaders.pop(user_id, None)

    async def _write_group(
        self, user_id: int, group: list[_Waiting]
    ) -> list[tuple[Change, UserImage] | BaseException]:
        """Each write's outcome; raises what fails them all (ownership, the store)."""
        attempts = self._conflict_retries + 1
        for attempt in range(attempts):
            self.check_owner(user_id)
            async with self._lock(user_id):
                image = self._cache.get(user_id)
                if image is None:
                    image = await self._load(user_id)
                if user_id not in self._epochs:
                    # loaded without a claim (refused then: a full disk): claimed now. The
                    # image may be older than the claim, but an append from it then fails
                    # on the seq unless the log is still where the image ends.
                    self._epochs[user_id] = await self._store.claim(user_id)
                try:
                    if len(group) == 1:
                        return [await self._write_one(user_id, image, group[0].decide)]
                    return await self._write_many(user_id, image, group)
                except WriteConflict as exc:
                    self._counters["conflicts"] += 1
                    self._forget(user_id, image)
                    log.info("write conflict user=%d attempt=%d: %s", user_id, attempt + 1, exc)
                    if attempt + 1 == attempts:
                        raise
        raise AssertionError("unreachable")

    async def _write_one(
        self, user_id: int, image: UserImage, decide: Callable[[UserImage], Awaitable[Change]]
    ) -> tuple[Change, UserImage] | BaseException:
        """A group of one: decided against the image readers see, applied once durable."""
        try:
            change = await decide(image)
        except Exception as exc:
            return exc
        if change.entries:
            await self._commit(user_id, image, change)
        return change, image

    async def _write_many(
        self, user_id: int, image: UserImage, group: list[_Waiting]
    ) -> list[tuple[Change, UserImage] | BaseException]:
        """Several writes in one append. Each is applied to the image as soon as it is
        decided, so the next one sees it; the image is taken out of the cache meanwhile
        (reads wait on the user's lock), and put back only once the append is durable."""
        _, held = self._cache.take(user_id)  # the cached one is `image` (or it was not kept)
        self._hidden.add(user_id)
        expected = image.seq
        ts = self._clock()
        outcomes: list[Change | BaseException] = []
        records: list[bytes] = []
        bodies: dict[str, bytes] = {}
        terms: list[tuple[str, str]] = []
        try:
            for waiting in group:
                try:
                    change = await waiting.decide(image)
                    entries = [
                        {"seq": image.seq + offset, "ts": ts, **fields}
                        for offset, fields in enumerate(change.entries, start=1)
                    ]
                    encoded = [logcodec.encode(entry) for entry in entries]
                    message_bodies = {m: orjson.dumps(b) for m, b in change.bodies.items()}
                except Exception as exc:
                    outcomes.append(exc)
                    continue
                for entry in entries:
                    body = change.bodies.get(entry["message_id"]) if "body_ref" in entry else None
                    image.apply(entry, body)
                change.entries = entries
                records += encoded
                bodies.update(message_bodies)
                terms += change.terms
                outcomes.append(change)
            if records:
                # On any failure the image (ahead of the log, maybe) is not put back.
                await self._store.append(
                    LogAppend(
                        user_id,
                        expected,
                        records,
                        messages=bodies,
                        owner_epoch=self._epochs.get(user_id),
                    )
                )
        finally:
            self._hidden.discard(user_id)
        if records:
            self.indexer.committed(user_id, expected + 1, image.seq, terms)
        self._keep(user_id, image, held)
        for outcome in outcomes:
            if isinstance(outcome, Change) and outcome.entries:
                self._on_commit(user_id, image, outcome.entries)
        if self._snapshot_due(image):
            self._snapshot_soon(user_id, image)
        return [(o, image) if isinstance(o, Change) else o for o in outcomes]

    async def _commit(self, user_id: int, image: UserImage, change: Change) -> None:
        """Append the change's entries to the log, then apply them to the image and publish.

        On success `change.entries` are the full log entries (with seq and ts).
        """
        ts = self._clock()
        entries = [
            {"seq": image.seq + offset, "ts": ts, **fields}
            for offset, fields in enumerate(change.entries, start=1)
        ]
        write = LogAppend(
            user_id=user_id,
            expected_seq=image.seq,
            records=[logcodec.encode(entry) for entry in entries],
            messages={mid: orjson.dumps(body) for mid, body in change.bodies.items()},
            owner_epoch=self._epochs.get(user_id),
        )
        try:
            await self._store.append(write)
        except WriteConflict:
            raise
        except BaseException:
            # The outcome is unknown (a cancelled or failed call may still have
            # committed), so the image may be behind the log: reload next time.
            self._forget(user_id, image)
            raise
        for entry in entries:
            body = change.bodies.get(entry["message_id"]) if "body_ref" in entry else None
            image.apply(entry, body)
        change.entries = entries
        self.indexer.committed(user_id, entries[0]["seq"], entries[-1]["seq"], change.terms)
        self._keep(user_id, image)
        self._on_commit(user_id, image, entries)
        if self._snapshot_due(image):
            self._snapshot_soon(user_id, image)

    def _keep(
        self, user_id: int, image: UserImage, held: list[tuple[int, bytes]] | None = None
    ) -> None:
        """(Re)insert the image with its current weight; snapshot whatever that evicts.

        `held`: the reply keys `ImageCache.take` returned, to answer again."""
        if self._owns is not None and not self._owns(user_id):
            # Ownership moved (or the server was fenced) while this image was loaded or
            # written: another server may extend the log now, so keep nothing it outdates.
            self._forget(user_id, image)
            return
        evicted = self._cache.put(user_id, image, image.weight, held)
        seen: set[int] = set()
        for evicted_id, evicted_image in evicted:
            self._epochs.pop(evicted_id, None)
            if id(evicted_image) in seen:
                continue
            seen.add(id(evicted_image))
            if evicted_image.seq > evicted_image.snapshot_seq:
                self._snapshot_soon(evicted_id, evicted_image, evicted=True)

    def _forget(self, user_id: int, image: UserImage) -> None:
        """Drop this image from the cache (not a newer one that replaced it)."""
        if self._cache.peek(user_id) is image:
            self._cache.pop(user_id)

    async def drop_cached(self, user_id: int) -> bool:
        """Drop the user's cached image (after the log was extended around this server):
        the next request loads it from the store. Whether one was cached."""
        self.check_owner(user_id)
        async with self._lock(user_id):
            image = self._cache.peek(user_id)
            if image is None:
                return False
            self._forget(user_id, image)
            return True

    def release(self, keep: Callable[[int], bool] | None = None) -> int:
        """Drop the cached images of users this server no longer serves; how many went.

        Every image goes when `keep` is None, else those of users for whom
        `keep(user_id)` is false. Another server may write their logs now; a
        later request here loads them again from the store. Images ahead of
        their snapshot are snapshotted (in the background) on the way out, so
        the new owner replays less.
        """
        dropped = 0
        for user_id, image in self._cache.items():
            if keep is not None and keep(user_id):
                continue
            self._cache.pop(user_id)
            self._epochs.pop(user_id, None)
            dropped += 1
            if image.seq > image.snapshot_seq:
                self._snapshot_soon(user_id, image, evicted=True)
        return dropped

    async def _load(self, user_id: int) -> UserImage:
        """Snapshot + replay of the log after it; cached. The caller holds the user's lock."""
        if self._check_load is not None:
            await self._check_load(user_id)
        self._counters["loads"] += 1
        # Claimed before anything is read: an append of a server that claimed the user
        # earlier is in what this load reads, or refused by the store (fenced). A read
        # does without when the store refuses the claim (a full disk still reads); the
        # user's next write claims it first (`_write_group`).
        self._epochs.pop(user_id, None)
        try:
            self._epochs[user_id] = await self._store.claim(user_id)
        except Unavailable as exc:
            log.warning("user %d loaded without a claim: %s", user_id, exc)
        image = UserImage()
        stored = await self._store.read_snapshot(user_id)
        if stored is not None:
            seq, data = stored
            try:
                image = UserImage.from_snapshot(data)
                if image.seq != seq:
                    raise LogCorrupt(f"snapshot stored at seq {seq} holds seq {image.seq}")
                image.snapshot_seq = seq
            except SnapshotOutdated as exc:
                log.info("older snapshot user=%d, replaying the whole log: %s", user_id, exc)
                image = UserImage()
            except LogCorrupt as exc:
                # The log is the truth: do without the snapshot.
                log.error("unreadable snapshot user=%d, replaying the whole log: %s", user_id, exc)
                image = UserImage()
        await self.replay(user_id, image)
        self._keep(user_id, image)
        return image

    async def replay(self, user_id: int, image: UserImage, until: int | None = None) -> None:
        """Apply the stored log after `image.seq` (up to seq `until`, if given)."""
        while until is None or image.seq < until:
            limit = _REPLAY_PAGE if until is None else min(_REPLAY_PAGE, until - image.seq)
            page = await self._store.read_log(user_id, image.seq, limit)
            if not page:
                return
            entries = decode_stored_page(page)
            bodies = await self.bodies(user_id, entries)
            for entry in entries:
                image.apply(entry, bodies.get(entry["body_ref"]) if "body_ref" in entry else None)
            if len(page) < limit:
                return

    async def terms_of_log(self, user_id: int, after: int, until: int) -> list[tuple[str, str]]:
        """The search terms of the user's log entries after seq `after` up to `until`:
        those its messages were indexed under when written (`_adding`)."""
        terms: list[tuple[str, str]] = []
        while after < until:
            page = await self._store.read_log(user_id, after, min(_REPLAY_PAGE, until - after))
            if not page:
                break
            entries = decode_stored_page(page)
            bodies = await self.bodies(user_id, entries)
            for entry in entries:
                body = bodies.get(entry["body_ref"]) if "body_ref" in entry else None
                if body is not None:
                    text = body.get("text") if isinstance(body.get("text"), str) else ""
                    words = search_terms(entry.get("subject") or "", text)
                    terms.extend((word, entry["message_id"]) for word in words)
            after = page[-1][0]
        return terms

    async def bodies(
        self, user_id: int, entries: Iterable[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        refs = [entry["body_ref"] for entry in entries if "body_ref" in entry]
        if not refs:
            return {}
        bodies: dict[str, dict[str, Any]] = {}
        for ref, raw in (await self._store.get_messages(user_id, refs)).items():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict):
                bodies[ref] = body
            else:
                log.error("unreadable message body user=%d message=%s", user_id, ref)
        return bodies

    # ---- snapshots ----

    def _snapshot_due(self, image: UserImage) -> bool:
        """Whether the image is far enough ahead of its snapshot for a new one: every
        `snapshot_every` entries, or every quarter of its messages for a large image, so
        the work (proportional to the image, on the event loop) stays about the same per
        write however large a mailbox grows, and a load replays at most that much."""
        interval = max(self._snapshot_every, len(image.messages) // _SNAPSHOT_FRACTION)
        return image.seq - image.snapshot_seq >= interval

    def _snapshot_soon(self, user_id: int, image: UserImage, evicted: bool = False) -> None:
        """Write the image's snapshot in the background: the reply never waits for it."""
        if not evicted:
            if user_id in self._snapshotting:
                return  # one in flight already; the next commit asks again
            self._snapshotting.add(user_id)
        task = asyncio.get_running_loop().create_task(
            self._write_snapshot(user_id, image, release=not evicted)
        )
        self._snapshot_tasks.add(task)
        task.add_done_callback(self._snapshot_tasks.discard)

    async def _write_snapshot(self, user_id: int, image: UserImage, release: bool = False) -> None:
        try:
            if user_id in self._hidden:
                return  # a group is changing the image: it may be ahead of the log
            # seq and bytes taken together, with no await between them
            seq, data = image.seq, image.to_snapshot()
            await self._store.write_snapshot(user_id, seq, data)
            image.snapshot_seq = max(image.snapshot_seq, seq)
            self._counters["snapshots"] += 1
        except Exception:
            self._counters["snapshot_failures"] += 1
            log.exception("snapshot failed user=%d", user_id)
        finally:
            if release:
                self._snapshotting.discard(user_id)

    async def quiesce(self, user_id: int) -> None:
        """Let the user's writes already under way finish, then drop its cached image.

        For a user this server has just stopped serving (frozen for a move to
        another cell): a write that passed the ownership check before that
        holds or waits for the user's lock, so once the lock is ours no write
        of the user is left; later ones are refused by the ownership hooks.
        The image is snapshotted first when ahead of its last snapshot.
        """
        async with self._lock(user_id):
            image = self._cache.peek(user_id)
            if image is not None:
                self._cache.pop(user_id)
                if image.seq > image.snapshot_seq:
                    await self._write_snapshot(user_id, image)

    async def drain(self) -> None:
        """Wait until every write under way, background snapshot and search index write
        has finished."""
        while tasks := [task for task in self._leaders.values() if task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.indexer.flush()
        while self._snapshot_tasks:
            await asyncio.gather(*list(self._snapshot_tasks), return_exceptions=True)

    async def close(self) -> None:
        """Finish background snapshots, then snapshot every cached image ahead of its last one.

        The store stays open: whoever opened it closes it.
        """
        await self.drain()
        await self.indexer.close()
        for user_id, image in self._cache.items():
            if image.seq > image.snapshot_seq:
                await self._write_snapshot(user_id, image)

    # ---- admin: rebuild, export, import, stats ----

    async def rebuild(self, user_id: int) -> dict[str, Any]:
        """Regenerate the user's image from the log alone; report how the stored snapshot differs.

        The snapshot is compared with the log replayed up to the snapshot's
        position; the regenerated image then replaces the cached one and is
        written as the new snapshot.
        """
        self.check_owner(user_id)
        async with self._lock(user_id):
            rebuilt = UserImage()
            differences: list[str] = []
            stored = await self._store.read_snapshot(user_id)
            snapshot_seq = None
            if stored is not None:
                snapshot_seq, data = stored
                await self.replay(user_id, rebuilt, until=snapshot_seq)
                if rebuilt.seq < snapshot_seq:
                    differences.append(
                        f"seq: the snapshot is at {snapshot_seq}, the log ends at {rebuilt.seq}"
                    )
                else:
                    try:
                        differences = UserImage.from_snapshot(data).differences(rebuilt)
                    except LogCorrupt as exc:
                        differences = [f"snapshot: {exc}"]
            await self.replay(user_id, rebuilt)
            if rebuilt.seq:
                await self._store.write_snapshot(user_id, rebuilt.seq, rebuilt.to_snapshot())
                rebuilt.snapshot_seq = rebuilt.seq
            self._keep(user_id, rebuilt)
        return {
            "user": user_id,
            "seq": rebuilt.seq,
            "snapshot_seq": snapshot_seq,
            "threads": len(rebuilt.threads),
            "messages": len(rebuilt.messages),
            "differences": differences,
            "ok": not differences,
        }

    async def export_log(self, user_id: int) -> list[dict[str, Any]]:
        """The user's whole log as JSON-able dicts, in order; a message_added entry
        carries its stored body under "body" (None if the store has lost it)."""
        out: list[dict[str, Any]] = []
        after = 0
        while page := await self._store.read_log(user_id, after, _REPLAY_PAGE):
            entries = decode_stored_page(page)
            bodies = await self.bodies(user_id, entries)
            for entry in entries:
                if "body_ref" in entry:
                    entry["body"] = bodies.get(entry["body_ref"])
                out.append(entry)
            after = page[-1][0]
        return out

    async def import_log(self, user_id: int, entries: Iterable[dict[str, Any]]) -> int:
        """Append exported entries to the user's log; returns how many were appended.

        Entries at or below the log's end are skipped, so re-running an import
        is harmless; the rest must continue the log without a gap. Message
        bodies are stored and indexed for search again. The cached image is
        dropped and reloaded on the next request.
        """
        self.check_owner(user_id)
        async with self._lock(user_id):
            last = await self._store.last_seq(user_id)
            todo = [_imported(entry) for entry in entries]
            todo = [(entry, body) for entry, body in todo if entry["seq"] > last]
            for expected, (entry, _) in enumerate(todo, start=last + 1):
                if entry["seq"] != expected:
                    raise BadRequest(f"entries: seq {entry['seq']} where {expected} should follow")
            # Every entry is checked (encoded) before the first is written.
            records = [logcodec.encode(entry) for entry, _ in todo]
            for start in range(0, len(todo), _IMPORT_BATCH):
                batch = todo[start : start + _IMPORT_BATCH]
                messages: dict[str, bytes] = {}
                terms: list[tuple[str, str]] = []
                for entry, body in batch:
                    if body is not None:
                        ref = entry["body_ref"]
                        messages[ref] = orjson.dumps(body)
                        text = body.get("text") if isinstance(body.get("text"), str) else ""
                        words = search_terms(entry["subject"], text)
                        terms.extend((word, entry["message_id"]) for word in words)
                await self._store.append(
                    LogAppend(
                        user_id=user_id,
                        expected_seq=batch[0][0]["seq"] - 1,
                        records=records[start : start + _IMPORT_BATCH],
                        messages=messages,
                        terms=terms,
                    )
                )
            image = self._cache.peek(user_id)
            if image is not None:
                self._forget(user_id, image)
        return len(todo)

    def stats(self) -> dict[str, Any]:
        """Cache and reply-table figures, the search index's, and the write counters."""
        return {
            **self._cache.stats(),
            "search_index_pending_users": self.indexer.pending_users,
            "search_index_flushes": self.indexer.flushes,
            "search_index_failures": self.indexer.failures,
            **self._counters,
        }


def _imported(item: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An exported entry split into the log entry and its body (encode checks the entry)."""
    if not isinstance(item, dict):
        raise BadRequest("entries: each must be a JSON object")
    entry = dict(item)
    body = entry.pop("body", None)
    if body is not None and not isinstance(body, dict):
        raise BadRequest(f"entries: seq {entry.get('seq')!r} has a body that is not an object")
    if type(entry.get("seq")) is not int:
        raise BadRequest("entries: each needs an integer seq")
    return entry, body


def decode_stored_page(page: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    """Decode a page of the store's (seq, record) pairs, refusing a record whose own
    seq is not the one it is stored under (a corrupt or misplaced row)."""
    entries = []
    for seq, record in page:
        entry = logcodec.decode(record)
        if entry["seq"] != seq:
            raise LogCorrupt(f"the record stored at seq {seq} says seq {entry['seq']}")
        entries.append(entry)
    return entries
