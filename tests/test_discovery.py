"""Discovery on the real ZooKeeper (and HBase): placement, LOOKUP, the routing client, moves.

* New users go to the enabled cell (with an active app server) that has the
  fewest users; two discovery instances placing the same new users at once
  agree on every one (the directory's conditional insert), on SQLite and HBase.
* `ClusterClient` finds owners through discovery (skipping a dead instance),
  follows NOT_OWNER when a node joins, then routes straight on the new ring.
* A frozen user is refused by its cell's app servers, which acknowledge.
* Users moved between cells (HBase) while SENDs run keep every message, none
  twice, and are served by the new cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops

from pyserver import logcodec
from pyserver.app.loop import new_event_loop
from pyserver.cluster import freeze, layout
from pyserver.cluster.zk import ZooKeeper
from pyserver.config import load_config
from pyserver.discovery.client import ClusterClient
from pyserver.discovery.directory import Directory
from pyserver.discovery.move import move_user, set_cell_record
from pyserver.discovery.service import DiscoveryService
from pyserver.errors import Unavailable
from pyserver.processes.discovery import DiscoveryProcess
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.store.sqlite import SQLiteStore
from pyserver.wire.ops import Op
from tests import support
from tests.cluster_harness import Cluster, SendLoad, eventually, remove_tree, zk_session

run = partial(support.run, timeout=90.0)


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables(_hbase_drops_finished: None) -> Iterator[None]:
    yield
    drop_made()


@pytest.fixture(scope="session")
def _hbase_drops_finished() -> Iterator[None]:
    yield
    wait_for_drops()


@pytest.fixture
def chroot(zookeeper: str) -> Iterator[str]:
    path = f"/pyserver-test-discovery-{uuid.uuid4().hex[:10]}"
    yield path
    asyncio.run(remove_tree(zookeeper, path))


async def _register(zk: ZooKeeper, cell: str, node_id: str, addr: str) -> None:
    """An app server's ephemeral record, without the app server (placement needs one)."""
    await zk.ensure_persistent(layout.nodes_path(cell))
    record = layout.NodeRecord(node_id, addr, 64)
    await zk.create(layout.node_path(cell, node_id), record.to_bytes(), ephemeral=True)


def _store_spec(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if engine == "hbase":
        host, port = request.getfixturevalue("hbase_thrift")
        return f"hbase:{host}:{port}/{fresh_namespace(host, port, 'dir')}"
    return f"sqlite:{tmp_path / 'directory.sqlite3'}"


# ---- placement ----


def test_new_users_go_to_the_enabled_cell_with_the_fewest_users(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        service_zk = await zk_session(zookeeper, chroot)
        store = SQLiteStore(tmp_path / "directory.sqlite3")
        await store.open()
        directory = Directory(store)
        try:
            for cell, state in (("a", "enabled"), ("b", "disabled"), ("c", "enabled")):
                await set_cell_record(zk, cell, state=state)
                await _register(zk, cell, "n1", f"127.0.0.1:{ord(cell)}")
            await set_cell_record(zk, "d")  # enabled, but no app server: no placement there
            for user, cell in ((1001, "a"), (1002, "a"), (1003, "a"), (1004, "c")):
                await store.set_cell(user, cell)
            service = DiscoveryService(service_zk, directory)
            await service.start()
            try:
                placed = []
                for user in range(1, 7):
                    reply = await service.execute(Op.LOOKUP, {"user": user})
                    placed.append(reply["cell"])
                    owner = f"127.0.0.1:{ord(reply['cell'])}"
                    assert (reply["owner"], reply["node"], reply["frozen"]) == (owner, "n1", False)
                # a 3, c 1: c, c, then a tie (the first by name), and so on
                assert placed == ["c", "c", "a", "c", "a", "c"]
                for user, cell in enumerate(placed, start=1):
                    assert await store.get_cell(user) == cell
                assert (await service.execute(Op.LOOKUP, {"user": 1001}))["cell"] == "a"
                unknown = await service.execute(Op.LOOKUP, {"user": 99, "place": False})
                assert unknown["cell"] is None and await store.get_cell(99) is None
                await set_cell_record(zk, "c", state="disabled")
                await eventually(lambda: service.cells.placeable() == ["a"], 5, "c disabled")
                assert (await service.execute(Op.LOOKUP, {"user": 7}))["cell"] == "a"
                cells = (await service.execute(Op.CELLS, {}))["cells"]
                assert sorted(cells) == ["a", "b", "c", "d"] and cells["b"]["state"] == "disabled"
                ring = await service.execute(Op.CELL_RING, {"cell": "a"})
                assert [n["addr"] for n in ring["nodes"]] == ["127.0.0.1:97"]
            finally:
                await service.close()
        finally:
            await store.close()
            await service_zk.close()
            await zk.close()

    run(scenario)


@pytest.mark.parametrize("engine", ["sqlite", "hbase"])
def test_two_discovery_instances_placing_the_same_new_users_agree(
    engine: str, zookeeper: str, chroot: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    spec = _store_spec(engine, tmp_path, request)
    users = range(1, 41)

    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        for cell in ("a", "c"):
            await set_cell_record(zk, cell)
            await _register(zk, cell, "n1", "127.0.0.1:9")
        services, stores, directories = [], [], []
        try:
            for _ in range(2):
                store = open_store(parse_store_spec(spec, tmp_path))
                await store.open()
                stores.append(store)
                directories.append(Directory(store))
                services.append(
                    DiscoveryService(await zk_session(zookeeper, chroot), directories[-1])
                )
                await services[-1].start()
            # each instance believes the other cell is the emptier one: they would disagree
            services[0]._counts = Counter({"a": 100, "c": 0})
            services[1]._counts = Counter({"a": 0, "c": 100})
            order = [list(users), list(users)]
            random.Random(7).shuffle(order[1])

            async def lookups(service: DiscoveryService, order: list[int]) -> dict[int, str]:
                replies = await asyncio.gather(
                    *(service.execute(Op.LOOKUP, {"user": user}) for user in order)
                )
                return {reply["user"]: reply["cell"] for reply in replies}

            first, second = await asyncio.gather(
                lookups(services[0], order[0]), lookups(services[1], order[1])
            )
            assert first == second
            for user in users:
                assert await stores[0].get_cell(user) == first[user]
            placed = sum(s.stats().get("placed", 0) for s in services)
            assert placed == len(users), "each new user placed exactly once"
        finally:
            for service in services:
                await service.close()
                await service.zk.close()
            for store in stores:
                await store.close()
            await zk.close()

    run(scenario)


# ---- freezing ----


def test_a_frozen_user_is_held_and_acknowledged_after_its_writes(
    zookeeper: str, chroot: str
) -> None:
    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        node_zk = await zk_session(zookeeper, chroot)
        quiesced: list[int] = []

        async def on_frozen(user: int) -> None:
            await asyncio.sleep(0.05)  # a write under way finishing
            quiesced.append(user)

        watch = freeze.FreezeWatch(node_zk, "a", "n1", on_frozen)
        try:
            assert await watch.start() == frozenset()
            await freeze.freeze_user(zk, "a", 42, "b")
            await eventually(lambda: watch.holds(42), 5, "user 42 held")
            assert await freeze.acknowledgements(zk, "a", 42) in (set(), {"n1"})
            await eventually(lambda: quiesced == [42], 5, "user 42 quiesced")
            for _ in range(100):
                if await freeze.acknowledgements(zk, "a", 42) == {"n1"}:
                    break
                await asyncio.sleep(0.02)
            assert await freeze.acknowledgements(zk, "a", 42) == {"n1"}
            await freeze.mark_moved(zk, "a", 42, "b")
            records = await freeze.read_frozen(zk, "a")
            assert records[42]["state"] == "moved" and records[42]["to"] == "b"
            assert await freeze.thaw_user(zk, "a", 42)
            await eventually(lambda: not watch.holds(42), 5, "user 42 thawed")
            assert not await freeze.thaw_user(zk, "a", 42)
        finally:
            await watch.close()
            await node_zk.close()
            await zk.close()

    run(scenario)


def test_finished_moves_stay_held_out_of_the_list_of_moves_under_way(
    zookeeper: str, chroot: str
) -> None:
    """A finished move's tombstone goes to the cell's `moved` list: the watched list of
    moves under way stays short, yet every app server holds the user throughout (never
    let go between its freeze and its tombstone), a watch started later holds it too, and
    a tombstone removed (a move back) lets the user go."""

    async def scenario() -> None:
        zk = await zk_session(zookeeper, chroot)
        node_zk = await zk_session(zookeeper, chroot)
        seen: list[frozenset[int]] = []
        watch = freeze.FreezeWatch(node_zk, "a", "n1")
        watch.subscribe(lambda _changed: seen.append(watch.users))
        later: freeze.FreezeWatch | None = None
        users = list(range(100, 140))
        try:
            await watch.start()
            await freeze.freeze_users(zk, "a", dict.fromkeys(users, "b"))
            await eventually(lambda: all(map(watch.holds, users)), 5, "the users held")
            for user in users:
                for _ in range(250):
                    if await freeze.acknowledgements(zk, "a", user) == {"n1"}:
                        break
                    await asyncio.sleep(0.02)
                assert await freeze.acknowledgements(zk, "a", user) == {"n1"}
            await freeze.mark_all_moved(zk, "a", dict.fromkeys(users, "b"))
            assert await zk.get_children(freeze.frozen_path("a")) == []
            assert sorted(map(int, await zk.get_children(freeze.moved_path("a")))) == users
            await eventually(lambda: watch.moved == frozenset(users), 5, "moved away")
            first = next(i for i, held in enumerate(seen) if set(users) <= held)
            assert all(set(users) <= held for held in seen[first:]), "let go mid-move"
            later = freeze.FreezeWatch(node_zk, "a", "n2")
            assert await later.start() == frozenset(users)
            # a move back to cell a removes its tombstone: the user is served here again
            assert await freeze.thaw_user(zk, "a", users[0])
            await eventually(lambda: not watch.holds(users[0]), 5, "the tombstone let go")
            await eventually(lambda: not later.holds(users[0]), 5, "the tombstone let go")
            assert all(map(watch.holds, users[1:]))
        finally:
            if later is not None:
                await later.close()
            await watch.close()
            await node_zk.close()
            await zk.close()

    run(scenario)


# ---- the routing client against app servers ----


async def _discovery(cluster: Cluster, tmp_path: Path, store: str) -> DiscoveryProcess:
    config = load_config(
        env={},
        overrides={
            "data_dir": cluster.data,
            "zookeeper": cluster.zookeeper,
            "zookeeper_chroot": cluster.chroot,
            "store": store,
            "zookeeper_session_timeout_s": 5.0,
        },
    )
    process = DiscoveryProcess(config)
    await process.start("127.0.0.1", 0)
    return process


def _address(process: DiscoveryProcess) -> str:
    assert process.server is not None
    assert process.server.address is not None
    host, port = process.server.address
    return f"{host}:{port}"


def test_the_cluster_client_routes_by_discovery_and_follows_not_owner(
    tmp_path: Path, zookeeper: str
) -> None:
    cluster = Cluster(tmp_path, zookeeper)
    try:
        cluster.start("n1", "n2")

        async def scenario() -> None:
            process = await _discovery(cluster, tmp_path, cluster.store)
            client = await ClusterClient.connect(
                ["127.0.0.1:1", _address(process)], cluster.key, request_timeout=20.0
            )
            try:

                async def round_of_sends(tag: str) -> None:
                    for user in range(1, 31):
                        reply = await client.send(user, [user % 30 + 1], tag, key=f"{tag}-{user}")
                        assert not reply["duplicate"]

                await round_of_sends("first")
                lookup = await client.lookup(5)
                assert lookup["cell"] == "c1" and lookup["node"] in ("n1", "n2")
                assert client.figures["ring_fetches"] == 1
                cluster.start("n3")  # the client's ring is stale now
                await round_of_sends("second")
                assert client.router.errors["NOT_OWNER"] > 0, "users of n3 were redirected"
                await eventually(
                    lambda: len(process.service.cells.cells["c1"].view.active) == 3, 5, "3 nodes"
                )
                ring = await client.ring_of("c1", refresh=True)
                assert sorted(ring.addrs) == ["n1", "n2", "n3"]
                redirects = client.router.errors["NOT_OWNER"]
                await round_of_sends("third")
                assert client.router.errors["NOT_OWNER"] == redirects, "straight to owners"
                threads = await client.list_threads(7)
                assert {t["snippet"] for t in threads["threads"]} <= {"first", "second", "third"}
                assert (await client.counts(7))["folders"]["other"]["unread"] == 1
            finally:
                await client.close()
                await process.stop()

        run(scenario)
    finally:
        cluster.close()


def test_the_cluster_client_follows_a_restarted_discovery_instance(
    tmp_path: Path, zookeeper: str
) -> None:
    """A ring's version is counted by the discovery instance that answers, from 1 at its
    start: the client kept the highest it had seen, so after discovery restarted it held a
    killed node's address for good (found by the chaos soak)."""
    cluster = Cluster(tmp_path, zookeeper)
    try:
        cluster.start("n1", "n2")

        async def scenario() -> None:
            process = await _discovery(cluster, tmp_path, cluster.store)
            address = _address(process)
            zk = await zk_session(zookeeper, cluster.chroot)
            client = await ClusterClient.connect([address], cluster.key, request_timeout=20.0)
            try:
                for state in ("disabled", "enabled") * 4:  # the instance counts versions up
                    await set_cell_record(zk, "c1", state=state)
                    await eventually(
                        lambda s=state: process.service.cells.cells["c1"].view.cell_state == s,
                        5,
                        state,
                    )
                ring = await client.ring_of("c1", refresh=True)
                assert ring.version >= 9
                users = [u for u in range(1, 200) if ring.owner_address(u) == ring.addrs["n2"]]
                await process.stop()
                process = await _discovery_at(cluster, address)  # counts from 1 again
                old = cluster.nodes["n2"].addr
                cluster.nodes["n2"].kill()
                (n2,) = await asyncio.to_thread(cluster.start, "n2")
                assert n2.addr != old
                for user in users[:5]:
                    reply = await client.send(user, [users[-1]], "after", key=f"k{user}")
                    assert not reply["duplicate"]
                assert (await client.ring_of("c1")).addrs["n2"] == n2.addr
            finally:
                await client.close()
                await process.stop()
                await zk.close()

        run(scenario, timeout=90.0)
    finally:
        cluster.close()


async def _discovery_at(cluster: Cluster, address: str) -> DiscoveryProcess:
    config = load_config(
        env={},
        overrides={
            "data_dir": cluster.data,
            "zookeeper": cluster.zookeeper,
            "zookeeper_chroot": cluster.chroot,
            "store": cluster.store,
            "zookeeper_session_timeout_s": 5.0,
        },
    )
    process = DiscoveryProcess(config)
    host, _, port = address.rpartition(":")
    await process.start(host, int(port))
    return process


def test_a_cluster_client_with_no_discovery_answering_raises_unavailable() -> None:
    async def scenario() -> None:
        client = ClusterClient(["127.0.0.1:1", "127.0.0.1:2"], "key", request_timeout=0.5)
        try:
            with pytest.raises(Unavailable):
                await client.send(1, [2], "hello", key="k")
        finally:
            await client.close()

    run(scenario, timeout=10)


# ---- moving users between cells ----


class _RoutedLoad:
    """SendLoad's `cell.request(user, op, payload, timeout)` over a ClusterClient."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client

    async def request(
        self, _user: int, op: Op, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await self.client.request(op, payload, timeout)


async def _logs(store: Any, users: range) -> dict[int, list[dict[str, Any]]]:
    logs = {}
    for user in users:
        page = await store.read_log(user, 0, 1_000_000)
        assert [seq for seq, _ in page] == list(range(1, len(page) + 1)), f"gap in {user}'s log"
        logs[user] = [logcodec.decode(record) for _, record in page]
    return logs


def test_users_moved_between_cells_under_load_keep_every_message(
    tmp_path: Path,
    zookeeper: str,
    hbase_thrift: tuple[str, int],
    hbase_thrift2: tuple[str, int],
) -> None:
    host, port = hbase_thrift
    users = range(1, 17)
    # cell ca appends through the Thrift2 gateway, cb through Thrift1 alone
    cluster = Cluster(
        tmp_path,
        zookeeper,
        session_timeout_s=5.0,
        hbase=hbase_thrift,
        hbase_commit_port=hbase_thrift2[1],
    )
    other = f"hbase:{host}:{port}/{fresh_namespace(host, port, 'cb')}"
    stores = {"ca": cluster.store, "cb": other}

    async def prepare() -> DiscoveryProcess:
        store = open_store(parse_store_spec(other, tmp_path))
        await store.create_tables()
        zk = await zk_session(zookeeper, cluster.chroot)
        for cell, spec in stores.items():
            await set_cell_record(zk, cell, store=spec)
        await zk.close()
        return await _discovery(cluster, tmp_path, cluster.store)

    loop = new_event_loop()
    try:
        process = loop.run_until_complete(prepare())
        extra = ["--discovery", _address(process)]
        spawned = [cluster.spawn("a1", "ca", *extra), cluster.spawn("a2", "ca", *extra)]
        spawned.append(cluster.spawn("b1", "cb", "--store", other, *extra))
        for node in spawned:
            node.wait_serving()

        async def scenario() -> None:
            client = await ClusterClient.connect([_address(process)], cluster.key)
            opened = {
                cell: open_store(parse_store_spec(spec, tmp_path)) for cell, spec in stores.items()
            }
            for store in opened.values():
                await store.open()
            zk = await zk_session(zookeeper, cluster.chroot)
            directory = Directory(opened["ca"])
            load = SendLoad(_RoutedLoad(client), users=len(users), workers=4, pause_s=0.01)  # type: ignore[arg-type]
            try:
                load.start()
                await asyncio.sleep(1.0)
                moved = {}
                for user in (1, 2, 3):
                    source = await client.cell_of(user)
                    target = "cb" if source == "ca" else "ca"
                    old = await _logs(opened[source], range(user, user + 1))
                    report = await move_user(zk, directory, opened, user, target)
                    assert (report.source, report.target) == (source, target)
                    assert report.copied >= len(old[user]) > 0
                    moved[user] = (source, target, report.last_seq)
                    await asyncio.sleep(0.3)
                for _ in range(100):  # each moved user written in its new cell
                    await asyncio.sleep(0.1)
                    seqs = [await opened[t].last_seq(u) > s for u, (_, t, s) in moved.items()]
                    if all(seqs):
                        break
                await load.stop()
                assert not load.failed, f"SENDs failed: {load.failed}"
                assert len(load.acked) > 50
                cells = {user: await directory.cell_of(user) for user in users}
                logs: dict[int, list[dict[str, Any]]] = {}
                for user in users:
                    logs |= await _logs(opened[cells[user]], range(user, user + 1))
                holders: dict[str, Counter[int]] = {}
                for user, entries in logs.items():
                    ids = Counter(
                        e["message_id"] for e in entries if e["action"] == "message_added"
                    )
                    assert max(ids.values(), default=1) == 1, f"user {user} holds a message twice"
                    for message in ids:
                        holders.setdefault(message, Counter())[user] += 1
                for message, (sender, recipients) in load.acked.items():
                    missing = {sender, *recipients} - set(holders.get(message, ()))
                    assert not missing, f"acknowledged {message} missing for {sorted(missing)}"
                for user, (source, target, _) in moved.items():
                    assert cells[user] == target
                    lookup = await client.lookup(user, fresh=True)
                    assert lookup["cell"] == target and not lookup["frozen"]
                    old = (await _logs(opened[source], range(user, user + 1)))[user]
                    assert logs[user][: len(old)] == old, "the old cell's log is a prefix"
                    assert len(logs[user]) > len(old), "the new cell served the user"
                    tombstone = (await freeze.read_frozen(zk, source))[user]
                    assert tombstone["state"] == "moved"
            finally:
                await zk.close()
                for store in opened.values():
                    await store.close()
                await client.close()
                await process.stop()

        loop.run_until_complete(asyncio.wait_for(scenario(), 120))
    finally:
        loop.close()
        cluster.close()
        asyncio.run(_drop(other, tmp_path))


async def _drop(spec: str, tmp_path: Path) -> None:
    store = open_store(parse_store_spec(spec, tmp_path))
    with contextlib.suppress(Exception):  # cleanup only
        await store.drop_tables()


def test_discovery_operations_are_for_service_connections_only() -> None:
    from pyserver.app.dispatcher import Dispatcher, Session
    from pyserver.errors import Forbidden

    session = Session("peer", lambda _id, _event: None)
    session.authenticated, session.user = True, 1  # a user-token connection of user 1
    for op in (Op.LOOKUP, Op.CELL_RING, Op.CELLS):
        with pytest.raises(Forbidden):
            Dispatcher._check_user_scope(session, op, {"user": 1})
