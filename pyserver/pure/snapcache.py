"""The pure-Python twin of `pyserver._native.SnapshotCache`: the LRU snapshot cache.

User images keyed by user id, bounded by a count and by a total weight, on an
OrderedDict kept in recency order (first = least recently used). Same API,
results, counters and errors as the Rust core (`native/src/snapcache/`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

_U64_MAX = (1 << 64) - 1


def _to_u64(value: object, what: str, minimum: int) -> int:
    """An int in minimum..2**64-1 (as a plain int), else TypeError or ValueError."""
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    # The int's own value, whatever an int subclass says of itself (as natively).
    number = int.__int__(value)
    if not minimum <= number <= _U64_MAX:
        raise ValueError(f"{what} must be in {minimum}..2**64-1")
    return number


class SnapshotCache:
    """User images keyed by user id, bounded by a count and a total weight (bytes)."""

    __slots__ = (
        "_entries",
        "_evictions",
        "_hits",
        "_max_entries",
        "_max_weight",
        "_misses",
        "_weight",
    )

    def __init__(self, max_entries: int, max_weight: int) -> None:
        self._max_entries = _to_u64(max_entries, "max_entries", 1)
        self._max_weight = _to_u64(max_weight, "max_weight", 1)
        # user id -> (image, weight); the tuple is never None, so a lookup's
        # None means "absent" even when the image itself is None.
        self._entries: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._weight = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def max_weight(self) -> int:
        return self._max_weight

    @property
    def weight(self) -> int:
        """The sum of the weights of the entries held."""
        return self._weight

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def evictions(self) -> int:
        return self._evictions

    def get(self, user_id: int, default: Any = None) -> Any:
        """The image, made most recently used (a hit), or default (a miss)."""
        if type(user_id) is not int:
            user_id = _to_u64(user_id, "user id", 0)
        entry = self._entries.get(user_id)
        if entry is None:
            # Out-of-range ids are never stored, so their check can wait for a
            # miss, off the hit path.
            _to_u64(user_id, "user id", 0)
            self._misses += 1
            return default
        self._entries.move_to_end(user_id)
        self._hits += 1
        return entry[0]

    def peek(self, user_id: int, default: Any = None) -> Any:
        """The image without touching recency or the counters."""
        if type(user_id) is not int:
            user_id = _to_u64(user_id, "user id", 0)
        entry = self._entries.get(user_id)
        if entry is None:
            _to_u64(user_id, "user id", 0)
            return default
        return entry[0]

    def put(self, user_id: int, image: Any, weight: int) -> list[tuple[int, Any]]:
        """Store (or replace) as most recently used; returns the evicted (user_id, image)
        pairs, least recently used first. An image heavier than max_weight is not kept:
        it comes back at once as evicted."""
        if type(user_id) is not int or not 0 <= user_id <= _U64_MAX:
            user_id = _to_u64(user_id, "user id", 0)
        if type(weight) is not int or not 0 <= weight <= _U64_MAX:
            weight = _to_u64(weight, "weight", 0)
        entries = self._entries
        total = self._weight
        # Taken out now, so a replaced entry never counts against the bounds
        # below and is never the one evicted; its image is dropped on return.
        previous = entries.pop(user_id, None)
        if previous is not None:
            total -= previous[1]
        evicted: list[tuple[int, Any]] = []
        if weight > self._max_weight:
            if previous is not None:
                evicted.append((user_id, previous[0]))
            evicted.append((user_id, image))
        else:
            max_entries = self._max_entries
            room = self._max_weight - weight
            while len(entries) >= max_entries or total > room:
                old_id, (old_image, old_weight) = entries.popitem(last=False)
                total -= old_weight
                evicted.append((old_id, old_image))
            entries[user_id] = (image, weight)
            total += weight
        self._weight = total
        self._evictions += len(evicted)
        return evicted

    def pop(self, user_id: int, default: Any = None) -> Any:
        """Remove and return the image, or default. Not an eviction."""
        if type(user_id) is not int:
            user_id = _to_u64(user_id, "user id", 0)
        entry = self._entries.pop(user_id, None)
        if entry is None:
            _to_u64(user_id, "user id", 0)
            return default
        self._weight -= entry[1]
        return entry[0]

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, int) and int.__int__(user_id) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (not counted as evictions); counters are kept."""
        # Detach first: dropping an image may run its __del__, which may use
        # this cache again, and must then find it already empty (as natively).
        entries = self._entries
        self._entries = OrderedDict()
        self._weight = 0
        entries.clear()

    def items(self) -> list[tuple[int, Any]]:
        """Every (user_id, image), least recently used first, without touching recency."""
        return [(user_id, entry[0]) for user_id, entry in self._entries.items()]
