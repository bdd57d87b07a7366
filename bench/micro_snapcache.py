"""Micro-benchmarks of the LRU snapshot cache: native and pure twins against peer LRUs.

`lru_get`: a get that hits, in a cache of 10_000 entries. `lru_put`: a put
into a full cache, so that each put evicts exactly one entry. Every contender
runs the same loop shape over the same keys, in batches of `BATCH` operations.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import lru

from bench.timing import compare, entry
from pyserver.implementation import native
from pyserver.pure.snapcache import SnapshotCache as PureSnapshotCache

ENTRIES = 10_000
BATCH = 1_000
# Only the count bound evicts in these benchmarks.
UNBOUNDED_WEIGHT = 1 << 62


class OrderedDictLRU:
    """The textbook LRU on an OrderedDict: the least a Python LRU can do."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.data: OrderedDict[int, Any] = OrderedDict()

    def get(self, key: int, default: Any = None) -> Any:
        try:
            value = self.data[key]
        except KeyError:
            return default
        self.data.move_to_end(key)
        return value

    def put(self, key: int, value: Any) -> None:
        data = self.data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.max_entries:
            data.popitem(last=False)


def _native_cache_class() -> type:
    if native is None:
        raise RuntimeError("pyserver._native is not built (or PYSERVER_PURE=1 is set)")
    return native.SnapshotCache


def _filled(cache_class: type) -> Any:
    cache = cache_class(ENTRIES, UNBOUNDED_WEIGHT)
    for user_id in range(ENTRIES):
        cache.put(user_id, ("image", user_id), 1)
    return cache


def _bench_get(quick: bool) -> dict[str, object]:
    hit_keys = random.Random(7).sample(range(ENTRIES), BATCH)
    native_cache = _filled(_native_cache_class())
    pure_cache = _filled(PureSnapshotCache)
    ordered = OrderedDictLRU(ENTRIES)
    lru_dict = lru.LRU(ENTRIES)
    for user_id in range(ENTRIES):
        ordered.put(user_id, ("image", user_id))
        lru_dict[user_id] = ("image", user_id)

    @functools.lru_cache(maxsize=ENTRIES)
    def load_image(user_id: int) -> tuple[str, int]:
        return ("image", user_id)

    for user_id in range(ENTRIES):
        load_image(user_id)

    def getter(get: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for user_id in hit_keys:
                get(user_id)

        return run

    def lru_dict_get() -> None:
        # Subscription, lru-dict's fastest hit path (its .get() is slower).
        for user_id in hit_keys:
            lru_dict[user_id]

    ns = _compare(
        {
            "native": getter(native_cache.get),
            "pure": getter(pure_cache.get),
            "ordereddict": getter(ordered.get),
            "lru-dict": lru_dict_get,
            "functools": getter(load_image),
        },
        quick,
    )
    for cache in (native_cache, pure_cache):
        assert cache.misses == 0 and cache.hits > 0, "every get must be a hit"
    return entry(
        ns.pop("native"),
        ns.pop("pure"),
        ns,
    )


def _bench_put(quick: bool) -> dict[str, object]:
    # The caches start with keys 0..ENTRIES-1; cycling through 2 * ENTRIES keys
    # in order from ENTRIES, each key was evicted ENTRIES puts before it comes
    # round again, so every put misses and evicts exactly one entry.
    keys = list(range(ENTRIES, 2 * ENTRIES)) + list(range(ENTRIES))
    batches = [keys[start : start + BATCH] for start in range(0, len(keys), BATCH)]
    image = ("image", 0)
    native_cache = _filled(_native_cache_class())
    pure_cache = _filled(PureSnapshotCache)
    ordered = OrderedDictLRU(ENTRIES)
    lru_dict = lru.LRU(ENTRIES)
    for user_id in range(ENTRIES):
        ordered.put(user_id, image)
        lru_dict[user_id] = image

    def snapshot_putter(cache: Any) -> Callable[[], None]:
        put = cache.put
        cycle = itertools.cycle(batches)

        def run() -> None:
            for user_id in next(cycle):
                put(user_id, image, 1)

        return run

    def ordered_put() -> None:
        for user_id in next(ordered_cycle):
            ordered_put_one(user_id, image)

    def lru_dict_put() -> None:
        for user_id in next(lru_dict_cycle):
            lru_dict[user_id] = image

    ordered_cycle = itertools.cycle(batches)
    ordered_put_one = ordered.put
    lru_dict_cycle = itertools.cycle(batches)

    ns = _compare(
        {
            "native": snapshot_putter(native_cache),
            "pure": snapshot_putter(pure_cache),
            "ordereddict": ordered_put,
            "lru-dict": lru_dict_put,
        },
        quick,
    )
    for cache in (native_cache, pure_cache):
        # Whole batches ran, and each of their puts evicted one entry.
        assert cache.evictions > 0 and cache.evictions % BATCH == 0, "every put must evict"
        assert len(cache) == ENTRIES
    return entry(ns.pop("native"), ns.pop("pure"), ns)


def _compare(contenders: dict[str, Callable[[], None]], quick: bool) -> dict[str, float]:
    if quick:
        return compare(contenders, ops_per_call=BATCH, rounds=2, round_s=0.005)
    return compare(contenders, ops_per_call=BATCH, rounds=60, round_s=0.008)


def run(quick: bool = False) -> dict[str, dict]:
    """The `lru_get` and `lru_put` figures (nanoseconds per operation)."""
    return {"lru_get": _bench_get(quick), "lru_put": _bench_put(quick)}
