"""The user index service: relation answers over the wire, the app server's use of it
(FRIEND_ADD/REMOVE reach the service's social data, DELIVER routes by its answer), and
the app server delivering into its default folder when the service is down or hangs,
in one process and as separate processes (`pyserver userindex`, `pyserver run`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pyserver.app.auth import make_user_token
from pyserver.app.dispatcher import Dispatcher
from pyserver.app.mailbox import Mailbox, MailboxSettings
from pyserver.app.server import AppServer
from pyserver.client import Client
from pyserver.config import load_config
from pyserver.errors import BadRequest, Forbidden, Unavailable
from pyserver.implementation import PURE_FORCED
from pyserver.processes.cell import SingleNodeCell
from pyserver.store.sqlite import SQLiteStore
from pyserver.userindex import UserIndex
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.remote import RemoteUserIndex
from pyserver.userindex.service import UserIndexService
from pyserver.wire.ops import Op
from tests import support
from tests.processes import listening, start

KEY = "test-service-key-userindex-0123456789"


run = partial(support.run, timeout=30.0, new_loop=asyncio.new_event_loop)


@asynccontextmanager
async def index_service(
    folder: Path, port: int = 0, cache_users: int = 1_000
) -> AsyncIterator[tuple[UserIndexService, SQLiteStore, int]]:
    """A user index service on its own store in `folder`: (service, store, port)."""
    store = SQLiteStore(folder / "social.sqlite3")
    await store.open()
    service = UserIndexService(LocalUserIndex(store, cache_users))
    server = AppServer(Dispatcher(service, KEY, "userindex-test", stats_section="userindex"))
    _, bound = await server.start("127.0.0.1", port)
    try:
        yield service, store, bound
    finally:
        await server.stop(1.0)
        await store.close()


@asynccontextmanager
async def app_server(
    folder: Path, index: UserIndex, settings: MailboxSettings | None = None
) -> AsyncIterator[Client]:
    """An app server whose mailbox uses `index`, and a service client of it."""
    store = SQLiteStore(folder / "app.sqlite3")
    await store.open()
    mailbox = Mailbox(store, index, settings)
    server = AppServer(Dispatcher(mailbox, KEY, "app-test"))
    _, port = await server.start("127.0.0.1", 0)
    client = await Client.connect("127.0.0.1", port, service_key=KEY, request_timeout=10)
    try:
        yield client
    finally:
        await client.close()
        await server.stop(1.0)
        await mailbox.close()
        await store.close()


def test_relation_friend_friend_of_friend_stranger(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with index_service(tmp_path) as (_, store, port):
            index = RemoteUserIndex("127.0.0.1", port, KEY)
            try:
                await index.add_friend(1, 2)
                await index.add_friend(2, 3)
                await index.add_friend(2, 3)  # idempotent
                await index.add_friend(4, 5)
                assert await store.friends(2) == {1, 3}
                assert await index.friends(2) == {1, 3}
                assert await index.relation(1, 2) == "friend"
                assert await index.relation(2, 1) == "friend"
                assert await index.relation(1, 3) == "friend_of_friend"
                assert await index.relation(3, 1) == "friend_of_friend"
                assert await index.relation(1, 4) == "stranger"
                assert await index.relation(6, 1) == "stranger"  # nobody's friend
                await index.remove_friend(2, 1)
                await index.remove_friend(2, 1)  # idempotent
                assert await store.friends(1) == set()
                assert await index.relation(1, 2) == "stranger"
                assert await index.relation(1, 3) == "stranger"
                assert await index.relation(3, 2) == "friend"
                with pytest.raises(BadRequest):
                    await index.add_friend(7, 7)
            finally:
                await index.close()

    run(scenario)


def test_hot_users_come_from_the_cache(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with index_service(tmp_path) as (service, store, port):
            for friend in range(10, 20):
                await store.add_friend(1, friend)
            await store.add_friend(2, 15)
            index = RemoteUserIndex("127.0.0.1", port, KEY)
            try:
                assert await index.relation(1, 2) == "friend_of_friend"
                misses = service.stats()["cache"]["misses"]
                assert misses == 2  # user 1 and user 2, each read once
                for _ in range(5):
                    assert await index.relation(1, 2) == "friend_of_friend"
                cache = service.stats()["cache"]
                assert cache["misses"] == misses and cache["hits"] >= 10
                # A change through the service drops both users from the cache.
                await index.add_friend(1, 2)
                assert await index.relation(1, 2) == "friend"
                assert service.stats()["cache"]["misses"] == misses + 1
                assert service.stats()["relations"]["friend_of_friend"] == 6
            finally:
                await index.close()

    run(scenario)


def test_payload_checks_and_service_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with index_service(tmp_path) as (_, _, port):
            client = await Client.connect("127.0.0.1", port, service_key=KEY)
            try:
                for payload in ({"user": 0, "sender": 1}, {"user": 1}, {"user": "1", "sender": 2},
                                {"user": 1, "sender": -1}):  # fmt: skip
                    with pytest.raises(BadRequest):
                        await client.request(Op.RELATION, payload)
                with pytest.raises(BadRequest):
                    await client.request(Op.COUNTS, {"user": 1})  # not an index operation
                with pytest.raises(BadRequest):
                    await client.request(Op.SUBSCRIBE, {"user": 1})
                stats = await client.stats()
                assert stats["userindex"]["requests"] == {"RELATION": 4}
            finally:
                await client.close()
            token = make_user_token(1, int(time.time()) + 60, KEY)
            user = await Client.connect("127.0.0.1", port, user_token=token)
            try:
                with pytest.raises(Forbidden):
                    await user.request(Op.RELATION, {"user": 1, "sender": 2})
            finally:
                await user.close()

    run(scenario)


def test_app_server_friendships_and_routing_go_through_the_service(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with index_service(tmp_path) as (_, index_store, port):
            index = RemoteUserIndex("127.0.0.1", port, KEY)
            async with app_server(tmp_path, index) as app:
                await app.friend_add(1, 2)
                await app.friend_add(2, 3)
                # The service's social data changed, not some other copy.
                assert await index_store.friends(2) == {1, 3}
                friend = await app.deliver(1, sender=2, text="hi", channel="chat")
                fof = await app.deliver(1, sender=3, text="hello", channel="chat")
                stranger = await app.deliver(1, sender=4, text="hey", channel="chat")
                outside = await app.deliver(1, text="spam?", from_="x@example.org")
                assert (friend["folder"], fof["folder"]) == ("inbox", "inbox")
                assert (stranger["folder"], outside["folder"]) == ("other", "other")
                await app.friend_remove(1, 2)
                assert await index_store.friends(1) == set()
                # a new conversation with 2 (with 5 in it) is now a stranger's
                again = await app.deliver(1, sender=2, participants=[1, 2, 5], text="x")
                assert again["folder"] == "other"
            await index.close()

    run(scenario)


def test_delivery_uses_the_default_folder_while_the_service_is_down(tmp_path: Path) -> None:
    port = support.free_port()

    async def scenario() -> None:
        index = RemoteUserIndex("127.0.0.1", port, KEY, retry_connect_after_s=0.1)
        settings = MailboxSettings(default_folder="inbox")
        async with app_server(tmp_path, index, settings) as app:
            started = time.monotonic()
            down = await app.deliver(1, sender=9, text="while down", channel="sms")
            assert time.monotonic() - started < 0.45  # a refused connect fails fast
            # a stranger would go to other: inbox is the default folder's doing
            assert down["folder"] == "inbox" and not down["dropped"]
            thread = await app.get_thread(1, down["thread_id"])
            assert [m["text"] for m in thread["messages"]] == ["while down"]
            with pytest.raises(Unavailable):
                await app.friend_add(1, 9)
            async with index_service(tmp_path, port):
                await asyncio.sleep(0.15)
                deadline = time.monotonic() + 5
                while True:
                    up = await app.deliver(1, sender=10, participants=[1, 10, 11], text="up")
                    if up["folder"] == "other" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert up["folder"] == "other"
            # the service went away again after it was connected: default folder again
            gone = await app.deliver(1, sender=12, text="gone", channel="chat")
            assert gone["folder"] == "inbox"
            stats = await app.stats()
            assert stats["mailbox"]["index_failures"] >= 2
        await index.close()

    run(scenario)


def test_delivery_does_not_wait_for_a_service_that_hangs(tmp_path: Path) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads everything, answers nothing
        writer.close()

    async def scenario() -> None:
        hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = hung.sockets[0].getsockname()[1]
        index = RemoteUserIndex("127.0.0.1", port, KEY)
        # a stranger would go to other: inbox is the default folder's doing
        settings = MailboxSettings(default_folder="inbox", user_index_timeout_s=0.3)
        async with app_server(tmp_path, index, settings) as app:
            started = time.monotonic()
            reply = await app.deliver(1, sender=2, text="slow index", channel="chat")
            took = time.monotonic() - started
            assert reply["folder"] == "inbox" and reply["message_id"]
            assert 0.25 < took < 2.0
            thread = await app.get_thread(1, reply["thread_id"])
            assert thread["messages"][0]["text"] == "slow index"
        await index.close()
        hung.close()

    run(scenario)


def test_pyserver_run_serves_its_own_index_in_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = load_config(
            env={}, overrides={"data_dir": tmp_path, "port": 0, "http_port": 0, "service_key": KEY}
        )
        cell = SingleNodeCell(config)
        addresses = await cell.start()
        try:
            port = addresses["userindex"]["port"]
            app = await Client.connect("127.0.0.1", addresses["server"]["port"], service_key=KEY)
            index = RemoteUserIndex("127.0.0.1", port, KEY)
            try:
                await app.friend_add(1, 2)
                # the app server's friendship is the one the in-process service answers from
                assert await index.relation(2, 1) == "friend"
                await index.add_friend(2, 3)
                reply = await app.deliver(1, sender=3, text="via 2", channel="chat")
                assert reply["folder"] == "inbox"
            finally:
                await index.close()
                await app.close()
        finally:
            await cell.stop()

    run(scenario)


# ---- separate processes ----


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_separate_processes_and_the_service_killed(tmp_path: Path) -> None:
    index_dir, app_dir = tmp_path / "index", tmp_path / "app"
    index_port = support.free_port()
    env = {"PYSERVER_SERVICE_KEY": KEY, "PYSERVER_LOG_LEVEL": "WARNING"}
    index_args = ["userindex", "--data", str(index_dir), "--port", str(index_port)]
    index_proc = start(index_args, env, listening(index_port))
    app_env = {**env, "PYSERVER_USERINDEX_ADDR": f"127.0.0.1:{index_port}"}
    endpoints = app_dir / "endpoints.json"
    app_proc = start(
        [
            "run",
            "--data",
            str(app_dir),
            "--port",
            "0",
            "--http-port",
            "0",
            "--smtp-port",
            "0",
            "--web-port",
            "-1",
        ],
        app_env,
        endpoints.exists,
    )
    procs = [index_proc, app_proc]
    try:
        app_port = json.loads(endpoints.read_text())["server"]["port"]
        assert "userindex" not in json.loads(endpoints.read_text())  # the remote one is used

        async def scenario() -> Any:
            app = await Client.connect("127.0.0.1", app_port, service_key=KEY)
            try:
                await app.friend_add(1, 2)
                friend = await app.deliver(1, sender=2, text="friend", channel="chat")
                stranger = await app.deliver(1, sender=3, text="stranger", channel="chat")
                assert (friend["folder"], stranger["folder"]) == ("inbox", "other")
                os.kill(index_proc.pid, signal.SIGKILL)
                index_proc.wait(10)
                down = await app.deliver(1, sender=4, text="index down", channel="chat")
                assert down["folder"] == "inbox"  # the default folder: 4 is a stranger
                threads = await app.list_threads(1, folder="inbox")
                assert "index down" in [t["snippet"] for t in threads["threads"]]
            finally:
                await app.close()

        run(scenario)

        # The friendship was stored by the service process, in its own data folder.
        async def stored() -> None:
            store = SQLiteStore(index_dir / "store.sqlite3")
            await store.open()
            try:
                assert await store.friends(1) == {2}
            finally:
                await store.close()

        run(stored)
    finally:
        for proc in procs:
            _stop(proc)


@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_userindex_bench_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "userindex", "--json", "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    results = json.loads(out)
    for key in ("relation_service_per_s", "relation_local_hot_per_s", "relation_local_cold_per_s"):
        assert results[key] > 0, key
    kinds = results["setup"]["answers"]
    assert set(kinds) == {"friend", "friend_of_friend", "stranger"}
