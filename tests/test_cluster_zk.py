"""Membership, ring watch and fence against the real ZooKeeper (the `zookeeper` fixture).

Each test works under a chroot of its own, removed afterwards. Session expiry
is forced the way ZooKeeper's own tests do it: a second client attaches to the
session with its id and password and closes it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import aiozk
import orjson
import pytest

from pyserver.cluster import layout
from pyserver.cluster.fence import OwnershipFence
from pyserver.cluster.membership import Membership, NodeIdInUse
from pyserver.cluster.ringwatch import RingView, RingWatch
from pyserver.cluster.zk import ZooKeeper, ZooKeeperUnavailable
from pyserver.ring import HashRing
from tests import support
from tests.support.zkcut import ZooKeeperCut

SESSION_S = 4.0


run = partial(support.run, timeout=30.0)


@pytest.fixture
def chroot(zookeeper: str) -> str:
    return f"/pyserver-test-{uuid.uuid4().hex[:12]}"


async def remove_tree(servers: str, chroot: str) -> None:
    client = aiozk.ZKClient(servers, session_timeout=5)
    await asyncio.wait_for(client.start(), 5)
    try:
        if await client.exists(chroot):
            await client.deleteall(chroot)
    finally:
        await client.close()


@asynccontextmanager
async def sessions(servers: str, chroot: str, count: int) -> AsyncIterator[list[ZooKeeper]]:
    opened = [ZooKeeper(servers, chroot=chroot, session_timeout_s=SESSION_S) for _ in range(count)]
    try:
        for zk in opened:
            await zk.start(10.0)
        yield opened
    finally:
        for zk in opened:
            await zk.close()
        await remove_tree(servers, chroot)


async def expire(zk: ZooKeeper) -> None:
    """End `zk`'s session from another connection: ZooKeeper deletes its ephemerals.

    `zk` is cut off meanwhile (its connection dropped, its server list pointing
    nowhere), so it cannot take the session back before it is closed.
    """
    session = zk.client.session
    hosts, session.hosts = session.hosts, [("127.0.0.1", support.free_port())]
    session.conn.writer.transport.abort()
    other = aiozk.ZKClient(zk.servers, session_timeout=SESSION_S)
    other.session.session_id = zk.session_id
    other.session.password = session.password
    try:
        await asyncio.wait_for(other.start(), 5)
        await asyncio.wait_for(other.close(), 5)
    finally:
        session.hosts = hosts


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not check():
        if loop.time() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
    return loop.time() - started


class Releases:
    """Records the fence's releases, as the Mailbox would see them."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def release(self, keep: object = None) -> int:
        self.calls.append(keep)
        return 0


# ---- the session ----


def test_start_is_bounded_when_zookeeper_is_not_there() -> None:
    port = support.free_port()

    async def scenario() -> None:
        zk = ZooKeeper(f"127.0.0.1:{port}", session_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(ZooKeeperUnavailable):
            await zk.start(1.0)
        assert time.monotonic() - started < 3.0
        assert not zk.live
        await zk.close()

    run(scenario)


def test_join_makes_persistent_parents_and_an_ephemeral_record(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 1) as (zk,):
            member = Membership(zk, "c1", "n1", 32)
            await member.join("127.0.0.1:7001", 5.0)
            assert member.live and member.registered and member.state == "active"
            for path in ("/", "/cells", layout.cell_path("c1"), layout.nodes_path("c1")):
                _, stat = await zk.get(path)
                assert stat.ephemeral_owner == 0, f"{path} is not a plain persistent node"
            data, stat = await zk.get(layout.cell_path("c1"))
            assert orjson.loads(data)["state"] == "enabled"
            data, stat = await zk.get(layout.node_path("c1", "n1"))
            assert stat.ephemeral_owner == zk.session_id
            record = orjson.loads(data)
            assert (record["addr"], record["tokens"], record["state"]) == (
                "127.0.0.1:7001",
                32,
                "active",
            )
            await member.leave()
            assert not await zk.exists(layout.node_path("c1", "n1"))
            assert await zk.exists(layout.nodes_path("c1"))  # not a container node

    run(scenario)


def test_the_ring_follows_joins_draining_and_leaves(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 3) as (zk1, zk2, zk3):
            watch = RingWatch(zk3, "c1")
            first = await watch.start(5.0)
            assert first.cell_state == "missing" and first.active == []
            seen: list[RingView] = []
            watch.subscribe(seen.append)
            n1 = Membership(zk1, "c1", "n1", 16)
            n2 = Membership(zk2, "c1", "n2", 16)
            await n1.join("127.0.0.1:7001", 5.0)
            await n2.join("127.0.0.1:7002", 5.0)
            view = await watch.wait_until(lambda v: v.active == ["n1", "n2"], 5.0)
            assert view.cell_state == "enabled"
            expected = HashRing(16)
            expected.add_node("n1")
            expected.add_node("n2")
            for user in range(1, 200):
                owner = view.owner(user)
                assert owner is not None and owner.node_id == expected.owner(user)
                assert view.owner_address(user) == owner.addr
            await n2.set_state("draining")
            view = await watch.wait_until(lambda v: v.active == ["n1"], 5.0)
            assert view.members["n2"].state == "draining"
            assert all(view.owner_address(user) == "127.0.0.1:7001" for user in range(1, 50))
            await n2.leave()
            view = await watch.wait_until(lambda v: "n2" not in v.members, 5.0)
            assert [v.version for v in seen] == sorted({v.version for v in seen})
            await n1.leave()
            view = await watch.wait_until(lambda v: not v.members, 5.0)
            assert view.owner(1) is None and view.owner_address(1) is None
            await watch.close()

    run(scenario)


def test_a_node_id_held_by_a_live_session_is_refused(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 2) as (zk1, zk2):
            await Membership(zk1, "c1", "n1", 16).join("127.0.0.1:7001", 5.0)
            started = time.monotonic()
            with pytest.raises(NodeIdInUse):
                await Membership(zk2, "c1", "n1", 16).join("127.0.0.1:7002", 1.0)
            assert time.monotonic() - started < 3.0

    run(scenario)


def test_after_a_session_expiry_the_node_registers_again(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 2) as (zk1, zk2):
            member = Membership(zk1, "c1", "n1", 16)
            await member.join("127.0.0.1:7001", 5.0)
            await member.set_state("draining")  # the state survives re-registration
            ring1 = RingWatch(zk1, "c1")
            await ring1.start(5.0)
            fence = OwnershipFence(member, ring1)
            cache = Releases()
            fence.bind(cache)
            watch = RingWatch(zk2, "c1")
            await watch.start(5.0)
            old_session = zk1.session_id
            await expire(zk1)
            await eventually(lambda: not member.live, 5.0, "the expired session is noticed")
            await eventually(lambda: member.registrations == 2, 15.0, "registered again")
            assert zk1.session_id != old_session and member.live
            data, stat = await zk2.get(layout.node_path("c1", "n1"))
            assert stat.ephemeral_owner == zk1.session_id
            assert orjson.loads(data)["state"] == "draining"
            await watch.wait_until(lambda v: "n1" in v.members, 5.0)
            assert None in cache.calls, "every cached image is released after an expiry"
            await ring1.close()
            await watch.close()

    run(scenario, timeout=40.0)


# ---- the fence ----


def test_the_fence_closes_the_moment_the_connection_drops_and_opens_after(
    zookeeper: str, chroot: str
) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 2) as (zk1, zk2):
            n1 = Membership(zk1, "c1", "n1", 16)
            n2 = Membership(zk2, "c1", "n2", 16)
            await n1.join("127.0.0.1:7001", 5.0)
            await n2.join("127.0.0.1:7002", 5.0)
            ring = RingWatch(zk1, "c1")
            await ring.start(5.0)
            await ring.wait_until(lambda v: len(v.active) == 2, 5.0)
            fence = OwnershipFence(n1, ring)
            mine = [u for u in range(1, 500) if ring.view.owner(u).node_id == "n1"][:20]
            theirs = [u for u in range(1, 500) if ring.view.owner(u).node_id == "n2"][:20]
            assert mine and theirs
            assert all(fence.owns(u) for u in mine) and not any(fence.owns(u) for u in theirs)
            assert {fence.owner_of(u) for u in theirs} == {"127.0.0.1:7002"}
            assert {fence.owner_of(u) for u in mine} == {None}
            # What the fence answers when the session is suspended, seen from the listener
            # told of the suspension (ZooKeeper on loopback is back within milliseconds).
            seen: list[tuple[str, bool, set[str | None]]] = []

            def on_state(state: str, _session: int | None) -> None:
                owner_of = {fence.owner_of(u) for u in mine}
                seen.append((state, any(fence.owns(u) for u in mine), owner_of))

            zk1.add_listener(on_state)
            session = zk1.session_id
            zk1.client.session.conn.writer.transport.abort()  # the connection dies
            await eventually(lambda: bool(seen) and fence.serving, 10.0, "serving again")
            # UNAVAILABLE (no owner named), not NOT_OWNER, while suspended
            assert seen[0] == ("suspended", False, {None})
            assert seen[-1][0] == "connected"
            assert zk1.session_id == session, "the session survived: nothing expired"
            assert all(fence.owns(u) for u in mine)
            await ring.close()

    run(scenario)


def test_a_draining_node_owns_nobody_and_names_the_next_owner(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 3) as (zk1, zk2, zk3):
            members = [Membership(zk, "c1", f"n{i}", 16) for i, zk in enumerate((zk1, zk2, zk3), 1)]
            for i, member in enumerate(members, 1):
                await member.join(f"127.0.0.1:700{i}", 5.0)
            ring = RingWatch(zk1, "c1")
            await ring.start(5.0)
            view = await ring.wait_until(lambda v: len(v.active) == 3, 5.0)
            fence = OwnershipFence(members[0], ring)
            cache = Releases()
            fence.bind(cache)
            mine = [u for u in range(1, 300) if view.owner(u).node_id == "n1"]
            nexts = {u: view.successors(u, 2)[1].addr for u in mine}
            await members[0].set_state("draining")
            # at once, before the ring shows it: owns nobody, sends each user to the next node
            assert not any(fence.owns(u) for u in mine)
            assert all(fence.owner_of(u) == nexts[u] for u in mine)
            view = await ring.wait_until(lambda v: v.active == ["n2", "n3"], 5.0)
            assert all(view.owner_address(u) == nexts[u] for u in mine)
            assert None in cache.calls
            await ring.close()

    run(scenario)


# ---- reconnections interrupted (recovery must not depend on luck) ----


def test_a_connection_lost_in_the_middle_of_a_reconnection_is_made_again(
    zookeeper: str, chroot: str
) -> None:
    """aiozk restored the watches through a call that waits for a connected session; the
    connection dying right then left the session suspended, and the node fenced, for good."""

    async def scenario() -> None:
        async with ZooKeeperCut(zookeeper) as cut:
            zk = ZooKeeper(cut.address, chroot=chroot, session_timeout_s=SESSION_S)
            try:
                await zk.start(10.0)
                member = Membership(zk, "c1", "n1", 16)
                await member.join("127.0.0.1:7001", 5.0)
                ring = RingWatch(zk, "c1")
                await ring.start(5.0)
                fence = OwnershipFence(member, ring)
                assert fence.serving
                session = zk.session_id
                seen: list[str] = []
                zk.add_listener(lambda state, _session: seen.append(state))
                cut.cut_after_connect()
                cut.drop_all()
                await eventually(lambda: cut.cuts == 1, 10.0, "the reconnection was cut")
                # suspended (the drop), connected (the cut connection), suspended (the cut),
                # then connected again and serving
                took = await eventually(
                    lambda: seen.count("suspended") >= 2 and seen[-1] == "connected",
                    10.0,
                    "connected again after the cut",
                )
                await eventually(lambda: fence.serving, 5.0, "serving again")
                print(f"\nconnected again {took:.2f} s after the reconnection was cut: {seen}")
                assert zk.session_id == session, "the session survived: nothing expired"
                await ring.close()
            finally:
                await zk.close()
                await remove_tree(zookeeper, chroot)

    run(scenario)


def test_a_session_given_up_by_the_client_does_not_keep_its_node_fenced(
    zookeeper: str, chroot: str
) -> None:
    """A reconnection closed unanswered makes aiozk open a new session while ZooKeeper
    keeps the old one (and its ephemeral node) for its whole timeout: the node takes its
    own leftover back at once instead of staying fenced until the old session expires."""
    session_s = 12.0

    async def scenario() -> None:
        async with ZooKeeperCut(zookeeper) as cut:
            zk = ZooKeeper(cut.address, chroot=chroot, session_timeout_s=session_s)
            try:
                await zk.start(10.0)
                member = Membership(zk, "c1", "n1", 16)
                await member.join("127.0.0.1:7001", 5.0)
                ring = RingWatch(zk, "c1")
                await ring.start(5.0)
                fence = OwnershipFence(member, ring)
                old_session = zk.session_id
                cut.refuse_next_connect()
                cut.drop_all()
                took = await eventually(
                    lambda: member.registrations == 2 and fence.serving,
                    2 * session_s,
                    "registered again and serving",
                )
                print(f"\nregistered again in a new session {took:.2f} s after the refusal")
                assert cut.cuts == 1, "the reconnection was not refused: the test proved nothing"
                assert zk.session_id != old_session
                assert took < session_s / 2, "the node waited for its old session to expire"
                _, stat = await zk.get(layout.node_path("c1", "n1"))
                assert stat.ephemeral_owner == zk.session_id
                await ring.close()
            finally:
                await zk.close()
                await remove_tree(zookeeper, chroot)

    run(scenario, timeout=60.0)


def test_a_node_stalled_past_its_session_wakes_up_fenced(zookeeper: str, chroot: str) -> None:
    """A process stopped (SIGSTOP, a stall) longer than its session timeout must not serve
    on waking, before it has read anything: ZooKeeper may have expired its session and
    another node may serve its users already (the chaos soak saw such a node acknowledge
    writes)."""

    async def scenario() -> None:
        async with sessions(zookeeper, chroot, 1) as (zk,):
            member = Membership(zk, "c1", "n1", 16)
            await member.join("127.0.0.1:7001", 5.0)
            ring = RingWatch(zk, "c1")
            await ring.start(5.0)
            fence = OwnershipFence(member, ring)
            assert fence.serving
            await asyncio.sleep(SESSION_S / 2)
            assert fence.serving, "pings keep an idle session live"
            time.sleep(SESSION_S * 0.8)  # the whole loop stalls, as under SIGSTOP
            assert not fence.serving, "woke up serving on a session it cannot vouch for"
            await eventually(lambda: fence.serving, 20.0, "serving again")
            await ring.close()

    run(scenario, timeout=60.0)


def test_a_zookeeper_that_accepts_and_never_answers_does_not_hold_the_reconnection(
    zookeeper: str, chroot: str
) -> None:
    """aiozk waited on its `srvr` probe (and its connects) as long as TCP kept them: a
    ZooKeeper listening but not serving held a reconnection for a minute under load, the
    session expired meanwhile and the node stayed fenced (seen in the ZooKeeper-restart
    test). Bounded, the next attempt reaches the server as soon as it answers."""
    session_s = 10.0

    async def scenario() -> None:
        async with ZooKeeperCut(zookeeper) as cut:
            zk = ZooKeeper(cut.address, chroot=chroot, session_timeout_s=session_s)
            try:
                await zk.start(10.0)
                member = Membership(zk, "c1", "n1", 16)
                await member.join("127.0.0.1:7001", 5.0)
                ring = RingWatch(zk, "c1")
                await ring.start(5.0)
                fence = OwnershipFence(member, ring)
                session = zk.session_id
                cut.hold = True
                cut.drop_all()
                await eventually(lambda: cut.held > 0, 10.0, "a reconnection held")
                cut.hold = False
                took = await eventually(lambda: fence.serving, session_s, "serving again")
                print(f"\nserving again {took:.2f} s after ZooKeeper answered again")
                assert zk.session_id == session, "the session outlived the outage"
                await ring.close()
            finally:
                await zk.close()
                await remove_tree(zookeeper, chroot)

    run(scenario, timeout=60.0)
