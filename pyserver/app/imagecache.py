"""The cache of user images of one app server, and the ready-made replies that mirror them.

`ImageCache` is the write-through LRU of user images (`pyserver.snapcache`) with the
table of cached-read replies (`pyserver.wire.replies`) beside it: every change of what
the cache holds for a user (a new or changed image put back, an image dropped or
evicted) forgets that user's replies in the same synchronous step, so the table never
answers from an image the cache no longer holds. The residency puts an image back after
every change it applies (`put`), which is what keeps the table current.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyserver.snapcache import SnapshotCache
from pyserver.wire.replies import ReplyTable

__all__ = ["ImageCache"]


class ImageCache:
    """User id -> image, bounded by count and bytes, with the replies derived from them."""

    def __init__(self, max_users: int, max_bytes: int, reply_bytes: int = 64 << 20) -> None:
        self._cache = SnapshotCache(max_users, max_bytes)
        self.replies = ReplyTable(reply_bytes)

    # ---- the images ----

    def get(self, user_id: int) -> Any:
        """The user's image (counted as a hit or a miss, and made most recent), or None."""
        return self._cache.get(user_id)

    def peek(self, user_id: int) -> Any:
        """The user's image or None, without counting or reordering."""
        return self._cache.peek(user_id)

    def put(self, user_id: int, image: Any, weight: int) -> list[tuple[int, Any]]:
        """(Re)insert an image after it was loaded or changed; returns what that evicted."""
        self.replies.forget(user_id)
        evicted = self._cache.put(user_id, image, weight)
        for evicted_id, _ in evicted:
            self.replies.forget(evicted_id)
        return evicted

    def pop(self, user_id: int) -> Any:
        """Drop the user's image (and its replies); the image, or None."""
        self.replies.forget(user_id)
        return self._cache.pop(user_id)

    def items(self) -> list[tuple[int, Any]]:
        return self._cache.items()

    def forget_replies(self, user_ids: Iterable[int]) -> None:
        """Drop these users' replies, keeping their images (they may not be served now)."""
        for user_id in user_ids:
            self.replies.forget(user_id)

    # ---- figures ----

    def stats(self) -> dict[str, Any]:
        """Cache figures (hits, misses, evictions, hit rate, users, bytes) and the table's."""
        cache = self._cache
        lookups = cache.hits + cache.misses
        return {
            "hits": cache.hits,
            "misses": cache.misses,
            "evictions": cache.evictions,
            "hit_rate": cache.hits / lookups if lookups else 0.0,
            "users": len(cache),
            "bytes": cache.weight,
            "table_replies": sum(self.replies.hits().values()),
            "table_entries": len(self.replies),
            "table_bytes": self.replies.nbytes,
        }
