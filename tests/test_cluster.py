"""Cells of several app servers, each a `pyserver node` process, on the real ZooKeeper.

Under a steady load of SENDs routed by the cell's ring (tests/cluster_harness.py):
kill -9 of one of three nodes (its users are served by the others within the
session timeout plus one second), a fourth node joining (it takes about a
quarter of the users), a node draining, ZooKeeper itself stopped and started
again (a private instance: the nodes fence themselves, then serve again), and
two nodes both told they own the same users (the store's compare-and-set keeps
every log whole). After each, every acknowledged message is in the logs of its
sender and recipients exactly once. The nodes share one SQLite store, whose
compare-and-set holds across processes as HBase's does across servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from pyserver.client import Client
from pyserver.cluster.routing import OwnerRouter
from pyserver.errors import PyserverError, Unavailable
from pyserver.wire.ops import Op
from tests import support
from tests.cluster_harness import (
    REPO,
    SESSION_TIMEOUT_S,
    Cluster,
    SendLoad,
    check_logs,
    stop_gracefully,
)

USERS = 60


run = partial(support.run, timeout=90.0)


@pytest.fixture
def cluster(tmp_path: Path, zookeeper: str) -> Iterator[Cluster]:
    """Nodes on one SQLite file."""
    cluster = Cluster(tmp_path, zookeeper)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "hbase"])
def any_store_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, zookeeper: str
) -> Iterator[Cluster]:
    """Nodes on one SQLite file, or on HBase (a namespace of the test's own; appends
    through the Thrift2 gateway)."""
    hbase = commit_port = None
    if request.param == "hbase":
        hbase = request.getfixturevalue("hbase_thrift")
        commit_port = request.getfixturevalue("hbase_thrift2")[1]
    cluster = Cluster(tmp_path, zookeeper, hbase=hbase, hbase_commit_port=commit_port)
    try:
        yield cluster
    finally:
        cluster.close()


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# ---- kill -9 ----


def test_kill_9_of_one_node_fails_its_users_over_within_the_session_timeout(
    any_store_cluster: Cluster,
) -> None:
    cluster = any_store_cluster
    cluster.start("n1", "n2", "n3")

    async def scenario() -> None:
        async with await cluster.client() as cell:
            view = await cell.ring.wait_until(lambda v: len(v.active) == 3, 10.0)
            victims = [u for u in range(1, USERS + 1) if view.owner(u).node_id == "n2"]
            assert victims
            load = SendLoad(cell, users=USERS)
            load.start()
            await asyncio.sleep(1.5)
            before = len(load.acked)
            killed_at = time.monotonic()
            cluster.nodes["n2"].kill()
            # a router that retries fast: the first answer for each victim after the kill
            probe = OwnerRouter(
                lambda user: cell.ring.view.owner_address(user),
                cluster.key,
                timeout_s=15.0,
                backoff_max_s=0.02,
            )
            try:
                for user in victims:
                    await probe.request(user, Op.COUNTS, {"user": user})
            finally:
                await probe.close()
            failover_s = time.monotonic() - killed_at
            assert cell.ring.view.active == ["n1", "n3"]
            await asyncio.sleep(1.0)
            # n2 again: its tokens are derived from its id, so its users come back to it
            # (and the others drop what they cached of them)
            restarted = cluster.spawn("n2")
            await asyncio.to_thread(restarted.wait_serving)
            view = await cell.ring.wait_until(lambda v: len(v.active) == 3, 10.0)
            assert {view.owner(u).node_id for u in victims} == {"n2"}
            await asyncio.sleep(1.0)
            await load.stop()
            host, port = host_port(restarted.addr)
            async with await Client.connect(host, port, service_key=cluster.key) as direct:
                served_again = (await direct.stats())["requests"]
            assert served_again.get("SEND", 0) + served_again.get("DELIVER_COPY", 0) > 0
            print(
                f"\nfailover after kill -9 ({cluster.store.split(':')[0]}): {failover_s:.2f} s "
                f"(session timeout {SESSION_TIMEOUT_S:g} s); {len(load.acked)} SENDs acknowledged, "
                f"{len(load.acked) - before} after the kill; router {dict(cell.router.errors)}"
            )
            assert failover_s <= SESSION_TIMEOUT_S + 1.0
            assert not load.failed, load.failed
            assert len(load.acked) > before
            await check_logs(cluster.open_store(), load.acked, USERS)

    run(scenario)


def test_a_node_killed_and_started_again_at_once_waits_out_its_old_session(
    cluster: Cluster,
) -> None:
    (n1,) = cluster.start("n1")
    n1.kill()
    started = time.monotonic()
    again = cluster.spawn("n1")
    again.wait_serving(timeout_s=3 * SESSION_TIMEOUT_S + 10)
    waited = time.monotonic() - started
    assert "still held by session" in again.log_path.read_text()
    assert waited <= 2 * SESSION_TIMEOUT_S + 5

    async def scenario() -> None:
        async with await cluster.client() as cell:
            reply = await cell.request(1, Op.SEND, {"sender": 1, "recipients": [2], "text": "back",
                                                    "channel": "chat", "key": "k"})  # fmt: skip
            assert reply["duplicate"] is False

    run(scenario)


# ---- a fourth node joins ----


def test_a_fourth_node_takes_a_quarter_of_the_users_without_failed_requests(
    cluster: Cluster,
) -> None:
    cluster.start("n1", "n2", "n3")

    async def scenario() -> None:
        async with await cluster.client() as cell:
            await cell.ring.wait_until(lambda v: len(v.active) == 3, 10.0)
            load = SendLoad(cell, users=USERS)
            load.start()
            await asyncio.sleep(1.0)
            spawned = time.monotonic()
            n4 = cluster.spawn("n4")
            view = await cell.ring.wait_until(lambda v: "n4" in v.active, 30.0)
            join_s = time.monotonic() - spawned
            n4.wait_serving()
            await asyncio.sleep(2.0)
            await load.stop()
            share = sum(view.owner(u).node_id == "n4" for u in range(1, 20_001)) / 20_000
            host, port = host_port(n4.addr)
            async with await Client.connect(host, port, service_key=cluster.key) as direct:
                stats = await direct.stats()
            print(
                f"\njoin: n4 on the ring {join_s:.2f} s after its start, owns {share:.1%}; "
                f"it answered {stats['requests']}; router {dict(cell.router.errors)}"
            )
            assert 0.15 <= share <= 0.35
            assert stats["requests"].get("SEND", 0) + stats["requests"].get("DELIVER_COPY", 0)
            assert not load.failed, load.failed
            assert set(cell.router.errors) <= {"NOT_OWNER"}, cell.router.errors
            await check_logs(cluster.open_store(), load.acked, USERS)

    run(scenario)


# ---- draining ----


def test_draining_a_node_under_load_fails_no_request(cluster: Cluster) -> None:
    cluster.start("n1", "n2", "n3")

    async def scenario() -> None:
        async with await cluster.client() as cell:
            await cell.ring.wait_until(lambda v: len(v.active) == 3, 10.0)
            load = SendLoad(cell, users=USERS)
            load.start()
            await asyncio.sleep(1.5)
            started = time.monotonic()
            drain = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyserver.cli", "admin", "drain", "--node", "n2",
                "--cell", "c1", "--zookeeper", cluster.zookeeper, "--chroot", cluster.chroot,
                "--wait", "30", cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await drain.communicate()
            assert drain.returncode == 0, (out, err)
            code = await asyncio.to_thread(cluster.nodes["n2"].wait, 30.0)
            drained_s = time.monotonic() - started
            assert cell.ring.view.active == ["n1", "n3"]
            await asyncio.sleep(1.0)
            await load.stop()
            print(
                f"\ndrain: n2 left in {drained_s:.2f} s, exit {code}; {len(load.acked)} SENDs "
                f"acknowledged; router {dict(cell.router.errors)}"
            )
            assert code == 0, cluster.nodes["n2"].tail()
            assert "stopped" in cluster.nodes["n2"].output[-1]
            assert not load.failed, load.failed
            assert set(cell.router.errors) <= {"NOT_OWNER"}, cell.router.errors
            await check_logs(cluster.open_store(), load.acked, USERS)

    run(scenario)


def test_sigterm_drains_too(cluster: Cluster) -> None:
    (n1,) = cluster.start("n1")

    async def scenario() -> None:
        async with await cluster.client() as cell:
            await cell.request(1, Op.SEND, {"sender": 1, "recipients": [2], "text": "hi",
                                            "channel": "chat", "key": "k"})  # fmt: skip
            assert stop_gracefully(n1) == 0
            view = await cell.ring.wait_until(lambda v: not v.members, 10.0)
            assert view.active == []
            with pytest.raises(Unavailable):
                await cell.request(1, Op.COUNTS, {"user": 1}, timeout_s=0.3)

    run(scenario)


# ---- split brain ----


def test_two_nodes_that_both_own_a_user_keep_its_log_whole(any_store_cluster: Cluster) -> None:
    cluster = any_store_cluster
    # Two one-node cells on one store: each node owns every user, as after a split brain.
    a = cluster.spawn("a", "split-a")
    b = cluster.spawn("b", "split-b")
    a.wait_serving()
    b.wait_serving()
    sender, recipient = 1, 2

    async def writer(client: Client, name: str, acked: dict, deadline: float) -> None:
        count = 0
        while time.monotonic() < deadline:
            count += 1
            payload = {"sender": sender, "recipients": [recipient], "text": f"{name} {count}",
                       "channel": "chat", "key": f"{name}-{count}"}  # fmt: skip
            # CONFLICT (lost the race too often): retried with the same key until answered,
            # as a client must: a SEND that wrote the sender's copy and lost the race for
            # the recipient's is in one log already, and its retry completes it
            for _ in range(500):
                try:
                    reply = await client.request(Op.SEND, payload)
                except PyserverError as error:
                    assert error.code == "CONFLICT", error
                    continue
                acked[reply["message_id"]] = (sender, (recipient,))
                break
            else:
                raise AssertionError(f"{payload['key']}: CONFLICT 500 times in a row")

    async def scenario() -> None:
        acked: dict = {}
        clients = []
        for node in (a, b):
            host, port = host_port(node.addr)
            clients.append(await Client.connect(host, port, service_key=cluster.key))
        deadline = time.monotonic() + 2.5
        await asyncio.gather(*(
            writer(client, f"{name}{i}", acked, deadline)
            for client, name in zip(clients, "ab", strict=True) for i in range(3)
        ))  # fmt: skip
        conflicts = 0
        for client in clients:
            conflicts += (await client.stats())["mailbox"]["conflicts"]
            await client.close()
        logs = await check_logs(cluster.open_store(), acked, 2)
        print(
            f"\nsplit brain ({cluster.store.split(':')[0]}): {len(acked)} SENDs acknowledged, "
            f"{conflicts} lost races reloaded"
        )
        assert conflicts > 0, "the two nodes never raced: the test proved nothing"
        for user in (sender, recipient):
            added = [e["message_id"] for e in logs[user] if e["action"] == "message_added"]
            assert sorted(added) == sorted(acked), f"user {user}: log and acknowledgements differ"

    run(scenario)


# ---- ZooKeeper stopped and started again ----


def _engines(engines_dir: Path, port: int, *args: str) -> None:
    env = {**os.environ, "PYSERVER_ENGINES_DIR": str(engines_dir),
           "PYSERVER_ZOOKEEPER_PORT": str(port)}  # fmt: skip
    done = subprocess.run(
        [str(REPO / "scripts" / "engines"), *args, "zookeeper"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def private_zookeeper(tmp_path: Path, zookeeper: str) -> Iterator[tuple[str, Callable]]:
    """A ZooKeeper of this test's own (started by scripts/engines in tmp_path), and a
    function that runs `scripts/engines up|down zookeeper` on it."""
    port = support.free_port()
    engines_dir = tmp_path / "engines"

    def control(action: str) -> None:
        _engines(engines_dir, port, action)

    control("up")
    try:
        yield f"127.0.0.1:{port}", control
    finally:
        _engines(engines_dir, port, "down")


def test_zookeeper_down_fences_every_node_and_they_serve_again_once_it_is_back(
    tmp_path: Path, private_zookeeper: tuple[str, Callable]
) -> None:
    servers, control = private_zookeeper
    cluster = Cluster(tmp_path, servers, session_timeout_s=4.0)
    try:
        cluster.start("n1", "n2", "n3")

        async def answer(addr: str, user: int) -> str:
            host, port = host_port(addr)
            try:
                async with await Client.connect(host, port, service_key=cluster.key) as direct:
                    await direct.counts(user)
            except PyserverError as error:
                return error.code
            return "OK"

        async def scenario() -> None:
            async with await cluster.client(request_timeout_s=40.0) as cell:
                view = await cell.ring.wait_until(lambda v: len(v.active) == 3, 10.0)
                owned = {
                    node: next(u for u in range(1, USERS + 1) if view.owner(u).node_id == node)
                    for node in ("n1", "n2", "n3")
                }
                addrs = {node: view.members[node].addr for node in owned}
                load = SendLoad(cell, users=USERS, request_timeout_s=40.0)
                load.start()
                await asyncio.sleep(1.0)
                stopped = time.monotonic()
                await asyncio.to_thread(control, "down")
                answers = {n: await answer(addrs[n], owned[n]) for n in owned}
                fenced_s = time.monotonic() - stopped
                print(f"\nZooKeeper down: {answers} {fenced_s:.2f} s after the stop began")
                assert set(answers.values()) == {"UNAVAILABLE"}
                acked_down = len(load.acked)
                await asyncio.sleep(1.0)
                restarted = time.monotonic()
                await asyncio.to_thread(control, "up")
                up_s = time.monotonic() - restarted
                while {await answer(addrs[n], owned[n]) for n in owned} != {"OK"}:
                    assert time.monotonic() - restarted < 30, "the nodes did not serve again"
                    await asyncio.sleep(0.1)
                recovered_s = time.monotonic() - restarted
                await asyncio.sleep(1.0)
                await load.stop()
                print(
                    f"ZooKeeper up in {up_s:.2f} s; every node serving again "
                    f"{recovered_s:.2f} s after the restart began; {len(load.acked)} SENDs "
                    f"acknowledged ({len(load.acked) - acked_down} after the outage began)"
                )
                assert not load.failed, load.failed
                assert len(load.acked) > acked_down
                await check_logs(cluster.open_store(), load.acked, USERS)

        run(scenario, timeout=150.0)
    finally:
        for node in cluster.nodes.values():
            node.kill()


def test_nodes_print_where_they_listen_and_stop_on_a_second_signal(cluster: Cluster) -> None:
    (n1,) = cluster.start("n1")
    assert any(line.startswith("  binary protocol") for line in n1.output)
    assert any("zookeeper" in line and cluster.chroot in line for line in n1.output)
    n1.signal(signal.SIGTERM)
    n1.signal(signal.SIGTERM)
    assert n1.wait(15.0) == 0
