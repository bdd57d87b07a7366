"""One app server of a cell of several, in its own process: `pyserver node`.

Assembles, from one `Config`, the parts every app server has
(`processes.assembly.AppServerParts` on the `store` setting's store: SQLite,
shared by the cell's nodes, or HBase), giving the mailbox its ownership hooks
(`OwnershipFence`) and its copy relay (SEND copies go to each recipient's
owner as DELIVER_COPY, through an `OwnerRouter` on the node's own ring); then
the ZooKeeper session, the cell's `RingWatch` and the node's `Membership`.

Start: open the store, listen (so the address is known), open the ZooKeeper
session, read the cell's ring, register, and wait until the registration is
in the ring; then print where it listens. From then on the node serves the
users the ring gives it while its session is live.

Drain (SIGTERM or SIGINT, or `pyserver admin drain` marking the node
draining in ZooKeeper): the node marks itself draining, which takes it off
every ring; it stops serving at once (requests get NOT_OWNER naming the next
owner) and drops its cached images, so each user's next request loads it on
the new owner. It keeps answering for `drain_settle_s` while clients and peers
re-route, then stops listening once in-flight requests are answered,
snapshots what it still holds, leaves the cell, and exits 0. A second signal
stops it at once.

A node whose ZooKeeper or store does not answer at start (restarted during an
outage) says so and tries again with a doubling pause up to 10 s until they
do, or until a signal stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pyserver
from pyserver import doctor
from pyserver.app.loop import loop_implementation
from pyserver.app.mailbox import Delivery
from pyserver.cluster.darklaunch import DarkLaunch
from pyserver.cluster.fence import OwnershipFence
from pyserver.cluster.freeze import FreezeWatch
from pyserver.cluster.membership import Membership
from pyserver.cluster.ringwatch import RingView, RingWatch
from pyserver.cluster.routing import OwnerRouter
from pyserver.cluster.state import NoCluster, process_settings
from pyserver.config import Config, ConfigError, load_config
from pyserver.discovery.client import ClusterClient
from pyserver.errors import NotOwner, Unavailable
from pyserver.processes import nodeops
from pyserver.processes.assembly import AppServerParts, zookeeper_session
from pyserver.processes.runtime import (
    add_ready_file_argument,
    announce_ready,
    configure_logging,
    run,
    start_when_engines_answer,
    withdraw_ready,
)
from pyserver.servicelink import ServiceLinks
from pyserver.store.spec import open_store
from pyserver.wire.ops import Op

__all__ = ["ClusterNode", "add_parser", "serve"]

# the release label a rollout gives the node (`pyserver cluster rollout --version`)
RELEASE = os.environ.get("PYSERVER_RELEASE", "")

log = logging.getLogger(__name__)


class ClusterNode:
    """Every part of one app server of a multi-node cell, started and stopped together."""

    def __init__(self, config: Config) -> None:
        if not config.zookeeper:
            raise ConfigError("config zookeeper: a cell node needs ZooKeeper (host:port)")
        self.config = config = config.with_service_key()
        self.store_spec = config.store_spec
        self.zk = zookeeper_session(config)
        self.ring = RingWatch(self.zk, config.cell, tokens_per_node=config.tokens_per_node)
        self.membership = Membership(self.zk, config.cell, config.node_id, config.tokens_per_node)
        self.fence = OwnershipFence(self.membership, self.ring)
        keys, tls = config.service_keys(), config.client_tls()
        self.pool = ServiceLinks(
            keys,
            name="app server",
            connect_timeout_s=1.0,
            request_timeout_s=config.relay_timeout_s,
            retry_connect_after_s=0,  # the router retries a peer with its own back-off
            tls=tls,
        )
        self.relay = OwnerRouter(
            self.fence.owner_of, pool=self.pool, timeout_s=config.relay_timeout_s
        )
        # other cells' users, reached through discovery; None: a cell on its own
        self.cells: ClusterClient | None = None
        if config.discovery_addrs:
            self.cells = ClusterClient(
                config.discovery,
                keys,
                request_timeout=config.relay_timeout_s,
                attempt_timeout=min(2.0, config.relay_timeout_s),
                tls=tls,
            )
        self.parts = AppServerParts(
            config,
            open_store(self.store_spec),
            health=self._health,
            mailbox_hooks={
                "owns": self._owns,
                "owner_of": self._owner_of,
                "relay": self._relay_copy,
                "in_other_cell": self._in_other_cell if self.cells is not None else None,
                "check_load": self._check_cell if self.cells is not None else None,
                # fenced, draining or not synced: no reply is given from the table
                "serving": lambda: self.fence.serving,
            },
        )
        self.mailbox = self.parts.mailbox
        # a dark launch: some users' requests mirrored to a shadow cell, set in ZooKeeper
        self.darklaunch = DarkLaunch(
            self.zk, config.cell, keys, self.parts.metrics.registry, tls=tls
        )
        self.parts.dispatcher.mirror = self.darklaunch
        # what `pyserver cells` and Prometheus read of this node (pyserver_info, ring share...)
        self.parts.metrics.describe(
            role="node", version=pyserver.__version__, cell=config.cell, node=config.node_id
        )
        if RELEASE:  # the label `pyserver cluster rollout --version` started it with
            self.parts.metrics.describe(release=RELEASE)
        self.parts.metrics.watch_node(self._node_stats)
        # users frozen in this cell for a move to another, or moved away: refused here
        self.freeze = FreezeWatch(self.zk, config.cell, config.node_id, self.mailbox.quiesce)
        # from the moment a user is listed, its reads go through the ownership checks
        self.freeze.subscribe(self.mailbox.forget_replies)
        if self.cells is not None:
            # a listed user's cell as learnt before may be stale once its marker is gone
            self.freeze.subscribe(self.cells.forget_cells)
        self.addr = ""
        self.addresses: dict[str, Any] = {}
        self.stopped = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._started: list[str] = []

    # ---- life ----

    @property
    def join_timeout_s(self) -> float:
        """Long enough to wait out a previous session of this node id (killed, not expired)."""
        return 2 * self.config.zookeeper_session_timeout_s + 10.0

    async def start(self) -> dict[str, Any]:
        """Open the store, listen, join the cell; returns the addresses."""
        config = self.config
        try:
            await self.parts.open()
            self._started.append("parts")
            addresses = await self.parts.listen()
            host, port = addresses["server"]["host"], addresses["server"]["port"]
            self.addr = f"{config.advertise_host or host}:{port}"
            # the registration names the node's /metrics too, for the operators' tools
            http = f"{config.advertise_host or host}:{addresses['http']['port']}"
            self.membership.record = dataclasses.replace(
                self.membership.record,
                data={**self.membership.record.data, "http": http, "version": pyserver.__version__},
            )
            await self.zk.start(self.join_timeout_s)
            self._started.append("zookeeper")
            await self.ring.start(self.join_timeout_s)
            await self.freeze.start(self.join_timeout_s)
            self.fence.bind(self.mailbox)
            self.ring.subscribe(self._on_view)
            await self.membership.join(self.addr, self.join_timeout_s)
            self._started.append("membership")
            await self.ring.wait_until(
                lambda view: config.node_id in view.members, self.join_timeout_s
            )
            self.darklaunch.start()
        except BaseException:
            await self._close_parts(grace_s=0.0)
            raise
        self.addresses = {**addresses, "cell": config.cell, "addr": self.addr}
        return self.addresses

    def drain(self) -> asyncio.Task[None]:
        """Start draining (once); the task ends when the node has stopped."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return self._drain_task

    async def _drain(self) -> None:
        log.info("node %s draining", self.config.node_id)
        try:
            await self.membership.set_state("draining", timeout_s=5.0)
        except Unavailable as error:
            # The fence reads the local state: this node serves nobody from now on anyway.
            log.warning("could not mark node draining in ZooKeeper: %s", error)
        released = self.mailbox.release()
        log.info("node %s released %d cached users", self.config.node_id, released)
        await asyncio.sleep(self.config.drain_settle_s)
        await self.stop()

    async def stop(self, grace_s: float | None = None) -> None:
        """Answer in-flight requests, snapshot cached images, leave the cell, close everything."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        try:
            await self._close_parts(self.config.shutdown_grace_s if grace_s is None else grace_s)
        finally:
            self.stopped.set()

    async def _close_parts(self, grace_s: float) -> None:
        started = set(self._started)
        await self.parts.stop_serving(grace_s)
        if "membership" in started:
            await self.membership.leave()
        await self.darklaunch.close()
        await self.freeze.close()
        await self.ring.close()
        if "zookeeper" in started:
            await self.zk.close()
        await self.relay.close()
        await self.pool.close()
        if self.cells is not None:
            await self.cells.close()
        await self.parts.close()
        self._started.clear()

    # ---- hooks ----

    def _owns(self, user_id: int) -> bool:
        return not self.freeze.holds(user_id) and self.fence.owns(user_id)

    def _owner_of(self, user_id: int) -> str | None:
        # a frozen or moved user: UNAVAILABLE, and the client asks discovery again
        return None if self.freeze.holds(user_id) else self.fence.owner_of(user_id)

    async def _in_other_cell(self, user_id: int) -> bool:
        """Whether discovery places the user in another cell than this node's."""
        assert self.cells is not None
        # a user frozen or moved away here: the cached cell may be this one, stale
        fresh = self.freeze.holds(user_id) and self.cells.cached_cell(user_id) in (
            None,
            self.config.cell,
        )
        return await self.cells.cell_of(user_id, fresh=fresh) != self.config.cell

    async def _check_cell(self, user_id: int) -> None:
        """Before a user's image is loaded: refuse a user the directory places in another
        cell. Its "moved" marker, which refuses it here, is removed in the end
        (pyserver.discovery.moved); a client with a stale route is refused here still."""
        assert self.cells is not None
        reply = await self.cells.discovery_request(
            Op.LOOKUP, {"user": user_id, "fresh": True, "place": False}
        )
        cell = reply.get("cell")
        if cell is not None and cell != self.config.cell:
            raise Unavailable(f"user {user_id} lives in cell {cell} now, not in {self.config.cell}")

    async def _relay_copy(self, recipient: int, delivery: Delivery) -> dict[str, Any]:
        """A SEND's copy for a recipient this node does not serve, on that recipient's owner."""
        if self.cells is not None and await self._in_other_cell(recipient):
            try:
                return await self.cells.request(Op.DELIVER_COPY, delivery.copy_request(recipient))
            except NotOwner as error:
                raise Unavailable(f"recipient {recipient}'s owner is moving: {error}") from None
        if self.freeze.holds(recipient):
            # moving to another cell: the SEND is retried once discovery names that cell
            raise Unavailable(f"recipient {recipient} is moving to another cell")
        if self.fence.ring_names_me(recipient):
            # ours, but not now (fenced): no other node may take it either
            raise Unavailable(f"recipient {recipient}'s owner (this node) cannot serve now")
        try:
            return await self.relay.request(
                recipient, Op.DELIVER_COPY, delivery.copy_request(recipient)
            )
        except NotOwner as error:
            # The SEND itself is at the right server: its client must not re-route it.
            raise Unavailable(f"recipient {recipient}'s owner is moving: {error}") from None

    def _on_view(self, view: RingView) -> None:
        # the fence, told first, has adopted a "draining" written to this node's record
        if self.membership.draining and not self._stopping:
            self.drain()
        # subscribers of users this node no longer serves go to their new owner
        moved = self.parts.dispatcher.end_subscriptions_of(
            lambda user: not self.mailbox.owns(user), "owner changed"
        )
        if moved:
            log.info(
                "node %s ended %d subscriptions of users it no longer serves",
                self.config.node_id,
                moved,
            )
        stale = set(self.pool.addresses()) - {member.addr for member in view.members.values()}
        for addr in stale:  # servers that left the cell
            asyncio.get_running_loop().create_task(self.pool.discard(addr))

    def _node_stats(self) -> dict[str, Any]:
        return {
            "ring_share": self.ring.view.ring.shares().get(self.config.node_id, 0.0),
            "serving": self.fence.serving,
            "zookeeper": self.zk.state,
        }

    async def _health(self) -> dict[str, Any]:
        store_ok = await self.parts.store.healthy()
        serving = self.fence.serving
        return {
            "status": "ok" if store_ok and serving else "unavailable",
            "node": self.config.node_id,
            "cell": self.config.cell,
            "addr": self.addr,
            "state": self.membership.state,
            "serving": serving,
            "zookeeper": self.zk.state,
            "ring": self.ring.view.active,
            "store": "ok" if store_ok else "unavailable",
            "version": pyserver.__version__,
            "release": RELEASE,
            "darklaunch": self.darklaunch.figures(),
        }


# ---- the process ----


async def _started_node(config: Config) -> ClusterNode:
    node = ClusterNode(config)
    await node.start()
    return node


async def _run_until_stopped(config: Config, ready: Path | None) -> None:
    loop = asyncio.get_running_loop()
    signals = 0
    signalled = asyncio.Event()
    stopping: set[asyncio.Task[None]] = set()
    node: ClusterNode | None = None

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        signalled.set()
        if node is None:  # still waiting for the engines: nothing to drain
            return
        if signals == 1:
            print(f"pyserver: node {node.config.node_id} draining", flush=True)
            node.drain()
        else:
            print(f"pyserver: node {node.config.node_id} stopping now", flush=True)
            if node._drain_task is not None:
                node._drain_task.cancel()
            stopping.add(loop.create_task(node.stop(grace_s=0.0)))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    node = await start_when_engines_answer(
        lambda: _started_node(config), f"node {config.node_id}", signalled
    )
    if node is None:
        print(f"pyserver: node {config.node_id} stopped before it started", flush=True)
        return
    addresses = node.addresses
    config, http = node.config, addresses["http"]
    view = node.ring.view
    print(f"pyserver: node {config.node_id} of cell {config.cell} serving on {node.addr}")
    print(f"  binary protocol  {addresses['server']['host']}:{addresses['server']['port']}")
    print(f"  http             http://{http['host']}:{http['port']}/metrics  /health")
    print(f"  store            {node.store_spec}")
    print(
        f"  zookeeper        {config.zookeeper} chroot {node.zk.chroot or '/'} "
        f"session {node.zk.session_id or 0:#x} timeout {node.zk.negotiated_timeout_s:g} s"
    )
    print(f"  ring             {len(view.active)} active: {', '.join(view.active)}")
    print(f"  implementations  {doctor.report()} loop={loop_implementation(loop)}")
    sys.stdout.flush()
    announce_ready(ready, "node", node.addr, addresses)
    try:
        await node.stopped.wait()
    finally:
        withdraw_ready(ready)
    if node._drain_task is not None and not node._drain_task.done():
        node._drain_task.cancel()
    print(f"pyserver: node {config.node_id} stopped", flush=True)


def serve(config: Config, ready_file: Path | None = None) -> int:
    """`pyserver node`: serve as one node of a cell until drained or signalled; once it
    serves, its addresses are written to `ready_file` (if given)."""
    configure_logging(config.log_level)
    run(_run_until_stopped(config, ready_file))
    return 0


def _node_command(args: argparse.Namespace) -> int:
    if args.action is not None:  # `pyserver node add|remove`: a running cluster's nodes
        return nodeops.node_action(args)
    # `--cluster DIR`: the settings this cell's other app servers were started with; a flag
    # wins over the folder, the folder over the configuration
    env: dict[str, str] | None = None
    found: dict[str, Any] = {}
    if args.cluster is not None:
        cell = args.cell or load_config(args.config).cell
        try:
            peer_env, found = process_settings(args.cluster, "node", cell)
        except (NoCluster, ConfigError) as error:
            print(f"pyserver node: {error}", file=sys.stderr)
            return 1
        env = {**os.environ, **peer_env}
    flags = {
        "data_dir": args.data,
        "cell": args.cell,
        "node_id": args.node_id,
        "host": args.host,
        "port": args.port,
        "http_port": args.http_port,
        "advertise_host": args.advertise_host,
        "zookeeper": args.zookeeper,
        "zookeeper_chroot": args.chroot,
        "zookeeper_session_timeout_s": args.session_timeout,
        "tokens_per_node": args.tokens,
        "store": args.store,
        "drain_settle_s": args.drain_settle,
        "discovery_addrs": args.discovery,
    }
    overrides = {**found, **{name: value for name, value in flags.items() if value is not None}}
    try:
        config = load_config(args.config, env=env, overrides=overrides)
    except ConfigError as error:
        print(f"pyserver node: {error}", file=sys.stderr)
        return 1
    return serve(config, args.ready_file)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `node` to the `pyserver` command line."""
    node = commands.add_parser(
        "node", help="run one app server of a cell of several (ZooKeeper; docs/cluster.md)"
    )
    node.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    node.add_argument("--data", type=Path, help="data folder: service key, default SQLite store")
    node.add_argument("--cell", help="the cell to join (default cell-1)")
    node.add_argument("--node-id", help="this node's id on the cell's ring")
    node.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    node.add_argument("--port", type=int, help="binary protocol port (0: any free one)")
    node.add_argument("--http-port", type=int, help="/metrics and /health port (0: any)")
    node.add_argument("--advertise-host", help="host the others reach this node at")
    node.add_argument("--zookeeper", help="ZooKeeper, host:port[,host:port...]")
    node.add_argument("--chroot", help="ZooKeeper path the cells live under (default /pyserver)")
    node.add_argument("--session-timeout", type=float, help="ZooKeeper session timeout, seconds")
    node.add_argument("--tokens", type=int, help="tokens on the ring (default 64)")
    node.add_argument("--store", help="sqlite:PATH or hbase:HOST:PORT[/namespace]")
    node.add_argument("--drain-settle", type=float, help="seconds of NOT_OWNER before stopping")
    node.add_argument("--discovery", help="discovery, host:port[,...]: reach other cells' users")
    add_ready_file_argument(node)
    nodeops.add_node_actions(node)
    node.set_defaults(handler=_node_command)
    return node
