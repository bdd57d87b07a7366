"""A cell's ring client: the cell's nodes, watched in ZooKeeper, as a hash ring.

`RingWatch(zk, cell)` watches `/cells/<cell>` (its state), the children of
`/cells/<cell>/nodes` and each child's data, and after every change publishes a
new immutable `RingView`: every registered node by id (`members`, draining
ones included) and a `pyserver.ring.HashRing` of the active ones. App servers
use it to know whom they may serve and where the others are; the discovery
service runs one per cell to answer "who owns this user".

    watch = RingWatch(zk, "cell-1")
    view = await watch.start()               # the first view, read from ZooKeeper
    view.owner(42)                           # NodeRecord of the owner, None if no node
    view.owner_address(42)                   # its "host:port"
    unsubscribe = watch.subscribe(callback)  # callback(view) after each change
    await watch.wait_until(lambda v: len(v.active) == 3, timeout_s=5)
    await watch.close()

While ZooKeeper cannot be reached the last view stays in place (and is re-read
as soon as the session is back). All nodes of a cell should advertise the same
token count; the ring uses it (the smallest, with a warning, if they differ),
unless the watch was given `tokens_per_node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pyserver.cluster import layout
from pyserver.cluster.layout import NodeRecord
from pyserver.cluster.zk import (
    CHILDREN_CHANGED,
    CREATED,
    DATA_CHANGED,
    DELETED,
    NoNode,
    ZooKeeper,
    ZooKeeperUnavailable,
)
from pyserver.errors import EmptyRing
from pyserver.ring import HashRing

__all__ = ["DEFAULT_TOKENS", "RingView", "RingWatch"]

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 64
_NODE_EVENTS = (DATA_CHANGED, DELETED)
_PARENT_EVENTS = (CHILDREN_CHANGED, DELETED, CREATED)
_CELL_EVENTS = (DATA_CHANGED, DELETED, CREATED)
# Pause before reading again after ZooKeeper failed to answer.
_RETRY_S = 0.5


@dataclass(frozen=True, slots=True, eq=False)
class RingView:
    """One published state of a cell: never changes once published (`version` orders them)."""

    cell: str
    version: int
    # every registered node by id, draining ones included
    members: Mapping[str, NodeRecord]
    # the active nodes' ring; do not modify it
    ring: HashRing
    # the cell's state ("enabled" or "disabled"), or "missing" if /cells/<cell> does not exist
    cell_state: str = "missing"

    @classmethod
    def empty(cls, cell: str) -> RingView:
        return cls(cell, 0, MappingProxyType({}), HashRing(DEFAULT_TOKENS))

    @property
    def active(self) -> list[str]:
        """The ids of the nodes on the ring, sorted."""
        return self.ring.nodes()

    def owner(self, user_id: int) -> NodeRecord | None:
        """The node that owns the user, or None when no node is active."""
        try:
            return self.members[self.ring.owner(user_id)]
        except EmptyRing:
            return None

    def owner_address(self, user_id: int) -> str | None:
        owner = self.owner(user_id)
        return owner.addr if owner is not None else None

    def successors(self, user_id: int, k: int) -> list[NodeRecord]:
        """The first k distinct active nodes clockwise from the user (the owner first)."""
        if not len(self.ring):
            return []
        return [self.members[node] for node in self.ring.successors(user_id, k)]

    def address_of(self, node_id: str) -> str | None:
        member = self.members.get(node_id)
        return member.addr if member is not None else None


RingListener = Callable[[RingView], None]


class RingWatch:
    """Keeps a `RingView` of one cell up to date from ZooKeeper (see the module docstring)."""

    def __init__(self, zk: ZooKeeper, cell: str, *, tokens_per_node: int | None = None) -> None:
        layout.check_name("cell", cell)
        if tokens_per_node is not None and not 1 <= tokens_per_node <= 65_536:
            raise ValueError("tokens_per_node must be in 1..65536")
        self.zk = zk
        self.cell = cell
        self._tokens = tokens_per_node
        self._view = RingView.empty(cell)
        self._listeners: list[RingListener] = []
        self._dirty = asyncio.Event()
        self._loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._watched_nodes: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._warned_tokens: tuple[int, ...] = ()
        # Connections seen, and the count when the last successful read began: the view is
        # `synced` once it was read after the latest (re)connection.
        self._connections = 0
        self._read_after = -1

    @property
    def view(self) -> RingView:
        """The latest view (an empty one before the first read)."""
        return self._view

    @property
    def synced(self) -> bool:
        """The view was read since the session last (re)connected: changes made while this
        process could not hear ZooKeeper are in it."""
        return self._read_after == self._connections and self.zk.live

    # ---- life ----

    async def start(self, timeout_s: float = 10.0) -> RingView:
        """Start watching; returns the first view, or raises ZooKeeperUnavailable."""
        if self._task is not None:
            raise RuntimeError("this RingWatch is already started")
        self.zk.add_watch(layout.cell_path(self.cell), _CELL_EVENTS, self._on_event)
        self.zk.add_watch(layout.nodes_path(self.cell), _PARENT_EVENTS, self._on_event)
        self.zk.add_listener(self._on_session)
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(timeout_s):
                await self._loaded.wait()
        except TimeoutError:
            await self.close()
            raise ZooKeeperUnavailable(
                f"could not read cell {self.cell} from ZooKeeper within {timeout_s:g} s"
            ) from None
        return self._view

    async def close(self) -> None:
        """Stop watching (the last view stays readable)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.zk.remove_listener(self._on_session)
        with contextlib.suppress(RuntimeError):
            self.zk.remove_watch(layout.cell_path(self.cell), _CELL_EVENTS, self._on_event)
            self.zk.remove_watch(layout.nodes_path(self.cell), _PARENT_EVENTS, self._on_event)
            for node_id in self._watched_nodes:
                self.zk.remove_watch(
                    layout.node_path(self.cell, node_id), _NODE_EVENTS, self._on_event
                )
        self._watched_nodes.clear()

    # ---- listening ----

    def subscribe(self, listener: RingListener) -> Callable[[], None]:
        """Call `listener(view)` on the loop after each new view; returns the unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def wait_until(self, predicate: Callable[[RingView], bool], timeout_s: float) -> RingView:
        """The first view (the current one included) for which predicate holds; TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self._view):
                changed = self._changed
                await changed.wait()
        return self._view

    def refresh(self) -> None:
        """Read the cell again soon (watches make this unnecessary; tools may call it)."""
        self._dirty.set()

    # ---- reading ----

    def _on_event(self, _path: str) -> None:
        self._dirty.set()

    def _on_session(self, state: str, _session_id: int | None) -> None:
        if state == "connected":
            self._connections += 1
            self._dirty.set()

    async def _run(self) -> None:
        while True:
            self._dirty.clear()
            connections = self._connections
            try:
                members, cell_state = await self._read()
            except ZooKeeperUnavailable as error:
                log.info("cell %s not read from ZooKeeper: %s", self.cell, error)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RETRY_S):
                        await self._dirty.wait()
                continue
            except Exception:
                log.exception("reading cell %s failed", self.cell)
                await asyncio.sleep(_RETRY_S)
                continue
            self._publish(members, cell_state)
            self._read_after = connections
            self._loaded.set()
            await self._dirty.wait()

    async def _read(self) -> tuple[dict[str, NodeRecord], str]:
        """The cell's state and nodes, setting a watch on everything read."""
        zk, cell = self.zk, self.cell
        try:
            data, _ = await zk.get(layout.cell_path(cell), watch=True)
            cell_state = layout.parse_cell_state(data)
        except NoNode:
            cell_state = "missing"
            if await zk.exists(layout.cell_path(cell), watch=True):
                self._dirty.set()  # created meanwhile: read again
        try:
            children = await zk.get_children(layout.nodes_path(cell), watch=True)
        except NoNode:
            children = []
            if await zk.exists(layout.nodes_path(cell), watch=True):
                self._dirty.set()
        for node_id in set(children) - self._watched_nodes:
            with contextlib.suppress(ValueError):
                zk.add_watch(layout.node_path(cell, node_id), _NODE_EVENTS, self._on_event)
                self._watched_nodes.add(node_id)
        for node_id in self._watched_nodes - set(children):
            zk.remove_watch(layout.node_path(cell, node_id), _NODE_EVENTS, self._on_event)
            self._watched_nodes.discard(node_id)
        readable = [node_id for node_id in sorted(children) if node_id in self._watched_nodes]
        replies = await asyncio.gather(
            *(zk.get(layout.node_path(cell, node_id), watch=True) for node_id in readable),
            return_exceptions=True,
        )
        members: dict[str, NodeRecord] = {}
        for node_id, reply in zip(readable, replies, strict=True):
            if isinstance(reply, NoNode):
                continue  # gone since the listing: the children watch has fired
            if isinstance(reply, BaseException):
                raise reply
            try:
                data, stat = reply
                members[node_id] = NodeRecord.from_bytes(node_id, data, stat.ephemeral_owner)
            except ValueError as error:
                log.warning("cell %s: ignoring node with bad data: %s", cell, error)
        return members, cell_state

    def _publish(self, members: dict[str, NodeRecord], cell_state: str) -> None:
        current = self._view
        unchanged = dict(current.members) == members and current.cell_state == cell_state
        if unchanged and current.version:
            return
        active = sorted(node_id for node_id, member in members.items() if member.active)
        ring = HashRing(self._tokens_for([members[node_id] for node_id in active]))
        for node_id in active:
            ring.add_node(node_id)
        view = RingView(
            cell=self.cell,
            version=current.version + 1,
            members=MappingProxyType(members),
            ring=ring,
            cell_state=cell_state,
        )
        self._view = view
        log.info(
            "cell %s ring v%d: active %s%s",
            self.cell,
            view.version,
            ",".join(active) or "(none)",
            "".join(f" {m.node_id}:{m.state}" for m in members.values() if not m.active),
        )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in list(self._listeners):
            try:
                listener(view)
            except Exception:
                log.exception("ring listener failed cell=%s", self.cell)

    def _tokens_for(self, active: list[NodeRecord]) -> int:
        if self._tokens is not None:
            return self._tokens
        counts = tuple(sorted({member.tokens for member in active}))
        if not counts:
            return DEFAULT_TOKENS
        if len(counts) > 1 and counts != self._warned_tokens:
            self._warned_tokens = counts
            log.warning(
                "cell %s: nodes advertise different token counts %s; the ring uses %d",
                self.cell,
                counts,
                counts[0],
            )
        return counts[0]
