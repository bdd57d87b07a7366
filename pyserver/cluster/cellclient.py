"""A client of one cell that routes by the cell's ring, read from ZooKeeper.

For tools, tests and load generators that talk to a cell's app servers
directly (the discovery service, with its LOOKUP, is the way for everything
else): its own ZooKeeper session, a `RingWatch` of the cell, and an
`OwnerRouter` sending each user's request to the owner the ring names,
following NOT_OWNER and retrying UNAVAILABLE until the request's deadline.

    async with await CellClient.open("127.0.0.1:2181", "cell-1", service_key) as cell:
        await cell.request(1, Op.SEND, {"sender": 1, "recipients": [2], ...})
        cell.ring.view.active        # the cell's active nodes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyserver.cluster.ringwatch import RingWatch
from pyserver.cluster.routing import OwnerRouter
from pyserver.cluster.zk import ZooKeeper
from pyserver.servicekey import ServiceKey
from pyserver.wire.ops import Op

__all__ = ["CellClient"]


class CellClient:
    """Requests routed to the owners of a cell's users (see the module docstring)."""

    def __init__(self, zk: ZooKeeper, ring: RingWatch, router: OwnerRouter) -> None:
        self.zk = zk
        self.ring = ring
        self.router = router

    @classmethod
    async def open(
        cls,
        zookeeper: str,
        cell: str,
        service_key: ServiceKey,
        *,
        chroot: str = "/pyserver",
        timeout_s: float = 10.0,
        request_timeout_s: float = 10.0,
        zookeeper_auth: str = "",
        zookeeper_read_ids: Sequence[str] = (),
        **router_options: Any,
    ) -> CellClient:
        """Connect to ZooKeeper (as `zookeeper_auth`, a reader, when the tree has ACLs) and
        read the cell's ring (Unavailable past timeout_s)."""
        zk = ZooKeeper(
            zookeeper,
            chroot=chroot,
            session_timeout_s=10.0,
            auth=zookeeper_auth,
            read_ids=zookeeper_read_ids,
        )
        await zk.start(timeout_s)
        ring = RingWatch(zk, cell)
        try:
            await ring.start(timeout_s)
        except BaseException:
            await zk.close()
            raise
        router = OwnerRouter(
            lambda user: ring.view.owner_address(user),
            service_key,
            timeout_s=request_timeout_s,
            **router_options,
        )
        return cls(zk, ring, router)

    async def request(
        self, user_id: int, op: Op | int, payload: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The owner's reply to a request for `user_id` (see OwnerRouter.request)."""
        return await self.router.request(user_id, op, payload, timeout_s)

    async def close(self) -> None:
        await self.router.close()
        await self.ring.close()
        await self.zk.close()

    async def __aenter__(self) -> CellClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
