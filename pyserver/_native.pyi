"""Type stubs for `pyserver._native`, the Rust core (PyO3).

The pure-Python twins in `pyserver.pure` have exactly this API.
"""

from collections.abc import Iterable, Sequence
from typing import Any

RELEASE_BUILD: bool

# ---- hash ring (DESIGN.md "Hash ring") ----

def key_position(user_id: int) -> int:
    """xxh3_64 of the user id as 8 little-endian bytes. ValueError if not in 0..2**64-1."""

def token_position(node_id: str, index: int) -> int:
    """xxh3_64 of utf8(f"{node_id}#{index}")."""

class HashRing:
    def __init__(self, tokens_per_node: int = 64) -> None: ...
    @property
    def tokens_per_node(self) -> int: ...
    def add_node(self, node_id: str) -> None:
        """ValueError if the node is already on the ring or the id is empty."""
    def remove_node(self, node_id: str) -> None:
        """KeyError if the node is not on the ring."""
    def nodes(self) -> list[str]:
        """The node ids, sorted."""
    def __len__(self) -> int: ...
    def __contains__(self, node_id: object) -> bool: ...
    def owner(self, user_id: int) -> str:
        """EmptyRing if no nodes; ValueError if not in 0..2**64-1; TypeError if not an int."""
    def owners(self, user_ids: Sequence[int]) -> list[str]:
        """owner() of each id, in order."""
    def successors(self, user_id: int, k: int) -> list[str]:
        """The first k distinct nodes clockwise from the user's position (all, if fewer)."""
    def shares(self) -> dict[str, float]:
        """Each node's fraction of the 2**64 key space; the fractions sum to 1.0."""

# ---- log-record codec (docs/log-format.md) ----

def encode(entry: dict[str, Any]) -> bytes: ...
def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]: ...
def encode_batch(entries: Iterable[dict[str, Any]]) -> bytes: ...
def decode_batch(data: bytes | bytearray | memoryview) -> list[dict[str, Any]]: ...

# ---- LRU snapshot cache ----

class SnapshotCache:
    """User images keyed by user id, bounded by a count and a total weight (bytes)."""

    def __init__(self, max_entries: int, max_weight: int) -> None: ...
    @property
    def max_entries(self) -> int: ...
    @property
    def max_weight(self) -> int: ...
    @property
    def weight(self) -> int:
        """The sum of the weights of the entries held."""
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    def get(self, user_id: int, default: Any = None) -> Any:
        """The image, made most recently used (a hit), or default (a miss)."""
    def peek(self, user_id: int, default: Any = None) -> Any:
        """The image without touching recency or the counters."""
    def put(self, user_id: int, image: Any, weight: int) -> list[tuple[int, Any]]:
        """Store (or replace) as most recently used; returns the evicted (user_id, image) pairs,
        least recently used first. An image heavier than max_weight is not kept: it comes back
        at once as evicted."""
    def pop(self, user_id: int, default: Any = None) -> Any:
        """Remove and return the image, or default. Not an eviction."""
    def __contains__(self, user_id: object) -> bool: ...
    def __len__(self) -> int: ...
    def clear(self) -> None:
        """Drop every entry (not counted as evictions); counters are kept."""
    def items(self) -> list[tuple[int, Any]]:
        """Every (user_id, image), least recently used first, without touching recency."""
