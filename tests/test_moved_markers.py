"""Moved markers leave ZooKeeper once every discovery instance has seen the move.

Two `DiscoveryService` instances (each its own ZooKeeper session) on the real shared
ZooKeeper, in a chroot of this test's own: a "moved" marker both have seen is removed
after the grace period; one a live instance has not seen stays until it has (or until
that instance is gone); a "frozen" marker (a move under way) is never removed; and an
instance on a new session forgets every cached cell.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from pyserver.app.loop import new_event_loop
from pyserver.client import Client
from pyserver.cluster import freeze, layout
from pyserver.cluster.zk import ZooKeeper
from pyserver.config import load_config
from pyserver.discovery.client import ClusterClient
from pyserver.discovery.directory import Directory
from pyserver.discovery.move import move_user, set_cell_record
from pyserver.discovery.moved import INSTANCES, SEEN_PREFIX
from pyserver.discovery.service import DiscoveryService
from pyserver.errors import Unavailable
from pyserver.processes.discovery import DiscoveryProcess
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.store.sqlite import SQLiteStore
from pyserver.wire.ops import Op
from tests import support
from tests.cluster_harness import Cluster, eventually, remove_tree, zk_session

run = partial(support.run, timeout=90.0)
GRACE_S = 0.5
SWEEP_S = 0.1


@pytest.fixture
def chroot(zookeeper: str) -> Iterator[str]:
    path = f"/pyserver-test-moved-{uuid.uuid4().hex[:10]}"
    yield path
    asyncio.run(remove_tree(zookeeper, path))


class Discovery:
    """Discovery instances on one directory, each with its own session."""

    def __init__(self, zookeeper: str, chroot: str, tmp_path: Path) -> None:
        self.zookeeper, self.chroot = zookeeper, chroot
        self.store = SQLiteStore(tmp_path / "directory.sqlite3")
        self.services: list[tuple[DiscoveryService, ZooKeeper]] = []

    async def open(self) -> None:
        await self.store.open()

    async def start(self) -> DiscoveryService:
        zk = await zk_session(self.zookeeper, self.chroot)
        service = DiscoveryService(
            zk, Directory(self.store), moved_grace_s=GRACE_S, moved_sweep_s=SWEEP_S
        )
        await service.start()
        self.services.append((service, zk))
        return service

    async def close(self) -> None:
        for service, zk in self.services:
            await service.close()
            await zk.close()
        await self.store.close()


async def _listed(zk: ZooKeeper, cell: str) -> set[int]:
    return set(await freeze.read_frozen(zk, cell))


async def _prepare(zk: ZooKeeper) -> None:
    for cell in ("a", "b"):
        await set_cell_record(zk, cell)
        await zk.ensure_persistent(layout.nodes_path(cell))


async def _move_marker(zk: ZooKeeper, user: int) -> None:
    """What a finished move from cell a to cell b leaves in a."""
    await freeze.freeze_user(zk, "a", user, "b")
    await freeze.mark_moved(zk, "a", user, "b")


def test_a_marker_every_instance_has_seen_is_removed(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        discovery = Discovery(zookeeper, chroot, tmp_path)
        try:
            await _prepare(zk)
            await discovery.open()
            first, second = await discovery.start(), await discovery.start()
            assert len(await zk.get_children(INSTANCES)) == 2
            await discovery.store.set_cell(42, "a")
            assert (await first.execute(Op.LOOKUP, {"user": 42}))[
                "cell"
            ] == "a"  # cached in `first` now
            await _move_marker(zk, 42)
            await freeze.freeze_user(zk, "a", 43, "b")  # a move under way: never removed
            await discovery.store.set_cell(42, "b")
            # Both instances record that they saw it; once they have, and the grace period
            # is over, one of them removes it.
            await eventually(lambda: _gone(zk, 42), 20, "the moved marker removed")
            assert first.moved.removed + second.moved.removed == 1
            assert 43 in await _listed(zk, "a")
            # `first` dropped its cached cell when it saw the move: it answers the new one.
            assert (await first.execute(Op.LOOKUP, {"user": 42}))["cell"] == "b"
            await asyncio.sleep(5 * SWEEP_S + GRACE_S)
            assert 43 in await _listed(zk, "a"), "a move under way lost its freeze"
        finally:
            await discovery.close()
            await zk.close()

    run(scenario)


async def _gone(zk: ZooKeeper, user: int) -> bool:
    return user not in await _listed(zk, "a")


def test_a_live_instance_that_has_not_seen_the_move_keeps_the_marker(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        silent = await zk_session(zookeeper, chroot)
        discovery = Discovery(zookeeper, chroot, tmp_path)
        try:
            await _prepare(zk)
            await discovery.open()
            service = await discovery.start()
            # A live instance that follows nothing (hung, or slow to read ZooKeeper).
            await silent.create(f"{INSTANCES}/silent", ephemeral=True)
            await _move_marker(zk, 7)
            await _move_marker(zk, 8)
            seen_by_service = f"{SEEN_PREFIX}{service.moved.instance_id}"
            for user in (7, 8):
                path = freeze.moved_user_path("a", user)
                await eventually(
                    lambda path=path: _has_child(zk, path, seen_by_service), 20, "seen recorded"
                )
            await asyncio.sleep(GRACE_S + 10 * SWEEP_S)
            assert {7, 8} <= await _listed(zk, "a"), "removed before every instance saw it"
            # It sees user 7's move: that marker goes, user 8's stays.
            await silent.create(
                f"{freeze.moved_user_path('a', 7)}/{SEEN_PREFIX}silent", ephemeral=True
            )
            await eventually(lambda: _gone(zk, 7), 20, "user 7's marker removed")
            assert 8 in await _listed(zk, "a")
            # It dies: it holds nothing cached any more, so it no longer counts.
            await silent.close()
            await eventually(lambda: _gone(zk, 8), 30, "user 8's marker removed")
        finally:
            await discovery.close()
            await silent.close()
            await zk.close()

    run(scenario)


async def _has_child(zk: ZooKeeper, path: str, child: str) -> bool:
    return child in await zk.get_children(path)


def test_an_instance_on_a_new_session_forgets_every_cached_cell(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        discovery = Discovery(zookeeper, chroot, tmp_path)
        try:
            await _prepare(zk)
            await discovery.open()
            service = await discovery.start()
            for user in (1, 2, 3):
                await discovery.store.set_cell(user, "a")
                await service.execute(Op.LOOKUP, {"user": user})
            assert service.stats()["cache_users"] == 3
            service_zk = discovery.services[0][1]
            service.moved._on_session("connected", (service_zk.session_id or 0) + 1)
            assert service.stats()["cache_users"] == 0
        finally:
            await discovery.close()
            await zk.close()

    run(scenario)


def test_the_old_cell_refuses_a_stale_route_once_the_marker_is_gone(
    zookeeper: str, tmp_path: Path
) -> None:
    """Two cells of `pyserver node` processes and a `pyserver discovery` on the real
    ZooKeeper: a user moved from cell ca to cb; once its marker is removed, a client that
    still talks to ca's node is refused there (the node checks the user's cell when it
    loads the image), and nothing is written to ca's old copy of the log."""
    cluster = Cluster(tmp_path, zookeeper, session_timeout_s=5.0)
    other = f"sqlite:{tmp_path / 'cb.sqlite3'}"
    stores = {"ca": cluster.store, "cb": other}
    loop = new_event_loop()
    try:

        async def prepare() -> DiscoveryProcess:
            zk = await zk_session(zookeeper, cluster.chroot)
            for cell, spec in stores.items():
                await set_cell_record(zk, cell, store=spec)
            await zk.close()
            config = load_config(
                env={},
                overrides={
                    "data_dir": cluster.data,
                    "zookeeper": cluster.zookeeper,
                    "zookeeper_chroot": cluster.chroot,
                    "store": cluster.store,
                    "zookeeper_session_timeout_s": 5.0,
                    "moved_marker_grace_s": GRACE_S,
                    "moved_marker_sweep_s": SWEEP_S,
                },
            )
            process = DiscoveryProcess(config)
            await process.start("127.0.0.1", 0)
            return process

        process = loop.run_until_complete(prepare())
        assert process.server is not None and process.server.address is not None
        address = "{}:{}".format(*process.server.address)
        old_node = cluster.spawn("a1", "ca", "--discovery", address)
        new_node = cluster.spawn("b1", "cb", "--store", other, "--discovery", address)
        old_addr = old_node.wait_serving()
        new_node.wait_serving()

        async def scenario() -> None:
            opened = {cell: open_store(parse_store_spec(s, tmp_path)) for cell, s in stores.items()}
            for store in opened.values():
                await store.open()
            zk = await zk_session(zookeeper, cluster.chroot)
            for user in (5, 6):
                await opened["ca"].set_cell(user, "ca")  # ca's store is the directory
            host, port = old_addr.rsplit(":", 1)
            stale = await Client.connect(host, int(port), service_key=cluster.key)
            routed = await ClusterClient.connect([address], cluster.key)
            try:
                await stale.send(5, [6], "before the move", key="k1")
                report = await move_user(zk, Directory(opened["ca"]), opened, 5, "cb")
                assert (report.source, report.target) == ("ca", "cb")
                old_seq = await opened["ca"].last_seq(5)
                await eventually(lambda: _gone_from(zk, "ca", 5), 30, "the moved marker removed")
                # ca's node lets user 5 go once it has read that the marker is gone (within a
                # second), yet refuses it: it lives in cb. It is refused all along.

                async def refused_as_elsewhere() -> bool:
                    with pytest.raises(Unavailable) as refused:
                        await stale.send(5, [6], "to the old cell", key="k2")
                    return "lives in cell cb" in str(refused.value)

                await eventually(refused_as_elsewhere, 10, "refused as living in cell cb")
                with pytest.raises(Unavailable, match="lives in cell cb"):
                    await stale.list_threads(5)
                # Through discovery the user is served, in its new cell.
                await routed.send(5, [6], "after the move", key="k3")
                assert await opened["ca"].last_seq(5) == old_seq, "ca's old log was written"
                assert await opened["cb"].last_seq(5) > old_seq
                # A user who never moved is served by ca's node as before.
                await stale.send(6, [5], "still in ca", key="k4")
            finally:
                await routed.close()
                await stale.close()
                await zk.close()
                for store in opened.values():
                    await store.close()
                await process.stop()

        loop.run_until_complete(asyncio.wait_for(scenario(), 120))
    finally:
        loop.close()
        cluster.close()


async def _gone_from(zk: ZooKeeper, cell: str, user: int) -> bool:
    return user not in await _listed(zk, cell)
