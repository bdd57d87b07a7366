"""`LocalUserIndex`: the user index on the store's own social table (the embedded default).

Owns a small LRU of hot users' friend sets, dropped for both users whenever a
friendship changes through it, and, with `cache_ttl_s`, after that many seconds: when
several instances share one store (the user index service on HBase), a change made
through one reaches the others' answers within that time. Calls only the store.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from pyserver.errors import BadRequest
from pyserver.store.base import SocialStore
from pyserver.userindex import Relation

__all__ = ["LocalUserIndex"]


class LocalUserIndex:
    """`pyserver.userindex.UserIndex` on the store's friends, add_friend and remove_friend.

    A friendship changed by another process reaches this cache only when the entry
    ages out: after `cache_ttl_s` seconds if given, else once pushed out of the LRU (the
    cell's own index, the only one that changes friendships).
    """

    def __init__(
        self, store: SocialStore, cache_users: int = 10_000, cache_ttl_s: float | None = None
    ) -> None:
        if cache_users < 1:
            raise ValueError("cache_users must be at least 1")
        if cache_ttl_s is not None and cache_ttl_s < 0:
            raise ValueError("cache_ttl_s must be >= 0")
        self._store = store
        self._cache_users = cache_users
        self._cache_ttl_s = cache_ttl_s
        # user id -> (that user's friends, when they were read), least recently used first
        self._friends: OrderedDict[int, tuple[frozenset[int], float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def relation(self, user_id: int, sender_id: int) -> Relation:
        if user_id == sender_id:
            return "friend"
        friends = await self.friends(user_id)
        if sender_id in friends:
            return "friend"
        if friends and not friends.isdisjoint(await self.friends(sender_id)):
            return "friend_of_friend"
        return "stranger"

    async def friends(self, user_id: int) -> frozenset[int]:
        """The user's friends (from the cache when hot)."""
        cached = self._friends.get(user_id)
        now = time.monotonic()
        if cached is not None and (
            self._cache_ttl_s is None or now - cached[1] < self._cache_ttl_s
        ):
            self._friends.move_to_end(user_id)
            self.hits += 1
            return cached[0]
        self.misses += 1
        friends = frozenset(await self._store.friends(user_id))
        self._friends[user_id] = (friends, now)
        self._friends.move_to_end(user_id)
        if len(self._friends) > self._cache_users:
            self._friends.popitem(last=False)
        return friends

    async def add_friend(self, user_id: int, friend_id: int) -> None:
        _check_pair(user_id, friend_id)
        try:
            await self._store.add_friend(user_id, friend_id)
        finally:
            self._forget(user_id, friend_id)

    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        _check_pair(user_id, friend_id)
        try:
            await self._store.remove_friend(user_id, friend_id)
        finally:
            self._forget(user_id, friend_id)

    def stats(self) -> dict[str, int]:
        """The hot-user cache's figures: users held, hits and misses."""
        return {"cached_users": len(self._friends), "hits": self.hits, "misses": self.misses}

    def _forget(self, *user_ids: int) -> None:
        for user_id in user_ids:
            self._friends.pop(user_id, None)


def _check_pair(user_id: int, friend_id: int) -> None:
    if user_id == friend_id:
        raise BadRequest(f"friend: user {user_id} cannot befriend themself")
