"""`python -m bench ops`: the operations of issue 13, measured.

* `evacuate_*` (`bench.ops_evacuate`): a cell of 10,000 users emptied into another
  by `pyserver cell evacuate`, against the store-copy ceiling of the same users.
* `rollout_*` (`bench.ops_rollout`): a 3-node cell rolled by `pyserver cluster
  rollout` under a steady load through `ClusterClient`, against that load at rest.

Each part is its own module with `run(quick) -> dict`; their figures are merged.
"""

from __future__ import annotations

from typing import Any

from bench import ops_evacuate, ops_rollout


def run(quick: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results.update(ops_evacuate.run(quick=quick))
    results.update(ops_rollout.run(quick=quick))
    return results
