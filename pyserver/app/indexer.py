"""The search index, derived from the log off the durable path of a write.

A write is acknowledged once its log records and bodies are durable; its search terms
wait here and are written a moment later (`delay_s`, half a second: every user's terms
of that long go in one `Store.index_terms_many` call, one transaction on SQLite, on
HBase one Thrift call per user instead of one per commit, a few at a time so the
durable appends keep the rest of the store's connections), each with the user's index
mark: the log up to that mark is indexed. Nothing is lost when the
process dies before that: the log is the truth, and `caught_up` indexes whatever the
log holds past the stored mark before a search reads the index. So an
acknowledged message is always found by a search, after a crash as before it.

The mark only advances over a contiguous prefix of the log: before writing a user's
pending terms that start after the last mark this process knows, the gap is indexed
from the log first (`terms_of_log`, supplied by the mailbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pyserver.store.base import IndexMark, LogStore

__all__ = ["SearchIndexer", "search_terms"]

log = logging.getLogger(__name__)

# (user id, after seq, up to seq) -> the (term, message id) pairs of those log entries
TermsOfLog = Callable[[int, int, int], Awaitable[list[tuple[str, str]]]]

_WORD = re.compile(r"\w+")
# A longer "word" (a hash, a base64 run) is neither indexed nor searchable.
_MAX_TERM_CHARS = 64
# Marks remembered per user; past this many the memory is dropped (they are re-read).
_MAX_KNOWN_MARKS = 1_000_000
# Users' index marks read at once in a flush (those whose gap needs the log).
_MARK_READERS = 4


def search_terms(*texts: str) -> list[str]:
    """The distinct words of the texts, case-folded, in first-seen order (the search index)."""
    words = (word for text in texts for word in _WORD.findall(text.casefold()))
    return [word for word in dict.fromkeys(words) if len(word) <= _MAX_TERM_CHARS]


@dataclass(slots=True)
class _Pending:
    """A user's log entries (first_seq..last_seq) committed but not yet indexed."""

    first_seq: int
    last_seq: int
    terms: list[tuple[str, str]] = field(default_factory=list)


class SearchIndexer:
    """Writes the search terms of committed entries in the background, batched."""

    def __init__(self, store: LogStore, terms_of_log: TermsOfLog, delay_s: float = 0.5) -> None:
        self._store = store
        self._terms_of_log = terms_of_log
        self._delay_s = delay_s
        self._pending: dict[int, _Pending] = {}
        # user -> the mark known to be stored (or covering only entries without terms)
        self._marks: dict[int, int] = {}
        self._flush_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes = 0
        self.failures = 0

    @property
    def pending_users(self) -> int:
        return len(self._pending)

    def committed(
        self, user_id: int, first_seq: int, last_seq: int, terms: Sequence[tuple[str, str]]
    ) -> None:
        """Entries first_seq..last_seq of the user's log are durable; `terms` index them."""
        pending = self._pending.get(user_id)
        if pending is not None:
            pending.last_seq = last_seq
            pending.terms.extend(terms)
            return
        if not terms and self._marks.get(user_id) == first_seq - 1:
            # Nothing to index: the mark moves in memory (the log holds no terms for a
            # restart to miss there).
            self._marks[user_id] = last_seq
            return
        self._pending[user_id] = _Pending(first_seq, last_seq, list(terms))
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._delay_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write every pending user's terms and mark now, all in one store call (a user
        whose index has a gap before its entries gets the gap's terms from the log
        first); those that fail wait for the next flush."""
        async with self._flush_lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            marks: list[IndexMark] = []
            gaps: list[tuple[int, _Pending]] = []
            for user, entry in pending.items():
                known = self._marks.get(user)
                if known is not None and known >= entry.first_seq - 1:
                    marks.append((user, entry.last_seq, entry.terms))
                else:
                    gaps.append((user, entry))
            if gaps:
                marks += await self._with_gaps(gaps)
            if marks:
                try:
                    await self._store.index_terms_many(marks)
                except BaseException as error:
                    self.failures += 1
                    log.warning("search index write of %d users failed: %r", len(marks), error)
                    for user, _, _ in marks:
                        self._requeue(user, pending[user])
                    if not isinstance(error, Exception):
                        raise
                else:
                    for user, mark, _ in marks:
                        self._remember(user, mark)
            self.flushes += 1
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._flush_soon)

    async def _with_gaps(self, gaps: list[tuple[int, _Pending]]) -> list[IndexMark]:
        """The index writes of users whose stored mark is not known to end right before
        their pending entries: the mark is read, and the log's terms in between added.
        A user whose read fails waits for the next flush."""
        readers = asyncio.Semaphore(_MARK_READERS)

        async def filled(user_id: int, entry: _Pending) -> IndexMark:
            async with readers:
                known = await self._store.indexed_seq(user_id)
                terms = entry.terms
                if known < entry.first_seq - 1:  # entries before these were never indexed
                    terms = await self._terms_of_log(user_id, known, entry.first_seq - 1) + terms
                return user_id, entry.last_seq, terms

        outcomes = await asyncio.gather(*(filled(*gap) for gap in gaps), return_exceptions=True)
        marks: list[IndexMark] = []
        for (user, entry), outcome in zip(gaps, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self.failures += 1
                log.warning("search index write failed user=%d: %r", user, outcome)
                self._requeue(user, entry)
            else:
                marks.append(outcome)
        return marks

    def _requeue(self, user_id: int, entry: _Pending) -> None:
        later = self._pending.get(user_id)
        if later is not None:
            entry.last_seq = max(entry.last_seq, later.last_seq)
            entry.terms.extend(later.terms)
        self._pending[user_id] = entry

    def _remember(self, user_id: int, mark: int) -> None:
        if len(self._marks) >= _MAX_KNOWN_MARKS:
            self._marks.clear()
        self._marks[user_id] = max(mark, self._marks.get(user_id, 0))

    async def caught_up(self, user_id: int, seq: int) -> None:
        """Return once the user's log up to `seq` is in the index (for a search)."""
        if user_id in self._pending or self._flush_lock.locked():
            await self.flush()
        if self._marks.get(user_id, -1) >= seq:
            return
        mark = await self._store.indexed_seq(user_id)
        if mark < seq:
            await self._store.index_terms(
                user_id, seq, await self._terms_of_log(user_id, mark, seq)
            )
            mark = seq
        self._remember(user_id, mark)

    def forget(self, user_id: int) -> None:
        """Forget the user's known mark (its log changed under us: re-read it next time)."""
        self._marks.pop(user_id, None)

    async def close(self) -> None:
        """Write what is pending, and stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.flush()
