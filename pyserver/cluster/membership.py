"""An app server's membership of its cell: its ephemeral node, kept for as long as it runs.

`join()` creates the persistent `/cells/<cell>` (state "enabled") and
`/cells/<cell>/nodes` if they are missing, then the node's ephemeral
`/cells/<cell>/nodes/<node-id>` holding its `NodeRecord` (address, token
count, state). A node id still held by another session (the same server
killed and restarted before ZooKeeper expired its old session) is waited for,
up to the join's deadline; an id held longer is refused. A node held by an
earlier session of this same process (aiozk gave it up without its expiring)
is removed at once.

When the session expires, ZooKeeper deletes the ephemeral node and aiozk opens
a new session without it: `Membership` notices the new session and registers
again, with the state it had (a draining node stays draining). `registered`
is true only while the node exists for the *current* session, and `live` only
while that session is also connected: the fence serves nothing otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import orjson

from pyserver.cluster import layout
from pyserver.cluster.layout import NodeRecord
from pyserver.cluster.zk import (
    BadVersion,
    NodeExists,
    NoNode,
    ZooKeeper,
    ZooKeeperUnavailable,
    retry_until,
)
from pyserver.errors import Unavailable

__all__ = ["Membership", "NodeIdInUse"]

log = logging.getLogger(__name__)

_POLL_S = 0.2


class NodeIdInUse(Unavailable):
    """Another live session holds this node id in the cell."""


class Membership:
    """One node's registration in one cell (see the module docstring)."""

    def __init__(
        self,
        zk: ZooKeeper,
        cell: str,
        node_id: str,
        tokens: int,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        layout.check_name("cell", cell)
        layout.check_name("node id", node_id)
        self.zk = zk
        self.cell = cell
        self.node_id = node_id
        self.path = layout.node_path(cell, node_id)
        details = {"pid": os.getpid(), "started": int(time.time()), **(extra or {})}
        # the address is known once the server listens: join() fills it in
        self.record = NodeRecord(node_id, "", tokens, "active", data=details)
        self._registered_session: int | None = None
        # every session this node was registered in (their nodes are this process's own)
        self._own_sessions: set[int] = set()
        self._reregistering: asyncio.Task[None] | None = None
        self._leaving = False
        self.registrations = 0

    # ---- state ----

    @property
    def state(self) -> str:
        """The node's state: "active" or "draining"."""
        return self.record.state

    @property
    def draining(self) -> bool:
        return self.record.state == "draining"

    @property
    def registered(self) -> bool:
        """The node exists in ZooKeeper for the current session."""
        return self._registered_session is not None and self._registered_session == (
            self.zk.session_id
        )

    @property
    def live(self) -> bool:
        """Registered, and the session is connected now."""
        return self.registered and self.zk.live

    # ---- joining and leaving ----

    async def join(self, addr: str, timeout_s: float) -> None:
        """Register in the cell as serving at `addr` ("host:port"); Unavailable
        (ZooKeeperUnavailable, NodeIdInUse) when that does not happen within timeout_s."""
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"addr: {addr!r} is not host:port")
        self.record = dataclasses.replace(self.record, addr=addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await retry_until(self._ensure_cell, timeout_s)
        await self._register(deadline - loop.time())
        self.zk.add_listener(self._on_session)

    async def _ensure_cell(self) -> None:
        created = await self.zk.ensure_persistent(
            layout.cell_path(self.cell), orjson.dumps({"state": "enabled"})
        )
        if created:
            log.info("created cell %s in ZooKeeper", self.cell)
        await self.zk.ensure_persistent(layout.nodes_path(self.cell))

    async def _register(self, timeout_s: float) -> None:
        """Create the ephemeral node for the current session, waiting out a stale one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        waited_for: int | None = None
        while True:
            try:
                await self._create_or_adopt()
                return
            except _HeldBy as held:
                if held.session in self._own_sessions:
                    await self._remove_left_behind(held)
                    continue
                if held.session != waited_for:
                    waited_for = held.session
                    log.warning(
                        "node id %s of cell %s is still held by session %#x; waiting for it "
                        "to expire",
                        self.node_id,
                        self.cell,
                        held.session,
                    )
                if loop.time() + _POLL_S >= deadline:
                    raise NodeIdInUse(
                        f"node id {self.node_id} of cell {self.cell} is held by another live "
                        f"session ({held.session:#x})"
                    ) from None
            except NoNode:  # the cell or its nodes folder was removed: make them again
                with contextlib.suppress(ZooKeeperUnavailable):
                    await self._ensure_cell()
            except ZooKeeperUnavailable:
                if loop.time() + _POLL_S >= deadline:
                    raise
            await asyncio.sleep(_POLL_S)

    async def _remove_left_behind(self, held: _HeldBy) -> None:
        """Delete the node an earlier session of this process still holds.

        aiozk gives a session up, and opens a new one, when ZooKeeper closes a reconnection
        before answering it (a server still starting, say), though ZooKeeper may keep the
        old session alive for its whole timeout. That session is this process's own and
        nobody can use it any more: waiting for it to expire would only keep this node
        fenced that long.
        """
        log.warning(
            "node id %s of cell %s is still held by this process's earlier session %#x; "
            "removing it",
            self.node_id,
            self.cell,
            held.session,
        )
        with contextlib.suppress(NoNode, BadVersion):
            await self.zk.delete(self.path, held.version)

    async def _create_or_adopt(self) -> None:
        data = self.record.to_bytes()
        with contextlib.suppress(NodeExists):
            await self.zk.create(self.path, data, ephemeral=True)
        # Whose is it? Ours if an earlier attempt's reply was lost, or just made.
        stored, stat = await self.zk.get(self.path)
        if stat.ephemeral_owner != self.zk.session_id:
            raise _HeldBy(stat.ephemeral_owner, stat.version)
        if stored != data:
            await self.zk.set_data(self.path, data, stat.version)
        first = self.registrations == 0
        self._registered_session = stat.ephemeral_owner
        self._own_sessions.add(stat.ephemeral_owner)
        self.registrations += 1
        log.info(
            "%s node %s in cell %s addr=%s state=%s session=%#x",
            "registered" if first else "registered again",
            self.node_id,
            self.cell,
            self.record.addr,
            self.record.state,
            stat.ephemeral_owner,
        )

    def _on_session(self, state: str, session_id: int | None) -> None:
        if self._leaving or state != "connected" or session_id == self._registered_session:
            return
        if self._reregistering is None or self._reregistering.done():
            self._reregistering = asyncio.get_running_loop().create_task(self._register_again())

    async def _register_again(self) -> None:
        """After a session expiry: register in the new session, for as long as it takes."""
        while not self._leaving and not self.registered:
            try:
                await self._register(2 * self.zk.negotiated_timeout_s + 2.0)
            except Unavailable as error:
                log.warning("registering again failed, retrying: %s", error)
                await asyncio.sleep(_POLL_S)
            except Exception:
                log.exception("registering again failed, retrying")
                await asyncio.sleep(1.0)

    async def set_state(self, state: str, timeout_s: float = 10.0) -> None:
        """Change this node's state ("active" or "draining") in ZooKeeper."""
        if state not in layout.NODE_STATES:
            raise ValueError(f"state must be one of {layout.NODE_STATES}")
        self.record = dataclasses.replace(self.record, state=state)
        data = self.record.to_bytes()

        async def write() -> None:
            # NoNode: not registered now; the next registration writes the new state
            with contextlib.suppress(NoNode):
                await self.zk.set_data(self.path, data)

        await retry_until(write, timeout_s)

    def observe(self, record: NodeRecord | None) -> None:
        """Adopt the state another party wrote to this node's record (`pyserver admin drain`).

        Only this registration's record counts: one left by a previous process with
        this node id (killed, its session not yet expired) says nothing about this one.
        """
        if record is None or record.session != self._registered_session:
            return
        if record.state != self.record.state:
            log.info("node %s: state set to %s in ZooKeeper", self.node_id, record.state)
            self.record = dataclasses.replace(self.record, state=record.state)

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Delete the node (the session itself is closed by its owner)."""
        self._leaving = True
        self.zk.remove_listener(self._on_session)
        if self._reregistering is not None:
            self._reregistering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reregistering
        if not self.registered:
            return
        session = self._registered_session
        self._registered_session = None
        try:
            async with asyncio.timeout(timeout_s):
                _, stat = await self.zk.get(self.path)
                if stat.ephemeral_owner == session:
                    await self.zk.delete(self.path)
        except NoNode:
            pass
        except (ZooKeeperUnavailable, TimeoutError) as error:
            log.warning("could not delete node %s (it goes with the session): %s", self.path, error)
        else:
            log.info("node %s left cell %s", self.node_id, self.cell)


class _HeldBy(Exception):
    def __init__(self, session: int, version: int) -> None:
        super().__init__(f"held by session {session:#x}")
        self.session = session
        self.version = version
