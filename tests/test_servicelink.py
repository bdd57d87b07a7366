"""`ServiceLink` and `ServiceLinks` against a real service on loopback: connect on first
use, a fast `Unavailable` while the service is down, a new connection once it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyserver.app.dispatcher import Dispatcher
from pyserver.app.server import AppServer, ServerLimits
from pyserver.errors import Unavailable
from pyserver.servicelink import ServiceLink, ServiceLinks
from pyserver.store.sqlite import SQLiteStore
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.service import UserIndexService
from pyserver.wire.ops import Op
from tests import support

KEY = "test-service-key-0123456789abcdef"


def _user_index_server(store: SQLiteStore) -> AppServer:
    service = UserIndexService(LocalUserIndex(store))
    return AppServer(Dispatcher(service, KEY, "userindex-test"), ServerLimits())


def test_a_link_fails_fast_while_down_and_reconnects_once_back(tmp_path: Path) -> None:
    port = support.free_port()

    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "index.sqlite3")
        await store.open()
        link = ServiceLink("127.0.0.1", port, KEY, name="user index", retry_connect_after_s=0.3)
        try:
            with pytest.raises(Unavailable):
                await link.request(Op.FRIENDS, {"user": 1})
            # within the pause: refused at once, without trying to connect
            with pytest.raises(Unavailable, match=r"user index at 127\.0\.0\.1:\d+ is down"):
                await link.request(Op.FRIENDS, {"user": 1})
            server = _user_index_server(store)
            await server.start("127.0.0.1", port)
            await asyncio.sleep(0.35)  # the pause is over
            assert await link.request(Op.FRIENDS, {"user": 1}) == {"friends": []}
            first = await link.client()
            assert await link.client() is first  # one connection, kept
            await server.stop(1.0)
            with pytest.raises(Unavailable):
                await link.request(Op.FRIENDS, {"user": 1})
            server = _user_index_server(store)
            await server.start("127.0.0.1", port)
            await asyncio.sleep(0.35)
            assert await link.request(Op.FRIENDS, {"user": 1}) == {"friends": []}
            assert await link.client() is not first  # the dropped one was replaced
            await server.stop(1.0)
        finally:
            await link.close()
            await store.close()
        with pytest.raises(Unavailable, match="closed"):
            await link.request(Op.FRIENDS, {"user": 1})

    support.run(scenario)


def test_links_keep_one_link_per_address_and_refuse_bad_ones(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "index.sqlite3")
        await store.open()
        server = _user_index_server(store)
        host, port = await server.start("127.0.0.1", 0)
        links = ServiceLinks(KEY, retry_connect_after_s=0)
        try:
            first = await links.get(f"{host}:{port}")
            assert await links.get(f"{host}:{port}") is first
            assert links.addresses() == [f"{host}:{port}"]
            with pytest.raises(Unavailable, match="not a host:port"):
                await links.get("not-an-address")
            await links.discard(f"{host}:{port}")
            assert links.addresses() == [] and not first.connected
        finally:
            await links.close()
            await server.stop(1.0)
            await store.close()

    support.run(scenario)
