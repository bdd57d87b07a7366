"""The ZooKeeper layout of cells and the records stored in it (DESIGN.md "Ownership and fencing").

Under the configured chroot:

    /cells/<cell>                  persistent; {"state": "enabled"|"disabled", ...}
    /cells/<cell>/nodes            persistent (never a container node)
    /cells/<cell>/nodes/<node-id>  ephemeral;  {"addr": "host:port", "tokens": N,
                                                "state": "active"|"draining", ...}

Paths here are relative to the chroot (`pyserver.cluster.zk.ZooKeeper` adds it).
Records are JSON objects; fields this version does not know are kept and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "CELL_STATES",
    "NODE_STATES",
    "NodeRecord",
    "cell_path",
    "check_name",
    "node_path",
    "nodes_path",
    "parse_cell_state",
]

CELLS = "/cells"
CELL_STATES = ("enabled", "disabled")
NODE_STATES = ("active", "draining")
# A ZooKeeper path component may not contain "/" and should stay printable.
_MAX_NAME = 200


def check_name(kind: str, name: str) -> str:
    """A cell or node id usable as one path component; ValueError otherwise."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_NAME
        or "/" in name
        or name in (".", "..")
        or not name.isprintable()
    ):
        raise ValueError(f"{kind}: {name!r} is not a usable id (1-200 printable characters, no /)")
    return name


def cell_path(cell: str) -> str:
    return f"{CELLS}/{check_name('cell', cell)}"


def nodes_path(cell: str) -> str:
    return f"{cell_path(cell)}/nodes"


def node_path(cell: str, node_id: str) -> str:
    return f"{nodes_path(cell)}/{check_name('node id', node_id)}"


def parse_cell_state(data: bytes) -> str:
    """A cell node's state ("enabled" when the data says nothing usable)."""
    try:
        record = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return "enabled"
    state = record.get("state") if isinstance(record, dict) else None
    return state if state in CELL_STATES else "enabled"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One app server of a cell, as its ephemeral node describes it."""

    node_id: str
    addr: str
    tokens: int
    state: str = "active"
    # every field of the stored object, the ones above included
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the ZooKeeper session holding the ephemeral node (0: not read from ZooKeeper)
    session: int = 0

    @property
    def active(self) -> bool:
        return self.state == "active"

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.addr.rpartition(":")
        return host, int(port)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {**self.data, "addr": self.addr, "tokens": self.tokens, "state": self.state}
        )

    @classmethod
    def from_bytes(cls, node_id: str, data: bytes, session: int = 0) -> NodeRecord:
        """The record of node `node_id` (held by `session`); ValueError if the data is not one."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"node {node_id}: data is not JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"node {node_id}: data is not a JSON object")
        addr = raw.get("addr")
        host, _, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"node {node_id}: addr {addr!r} is not host:port")
        tokens = raw.get("tokens", 64)
        if type(tokens) is not int or not 1 <= tokens <= 65_536:
            raise ValueError(f"node {node_id}: tokens {tokens!r} is not in 1..65536")
        state = raw.get("state", "active")
        if state not in NODE_STATES:
            raise ValueError(f"node {node_id}: state {state!r} is not one of {NODE_STATES}")
        return cls(node_id, addr, tokens, state, data=raw, session=session)
