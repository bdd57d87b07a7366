"""The user index service on HBase: two `pyserver userindex` processes on one namespace,
no single point of failure.

Both instances serve the same social table (a namespace of this test's own on the real
HBase): a friendship added through one is answered by the other, a change reaches the
other's cached answers within its cache TTL, and an app server (`pyserver run`) given
both addresses keeps filing mail by relation while either instance is killed or hung.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops

from pyserver.client import Client
from pyserver.store.hbase import HBaseStore
from pyserver.wire.ops import Op
from tests import support
from tests.processes import listening, start

KEY = "test-service-key-userindex-hbase-0123456789"
TTL_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables() -> Iterator[None]:
    yield
    drop_made()
    wait_for_drops()


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Instances:
    """The two user index processes (and restarting one on its own port)."""

    def __init__(self, tmp_path: Path, store: str) -> None:
        self.tmp_path = tmp_path
        self.env = {
            "PYSERVER_SERVICE_KEY": KEY,
            "PYSERVER_LOG_LEVEL": "WARNING",
            "PYSERVER_STORE": store,
        }
        self.ports = [support.free_port(), support.free_port()]
        self.procs: list[subprocess.Popen[Any] | None] = [None, None]

    def start(self, n: int) -> None:
        args = ["userindex", "--data", str(self.tmp_path / f"index{n}"),
                "--port", str(self.ports[n]), "--cache-ttl-s", str(TTL_S)]  # fmt: skip
        self.procs[n] = start(args, self.env, listening(self.ports[n]))

    def kill(self, n: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[n]
        assert proc is not None
        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None:
                with_cont = proc.poll() is None
                if with_cont:
                    os.kill(proc.pid, signal.SIGCONT)
                _stop(proc)


@pytest.fixture
def instances(tmp_path: Path, hbase_thrift: tuple[str, int]) -> Iterator[Instances]:
    host, port = hbase_thrift
    namespace = fresh_namespace(host, port, "ui")

    async def create() -> None:
        store = HBaseStore(host, port, namespace=namespace)
        await store.create_tables()

    support.run(create, timeout=120)
    made = Instances(tmp_path, f"hbase:{host}:{port}/{namespace}")
    try:
        made.start(0)
        made.start(1)
        yield made
    finally:
        made.stop_all()


async def _relation(client: Client, user: int, sender: int) -> str:
    return (await client.request(Op.RELATION, {"user": user, "sender": sender}))["relation"]


def test_either_instance_answers_what_the_other_wrote(instances: Instances) -> None:
    async def scenario() -> None:
        a, b = [
            await Client.connect("127.0.0.1", port, service_key=KEY) for port in instances.ports
        ]
        try:
            await a.request(Op.INDEX_FRIEND_ADD, {"user": 1, "friend": 2})
            await a.request(Op.INDEX_FRIEND_ADD, {"user": 2, "friend": 3})
            assert await _relation(b, 1, 2) == "friend"
            assert await _relation(b, 1, 3) == "friend_of_friend"
            assert await _relation(b, 1, 4) == "stranger"
            assert await _relation(a, 1, 4) == "stranger"  # a caches user 1's friends now
            await b.request(Op.INDEX_FRIEND_ADD, {"user": 1, "friend": 4})
            assert await _relation(b, 1, 4) == "friend"
            # a's cached answer follows within its TTL
            deadline = time.monotonic() + TTL_S + 10
            while await _relation(a, 1, 4) != "friend":
                assert time.monotonic() < deadline, "a's cache never saw b's change"
                await asyncio.sleep(0.1)
            await b.request(Op.INDEX_FRIEND_REMOVE, {"user": 2, "friend": 3})
            await asyncio.sleep(TTL_S)
            assert await _relation(a, 1, 3) == "stranger"
            assert (await a.request(Op.FRIENDS, {"user": 1}))["friends"] == [2, 4]
        finally:
            await a.close()
            await b.close()

    support.run(scenario, timeout=60)


def test_an_app_server_keeps_its_relations_with_either_instance_down(
    instances: Instances, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVER_")}
    app, ready = support.start_serving(
        ["run", "--data", str(tmp_path / "app"), "--port", "0", "--http-port", "0",
         "--smtp-port", "0", "--web-port", "-1", "--imap-port", "-1"],
        tmp_path / "app.ready.json",
        env={**env, "PYSERVER_SERVICE_KEY": KEY, "PYSERVER_USERINDEX_ADDR": instances.addresses},
    )  # fmt: skip
    try:

        async def scenario() -> None:
            client = await Client.connect(
                "127.0.0.1", ready["server"]["port"], service_key=KEY, request_timeout=10
            )
            stranger = iter(range(100, 200))

            async def back(n: int) -> None:
                """Instance n restarted and serving: its first answer (opening its HBase
                connections) can outlast the app server's relation bound, which is the
                default folder by design; "it comes back" means it answers."""
                instances.start(n)
                port = instances.ports[n]
                async with await Client.connect("127.0.0.1", port, service_key=KEY) as direct:
                    await direct.request(Op.RELATION, {"user": 10, "sender": 11}, timeout=30)

            async def folder_of(sender: int) -> str:
                reply = await client.deliver(10, sender=sender, text=f"from {sender}")
                return reply["folder"]

            try:
                await client.friend_add(10, 11)
                assert await folder_of(11) == "inbox"
                assert await folder_of(next(stranger)) == "other"
                # One instance killed: the other answers (with none, a stranger's mail
                # would go to the default folder, the inbox).
                instances.kill(0)
                assert await folder_of(next(stranger)) == "other"
                await client.friend_add(10, 12)  # a write, through the survivor
                assert await folder_of(12) == "inbox"
                # It comes back; the other one is killed: still served.
                await back(0)
                instances.kill(1)
                # (instance 0 came back within its link's pause after a failed connect: it
                # is used anyway when no other instance answers)
                assert await folder_of(next(stranger)) == "other"
                assert await folder_of(12) == "inbox"
                # The one serving now hangs (SIGSTOP): the other takes over within the
                # relation's time bound, from the next request on at the latest.
                await back(1)
                instances.kill(0, signal.SIGSTOP)
                folders = [await folder_of(next(stranger)) for _ in range(3)]
                assert folders[1:] == ["other", "other"], folders
                assert await folder_of(11) == "inbox"
            finally:
                await client.close()

        support.run(scenario, timeout=90)
    finally:
        _stop(app)
