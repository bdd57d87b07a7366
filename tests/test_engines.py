"""Smoke checks of the real engines that `scripts/engines up` starts on loopback.

ZooKeeper through aiozk, HBase through aiohappybase and the Thrift1 client it wraps, the two
memcached instances over their text protocol, and the script's own `status --json`. Each test
runs only when its engine answers on its port (CI starts the engines before pytest, so there
they all run); when it does not, the test is skipped with the command that starts it. A
missing client library is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ZOOKEEPER_PORT = int(os.environ.get("PYSERVER_ZOOKEEPER_PORT", "2181"))
THRIFT_PORT = int(os.environ.get("PYSERVER_THRIFT_PORT", "9090"))
MEMCACHED_PORTS = [
    int(p) for p in os.environ.get("PYSERVER_MEMCACHED_PORTS", "11211,11212").split(",") if p
]
CALL_TIMEOUT_MS = 20_000  # aiohappybase's default is no timeout at all
TEST_DEADLINE_S = 90


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def _needs(what: str, engine: str, *ports: int) -> pytest.MarkDecorator:
    down = [p for p in ports if not _answers(p)]
    where = ", ".join(f"{LOOPBACK}:{p}" for p in down)
    return pytest.mark.skipif(
        bool(down), reason=f"{what} not up on {where}: start it with `scripts/engines up {engine}`"
    )


needs_zookeeper = _needs("ZooKeeper", "zookeeper", ZOOKEEPER_PORT)
needs_hbase = _needs("HBase's Thrift gateway", "hbase", THRIFT_PORT)
needs_memcached = _needs("memcached", "memcached", *MEMCACHED_PORTS)


def run(coroutine):
    """Run one test body with a deadline, so a hung engine fails the test instead of CI."""
    return asyncio.run(asyncio.wait_for(coroutine, TEST_DEADLINE_S))


# ---------------------------------------------------------------- HBase (Thrift1)


@needs_hbase
def test_hbase_create_put_get_and_check_and_put_through_a_pool() -> None:
    import aiohappybase
    from Hbase_thrift import Mutation  # the Thrift module aiohappybase loads on import

    table_name = f"pyserver_smoke_{uuid.uuid4().hex[:12]}"

    async def body() -> None:
        pool = aiohappybase.ConnectionPool(
            size=2, host=LOOPBACK, port=THRIFT_PORT, timeout=CALL_TIMEOUT_MS
        )
        async with pool:
            async with pool.connection(timeout=10) as conn:
                await conn.create_table(table_name, {"l": {"max_versions": 1}, "s": {}})
                try:
                    assert table_name.encode() in await conn.tables()
                    table = conn.table(table_name)
                    row = (7).to_bytes(8, "big")
                    await table.put(row, {b"s:seq": b"1", b"l:\x00": b"entry-0"})
                    assert await table.row(row) == {b"s:seq": b"1", b"l:\x00": b"entry-0"}

                    # aiohappybase has no checkAndPut; the Thrift1 client it wraps does.
                    client, name = conn.client, table_name.encode()
                    put_seq_2 = Mutation(column=b"s:seq", value=b"2")
                    assert await client.checkAndPut(name, row, b"s:seq", b"1", put_seq_2, {})
                    put_seq_3 = Mutation(column=b"s:seq", value=b"3")
                    assert not await client.checkAndPut(name, row, b"s:seq", b"1", put_seq_3, {})
                    # No expected value: put only while the column is absent (append entry k once).
                    first = Mutation(column=b"l:\x01", value=b"entry-1")
                    assert await client.checkAndPut(name, row, b"l:\x01", None, first, {})
                    again = Mutation(column=b"l:\x01", value=b"entry-1-again")
                    assert not await client.checkAndPut(name, row, b"l:\x01", None, again, {})

                    assert await table.row(row) == {
                        b"s:seq": b"2",
                        b"l:\x00": b"entry-0",
                        b"l:\x01": b"entry-1",
                    }
                finally:
                    await conn.delete_table(table_name, disable=True)
            async with pool.connection(timeout=10) as conn:
                assert table_name.encode() not in await conn.tables()

    run(body())


@needs_hbase
def test_hbase_pool_serves_concurrent_tasks() -> None:
    import aiohappybase

    table_name = f"pyserver_smoke_{uuid.uuid4().hex[:12]}"

    async def body() -> None:
        pool = aiohappybase.ConnectionPool(
            size=4, host=LOOPBACK, port=THRIFT_PORT, timeout=CALL_TIMEOUT_MS
        )
        async with pool:
            async with pool.connection(timeout=10) as conn:
                await conn.create_table(table_name, {"l": {}})

            async def writer(task: int) -> None:
                for i in range(25):
                    async with pool.connection(timeout=10) as conn:
                        key = b"%02d-%03d" % (task, i)
                        await conn.table(table_name).put(key, {b"l:v": key})

            try:
                await asyncio.gather(*(writer(task) for task in range(8)))
                async with pool.connection(timeout=10) as conn:
                    rows = [row async for row in conn.table(table_name).scan()]
                assert len(rows) == 8 * 25
                assert all(columns == {b"l:v": key} for key, columns in rows)
            finally:
                async with pool.connection(timeout=10) as conn:
                    await conn.delete_table(table_name, disable=True)

    run(body())


# ---------------------------------------------------------------- ZooKeeper


@needs_zookeeper
def test_zookeeper_ephemeral_node_and_children_watch() -> None:
    import aiozk

    base = f"/pyserver-smoke-{uuid.uuid4().hex[:12]}"
    nodes = f"{base}/nodes"
    servers = f"{LOOPBACK}:{ZOOKEEPER_PORT}"

    async def body() -> None:
        watching = aiozk.ZKClient(servers, session_timeout=5)
        member = aiozk.ZKClient(servers, session_timeout=5)
        # start() retries forever by default: bound it.
        await asyncio.wait_for(watching.start(), 10)
        await asyncio.wait_for(member.start(), 10)
        try:
            # Persistent parents made explicitly (ensure_path would make container nodes).
            await watching.create(base)
            await watching.create(nodes)
            seen: asyncio.Queue[list[str]] = asyncio.Queue()
            watcher = watching.recipes.ChildrenWatcher()

            def on_children(children: list[str]) -> None:
                seen.put_nowait(sorted(children))

            watcher.add_callback(nodes, on_children)
            try:
                assert await asyncio.wait_for(seen.get(), 10) == []
                data = b'{"addr": "127.0.0.1:7001", "tokens": 64}'
                await member.create(f"{nodes}/node-1", data=data, ephemeral=True)
                assert await asyncio.wait_for(seen.get(), 10) == ["node-1"]
                payload, stat = await watching.get(f"{nodes}/node-1")
                assert payload == data
                assert stat.ephemeral_owner != 0

                # The member's session ends: its ephemeral node goes, and the watch fires again.
                await member.close()
                assert await asyncio.wait_for(seen.get(), 10) == []
                assert not await watching.exists(f"{nodes}/node-1")
            finally:
                watcher.remove_callback(nodes, on_children)
        finally:
            await watching.deleteall(base)
            await watching.close()

    run(body())


# ---------------------------------------------------------------- memcached


def _memcached(port: int, request: bytes, until: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while not reply.endswith(until):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


@needs_memcached
def test_memcached_instances_are_separate_data_centres() -> None:
    assert len(MEMCACHED_PORTS) >= 2, "scripts/engines starts two memcached instances by default"
    first, second = MEMCACHED_PORTS[:2]
    key = f"pyserver-smoke-{uuid.uuid4().hex[:12]}".encode()
    assert _memcached(first, b"set %s 0 60 2\r\n42\r\n" % key, b"\r\n") == b"STORED\r\n"
    try:
        assert _memcached(first, b"get %s\r\n" % key, b"END\r\n") == (
            b"VALUE %s 0 2\r\n42\r\nEND\r\n" % key
        )
        assert _memcached(second, b"get %s\r\n" % key, b"END\r\n") == b"END\r\n"
    finally:
        assert _memcached(first, b"delete %s\r\n" % key, b"\r\n") == b"DELETED\r\n"


# ---------------------------------------------------------------- the script


def _engines(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "engines"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def private_engines(tmp_path: Path) -> dict[str, str]:
    """Settings for a throw-away engines folder whose ports nothing listens on."""
    return {
        "PYSERVER_ENGINES_DIR": str(tmp_path / "engines"),
        "PYSERVER_ENGINES_CACHE": str(tmp_path / "cache"),
        "PYSERVER_ZOOKEEPER_PORT": str(_free_port()),
        "PYSERVER_HBASE_ZOOKEEPER_PORT": str(_free_port()),
        "PYSERVER_THRIFT_PORT": str(_free_port()),
        "PYSERVER_THRIFT2_PORT": str(_free_port()),
        "PYSERVER_MEMCACHED_PORTS": f"{_free_port()},{_free_port()}",
    }


def test_status_of_engines_never_started_is_down_and_exits_3(private_engines) -> None:
    done = _engines("status", "--json", env=private_engines)
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["all_up"] is False
    assert report["engines_dir"] == private_engines["PYSERVER_ENGINES_DIR"]
    memcached = [f"memcached-{p}" for p in private_engines["PYSERVER_MEMCACHED_PORTS"].split(",")]
    assert list(report["engines"]) == [
        "zookeeper",
        "hbase-master",
        "hbase-thrift",
        "hbase-thrift2",
        *memcached,
    ]
    for entry in report["engines"].values():
        assert entry["state"] == "down"
        assert entry["pid"] is None
    thrift_port = private_engines["PYSERVER_THRIFT_PORT"]
    assert report["engines"]["hbase-thrift"]["address"] == f"{LOOPBACK}:{thrift_port}"
    thrift2_port = private_engines["PYSERVER_THRIFT2_PORT"]
    assert report["engines"]["hbase-thrift2"]["address"] == f"{LOOPBACK}:{thrift2_port}"


def test_up_refuses_a_port_held_by_another_process(private_engines) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {**private_engines, "PYSERVER_MEMCACHED_PORTS": str(port)}
        done = _engines("up", "memcached", env=env)
        assert done.returncode == 1
        assert f"{LOOPBACK}:{port} is taken by a process this script did not start" in done.stderr
        status = json.loads(_engines("status", "--json", "memcached", env=env).stdout)
        assert status["engines"][f"memcached-{port}"]["state"] == "foreign"
    assert not list(Path(private_engines["PYSERVER_ENGINES_DIR"]).glob("**/*.pid"))


def test_unknown_engine_is_an_error(private_engines) -> None:
    done = _engines("up", "cassandra", env=private_engines)
    assert done.returncode == 1
    assert "unknown engine 'cassandra'" in done.stderr


@needs_zookeeper
@needs_hbase
@needs_memcached
def test_status_json_reports_every_engine_up_on_loopback() -> None:
    done = _engines("status", "--json")
    report = json.loads(done.stdout)
    expected = {"zookeeper", "hbase-master", "hbase-thrift", "hbase-thrift2"} | {
        f"memcached-{port}" for port in MEMCACHED_PORTS
    }
    assert set(report["engines"]) == expected
    for name, entry in report["engines"].items():
        assert entry["state"] == "up", (name, entry)
        assert entry["address"].startswith(f"{LOOPBACK}:"), (name, entry)
        assert entry["pid"] > 0, (name, entry)
    assert report["engines"]["zookeeper"]["address"] == f"{LOOPBACK}:{ZOOKEEPER_PORT}"
    assert report["engines"]["hbase-thrift"]["address"] == f"{LOOPBACK}:{THRIFT_PORT}"
    thrift2 = os.environ.get("PYSERVER_THRIFT2_PORT", "9092")
    assert report["engines"]["hbase-thrift2"]["address"] == f"{LOOPBACK}:{thrift2}"
    assert report["engines"]["hbase-thrift2"]["detail"].endswith("table(s)")
    assert report["all_up"] is True
    assert done.returncode == 0
