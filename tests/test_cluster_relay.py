"""Cross-node delivery, in one process: two app servers over one store, each owning half
the users of a fixed ring, relaying SEND copies to each other as DELIVER_COPY.

ZooKeeper plays no part here (tests/test_cluster*.py run the real thing); the
ring is a `pyserver.ring.HashRing` both "nodes" share, so every semantic of a
SEND whose recipients live elsewhere is checked quickly and deterministically:
one message id and thread id in every copy, idempotent retries, blocked
senders, folder routing on the recipient's side, NOT_OWNER followed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pyserver.app.auth import make_user_token
from pyserver.app.dispatcher import Dispatcher
from pyserver.app.image import thread_id_for
from pyserver.app.mailbox import Mailbox
from pyserver.app.server import AppServer
from pyserver.client import Client
from pyserver.cluster.routing import OwnerRouter
from pyserver.errors import BadRequest, Forbidden, NotOwner, PyserverError, Unavailable
from pyserver.ring import HashRing
from pyserver.servicelink import ServiceLinks
from pyserver.store.sqlite import SQLiteStore
from pyserver.userindex.local import LocalUserIndex
from pyserver.wire.ops import Op
from tests import support

KEY = "relay-test-service-key-0123456789"
NODES = ("a", "b")


run = partial(support.run, timeout=20.0)


@dataclass
class Node:
    node_id: str
    mailbox: Mailbox
    server: AppServer
    router: OwnerRouter
    addr: str = ""


class TwoNodes:
    """Two app servers sharing a store; `ring` says who owns whom (mutable by tests)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.ring = HashRing(64)
        for node_id in NODES:
            self.ring.add_node(node_id)
        self.nodes: dict[str, Node] = {}
        self.fenced: set[str] = set()

    def owner(self, user: int) -> str:
        return self.ring.owner(user)

    def users_of(self, node_id: str, count: int, start: int = 1) -> list[int]:
        users = [u for u in range(start, start + 10_000) if self.owner(u) == node_id]
        return users[:count]

    async def start(self) -> None:
        for node_id in NODES:
            owns, owner_of = self._hooks(node_id)
            router = OwnerRouter(owner_of, KEY, timeout_s=2.0)
            mailbox = Mailbox(
                self.store,
                LocalUserIndex(self.store),
                owns=owns,
                owner_of=owner_of,
                relay=lambda user, delivery, router=router: router.request(
                    user, Op.DELIVER_COPY, delivery.copy_request(user)
                ),
            )
            server = AppServer(Dispatcher(mailbox, KEY, node_id))
            host, port = await server.start("127.0.0.1", 0)
            self.nodes[node_id] = Node(node_id, mailbox, server, router, f"{host}:{port}")

    def _hooks(self, node_id: str) -> tuple[Callable[[int], bool], Callable[[int], str | None]]:
        def owns(user: int) -> bool:
            return node_id not in self.fenced and self.owner(user) == node_id

        def owner_of(user: int) -> str | None:
            owner = self.owner(user)
            return None if owner == node_id else self.nodes[owner].addr

        return owns, owner_of

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.server.stop(1.0)
            await node.router.close()
            await node.mailbox.close()


@contextlib.asynccontextmanager
async def cell(tmp_path: Path) -> AsyncIterator[tuple[TwoNodes, Client, Client]]:
    store = SQLiteStore(tmp_path / "cell.sqlite", synchronous="OFF")
    await store.open()
    nodes = TwoNodes(store)
    await nodes.start()
    clients = []
    for node_id in NODES:
        host, port = nodes.nodes[node_id].addr.split(":")
        clients.append(await Client.connect(host, int(port), service_key=KEY))
    try:
        yield nodes, clients[0], clients[1]
    finally:
        for client in clients:
            await client.close()
        await nodes.stop()
        await store.close()


async def log_of(store: SQLiteStore, user: int) -> list[dict[str, Any]]:
    from pyserver import logcodec

    return [logcodec.decode(record) for _, record in await store.read_log(user, 0, 10_000)]


def added(entries: list[dict[str, Any]]) -> list[str]:
    return [e["message_id"] for e in entries if e["action"] == "message_added"]


# ---- SEND across nodes ----


def test_send_writes_each_copy_on_its_recipients_owner_with_one_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, _on_b):
            sender = nodes.users_of("a", 1)[0]
            remote = nodes.users_of("b", 2)
            local = nodes.users_of("a", 2, start=sender + 1)
            reply = await on_a.send(sender, remote + local, "lunch?", key="k-1")
            assert reply["duplicate"] is False
            for user in [sender, *remote, *local]:
                entries = await log_of(nodes.store, user)
                assert added(entries) == [reply["message_id"]]
                assert entries[0]["thread_id"] == reply["thread_id"]
                assert sorted(entries[0]["participants"]) == sorted([sender, *remote, *local])
            # the copies reached the recipients' owners, which serve them
            thread = (
                await nodes.nodes["b"].mailbox.execute(
                    Op.LIST_THREADS, {"user": remote[0], "folder": "other"}
                )
            )["threads"]
            assert [t["thread_id"] for t in thread] == [reply["thread_id"]]
            assert nodes.nodes["a"].router.counters["redirects"] == 0

    run(scenario)


def test_a_retried_send_duplicates_no_copy_anywhere(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, on_b):
            sender = nodes.users_of("a", 1)[0]
            remote = nodes.users_of("b", 3)
            first = await on_a.send(sender, remote, "once", key="retry-me")
            again = await on_a.send(sender, remote, "once", key="retry-me")
            assert again["duplicate"] is True
            assert again["message_id"] == first["message_id"]
            # a SEND that failed after its remote copies were written is retried in full
            copy = await on_b.request(
                Op.DELIVER_COPY,
                {
                    "user": remote[0],
                    "message_id": first["message_id"],
                    "thread_id": first["thread_id"],
                    "sender": sender,
                    "participants": sorted([sender, *remote]),
                    "channel": "chat",
                    "text": "once",
                    "key": "retry-me",
                },
            )
            assert copy["duplicate"] is True
            for user in [sender, *remote]:
                assert added(await log_of(nodes.store, user)) == [first["message_id"]]

    run(scenario)


def test_a_relayed_copy_without_a_key_is_idempotent_by_message_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, on_b):
            sender = nodes.users_of("a", 1)[0]
            recipient = nodes.users_of("b", 1)[0]
            reply = await on_a.send(sender, [recipient], "no key")
            assert reply["message_id"]
            copy = {
                "user": recipient,
                "message_id": reply["message_id"],
                "thread_id": reply["thread_id"],
                "sender": sender,
                "participants": [sender, recipient],
                "channel": "chat",
                "text": "no key",
            }
            again = await on_b.request(Op.DELIVER_COPY, copy)
            assert again == {
                "message_id": reply["message_id"],
                "thread_id": reply["thread_id"],
                "folder": "other",
                "duplicate": True,
                "dropped": False,
            }
            assert added(await log_of(nodes.store, recipient)) == [reply["message_id"]]

    run(scenario)


def test_folder_routing_and_blocking_happen_on_the_recipients_side(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, on_b):
            sender = nodes.users_of("a", 1)[0]
            friend, stranger, blocker = nodes.users_of("b", 3)
            await on_b.friend_add(friend, sender)
            await on_b.block(blocker, sender)
            reply = await on_a.send(sender, [friend, stranger, blocker], "hello", key="f-1")
            tid = reply["thread_id"]
            assert [t["thread_id"] for t in (await on_b.list_threads(friend))["threads"]] == [tid]
            other = (await on_b.list_threads(stranger, folder="other"))["threads"]
            assert [t["thread_id"] for t in other] == [tid]
            assert added(await log_of(nodes.store, blocker)) == []
            assert added(await log_of(nodes.store, sender)) == [reply["message_id"]]

    run(scenario)


def test_a_copy_for_a_user_the_node_does_not_own_is_refused_with_the_owner(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, _on_b):
            sender = nodes.users_of("a", 1)[0]
            recipient = nodes.users_of("b", 1)[0]
            with pytest.raises(NotOwner) as refused:
                await on_a.request(
                    Op.DELIVER_COPY,
                    {
                        "user": recipient,
                        "message_id": "m1",
                        "sender": sender,
                        "thread_id": thread_id_for([sender, recipient]),
                        "participants": [sender, recipient],
                        "channel": "chat",
                        "text": "t",
                    },
                )
            assert refused.value.owner == nodes.nodes["b"].addr

    run(scenario)


def test_deliver_copy_checks_its_payload_and_is_for_services_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, _on_a, on_b):
            sender = nodes.users_of("a", 1)[0]
            recipient = nodes.users_of("b", 1)[0]
            good = {
                "user": recipient,
                "message_id": "m-x",
                "sender": sender,
                "thread_id": thread_id_for([sender, recipient]),
                "participants": [sender, recipient],
                "channel": "chat",
                "text": "t",
            }
            for bad, field in [
                ({"thread_id": "t-wrong"}, "thread_id"),
                ({"thread_id": None}, "thread_id"),
                ({"participants": [sender]}, "participants"),
                ({"message_id": ""}, "message_id"),
                ({"channel": "pigeon"}, "channel"),
                ({"sender": 0}, "sender"),
            ]:
                with pytest.raises(BadRequest, match=field):
                    await on_b.request(Op.DELIVER_COPY, good | bad)
            assert added(await log_of(nodes.store, recipient)) == []
            assert (await on_b.request(Op.DELIVER_COPY, good))["duplicate"] is False
            host, port = nodes.nodes["b"].addr.split(":")
            token = make_user_token(recipient, 2_000_000_000, KEY)
            async with await Client.connect(host, int(port), user_token=token) as as_user:
                with pytest.raises(Forbidden):
                    await as_user.request(Op.DELIVER_COPY, good)

    run(scenario)


def test_a_send_whose_remote_owner_cannot_serve_fails_retriably_then_succeeds(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, _on_b):
            sender = nodes.users_of("a", 1)[0]
            recipient = nodes.users_of("b", 1)[0]
            nodes.fenced.add("b")
            with pytest.raises(Unavailable):
                await on_a.send(sender, [recipient], "fenced", key="u-1")
            # The sender's copy may be written already (copies go at once); the
            # recipient's is not.
            assert added(await log_of(nodes.store, recipient)) == []
            nodes.fenced.clear()
            reply = await on_a.send(sender, [recipient], "fenced", key="u-1")
            # The retry completes the missing copy and duplicates none.
            assert added(await log_of(nodes.store, recipient)) == [reply["message_id"]]
            assert added(await log_of(nodes.store, sender)) == [reply["message_id"]]

    run(scenario)


# ---- the router ----


def test_the_router_follows_not_owner_and_gives_up_on_other_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, _on_a, _on_b):
            user = nodes.users_of("b", 1)[0]
            wrong = nodes.nodes["a"].addr
            router = OwnerRouter(lambda _user: wrong, KEY, timeout_s=2.0)
            try:
                reply = await router.request(user, Op.COUNTS, {"user": user})
                assert "folders" in reply
                assert router.counters["redirects"] == 1
                with pytest.raises(BadRequest):
                    await router.request(user, Op.COUNTS, {"user": "nobody"})
                assert router.counters["failures"] == 1
            finally:
                await router.close()

    run(scenario)


def test_the_router_retries_unavailable_until_its_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, _on_a, _on_b):
            user = nodes.users_of("b", 1)[0]
            router = OwnerRouter(lambda u: nodes.nodes[nodes.owner(u)].addr, KEY, timeout_s=0.6)
            nodes.fenced.add("b")
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                with pytest.raises(Unavailable):
                    await router.request(user, Op.COUNTS, {"user": user})
                assert 0.3 <= loop.time() - started <= 1.5
                assert router.counters["retries"] >= 2
                # back in service during the retries: the request succeeds
                loop.call_later(0.2, nodes.fenced.clear)
                router.timeout_s = 3.0
                assert "folders" in await router.request(user, Op.COUNTS, {"user": user})
            finally:
                await router.close()

    run(scenario)


def test_the_pool_reconnects_after_a_server_goes_away(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, _on_a, _on_b):
            pool = ServiceLinks(KEY, connect_timeout_s=0.5, retry_connect_after_s=0)
            try:
                addr = nodes.nodes["a"].addr
                first = await pool.get(addr)
                assert await pool.get(addr) is first
                with pytest.raises(Unavailable):
                    await pool.get("127.0.0.1:1")
                await first.close()
                second = await pool.get(addr)
                assert second is not first and second.connected
                with pytest.raises(PyserverError):
                    await pool.get("not-an-address")
            finally:
                await pool.close()

    run(scenario)


# ---- the cache follows ownership ----


def test_release_drops_images_of_users_that_moved_and_keep_refuses_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cell(tmp_path) as (nodes, on_a, _on_b):
            mailbox = nodes.nodes["a"].mailbox
            mine = nodes.users_of("a", 4)
            for user in mine:
                await on_a.mark_seen(user, "inbox")  # loads (and caches) each
            assert mailbox.stats()["users"] == 4
            moved = set(mine[:2])
            assert mailbox.release(lambda user: user not in moved) == 2
            assert mailbox.stats()["users"] == 2
            nodes.fenced.add("a")  # fenced: nothing is kept
            assert mailbox.release() == 2
            nodes.fenced.clear()
            await on_a.counts(mine[0])
            assert mailbox.stats()["users"] == 1

    run(scenario)
