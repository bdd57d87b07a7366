"""The hash ring (DESIGN.md "Hash ring"): one suite run against both twins.

The native twin is skipped only when PYSERVER_PURE=1 forces the pure one; a
native module that fails to import makes its tests fail.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyserver.ring
from pyserver import implementation
from pyserver.errors import EmptyRing, PyserverError
from pyserver.pure import ring as pure_ring
from tests import support

VECTORS_FILE = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "ring-v1.json"
VECTORS = json.loads(VECTORS_FILE.read_text())
CASES = VECTORS["cases"]
CASE_IDS = [f"{case['nodes'][0]}x{len(case['nodes'])}" for case in CASES]

APPS = ["app-1", "app-2", "app-3", "app-4", "app-5"]
U64_MAX = 2**64 - 1


def _native() -> ModuleType:
    return support.native("pyserver._native")


@pytest.fixture(params=["native", "pure"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The module holding HashRing, key_position and token_position of one twin."""
    return _native() if request.param == "native" else pure_ring


def build(impl: ModuleType, nodes: list[str], tokens_per_node: int = 64):
    ring = impl.HashRing(tokens_per_node)
    for node in nodes:
        ring.add_node(node)
    return ring


# ---- the shared vectors ----


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_key_positions_match_vectors(impl, case):
    for user_id, position in case["key_positions"].items():
        assert impl.key_position(int(user_id)) == position


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_first_tokens_match_vectors(impl, case):
    for node, positions in case["first_tokens"].items():
        assert [impl.token_position(node, i) for i in range(len(positions))] == positions


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owners_match_vectors(impl, case):
    ring = build(impl, case["nodes"], case["tokens_per_node"])
    expected = case["owners"]
    assert [ring.owner(int(u)) for u in expected] == list(expected.values())
    assert ring.owners([int(u) for u in expected]) == list(expected.values())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_successors_match_vectors(impl, case):
    ring = build(impl, case["nodes"], case["tokens_per_node"])
    for user_id, nodes in case["successors_3"].items():
        assert ring.successors(int(user_id), 3) == nodes


@pytest.mark.parametrize("case", [c for c in CASES if "after_removing" in c])
def test_owners_after_removal_match_vectors(impl, case):
    ring = build(impl, case["nodes"], case["tokens_per_node"])
    ring.remove_node(case["after_removing"])
    expected = case["owners_after_removal"]
    assert ring.owners([int(u) for u in expected]) == list(expected.values())
    assert case["after_removing"] not in expected.values()


def test_insertion_order_does_not_matter(impl):
    case = CASES[0]
    forward = build(impl, case["nodes"])
    backward = build(impl, list(reversed(case["nodes"])))
    ids = [int(u) for u in case["owners"]]
    assert forward.owners(ids) == backward.owners(ids) == list(case["owners"].values())


# ---- membership and queries ----


def test_membership(impl):
    ring = build(impl, ["b", "c", "a"], 8)
    assert ring.nodes() == ["a", "b", "c"]
    assert len(ring) == 3
    assert "b" in ring
    assert "z" not in ring
    assert 5 not in ring
    assert None not in ring
    assert ring.tokens_per_node == 8
    ring.remove_node("b")
    assert ring.nodes() == ["a", "c"]
    assert "b" not in ring
    assert impl.HashRing().tokens_per_node == 64


def test_owners_equals_owner_of_each(impl):
    ring = build(impl, APPS)
    rng = random.Random(7)
    ids = [rng.getrandbits(64) for _ in range(3000)] + [0, 1, U64_MAX, True, False]
    expected = [ring.owner(u) for u in ids]
    assert ring.owners(ids) == expected
    assert ring.owners(tuple(ids)) == expected
    assert ring.owners(iter(ids)) == expected
    assert ring.owners(u for u in ids) == expected
    assert ring.owners([]) == []
    assert set(expected) == set(APPS)


def test_owners_hands_out_the_rings_own_strings(impl):
    ring = build(impl, APPS)
    names = {id(node) for node in ring.nodes()}
    assert {id(node) for node in ring.owners(list(range(2000)))} == names
    assert id(ring.owner(3)) in names


def test_owners_keeps_reference_counts_balanced(impl):
    ring = build(impl, ["solo"], 4)
    name = ring.nodes()[0]
    before = sys.getrefcount(name)
    result = ring.owners(list(range(1000)))
    assert sys.getrefcount(name) == before + 1000
    del result
    assert sys.getrefcount(name) == before
    with pytest.raises(ValueError):
        ring.owners([*range(500), -1])
    assert sys.getrefcount(name) == before


def test_successors(impl):
    ring = build(impl, APPS, 16)
    for user_id in range(300):
        everyone = ring.successors(user_id, 99)
        assert sorted(everyone) == APPS
        assert everyone[0] == ring.owner(user_id)
        assert ring.successors(user_id, 2) == everyone[:2]
        assert ring.successors(user_id, 0) == []
    assert ring.successors(1, 10**30) == ring.successors(1, 5)


def test_shares_sum_to_one_and_match_the_owners(impl):
    ring = build(impl, APPS)
    shares = ring.shares()
    assert list(shares) == APPS
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    rng = random.Random(3)
    owned = Counter(ring.owners([rng.getrandbits(64) for _ in range(40_000)]))
    for node, share in shares.items():
        assert owned[node] / 40_000 == pytest.approx(share, abs=0.015)
    assert build(impl, ["solo"], 1).shares() == {"solo": 1.0}
    assert impl.HashRing().shares() == {}


def test_a_leaving_node_moves_only_its_users(impl):
    ring = build(impl, APPS)
    ids = list(range(20_000))
    before = ring.owners(ids)
    ring.remove_node("app-3")
    after = ring.owners(ids)
    moved_to = Counter(new for old, new in zip(before, after, strict=True) if old != new)
    assert all(old == "app-3" for old, new in zip(before, after, strict=True) if old != new)
    assert "app-3" not in after
    assert set(moved_to) == {"app-1", "app-2", "app-4", "app-5"}
    # Spread over the neighbours, not dumped on one of them.
    assert max(moved_to.values()) < 0.6 * sum(moved_to.values())
    ring.add_node("app-3")
    assert ring.owners(ids) == before  # a restarted node takes its users back


def test_a_joining_node_takes_users_from_many(impl):
    ring = build(impl, APPS)
    ids = list(range(20_000))
    before = ring.owners(ids)
    ring.add_node("app-6")
    after = ring.owners(ids)
    taken_from = Counter(old for old, new in zip(before, after, strict=True) if old != new)
    assert all(new == "app-6" for old, new in zip(before, after, strict=True) if old != new)
    assert set(taken_from) == set(APPS)
    assert 0.1 < sum(taken_from.values()) / len(ids) < 0.25


def test_a_one_token_ring_owns_every_position(impl):
    ring = build(impl, ["only"], 1)
    assert set(ring.owners([0, U64_MAX, 12345])) == {"only"}


# ---- bad input ----


@pytest.mark.parametrize(
    ("user_id", "error"),
    [
        ("1", TypeError),
        (1.0, TypeError),
        (None, TypeError),
        (b"\x01", TypeError),
        (-1, ValueError),
        (2**64, ValueError),
        (-(2**70), ValueError),
    ],
)
def test_bad_user_ids(impl, user_id, error):
    ring = build(impl, APPS, 4)
    with pytest.raises(error, match="user id"):
        ring.owner(user_id)
    with pytest.raises(error, match="user id"):
        ring.owners([1, 2, user_id, 3])
    with pytest.raises(error, match="user id"):
        ring.owners(iter([1, user_id]))
    with pytest.raises(error, match="user id"):
        ring.successors(user_id, 2)
    with pytest.raises(error, match="user id"):
        impl.key_position(user_id)
    # A bad id is reported before an empty ring.
    with pytest.raises(error):
        impl.HashRing().owners([user_id])


def test_empty_ring(impl):
    ring = impl.HashRing()
    for call in (lambda: ring.owner(1), lambda: ring.owners([1, 2]), lambda: ring.successors(1, 2)):
        with pytest.raises(EmptyRing) as caught:
            call()
        assert isinstance(caught.value, PyserverError)
        assert caught.value.code == "UNAVAILABLE"
    with pytest.raises(EmptyRing):
        ring.owners([])
    ring.add_node("a")
    ring.remove_node("a")
    with pytest.raises(EmptyRing):
        ring.owner(0)


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (65_537, ValueError),
        (2**70, ValueError),
        ("64", TypeError),
        (64.0, TypeError),
        (None, TypeError),
    ],
)
def test_bad_tokens_per_node(impl, tokens, error):
    with pytest.raises(error, match="tokens_per_node"):
        impl.HashRing(tokens)


def test_bad_node_ids(impl):
    ring = build(impl, ["a"], 2)
    with pytest.raises(ValueError, match="already"):
        ring.add_node("a")
    with pytest.raises(ValueError, match="empty"):
        ring.add_node("")
    with pytest.raises(TypeError):
        ring.add_node(7)
    with pytest.raises(TypeError):
        ring.add_node(b"b")
    with pytest.raises(UnicodeEncodeError):
        ring.add_node("\ud800")
    with pytest.raises(KeyError):
        ring.remove_node("b")
    with pytest.raises(KeyError):
        ring.remove_node("\ud800")
    with pytest.raises(TypeError):
        ring.remove_node(None)
    assert ring.nodes() == ["a"]


@pytest.mark.parametrize(
    ("k", "error"), [(-1, ValueError), (-(2**70), ValueError), ("2", TypeError), (2.0, TypeError)]
)
def test_bad_successor_counts(impl, k, error):
    ring = build(impl, APPS, 4)
    with pytest.raises(error, match="k"):
        ring.successors(1, k)


def test_bad_token_positions(impl):
    assert impl.token_position("a", True) == impl.token_position("a", 1)
    assert impl.token_position("", 0) == pure_ring.token_position("", 0)
    with pytest.raises(ValueError):
        impl.token_position("a", -1)
    with pytest.raises(ValueError):
        impl.token_position("a", 2**64)
    with pytest.raises(TypeError):
        impl.token_position("a", "0")
    with pytest.raises(TypeError):
        impl.token_position(1, 0)


def test_facade_picks_the_built_twin():
    expected = "native" if implementation.native is not None else "pure"
    assert expected == pyserver.ring.IMPLEMENTATION
    module = implementation.native if implementation.native is not None else pure_ring
    assert pyserver.ring.HashRing is module.HashRing
    assert pyserver.ring.key_position is module.key_position
    assert pyserver.ring.token_position is module.token_position


# ---- the twins agree ----

node_ids = st.text(min_size=1, max_size=12)  # no lone surrogates by default
user_ids = st.integers(min_value=0, max_value=U64_MAX)


@pytest.mark.skipif(implementation.PURE_FORCED, reason="PYSERVER_PURE=1 forces the pure twin")
@settings(max_examples=60, deadline=None)
@given(
    nodes=st.lists(node_ids, min_size=1, max_size=8, unique=True),
    tokens_per_node=st.integers(min_value=1, max_value=24),
    ids=st.lists(user_ids, max_size=60),
    k=st.integers(min_value=0, max_value=10),
    removed=st.integers(min_value=0, max_value=7),
)
def test_native_and_pure_agree(nodes, tokens_per_node, ids, k, removed):
    native = build(_native(), nodes, tokens_per_node)
    pure = build(pure_ring, nodes, tokens_per_node)
    for ring in (native, pure):
        ring.remove_node(nodes[removed % len(nodes)])
    assert native.nodes() == pure.nodes()
    assert native.shares() == pure.shares()
    if len(native) == 0:
        return
    assert native.owners(ids) == pure.owners(ids)
    for user_id in ids[:10]:
        assert _native().key_position(user_id) == pure_ring.key_position(user_id)
        assert native.successors(user_id, k) == pure.successors(user_id, k)


@pytest.mark.skipif(implementation.PURE_FORCED, reason="PYSERVER_PURE=1 forces the pure twin")
@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none(), st.booleans()))
def test_native_and_pure_raise_alike(value):
    outcomes = []
    for impl in (_native(), pure_ring):
        ring = build(impl, ["a", "b"], 4)
        try:
            outcomes.append(("ok", ring.owner(value), ring.successors(value, 1)))
        except Exception as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]
