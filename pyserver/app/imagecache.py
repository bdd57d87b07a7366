"""The cache of user images of one app server, and the ready-made replies that mirror them.

`ImageCache` is the write-through LRU of user images (`pyserver.snapcache`) with the
table of cached-read replies (`pyserver.wire.replies`) beside it, kept current the same
way: when an image is put back after a change, the replies held for that user that
were asked for since they were last answered are answered again from the new image
(`answer_again`, the operations' own read code), in the same synchronous step, and the
others go; when an image is dropped or evicted, its user's replies go. So the table
never answers from an image the cache no longer holds, a reply a client keeps asking
for stays in it across writes, and one nobody asks for again costs a user's writes
one answer at most (a thread's first page once read, rendered again on every message
that came after, was a tenth of a mail's cost in a cell).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pyserver.snapcache import SnapshotCache
from pyserver.wire.replies import ReplyTable

__all__ = ["AnswerAgain", "ImageCache"]

# (op, request payload bytes, the user's new image) -> the reply payload, or None when
# that read now fails (its reply is then dropped).
AnswerAgain = Callable[[int, bytes, Any], "bytes | None"]


class ImageCache:
    """User id -> image, bounded by count and bytes, with the replies derived from them."""

    def __init__(
        self,
        max_users: int,
        max_bytes: int,
        answer_again: AnswerAgain | None = None,
        reply_bytes: int = 64 << 20,
    ) -> None:
        self._cache = SnapshotCache(max_users, max_bytes)
        self.replies = ReplyTable(reply_bytes)
        self._answer_again = answer_again

    # ---- the images ----

    def get(self, user_id: int) -> Any:
        """The user's image (counted as a hit or a miss, and made most recent), or None."""
        return self._cache.get(user_id)

    def peek(self, user_id: int) -> Any:
        """The user's image or None, without counting or reordering."""
        return self._cache.peek(user_id)

    def put(
        self,
        user_id: int,
        image: Any,
        weight: int,
        held: list[tuple[int, bytes]] | None = None,
    ) -> list[tuple[int, Any]]:
        """(Re)insert an image after it was loaded or changed; returns what that evicted.

        The user's replies asked for since they were last answered (or `held`, those
        `take` returned) are answered again from `image`; those that now fail go, and
        so do the others.
        """
        if held is None:
            held = self.replies.held(user_id, read_only=True)
        self.replies.forget(user_id)
        evicted = self._cache.put(user_id, image, weight)
        gone = {evicted_id for evicted_id, _ in evicted}
        for evicted_id in gone:
            self.replies.forget(evicted_id)
        if held and user_id not in gone and self._answer_again is not None:
            for op, payload in held:
                reply = self._answer_again(op, payload, image)
                if reply is not None:
                    self.replies.put(user_id, op, payload, reply, read=False)
        return evicted

    def take(self, user_id: int) -> tuple[Any, list[tuple[int, bytes]]]:
        """Take the user's image out while it is changed (nobody reads it meanwhile):
        the image (or None) and the keys of its replies asked for since they were last
        answered, for `put` to answer again."""
        held = self.replies.held(user_id, read_only=True)
        return self.pop(user_id), held

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
