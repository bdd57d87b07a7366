"""How fast, and how much at once, one user or one peer may ask of an app server.

`UserRateLimiter` owns a request rate: each request takes a token from its key's
bucket (a user id, or a peer's address), which refills at `rate` tokens a second up
to `burst`; a request that finds the bucket empty is refused `TOO_MANY` (the client
should wait and retry) and the server goes on serving everyone else. Buckets of keys
that went quiet are dropped (at most `max_users` are kept; a dropped bucket is full
again). `InFlightLimit` owns how many requests of one key may run at once.
Service connections (the trusted tiers, carrying many users) are limited by neither.
Sans I/O: the caller says what time it is.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable

__all__ = ["InFlightLimit", "UserRateLimiter"]


class InFlightLimit:
    """Requests running at once per key: `enter` (False at the cap), then `leave`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("an in-flight limit must be at least 1")
        self.limit = limit
        self._running: Counter[Hashable] = Counter()
        self.refused = 0

    def enter(self, key: Hashable) -> bool:
        if self._running[key] >= self.limit:
            self.refused += 1
            return False
        self._running[key] += 1
        return True

    def leave(self, key: Hashable) -> None:
        left = self._running[key] - 1
        if left > 0:
            self._running[key] = left
        else:
            del self._running[key]

    def running(self, key: Hashable) -> int:
        return self._running.get(key, 0)


class UserRateLimiter:
    """Token buckets by key: a user id, or a peer's address (see the module docstring)."""

    def __init__(self, rate: float, burst: float, max_users: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_users = max_users
        # user -> (tokens, when they were counted)
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def available(self, user: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(user, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, user: Hashable, now: float, count: int = 1) -> bool:
        """Take `count` tokens if the bucket holds one at least (a batch answered at once
        may leave it below zero: the user then waits longer)."""
        tokens = self.available(user, now)
        if tokens < 1:
            self.refused += 1
            self._store(user, tokens, now)
            return False
        self._store(user, tokens - count, now)
        return True

    def _store(self, user: Hashable, tokens: float, now: float) -> None:
        self._buckets[user] = (tokens, now)
        self._buckets.move_to_end(user)
        while len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
