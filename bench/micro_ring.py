"""Micro-benchmarks of the hash ring: native and pure twins beside uhashring.

Every contender holds the same 5 nodes x 64 tokens and looks up the same
random 64-bit user ids; uhashring hashes differently (md5), so only its speed
is comparable, not its answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import uhashring

from bench.timing import compare, entry
from pyserver import _native
from pyserver.pure import ring as pure_ring

NODES = ["app-1", "app-2", "app-3", "app-4", "app-5"]
TOKENS_PER_NODE = 64
BATCH = 100_000
SINGLE_CALLS = 1_000  # owner() calls per timed call, to dilute the timer's overhead


def _ring(module):
    ring = module.HashRing(TOKENS_PER_NODE)
    for node in NODES:
        ring.add_node(node)
    return ring


def _one_by_one(lookup: Callable[[int], object], ids: list[int]) -> Callable[[], None]:
    def run() -> None:
        for user_id in ids:
            lookup(user_id)

    return run


def run(quick: bool = False) -> dict[str, dict]:
    rng = random.Random(20110315)
    native = _ring(_native)
    pure = _ring(pure_ring)
    peer = uhashring.HashRing(nodes=NODES, vnodes=TOKENS_PER_NODE)
    timing = {"rounds": 2, "round_s": 0.01} if quick else {"rounds": 5, "round_s": 0.1}

    single_ids = [rng.getrandbits(64) for _ in range(SINGLE_CALLS)]
    single = compare(
        {
            "native": _one_by_one(native.owner, single_ids),
            "pure": _one_by_one(pure.owner, single_ids),
            "uhashring": _one_by_one(peer.get_node, single_ids),
        },
        ops_per_call=SINGLE_CALLS,
        **timing,
    )

    batch_ids = [rng.getrandbits(64) for _ in range(BATCH // 10 if quick else BATCH)]
    assert native.owners(batch_ids) == pure.owners(batch_ids)
    get_node = peer.get_node
    batch = compare(
        {
            "native": lambda: native.owners(batch_ids),
            "pure": lambda: pure.owners(batch_ids),
            "uhashring": lambda: [get_node(user_id) for user_id in batch_ids],
        },
        ops_per_call=len(batch_ids),
        **timing,
    )

    owners_batch = entry(batch["native"], batch["pure"], {"uhashring": batch["uhashring"]})
    owners_batch["native_ids_per_s"] = round(1e9 / batch["native"])
    return {
        "ring_owner": entry(single["native"], single["pure"], {"uhashring": single["uhashring"]}),
        "ring_owners_batch": owners_batch,
    }
