"""The LRU snapshot cache: one behaviour suite run on both twins, and property tests
that the native cache, the pure cache and a tiny reference model agree on random
operation sequences."""

from __future__ import annotations

import enum
import gc
import importlib
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver import implementation, snapcache
from pyserver.pure.snapcache import SnapshotCache as PureSnapshotCache

U64_MAX = 2**64 - 1


def _native_class() -> type:
    # An ImportError here fails the test: only PYSERVER_PURE=1 may skip native.
    return importlib.import_module("pyserver._native").SnapshotCache


@pytest.fixture(params=["native", "pure"])
def Cache(request: pytest.FixtureRequest) -> type:
    if request.param == "pure":
        return PureSnapshotCache
    if implementation.PURE_FORCED:
        pytest.skip("PYSERVER_PURE=1 forces the pure twin")
    return _native_class()


def test_facade_picks_the_native_class_unless_pure_is_forced() -> None:
    if implementation.PURE_FORCED:
        assert snapcache.IMPLEMENTATION == "pure"
        assert snapcache.SnapshotCache is PureSnapshotCache
    else:
        assert snapcache.IMPLEMENTATION == "native"
        assert snapcache.SnapshotCache is _native_class()


# ---- construction and bounds ----


def test_new_cache_is_empty_with_its_bounds(Cache: type) -> None:
    cache = Cache(3, 100)
    assert (cache.max_entries, cache.max_weight) == (3, 100)
    assert (len(cache), cache.weight, cache.hits, cache.misses, cache.evictions) == (0, 0, 0, 0, 0)
    assert cache.items() == []
    big = Cache(U64_MAX, U64_MAX)
    assert (big.max_entries, big.max_weight) == (U64_MAX, U64_MAX)


@pytest.mark.parametrize(
    ("max_entries", "max_weight", "error"),
    [
        (0, 10, ValueError),
        (10, 0, ValueError),
        (-1, 10, ValueError),
        (2**64, 10, ValueError),
        (10, 2**64, ValueError),
        (1.0, 10, TypeError),
        ("3", 10, TypeError),
        (10, None, TypeError),
    ],
)
def test_bad_bounds_are_refused(
    Cache: type, max_entries: Any, max_weight: Any, error: type
) -> None:
    with pytest.raises(error):
        Cache(max_entries, max_weight)


def test_count_bound_evicts_least_recently_used(Cache: type) -> None:
    cache = Cache(3, 1000)
    for user_id in (1, 2, 3):
        assert cache.put(user_id, f"img{user_id}", 10) == []
    assert cache.put(4, "img4", 10) == [(1, "img1")]
    assert cache.put(5, "img5", 10) == [(2, "img2")]
    assert [user_id for user_id, _ in cache.items()] == [3, 4, 5]
    assert (len(cache), cache.weight, cache.evictions) == (3, 30, 2)


def test_weight_bound_evicts_as_many_as_needed_oldest_first(Cache: type) -> None:
    cache = Cache(100, 10)
    cache.put(1, "a", 3)
    cache.put(2, "b", 3)
    cache.put(3, "c", 3)
    assert cache.put(4, "d", 7) == [(1, "a"), (2, "b")]
    assert cache.items() == [(3, "c"), (4, "d")]
    assert (cache.weight, cache.evictions) == (10, 2)


def test_an_exact_fit_and_zero_weights_evict_nothing(Cache: type) -> None:
    cache = Cache(5, 10)
    assert cache.put(1, "a", 4) == []
    assert cache.put(2, "b", 6) == []
    assert cache.put(3, "c", 0) == []
    assert cache.weight == 10
    assert cache.put(4, "d", 1) == [(1, "a")]
    assert cache.evictions == 1


def test_both_bounds_apply_together(Cache: type) -> None:
    cache = Cache(2, 10)
    cache.put(1, "a", 1)
    cache.put(2, "b", 8)
    # The count bound alone would evict 1; the weight bound then also needs 2 out.
    assert cache.put(3, "c", 5) == [(1, "a"), (2, "b")]
    assert cache.items() == [(3, "c")]


# ---- recency and counters ----


def test_get_makes_most_recently_used_and_counts(Cache: type) -> None:
    cache = Cache(2, 100)
    cache.put(1, "a", 1)
    cache.put(2, "b", 1)
    assert cache.get(1) == "a"
    assert cache.items() == [(2, "b"), (1, "a")]
    assert cache.put(3, "c", 1) == [(2, "b")]
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get(2) is None
    assert cache.get(2, "missing") == "missing"
    assert (cache.hits, cache.misses) == (1, 2)


def test_peek_contains_pop_and_items_touch_neither_recency_nor_counters(Cache: type) -> None:
    cache = Cache(2, 100)
    cache.put(1, "a", 1)
    cache.put(2, "b", 1)
    assert cache.peek(1) == "a"
    assert cache.peek(9) is None
    assert cache.peek(9, "dflt") == "dflt"
    assert 1 in cache
    assert 9 not in cache
    assert cache.items() == [(1, "a"), (2, "b")]
    assert cache.pop(9) is None
    assert (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)
    assert cache.put(3, "c", 1) == [(1, "a")]


def test_a_stored_none_is_a_hit_not_a_miss(Cache: type) -> None:
    cache = Cache(2, 100)
    cache.put(1, None, 1)
    assert cache.get(1, "dflt") is None
    assert cache.peek(1, "dflt") is None
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.pop(1, "dflt") is None
    assert len(cache) == 0


def test_images_are_returned_as_the_same_objects(Cache: type) -> None:
    image = {"folders": ["inbox"]}
    cache = Cache(1, 100)
    cache.put(7, image, 5)
    assert cache.get(7) is image
    assert cache.peek(7) is image
    assert cache.items()[0][1] is image
    [(user_id, evicted)] = cache.put(8, "other", 1)
    assert user_id == 7 and evicted is image


# ---- replace ----


def test_put_of_an_existing_key_replaces_and_refreshes_without_evicting(Cache: type) -> None:
    cache = Cache(3, 100)
    cache.put(1, "a", 10)
    cache.put(2, "b", 10)
    assert cache.put(1, "a2", 25) == []
    assert cache.items() == [(2, "b"), (1, "a2")]
    assert (len(cache), cache.weight, cache.evictions) == (2, 35, 0)
    cache.put(3, "c", 1)
    assert cache.put(4, "d", 1) == [(2, "b")]


def test_a_heavier_replacement_evicts_others_but_never_itself(Cache: type) -> None:
    cache = Cache(3, 10)
    cache.put(1, "a", 2)
    cache.put(2, "b", 2)
    cache.put(3, "c", 2)
    assert cache.put(2, "B", 10) == [(1, "a"), (3, "c")]
    assert cache.items() == [(2, "B")]
    assert (cache.weight, cache.evictions) == (10, 2)


# ---- oversize ----


def test_an_image_heavier_than_max_weight_comes_back_at_once(Cache: type) -> None:
    cache = Cache(3, 10)
    cache.put(1, "a", 5)
    assert cache.put(2, "huge", 11) == [(2, "huge")]
    assert 2 not in cache
    assert cache.items() == [(1, "a")]
    assert (cache.weight, cache.evictions) == (5, 1)
    assert cache.put(3, "huger", U64_MAX) == [(3, "huger")]
    assert cache.evictions == 2


def test_an_oversize_replacement_evicts_the_previous_image_first(Cache: type) -> None:
    cache = Cache(3, 10)
    cache.put(1, "a", 4)
    cache.put(2, "b", 4)
    assert cache.put(1, "huge", 11) == [(1, "a"), (1, "huge")]
    assert cache.items() == [(2, "b")]
    assert (len(cache), cache.weight, cache.evictions) == (1, 4, 2)


# ---- pop, clear, items ----


def test_pop_removes_without_counting_an_eviction(Cache: type) -> None:
    cache = Cache(3, 100)
    cache.put(1, "a", 10)
    cache.put(2, "b", 20)
    assert cache.pop(1) == "a"
    assert cache.pop(1, "gone") == "gone"
    assert (len(cache), cache.weight, cache.evictions) == (1, 20, 0)
    assert 1 not in cache


def test_clear_drops_everything_but_keeps_the_counters(Cache: type) -> None:
    cache = Cache(2, 100)
    for user_id in range(4):
        cache.put(user_id, user_id, 1)
    cache.get(3)
    cache.get(0)
    cache.clear()
    assert (len(cache), cache.weight, cache.items()) == (0, 0, [])
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 2)
    cache.clear()
    assert cache.put(5, "e", 1) == []
    assert cache.items() == [(5, "e")]


def test_items_lists_least_recently_used_first_as_tuples(Cache: type) -> None:
    cache = Cache(10, 100)
    for user_id in (5, 3, 9):
        cache.put(user_id, str(user_id), 1)
    cache.get(5)
    items = cache.items()
    assert items == [(3, "3"), (9, "9"), (5, "5")]
    assert all(type(pair) is tuple for pair in items)
    items.clear()
    assert len(cache) == 3


def test_extreme_user_ids_work(Cache: type) -> None:
    cache = Cache(3, 100)
    cache.put(0, "zero", 1)
    cache.put(U64_MAX, "max", 1)
    assert cache.get(U64_MAX) == "max"
    assert cache.items() == [(0, "zero"), (U64_MAX, "max")]
    assert U64_MAX in cache and 0 in cache


# ---- bad input ----


@pytest.mark.parametrize("user_id", ["1", 1.0, None, b"1", [1]])
def test_a_user_id_that_is_not_an_int_is_a_type_error(Cache: type, user_id: Any) -> None:
    cache = Cache(3, 100)
    cache.put(1, "a", 1)
    for call in (cache.get, cache.peek, cache.pop, lambda uid: cache.put(uid, "x", 1)):
        with pytest.raises(TypeError, match="user id must be an int"):
            call(user_id)
    assert user_id not in cache
    assert (cache.items(), cache.hits, cache.misses) == ([(1, "a")], 0, 0)


@pytest.mark.parametrize("user_id", [-1, 2**64, -(2**70), 2**100])
def test_a_user_id_out_of_range_is_a_value_error(Cache: type, user_id: int) -> None:
    cache = Cache(3, 100)
    for call in (cache.get, cache.peek, cache.pop, lambda uid: cache.put(uid, "x", 1)):
        with pytest.raises(ValueError, match="user id must be in"):
            call(user_id)
    assert user_id not in cache
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


@pytest.mark.parametrize(
    ("weight", "error"),
    [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), ("1", TypeError), (None, TypeError)],
)
def test_a_bad_weight_is_refused_and_changes_nothing(Cache: type, weight: Any, error: type) -> None:
    cache = Cache(1, 100)
    cache.put(1, "a", 1)
    with pytest.raises(error, match="weight must be"):
        cache.put(2, "b", weight)
    assert (cache.items(), cache.weight, cache.evictions) == ([(1, "a")], 1, 0)


def test_bool_and_int_subclass_ids_are_stored_as_plain_ints(Cache: type) -> None:
    class Shard(enum.IntEnum):
        SEVEN = 7

    cache = Cache(5, 100)
    cache.put(True, "one", 1)
    cache.put(Shard.SEVEN, "seven", 1)
    assert cache.get(1) == "one"
    assert cache.get(7) == "seven"
    assert True in cache and Shard.SEVEN in cache
    assert [type(user_id) for user_id, _ in cache.items()] == [int, int]
    assert cache.items() == [(1, "one"), (7, "seven")]


class _LyingInt(int):
    """An int that claims to be another number, and equal and ordered to anything."""

    def __int__(self) -> int:
        return 5

    def __index__(self) -> int:
        return 5

    def __hash__(self) -> int:
        return 5

    def __eq__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True


def test_an_int_subclass_is_taken_at_its_true_value(Cache: type) -> None:
    cache = Cache(5, 100)
    cache.put(_LyingInt(3), "three", 1)
    assert cache.items() == [(3, "three")]
    assert _LyingInt(3) in cache and 3 in cache
    assert _LyingInt(5) not in cache
    assert cache.get(_LyingInt(3)) == "three"
    assert cache.pop(_LyingInt(5), "none") == "none"
    with pytest.raises(ValueError, match="user id must be in"):
        cache.put(_LyingInt(2**64), "too big", 1)
    with pytest.raises(ValueError, match="weight must be in"):
        cache.put(4, "x", _LyingInt(-1))


# ---- Python objects leaving the cache ----


class _Reentrant:
    """An image whose finalizer uses the cache it is leaving."""

    def __init__(self, cache: Any, seen: list[Any]) -> None:
        self.cache = cache
        self.seen = seen

    def __del__(self) -> None:
        self.seen.append((len(self.cache), self.cache.put(99, "from __del__", 1)))


def test_finalizers_of_replaced_images_may_use_the_cache(Cache: type) -> None:
    cache = Cache(3, 100)
    seen: list[Any] = []
    cache.put(1, _Reentrant(cache, seen), 1)
    assert cache.put(1, "new", 1) == []
    assert seen == [(1, [])]
    assert cache.items() == [(1, "new"), (99, "from __del__")]


def test_finalizers_run_by_clear_see_an_empty_cache(Cache: type) -> None:
    cache = Cache(5, 100)
    seen: list[Any] = []
    cache.put(1, _Reentrant(cache, seen), 1)
    cache.put(2, _Reentrant(cache, seen), 1)
    cache.clear()
    assert seen == [(0, []), (1, [])]
    assert cache.items() == [(99, "from __del__")]


def test_finalizers_of_evicted_and_popped_images_may_use_the_cache(Cache: type) -> None:
    cache = Cache(1, 100)
    seen: list[Any] = []
    cache.put(1, _Reentrant(cache, seen), 1)
    cache.put(2, "b", 1)  # the evicted pair is dropped at once
    assert seen == [(1, [(2, "b")])]
    cache.put(3, _Reentrant(cache, seen), 1)
    cache.pop(3)
    assert seen[1] == (0, [])
    assert cache.items() == [(99, "from __del__")]


def test_reference_cycles_through_the_cache_are_collected(Cache: type) -> None:
    class Image:
        pass

    cache = Cache(3, 100)
    image = Image()
    image.cache = cache  # type: ignore[attr-defined]
    cache.put(1, image, 1)
    # The cache takes no weak references; the image dies only with the cache.
    image_ref = weakref.ref(image)
    del cache, image
    gc.collect()
    assert image_ref() is None


# ---- native, pure and a reference model agree ----


class ModelCache:
    """The spec in its plainest form: a list in recency order, searched linearly."""

    def __init__(self, max_entries: int, max_weight: int) -> None:
        self.max_entries, self.max_weight = max_entries, max_weight
        self.entries: list[tuple[int, Any, int]] = []  # least recently used first
        self.hits = self.misses = self.evictions = 0

    @property
    def weight(self) -> int:
        return sum(weight for _, _, weight in self.entries)

    def _find(self, user_id: int) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e[0] == user_id), None)

    def get(self, user_id: int, default: Any = None) -> Any:
        at = self._find(user_id)
        if at is None:
            self.misses += 1
            return default
        self.hits += 1
        self.entries.append(self.entries.pop(at))
        return self.entries[-1][1]

    def peek(self, user_id: int, default: Any = None) -> Any:
        at = self._find(user_id)
        return default if at is None else self.entries[at][1]

    def put(self, user_id: int, image: Any, weight: int) -> list[tuple[int, Any]]:
        evicted = []
        at = self._find(user_id)
        previous = None if at is None else self.entries.pop(at)
        if weight > self.max_weight:
            if previous is not None:
                evicted.append((user_id, previous[1]))
            evicted.append((user_id, image))
        else:
            self.entries.append((user_id, image, weight))
            while len(self.entries) > self.max_entries or self.weight > self.max_weight:
                old_id, old_image, _ = self.entries.pop(0)
                evicted.append((old_id, old_image))
        self.evictions += len(evicted)
        return evicted

    def pop(self, user_id: int, default: Any = None) -> Any:
        at = self._find(user_id)
        return default if at is None else self.entries.pop(at)[1]

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, int) and self._find(user_id) is not None

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries = []

    def items(self) -> list[tuple[int, Any]]:
        return [(user_id, image) for user_id, image, _ in self.entries]


_GOOD_IDS = st.integers(0, 7) | st.sampled_from([U64_MAX, U64_MAX - 1])
_BAD_IDS = st.sampled_from([-1, 2**64, "3", 3.0, None])
_OPERATIONS = st.one_of(
    st.tuples(st.just("get"), _GOOD_IDS),
    st.tuples(st.just("peek"), _GOOD_IDS),
    st.tuples(st.just("pop"), _GOOD_IDS),
    st.tuples(st.just("contains"), _GOOD_IDS | _BAD_IDS),
    st.tuples(st.just("put"), _GOOD_IDS, st.integers(0, 12)),
    st.tuples(st.just("put"), _GOOD_IDS, st.integers(0, 12)),
    st.tuples(st.just("put"), _GOOD_IDS, st.integers(0, 12)),
    st.tuples(st.just("clear")),
    st.tuples(st.just("bad get"), _BAD_IDS),
    st.tuples(st.just("bad put"), _GOOD_IDS | _BAD_IDS, st.sampled_from([-1, 2**64, "1", 0.5])),
)


def _apply(cache: Any, operation: tuple, step: int) -> Any:
    """Run one operation; an exception becomes its (type, message) so it can be compared."""
    kind, *args = operation
    try:
        if kind == "get":
            return cache.get(args[0], "miss")
        if kind == "peek":
            return cache.peek(args[0], "miss")
        if kind == "pop":
            return cache.pop(args[0], "miss")
        if kind == "contains":
            return args[0] in cache
        if kind == "put":
            return cache.put(args[0], f"image@{step}", args[1])
        if kind == "clear":
            return cache.clear()
        if kind == "bad get":
            return cache.get(args[0])
        if kind == "bad put":
            return cache.put(args[0], "bad", args[1])
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError(kind)


def _state(cache: Any) -> tuple:
    return (cache.items(), len(cache), cache.weight, cache.hits, cache.misses, cache.evictions)


@settings(max_examples=150, deadline=None)
@given(
    max_entries=st.integers(1, 5),
    max_weight=st.integers(1, 20),
    operations=st.lists(_OPERATIONS, max_size=60),
)
def test_native_pure_and_model_agree_on_random_operations(
    max_entries: int, max_weight: int, operations: list[tuple]
) -> None:
    caches = [PureSnapshotCache(max_entries, max_weight), ModelCache(max_entries, max_weight)]
    if not implementation.PURE_FORCED:
        caches.insert(0, _native_class()(max_entries, max_weight))
    twins = caches[:-1]
    for step, operation in enumerate(operations):
        if operation[0].startswith("bad"):
            # The model does no validation: the twins must fail identically and
            # change nothing, so the model is left out of this step.
            results = [_apply(cache, operation, step) for cache in twins]
            assert results[0][0] in (TypeError, ValueError), results
        else:
            results = [_apply(cache, operation, step) for cache in caches]
        assert all(result == results[0] for result in results), (operation, results)
        states = [_state(cache) for cache in caches]
        assert all(state == states[0] for state in states), (operation, states)


@pytest.mark.skipif(implementation.PURE_FORCED, reason="PYSERVER_PURE=1 forces the pure twin")
@settings(max_examples=60, deadline=None)
@given(
    max_entries=st.integers(0, 3) | st.sampled_from([-1, 2**64, U64_MAX, "2", 2.0]),
    max_weight=st.integers(0, 3) | st.sampled_from([-5, 2**64, U64_MAX, None]),
)
def test_native_and_pure_refuse_the_same_bounds_identically(
    max_entries: Any, max_weight: Any
) -> None:
    outcomes = []
    for cache_class in (_native_class(), PureSnapshotCache):
        try:
            cache = cache_class(max_entries, max_weight)
            outcomes.append((cache.max_entries, cache.max_weight))
        except (TypeError, ValueError) as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]
