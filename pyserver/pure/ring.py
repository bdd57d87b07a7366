"""The consistent hash ring of DESIGN.md "Hash ring", in pure Python.

The twin of the Rust ring in `pyserver._native`: the same API, the same
owners, the same errors. Tokens live in a sorted list of positions searched
with `bisect`; a parallel list names each token's node.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from xxhash import xxh3_64_intdigest

from pyserver.errors import EmptyRing

__all__ = ["MAX_TOKENS_PER_NODE", "HashRing", "key_position", "token_position"]

# The most tokens a node may hold; far above any useful count, low enough that
# a typo cannot make add_node hash billions of tokens.
MAX_TOKENS_PER_NODE = 65_536

_KEY_SPACE = 1 << 64

# The unbound method rejects a non-int with TypeError and an int outside
# 0..2**64-1 with OverflowError, without running any user code.
_int_to_bytes = int.to_bytes


def _u64_error(value: object, what: str) -> Exception:
    """The error for a value that is not an int in 0..2**64-1."""
    if isinstance(value, int):
        return ValueError(f"{what} out of range 0..2**64-1: {value!s}")
    return TypeError(f"{what} must be an int, not {type(value).__name__}")


def _check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str):
        raise TypeError(f"node id must be a str, not {type(node_id).__name__}")
    return node_id


def key_position(user_id: int) -> int:
    """xxh3_64 of the user id as 8 little-endian bytes. ValueError if not in 0..2**64-1."""
    try:
        return xxh3_64_intdigest(_int_to_bytes(user_id, 8, "little"))
    except (TypeError, OverflowError):
        raise _u64_error(user_id, "user id") from None


def token_position(node_id: str, index: int) -> int:
    """xxh3_64 of utf8(f"{node_id}#{index}")."""
    _check_node_id(node_id)
    if not isinstance(index, int):
        raise _u64_error(index, "token index")
    if not 0 <= index < _KEY_SPACE:
        raise _u64_error(index, "token index")
    # ":d" spells True as 1, as the native twin reads it.
    return xxh3_64_intdigest(f"{node_id}#{index:d}".encode())


class HashRing:
    """A consistent hash ring of app-server nodes (DESIGN.md "Hash ring")."""

    __slots__ = ("_node_set", "_node_tokens", "_nodes", "_owners", "_positions", "_tokens_per_node")

    def __init__(self, tokens_per_node: int = 64) -> None:
        if not isinstance(tokens_per_node, int):
            raise TypeError(f"tokens_per_node must be an int, not {type(tokens_per_node).__name__}")
        if not 1 <= tokens_per_node <= MAX_TOKENS_PER_NODE:
            raise ValueError(
                f"tokens_per_node must be in 1..{MAX_TOKENS_PER_NODE}, got {tokens_per_node!s}"
            )
        self._tokens_per_node = int(tokens_per_node)
        self._nodes: list[str] = []  # sorted
        self._node_set: set[str] = set()
        self._node_tokens: dict[str, list[int]] = {}
        # Every token's position, ascending; ties ordered by node id.
        self._positions: list[int] = []
        # _owners[i] names the node of token i; one extra slot repeats token 0's
        # node, so a key past the last token wraps round without a branch.
        self._owners: list[str] = []

    @property
    def tokens_per_node(self) -> int:
        return self._tokens_per_node

    def add_node(self, node_id: str) -> None:
        """ValueError if the node is already on the ring or the id is empty."""
        _check_node_id(node_id)
        # An exact str even if given a str subclass, as the native twin does.
        node_id = str.__str__(node_id)
        if not node_id:
            raise ValueError("node id must not be empty")
        if node_id in self._node_set:
            raise ValueError(f"node {node_id!r} is already on the ring")
        tokens = [token_position(node_id, i) for i in range(self._tokens_per_node)]
        self._node_tokens[node_id] = tokens
        self._node_set.add(node_id)
        self._nodes.insert(bisect_left(self._nodes, node_id), node_id)
        self._rebuild_tokens()

    def remove_node(self, node_id: str) -> None:
        """KeyError if the node is not on the ring."""
        _check_node_id(node_id)
        if node_id not in self._node_set:
            raise KeyError(node_id)
        self._node_set.remove(node_id)
        del self._node_tokens[node_id]
        self._nodes.remove(node_id)
        self._rebuild_tokens()

    def _rebuild_tokens(self) -> None:
        tokens = sorted(
            (position, node_id)
            for node_id, positions in self._node_tokens.items()
            for position in positions
        )
        self._positions = [position for position, _ in tokens]
        self._owners = [node_id for _, node_id in tokens]
        if tokens:
            self._owners.append(self._owners[0])

    def nodes(self) -> list[str]:
        """The node ids, sorted."""
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and node_id in self._node_set

    def owner(self, user_id: int) -> str:
        """The owner of a user.

        EmptyRing if no nodes; ValueError if the id is not in 0..2**64-1; TypeError if not an int.
        """
        try:
            position = xxh3_64_intdigest(_int_to_bytes(user_id, 8, "little"))
        except (TypeError, OverflowError):
            raise _u64_error(user_id, "user id") from None
        if not self._positions:
            raise EmptyRing("the ring has no nodes")
        return self._owners[bisect_left(self._positions, position)]

    def owners(self, user_ids: Sequence[int] | Iterable[int]) -> list[str]:
        """owner() of each id, in order."""
        ids = user_ids if isinstance(user_ids, (list, tuple)) else list(user_ids)
        positions = self._positions
        owners = self._owners
        if not positions:
            for user_id in ids:
                key_position(user_id)  # a bad id is reported before the empty ring
            raise EmptyRing("the ring has no nodes")
        try:
            return [
                owners[bisect_left(positions, xxh3_64_intdigest(_int_to_bytes(u, 8, "little")))]
                for u in ids
            ]
        except (TypeError, OverflowError):
            for user_id in ids:
                key_position(user_id)  # raises the error for the first bad id
            raise

    def successors(self, user_id: int, k: int) -> list[str]:
        """The first k distinct nodes clockwise from the user's position.

        Fewer if the ring has fewer nodes.
        """
        position = key_position(user_id)
        if not isinstance(k, int):
            raise TypeError(f"k must be an int, not {type(k).__name__}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k!s}")
        if not self._positions:
            raise EmptyRing("the ring has no nodes")
        wanted = min(k, len(self._nodes))
        found: list[str] = []
        seen: set[str] = set()
        owners = self._owners
        count = len(self._positions)
        start = bisect_left(self._positions, position)
        for step in range(count):
            if len(found) == wanted:
                break
            node_id = owners[(start + step) % count]
            if node_id not in seen:
                seen.add(node_id)
                found.append(node_id)
        return found

    def shares(self) -> dict[str, float]:
        """Each node's fraction of the 2**64 key space; the fractions sum to 1.0."""
        counts = dict.fromkeys(self._nodes, 0)
        positions = self._positions
        if positions:
            # A token owns the positions after the previous token up to its own;
            # the first token's arc wraps round from the last.
            previous = positions[-1] - _KEY_SPACE
            for position, node_id in zip(positions, self._owners, strict=False):
                counts[node_id] += position - previous
                previous = position
        return {node_id: count / _KEY_SPACE for node_id, count in counts.items()}
