"""`OwnershipFence`: whether this app server may serve a user now, and who does otherwise.

DESIGN.md "Ownership and fencing": a node serves a user only while (a) its
ZooKeeper session is live and its registration exists in it and (b) the ring
it last read, after its latest (re)connection, names it owner; a draining node
serves nobody. The fence answers the Mailbox's hooks:

* `owns(user)`: all of the above hold, now (checked on every request; no I/O);
* `owner_of(user)`: for NOT_OWNER, the "host:port" of the node the ring names
  (for a draining node, the next node clockwise, which is the owner once it
  has left); None when this node is the owner but may not serve (fenced):
  the request gets UNAVAILABLE and is retried.

ZooKeeper only routes: the store's compare-and-set on every append stays the
last word (a node that lost a race reloads the user and checks again).

`bind(mailbox)` also keeps the mailbox's write-through cache honest: images of
users whose ownership moved to another node are dropped (that node may write
their logs; if they come back here they are loaded again), and so is every
image when the session was lost (another node may have served any of them).
"""

from __future__ import annotations

import logging
from typing import Protocol

from pyserver.cluster.membership import Membership
from pyserver.cluster.ringwatch import RingView, RingWatch
from pyserver.errors import EmptyRing

__all__ = ["OwnershipFence", "Releasing"]

log = logging.getLogger(__name__)


class Releasing(Protocol):
    """What the fence needs of `pyserver.app.mailbox.Mailbox`."""

    def release(self, keep: object = None) -> int: ...


class OwnershipFence:
    """The ownership hooks of one app server (see the module docstring)."""

    def __init__(self, membership: Membership, ring: RingWatch) -> None:
        self.node_id = membership.node_id
        self._membership = membership
        self._ring = ring
        self._session: int | None = None
        self._cache: Releasing | None = None

    @property
    def serving(self) -> bool:
        """This node may serve the users the ring gives it (live, synced, not draining)."""
        membership = self._membership
        return membership.live and not membership.draining and self._ring.synced

    def owns(self, user_id: int) -> bool:
        if not self.serving:
            return False
        try:
            return self._ring.view.ring.owner(user_id) == self.node_id
        except EmptyRing:
            return False

    def owner_of(self, user_id: int) -> str | None:
        view = self._ring.view
        try:
            nodes = view.ring.successors(user_id, 2)
        except EmptyRing:
            return None
        if not nodes:
            return None
        if nodes[0] != self.node_id:
            return view.address_of(nodes[0])
        if self._membership.draining and len(nodes) > 1:
            return view.address_of(nodes[1])
        return None

    def ring_names_me(self, user_id: int) -> bool:
        """The last ring read names this node owner (whatever the session's state)."""
        try:
            return self._ring.view.ring.owner(user_id) == self.node_id
        except EmptyRing:
            return False

    # ---- keeping the cache honest ----

    def bind(self, cache: Releasing) -> None:
        """Release `cache`'s images as ownership moves (`Mailbox.release`)."""
        self._cache = cache
        self._session = self._membership.zk.session_id
        self._ring.subscribe(self._on_view)
        self._membership.zk.add_listener(self._on_session)

    def _on_view(self, view: RingView) -> None:
        self._membership.observe(view.members.get(self.node_id))
        if self._cache is None:
            return
        if self._membership.draining:
            dropped = self._cache.release()
        else:
            dropped = self._cache.release(self.ring_names_me)
        if dropped:
            log.info(
                "ring v%d: released %d cached users to their new owners", view.version, dropped
            )

    def _on_session(self, state: str, session_id: int | None) -> None:
        if state != "connected" or session_id == self._session:
            return
        previous, self._session = self._session, session_id
        if previous is not None and self._cache is not None:
            dropped = self._cache.release()
            log.warning(
                "zookeeper session %#x expired (now %#x): released all %d cached users",
                previous,
                session_id or 0,
                dropped,
            )
