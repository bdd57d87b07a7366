"""How fast one user may ask: a token bucket per user, shared by that user's connections.

Owns the per-user request rate of an app server: each user-token request takes a
token from its user's bucket, which refills at `rate` tokens a second up to `burst`;
a request that finds the bucket empty is refused `TOO_MANY` (the client should wait
and retry) and the server goes on serving everyone else. Service connections (the
trusted tiers, carrying many users) are not limited here. Buckets of users who went
quiet are dropped (at most `max_users` are kept; a dropped bucket is full again).
Sans I/O: the caller says what time it is.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["UserRateLimiter"]


class UserRateLimiter:
    """Token buckets by user id (see the module docstring)."""

    def __init__(self, rate: float, burst: float, max_users: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_users = max_users
        # user -> (tokens, when they were counted)
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def available(self, user: int, now: float) -> float:
        tokens, at = self._buckets.get(user, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, user: int, now: float, count: int = 1) -> bool:
        """Take `count` tokens if the bucket holds one at least (a batch answered at once
        may leave it below zero: the user then waits longer)."""
        tokens = self.available(user, now)
        if tokens < 1:
            self.refused += 1
            self._store(user, tokens, now)
            return False
        self._store(user, tokens - count, now)
        return True

    def _store(self, user: int, tokens: float, now: float) -> None:
        self._buckets[user] = (tokens, now)
        self._buckets.move_to_end(user)
        while len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
