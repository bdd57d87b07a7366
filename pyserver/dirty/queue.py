"""`DirtyQueue`: users whose count keys must go, coalesced, bounded, with a done watermark.

Owns the bookkeeping both ends of the dirty service share: the app server's
reporter (users to report) and each data centre's worker in the service (users
whose keys to delete there). Plain data, no I/O, one consumer:

* `add(users)` returns a ticket (a sequence number). A user already waiting is
  not added twice: the one pending entry, handled later, covers every report.
* `take(limit)` hands the consumer the oldest waiting users as a `Batch`;
  `done(batch)` or `failed(batch)` (back to the front of the queue) settles it.
  One batch is out at a time.
* `done_through` is the highest ticket all of whose users are handled;
  `wait(ticket)` resolves True once it is reached, False if `release()` gives up
  on the waiters first (a data centre that went down).
* Past `max_users` waiting users the queue stops listing them: it drops the
  list and asks instead for one `flush` batch, which stands for every user
  reported so far (the consumer then invalidates everything).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Batch", "DirtyQueue"]


@dataclass(frozen=True, slots=True)
class Batch:
    """Users to handle; `flush` means everyone (their list is then empty)."""

    users: tuple[int, ...]
    flush: bool
    # the oldest ticket this batch stands for (its entries' first tickets)
    floor: int
    seqs: tuple[int, ...] = ()
    # the newest ticket when the batch was taken (a flush covers every ticket up to it)
    last: int = 0


class DirtyQueue:
    """See the module docstring."""

    def __init__(self, max_users: int = 1_000_000) -> None:
        if max_users < 1:
            raise ValueError("max_users must be at least 1")
        self.max_users = max_users
        # user -> ticket of its oldest unhandled report, in ticket order
        self._pending: dict[int, int] = {}
        self._last = 0
        self._out: Batch | None = None
        # the oldest ticket a flush must cover, while one is wanted or out
        self._flush_floor: int | None = None
        self._overflowed_during_flush = False
        self.done_through = 0
        self._waiters: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._waiter_ids = 0
        self.overflows = 0

    def __len__(self) -> int:
        """Users waiting (not counting a batch that is out)."""
        return len(self._pending)

    @property
    def last_ticket(self) -> int:
        return self._last

    @property
    def busy(self) -> bool:
        """Anything waiting or out."""
        return bool(self._pending) or self._out is not None or self._flush_floor is not None

    def add(self, users: Iterable[int]) -> int:
        """Queue users; returns the ticket that `wait` takes."""
        self._last += 1
        ticket = self._last
        pending = self._pending
        for user in users:
            if user not in pending:
                if len(pending) >= self.max_users:
                    self._overflow()
                    # Everything up to and including this ticket is the flush's now.
                    return ticket
                pending[user] = ticket
        self._advance()
        return ticket

    def add_flush(self) -> int:
        """Ask for one flush (everything invalidated); returns its ticket."""
        self._last += 1
        self._overflow(counted=False)
        return self._last

    def _overflow(self, counted: bool = True) -> None:
        self.overflows += counted
        if self._out is not None and self._out.flush:
            self._overflowed_during_flush = True
        floor = self.done_through + 1
        self._flush_floor = floor if self._flush_floor is None else min(self._flush_floor, floor)
        self._pending.clear()

    def take(self, limit: int) -> Batch | None:
        """The next batch (None if nothing waits); at most `limit` users."""
        if self._out is not None:
            raise RuntimeError("a batch is already out")
        if self._flush_floor is not None:
            batch = Batch((), True, self._flush_floor, last=self._last)
        elif self._pending:
            users: list[int] = []
            seqs: list[int] = []
            for user, seq in self._pending.items():
                users.append(user)
                seqs.append(seq)
                if len(users) >= limit:
                    break
            for user in users:
                del self._pending[user]
            batch = Batch(tuple(users), False, seqs[0], tuple(seqs), self._last)
        else:
            return None
        self._out = batch
        return batch

    def done(self, batch: Batch) -> None:
        """The batch is handled."""
        self._settle(batch)
        if batch.flush:
            # Reports dropped by an overflow after this flush was taken need another one.
            self._flush_floor = batch.last + 1 if self._overflowed_during_flush else None
            self._overflowed_during_flush = False
        self._advance()

    def failed(self, batch: Batch) -> None:
        """The batch was not handled: its users wait again, ahead of the others."""
        self._settle(batch)
        self._overflowed_during_flush = False
        if not batch.flush:
            again = dict(zip(batch.users, batch.seqs, strict=True))
            for user, seq in self._pending.items():
                # A user reported again meanwhile keeps its older ticket.
                again.setdefault(user, seq)
            self._pending = again
        self._advance()

    def _settle(self, batch: Batch) -> None:
        if batch is not self._out:
            raise RuntimeError("that batch is not the one out")
        self._out = None

    def _advance(self) -> None:
        outstanding = []
        if self._flush_floor is not None:
            outstanding.append(self._flush_floor)
        if self._out is not None:
            outstanding.append(self._out.floor)
        if self._pending:
            outstanding.append(next(iter(self._pending.values())))
        self.done_through = min(outstanding) - 1 if outstanding else self._last
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.done_through:
            _, _, future = heapq.heappop(waiters)
            if not future.done():
                future.set_result(True)

    def wait(self, ticket: int) -> asyncio.Future[bool]:
        """A future: True once `done_through >= ticket`, False if released first."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if ticket <= self.done_through:
            future.set_result(True)
        else:
            self._waiter_ids += 1
            heapq.heappush(self._waiters, (ticket, self._waiter_ids, future))
        return future

    def release(self) -> None:
        """Resolve every waiter with False (their users stay queued)."""
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_result(False)
