"""The client library of a cluster of cells: every per-user request routed through discovery.

`ClusterClient` asks discovery (any of several instances: the first that
answers) which cell a user lives in (LOOKUP) and how that cell's ring looks
(CELL_RING), caches both, and computes each user's owner itself; the request
goes through a `pyserver.cluster.routing.OwnerRouter` (pooled connections,
NOT_OWNER followed, UNAVAILABLE retried briefly). When the owner's answer says
the route was stale (NOT_OWNER: the ring moved; UNAVAILABLE: the owner is
fenced, or the user is frozen or moved to another cell) the client drops what
it cached, asks discovery again and retries, until the request's deadline.
It has the same typed methods as `pyserver.client.Client` for per-user
operations (`send`, `list_threads`, `get_thread`, `counts`, ...):

    async with await ClusterClient.connect(["127.0.0.1:7470"], service_key) as client:
        await client.send(1, [2], "hello")
        await client.list_threads(2)

A retried request may have been applied already: as for `OwnerRouter`, give a
SEND or DELIVER its key. `ClusterRoute` is the MTA proxy's route
(`pyserver.mta.route.OwnerRoute`) in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyserver.addresses import parse_addresses
from pyserver.client import Client, Subscription
from pyserver.cluster.routing import OwnerRouter
from pyserver.cluster.state import read_state
from pyserver.errors import BadRequest, PyserverError, Unavailable
from pyserver.ring import HashRing
from pyserver.servicekey import ServiceKey, ServiceKeys
from pyserver.servicelink import ServiceLinks
from pyserver.snapcache import SnapshotCache
from pyserver.tls import TierTls
from pyserver.wire.ops import Op

__all__ = ["CellRing", "ClusterClient", "ClusterRoute", "connect_to_cluster"]

log = logging.getLogger(__name__)

# Answers after which the route is asked for again.
_STALE_CODES = frozenset({"UNAVAILABLE", "NOT_OWNER", "CONFLICT"})
# A cell's ring is asked for at most this often while requests find it stale.
_RING_REFRESH_S = 0.1


@dataclass(frozen=True, slots=True)
class CellRing:
    """A cell's ring as CELL_RING described it: owners computed here, no round trip."""

    cell: str
    version: int
    ring: HashRing
    addrs: dict[str, str]
    fetched_at: float

    @classmethod
    def from_reply(cls, reply: dict[str, Any], now: float) -> CellRing:
        ring = HashRing(int(reply["tokens"]))
        addrs = {}
        for node in reply["nodes"]:
            addrs[node["node"]] = node["addr"]
            if node.get("state", "active") == "active":
                ring.add_node(node["node"])
        return cls(reply["cell"], int(reply["version"]), ring, addrs, now)

    def owner_address(self, user_id: int) -> str | None:
        if not len(self.ring):
            return None
        return self.addrs.get(self.ring.owner(user_id))


def _user_of(op: Op | int, payload: dict[str, Any]) -> int:
    field = "sender" if op == Op.SEND else "user"
    user = payload.get(field)
    if type(user) is not int:
        raise BadRequest(f"{field}: a per-user request needs a user id, not {user!r}")
    return user


class ClusterClient:
    """Per-user requests of a whole cluster, routed through discovery (module docstring)."""

    def __init__(
        self,
        discovery: str | Iterable[str],
        service_key: ServiceKey,
        *,
        request_timeout: float = 30.0,
        attempt_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        cache_users: int = 1_000_000,
        backoff_initial_s: float = 0.02,
        backoff_max_s: float = 0.25,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.discovery = parse_addresses(discovery)
        self._service_key = service_key
        self.request_timeout = request_timeout
        self.attempt_timeout = attempt_timeout
        self._backoff = (backoff_initial_s, backoff_max_s)
        self.pool = ServiceLinks(
            service_key,
            name="app server",
            connect_timeout_s=connect_timeout,
            request_timeout_s=request_timeout,
            retry_connect_after_s=0,  # the router retries with its own back-off
            tls=tls,
        )
        self.router = OwnerRouter(
            self._locate, pool=self.pool, timeout_s=attempt_timeout, backoff_max_s=backoff_max_s
        )
        # one link per discovery instance; a failed one is tried again on the next request
        self._discovery_links = ServiceLinks(
            service_key,
            name="discovery",
            connect_timeout_s=min(connect_timeout, attempt_timeout),
            request_timeout_s=attempt_timeout,
            retry_connect_after_s=0,
            tls=tls,
        )
        # spreads clients over the instances; not a secret
        self._preferred = random.randrange(len(self.discovery))  # nosec B311
        # user -> cell name, most recently used kept (the native LRU; weight 1 per entry).
        self._cells = SnapshotCache(max(1, cache_users), max(1, cache_users))
        self._rings: dict[str, CellRing] = {}
        self._ring_fetches: dict[str, asyncio.Task[CellRing]] = {}
        self._closed = False
        # "lookups", "ring_fetches", "rerouted" (requests retried on a fresh route)
        self.figures: dict[str, int] = dict.fromkeys(("lookups", "ring_fetches", "rerouted"), 0)

    @classmethod
    async def connect(
        cls, discovery: str | Iterable[str], service_key: ServiceKey, **options: Any
    ) -> ClusterClient:
        """A client that has reached one discovery instance (Unavailable if none answers)."""
        client = cls(discovery, service_key, **options)
        try:
            await client.discovery_request(Op.CELLS, {})
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        self._closed = True
        for task in self._ring_fetches.values():
            task.cancel()
        await self.router.close()
        await self.pool.close()
        await self._discovery_links.close()

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- discovery ----

    async def discovery_request(
        self, op: Op, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """One request to discovery: the preferred instance, else the next that answers."""
        timeout = self.attempt_timeout if timeout is None else timeout
        last: PyserverError | None = None
        count = len(self.discovery)
        for step in range(count):
            index = (self._preferred + step) % count
            addr = self.discovery[index]
            try:
                client = await self._discovery_links.get(addr)
                reply = await client.request(op, payload, timeout=timeout)
            except PyserverError as error:
                if error.code != "UNAVAILABLE":
                    raise
                last = error
                await self._discovery_links.discard(addr)
                continue
            self._preferred = index
            return reply
        raise Unavailable(f"no discovery instance answered ({', '.join(self.discovery)}): {last}")

    async def lookup(self, user: int, *, fresh: bool = False) -> dict[str, Any]:
        """Discovery's LOOKUP reply for the user (placing a new one); remembers the cell."""
        self.figures["lookups"] += 1
        reply = await self.discovery_request(Op.LOOKUP, {"user": user, "fresh": fresh})
        if reply.get("cell") and not reply.get("frozen"):
            self._cells.put(user, reply["cell"], 1)
        return reply

    def cached_cell(self, user: int) -> str | None:
        """The user's cell as last learnt (None: not known here)."""
        return self._cells.get(user)

    def forget_cells(self, users: Iterable[int]) -> None:
        """Drop what was learnt of these users' cells (they are moving, or moved)."""
        for user in users:
            self._cells.pop(user, None)

    async def cell_of(self, user: int, *, fresh: bool = False) -> str:
        """The user's cell: cached, else asked of discovery (which places a new user)."""
        if not fresh:
            cell = self._cells.get(user)
            if cell is not None:
                return cell
        reply = await self.lookup(user, fresh=fresh)
        if not reply.get("cell"):
            raise Unavailable(f"discovery has no cell for user {user}")
        return reply["cell"]

    async def ring_of(self, cell: str, *, refresh: bool = False) -> CellRing:
        """The cell's ring: cached, else (or when `refresh` and not just fetched) asked for."""
        loop = asyncio.get_running_loop()
        ring = self._rings.get(cell)
        if ring is not None and not (refresh and loop.time() - ring.fetched_at > _RING_REFRESH_S):
            return ring
        task = self._ring_fetches.get(cell)
        if task is None:
            task = loop.create_task(self._fetch_ring(cell))
            self._ring_fetches[cell] = task
            task.add_done_callback(lambda _t, cell=cell: self._ring_fetches.pop(cell, None))
        return await asyncio.shield(task)

    async def _fetch_ring(self, cell: str) -> CellRing:
        self.figures["ring_fetches"] += 1
        reply = await self.discovery_request(Op.CELL_RING, {"cell": cell})
        # The latest answer wins: a ring's version is counted by the discovery instance
        # that answered (from 1 at its start), so it orders neither the rings of two
        # instances nor those of one restarted; keeping the highest kept a dead node's
        # address for good. Fetches of a cell are one at a time (`ring_of`), in order.
        ring = CellRing.from_reply(reply, asyncio.get_running_loop().time())
        self._rings[cell] = ring
        return ring

    def _locate(self, user: int) -> str | None:
        cell = self._cells.get(user)
        ring = self._rings.get(cell) if cell is not None else None
        return ring.owner_address(user) if ring is not None else None

    # ---- requests ----

    async def request(
        self, op: Op | int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """The owner's reply to one per-user request (see the module docstring)."""
        user = _user_of(op, payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.request_timeout if timeout is None else timeout)
        delay, most = self._backoff
        fresh = False
        while True:
            try:
                cell = await self.cell_of(user, fresh=fresh)
                await self.ring_of(cell, refresh=fresh)
                if fresh:  # discovery may hold a stale ring of the cell: ask the owner next
                    fresh = False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Unavailable(f"no answer for user {user} in time")
                redirects = self.router.errors["NOT_OWNER"]
                reply = await self.router.request(
                    user, op, payload, timeout_s=min(remaining, self.attempt_timeout)
                )
                if self.router.errors["NOT_OWNER"] != redirects:
                    self._refresh_soon(cell)  # the ring moved: later requests go straight
                return reply
            except PyserverError as error:
                if error.code not in _STALE_CODES or loop.time() + delay >= deadline:
                    raise
                log.debug("user %d: %s; asking discovery again", user, error.code)
            self.figures["rerouted"] += 1
            with contextlib.suppress(KeyError):
                self._cells.pop(user)
            fresh = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)

    def _refresh_soon(self, cell: str) -> None:
        if cell not in self._ring_fetches and not self._closed:
            task = asyncio.get_running_loop().create_task(self.ring_of(cell, refresh=True))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---- the per-user operations of pyserver.client.Client (they only call request) ----

    send = Client.send
    deliver = Client.deliver
    list_threads = Client.list_threads
    get_thread = Client.get_thread
    get_message = Client.get_message
    folder_messages = Client.folder_messages
    get_blob_range = Client.get_blob_range
    get_blob = Client.get_blob
    counts = Client.counts
    search = Client.search
    mark_read = Client.mark_read
    mark_unread = Client.mark_unread
    move = Client.move
    delete = Client.delete
    mark_seen = Client.mark_seen
    block = Client.block
    unblock = Client.unblock
    friend_add = Client.friend_add
    friend_remove = Client.friend_remove

    def subscribe(self, user: int) -> Subscription:
        """Events of `user`'s mailbox, from the app server owning the user when it starts
        (`await` it, or use it with `async with` / `async for`, as `Client.subscribe`)."""
        return _RoutedSubscription(self, user)

    async def owner_client(self, user: int, *, fresh: bool = False) -> Client:
        """The pooled connection to the user's owner now (`fresh`: the route asked of
        discovery again, not the one cached)."""
        cell = await self.cell_of(user, fresh=fresh)
        addr = (await self.ring_of(cell, refresh=fresh)).owner_address(user)
        if addr is None:
            raise Unavailable(f"no app server owns user {user} now")
        return await self.pool.get(addr)

    async def cells(self) -> dict[str, Any]:
        """Discovery's CELLS reply: every cell, its state, active nodes and users."""
        return await self.discovery_request(Op.CELLS, {})


class _RoutedSubscription(Subscription):
    """A subscription opened on the user's owner, found when it starts."""

    def __init__(self, cluster: ClusterClient, user: int) -> None:
        super().__init__(None, user)  # type: ignore[arg-type]  # the owner's, at start
        self._cluster = cluster

    async def start(self) -> Subscription:
        """Subscribe at the owner the cached route names; when that one cannot take it
        (gone, or no longer the owner), at the owner discovery names now."""
        if self._started:
            return self
        try:
            self._client = await self._cluster.owner_client(self.user)
            return await super().start()
        except PyserverError as error:
            if error.code not in _STALE_CODES:
                raise
        self._started = False
        self._end = None
        self._client = await self._cluster.owner_client(self.user, fresh=True)
        return await super().start()


class ClusterRoute:
    """The MTA proxy's route in a cluster: DELIVER to the recipient's owner via discovery."""

    def __init__(
        self,
        discovery: str | Sequence[str],
        service_key: ServiceKey,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._client = ClusterClient(discovery, service_key, request_timeout=timeout_s, tls=tls)
        self._timeout_s = timeout_s

    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.request(Op.DELIVER, payload)

    async def request(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._client.request(op, payload, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._client.close()


async def connect_to_cluster(folder: str | Path, **options: Any) -> ClusterClient:
    """A client of the cluster `pyserver cluster up` runs from `folder` (its discovery, its
    service key)."""
    state = read_state(Path(folder))
    keys = ServiceKeys.from_file(Path(state["service_key_file"]))
    if state.get("tls"):  # `cluster up --tls`: its CA, and a certificate it signed
        options.setdefault("tls", TierTls(**state["tls"]).client_context())
    return await ClusterClient.connect(state["discovery"], keys, **options)
