"""Side-by-side timing: every contender is measured in the same run, round-robin.

The machines are shared and noisy, so contenders are interleaved (one round of
each, then the next round) and each keeps its fastest round: a slow-down that
hits one round hits its neighbours too, and ratios stay honest.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def _calls_for(fn: Callable[[], object], target_s: float) -> int:
    """How many calls of fn take about target_s."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 10 or calls >= 1 << 24:
            return max(1, int(calls * target_s / max(elapsed, 1e-9)))
        calls *= 4


def compare(
    contenders: dict[str, Callable[[], object]],
    ops_per_call: int = 1,
    rounds: int = 5,
    round_s: float = 0.05,
) -> dict[str, float]:
    """Nanoseconds per operation for each contender, measured round-robin.

    `fn()` performs `ops_per_call` operations; each round runs fn for about round_s.
    """
    calls = {name: _calls_for(fn, round_s) for name, fn in contenders.items()}
    best = dict.fromkeys(contenders, float("inf"))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in contenders.items():
                n = calls[name]
                start = time.perf_counter_ns()
                for _ in range(n):
                    fn()
                elapsed = time.perf_counter_ns() - start
                best[name] = min(best[name], elapsed / (n * ops_per_call))
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def entry(native_ns: float, pure_ns: float, peers: dict[str, float]) -> dict[str, object]:
    """One benchmark's figures in the shape `python -m bench micro --json` prints."""
    return {
        "native_ns": round(native_ns, 1),
        "pure_ns": round(pure_ns, 1),
        "speedup": round(pure_ns / native_ns, 2),
        "peers": {name: round(ns, 1) for name, ns in peers.items()},
    }
