"""The memcache dirty service and the web tier's count read, against real memcached.

The `memcached_servers` fixture's two instances stand for two data centres. The
down-and-back tests start private memcached processes on free ports and stop them
(SIGSTOP: a data centre that hangs, keeping its data; kill: one that is gone), so
the shared instances are never disturbed. `DirtyQueue` is plain data: unit and
property tests, no memcached.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver.addresses import DataCentre, parse_data_centres
from pyserver.app.auth import make_user_token
from pyserver.app.mailbox import Mailbox
from pyserver.client import Client
from pyserver.dirty import count_key, memcached_client
from pyserver.dirty.queue import DirtyQueue
from pyserver.dirty.reporter import DirtyReporter, RemoteDirtyService
from pyserver.dirty.service import DirtyService
from pyserver.errors import BadRequest
from pyserver.web.counts import CountReader
from pyserver.wire.ops import Op
from tests import support
from tests.conftest import REQUIRE_ENGINES
from tests.processes import listening, start
from tests.support.cells import InProcessCell

KEY = "test-service-key-dirty-0123456789abc"


run = partial(support.run, timeout=40.0, new_loop=asyncio.new_event_loop)


def fresh_user() -> int:
    """A user id no earlier run has used (the shared memcached outlives test runs)."""
    return random.randrange(1 << 40, 1 << 60)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if asyncio.iscoroutine(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def unread(counts: dict[str, Any], folder: str) -> int:
    return counts["folders"][folder]["unread"]


# ---- DirtyQueue: coalescing, watermark, bound ----


def test_queue_coalesces_and_advances_its_watermark() -> None:
    async def scenario() -> None:
        queue = DirtyQueue()
        first = queue.add([1, 2])
        second = queue.add([2, 3])
        assert len(queue) == 3 and queue.done_through == 0
        waiter = queue.wait(second)
        batch = queue.take(10)
        assert batch is not None and batch.users == (1, 2, 3) and not batch.flush
        third = queue.add([1])  # reported again while out: must be handled again
        queue.done(batch)
        assert queue.done_through == second and waiter.result() is True
        assert queue.wait(first).result() is True
        assert len(queue) == 1 and not queue.wait(third).done()
        batch = queue.take(10)
        assert batch is not None and batch.users == (1,)
        queue.done(batch)
        assert queue.done_through == third and not queue.busy

    run(scenario)


def test_queue_failed_batch_goes_back_first_and_release_gives_up_waiters() -> None:
    async def scenario() -> None:
        queue = DirtyQueue()
        first = queue.add([1, 2, 3])
        batch = queue.take(2)
        assert batch is not None and batch.users == (1, 2)
        queue.add([4, 1])
        queue.failed(batch)
        assert queue.done_through == 0
        waiter = queue.wait(first)
        queue.release()
        assert waiter.result() is False
        batch = queue.take(10)
        assert batch is not None and batch.users == (1, 2, 3, 4)
        queue.done(batch)
        assert queue.done_through == queue.last_ticket

    run(scenario)


def test_queue_over_its_bound_asks_for_one_flush() -> None:
    queue = DirtyQueue(max_users=3)
    queue.add([1, 2])
    ticket = queue.add([3, 4, 5])
    assert queue.overflows == 1 and len(queue) == 0
    batch = queue.take(10)
    assert batch is not None and batch.flush and batch.users == ()
    queue.add([6])
    queue.done(batch)
    assert queue.done_through == ticket  # 6 came after the flush was taken
    batch = queue.take(10)
    assert batch is not None and batch.users == (6,)
    queue.done(batch)
    assert not queue.busy


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.lists(st.integers(1, 8), max_size=4)),
            st.tuples(st.just("take"), st.integers(1, 4)),
            st.tuples(st.just("done"), st.none()),
            st.tuples(st.just("fail"), st.none()),
        ),
        max_size=40,
    ),
    st.integers(2, 10),
)
def test_queue_never_claims_a_report_before_its_users_are_handled(
    ops: list[tuple[str, Any]], bound: int
) -> None:
    queue = DirtyQueue(max_users=bound)
    reports: dict[int, set[int]] = {}  # ticket -> users still to be handled after it
    out = None
    out_taken_at = 0

    def handled(batch: Any, taken_at: int) -> None:
        for ticket, users in reports.items():
            if ticket <= taken_at:
                users.difference_update(batch.users) if not batch.flush else users.clear()

    for op, arg in ops:
        if op == "add":
            reports[queue.add(arg)] = set(arg)
        elif op == "take" and out is None:
            out, out_taken_at = queue.take(arg), queue.last_ticket
        elif op == "done" and out is not None:
            queue.done(out)
            handled(out, out_taken_at)
            out = None
        elif op == "fail" and out is not None:
            queue.failed(out)
            out = None
        for ticket, users in reports.items():
            if ticket <= queue.done_through:
                assert not users, (ticket, users, queue.done_through)
    # Draining everything settles every report.
    if out is not None:
        queue.done(out)
        handled(out, out_taken_at)
    for _ in range(100):
        batch, taken_at = queue.take(3), queue.last_ticket
        if batch is None:
            break
        queue.done(batch)
        handled(batch, taken_at)
    assert queue.done_through == queue.last_ticket
    assert all(not users for users in reports.values())


def test_data_centre_specs() -> None:
    centres = parse_data_centres("east=127.0.0.1:11211, west=10.0.0.2:1+10.0.0.3:2")
    assert centres == [
        DataCentre("east", (("127.0.0.1", 11211),)),
        DataCentre("west", (("10.0.0.2", 1), ("10.0.0.3", 2))),
    ]
    assert str(centres[1]) == "west=10.0.0.2:1+10.0.0.3:2"
    assert parse_data_centres("") == []
    for bad in ("east", "east=", "east=host", "east=h:0", "=h:1", "a=h:1,a=h:2"):
        with pytest.raises(ValueError):
            parse_data_centres(bad)


# ---- one cell's pieces in one process, on real memcached ----


@asynccontextmanager
async def cell_pieces(
    folder: Path, centres: list[DataCentre], **service_options: Any
) -> AsyncIterator[tuple[Mailbox, DirtyService, DirtyReporter, dict[str, CountReader]]]:
    """A mailbox reporting to an in-process dirty service, and a count reader per centre."""
    service = DirtyService(centres, **service_options)
    await service.start()
    reporter = DirtyReporter(service.invalidate)
    reporter.start()
    cell = InProcessCell(folder, mailbox_options={"counts_changed": reporter.report})

    async def counts(user: int) -> dict[str, Any]:
        return await cell.mailbox.execute(Op.COUNTS, {"user": user})

    try:
        async with cell:
            readers = {c.name: CountReader(await memcached_client(c), counts) for c in centres}
            try:
                yield cell.mailbox, service, reporter, readers
            finally:
                for reader in readers.values():
                    await reader.cache.close()
    finally:
        await reporter.close()
        await service.close()


def centres_of(servers: list[tuple[str, int]]) -> list[DataCentre]:
    return [DataCentre(f"dc{i}", (server,)) for i, server in enumerate(servers)]


async def deliver(mailbox: Mailbox, user: int, sender: int, text: str = "hi") -> dict[str, Any]:
    payload = {"user": user, "sender": sender, "text": text, "channel": "chat"}
    return await mailbox.execute(Op.DELIVER, payload)


def test_no_stale_count_once_acknowledged(
    memcached_servers: list[tuple[str, int]], tmp_path: Path
) -> None:
    centres = centres_of(memcached_servers)

    async def scenario() -> None:
        async with cell_pieces(tmp_path, centres) as (mailbox, service, reporter, readers):
            user = fresh_user()
            for n in range(1, 6):
                # every centre caches the current counts...
                for reader in readers.values():
                    assert unread(await reader.read(user), "other") == n - 1
                    assert unread(await reader.read(user), "other") == n - 1  # a hit now
                # ...then a new message (a new thread, so "other" counts one more)
                await deliver(mailbox, user, sender=user + n)
                assert await reporter.synced(5)
                for name, reader in readers.items():
                    assert unread(await reader.read(user), "other") == n, name
            reply = await deliver(mailbox, user, sender=user + 1, text="same thread")
            thread_id = reply["thread_id"]
            await mailbox.execute(Op.MARK_READ, {"user": user, "thread_id": thread_id})
            assert await reporter.synced(5)
            for reader in readers.values():
                assert unread(await reader.read(user), "other") == 4
                assert reader.stats()["hits"] >= 5 and reader.stats()["fills"] >= 6
            assert reporter.stats()["behind"] == {}
            for centre in service.stats()["centres"].values():
                assert centre["up"] and centre["pending"] == 0 and centre["deleted"] >= 6

    run(scenario)


def test_a_fill_racing_a_write_never_stores_the_older_count(
    memcached_servers: list[tuple[str, int]], tmp_path: Path
) -> None:
    centres = centres_of(memcached_servers[:1])

    async def scenario() -> None:
        async with cell_pieces(tmp_path, centres) as (mailbox, _, reporter, readers):
            user = fresh_user()
            read_done = asyncio.Event()
            release = asyncio.Event()

            async def slow_counts(user_id: int) -> dict[str, Any]:
                counts = await mailbox.execute(Op.COUNTS, {"user": user_id})
                read_done.set()
                await release.wait()  # the write and its dirty report happen now
                return counts

            cache = readers["dc0"].cache
            racing = CountReader(cache, slow_counts)
            task = asyncio.create_task(racing.read(user))
            await read_done.wait()
            await deliver(mailbox, user, sender=user + 1)
            assert await reporter.synced(5)
            release.set()
            stale = await task
            assert unread(stale, "other") == 0  # it answered what it read...
            assert racing.stats()["lost_leases"] == 1  # ...but did not cache it
            assert await cache.get(count_key(user)) is None
            assert unread(await readers["dc0"].read(user), "other") == 1

    run(scenario)


def test_dirty_operation_over_the_wire(
    memcached_servers: list[tuple[str, int]], tmp_path: Path
) -> None:
    from pyserver.app.dispatcher import Dispatcher
    from pyserver.app.server import AppServer

    centres = centres_of(memcached_servers)

    async def scenario() -> None:
        service = DirtyService(centres)
        await service.start()
        server = AppServer(Dispatcher(service, KEY, "dirty-test", stats_section="dirty"))
        _, port = await server.start("127.0.0.1", 0)
        caches = [await memcached_client(centre) for centre in centres]
        remote = RemoteDirtyService("127.0.0.1", port, KEY)
        try:
            users = [fresh_user() for _ in range(300)]
            for cache in caches:
                for user in users:
                    await cache.set(count_key(user), b"{}")
            reply = await remote(users)
            assert reply == {"users": 300, "done": ["dc0", "dc1"], "behind": []}
            for cache in caches:
                assert await cache.get_many([count_key(user) for user in users]) == {}
            client = await Client.connect("127.0.0.1", port, service_key=KEY)
            try:
                for bad in ({"users": [0]}, {"users": "1"}, {}, {"users": [1], "flush": 1}):
                    with pytest.raises(BadRequest):
                        await client.request(Op.DIRTY, bad)
                stats = (await client.stats())["dirty"]
                assert stats["users"] == 300 and stats["centres"]["dc1"]["deleted"] == 300
            finally:
                await client.close()
        finally:
            await remote.close()
            for cache in caches:
                await cache.close()
            await server.stop(1.0)
            await service.close()

    run(scenario)


# ---- a data centre down and back: private memcached processes ----


@contextmanager
def private_memcached(count: int) -> Iterator[list[subprocess.Popen]]:
    binary = shutil.which("memcached")
    if binary is None:
        message = "memcached is not installed (scripts/engines up memcached installs it)"
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(start_memcached(binary, support.free_port()))
        yield procs
    finally:
        for proc in procs:
            stop_memcached(proc)


def start_memcached(binary: str, port: int) -> subprocess.Popen:
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16", *user],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"memcached did not start on port {port}") from None
            time.sleep(0.02)


def stop_memcached(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(5)


def test_a_data_centre_that_hangs_catches_up_when_it_returns(tmp_path: Path) -> None:
    with private_memcached(2) as (east, west):
        centres = [
            DataCentre("east", (("127.0.0.1", east.port),)),  # type: ignore[attr-defined]
            DataCentre("west", (("127.0.0.1", west.port),)),  # type: ignore[attr-defined]
        ]

        async def scenario() -> None:
            async with cell_pieces(tmp_path, centres, op_timeout_s=0.3) as pieces:
                mailbox, service, reporter, readers = pieces
                user = fresh_user()
                for reader in readers.values():
                    assert unread(await reader.read(user), "other") == 0
                os.kill(west.pid, signal.SIGSTOP)  # west hangs, keeping its (soon stale) data
                await deliver(mailbox, user, sender=user + 1)
                started = time.monotonic()
                assert await reporter.synced(5)
                # acknowledged without waiting for west: east is done, west is behind
                assert time.monotonic() - started < 2.0
                assert reporter.stats()["behind"] == {"west": 1}
                west_stats = service.stats()["centres"]["west"]
                assert not west_stats["up"] and west_stats["pending"] == 1
                assert unread(await readers["east"].read(user), "other") == 1
                # more writes while west is down pile up for it, coalesced
                await deliver(mailbox, user, sender=user + 2)
                assert await reporter.synced(5)
                deleted_before = service.stats()["centres"]["west"]["deleted"]
                os.kill(west.pid, signal.SIGCONT)

                def west_caught_up() -> bool:
                    west_now = service.stats()["centres"]["west"]
                    return west_now["up"] and west_now["pending"] == 0

                await wait_until(west_caught_up, 10, "west to catch up")
                assert service.stats()["centres"]["west"]["deleted"] > deleted_before
                assert await readers["west"].cache.get(count_key(user)) is None
                assert unread(await readers["west"].read(user), "other") == 2

        run(scenario)


def test_a_data_centre_restarted_comes_back_and_a_flush_clears_everything(
    tmp_path: Path,
) -> None:
    with private_memcached(2) as procs:
        east, west = procs
        west_port = west.port  # type: ignore[attr-defined]
        centres = [
            DataCentre("east", (("127.0.0.1", east.port),)),  # type: ignore[attr-defined]
            DataCentre("west", (("127.0.0.1", west_port),)),
        ]

        async def scenario() -> None:
            async with cell_pieces(tmp_path, centres, op_timeout_s=0.3) as pieces:
                mailbox, service, reporter, readers = pieces
                user = fresh_user()
                stop_memcached(procs[1])
                await deliver(mailbox, user, sender=user + 1)
                assert await reporter.synced(5)
                assert service.stats()["centres"]["west"]["up"] is False
                # the web tier of west cannot use its cache: it reads COUNTS, fast
                started = time.monotonic()
                assert unread(await readers["west"].read(user), "other") == 1
                assert unread(await readers["west"].read(user), "other") == 1
                assert time.monotonic() - started < 1.0
                procs[1] = start_memcached(shutil.which("memcached") or "", west_port)
                await wait_until(
                    lambda: service.stats()["centres"]["west"]["up"], 10, "west to come back"
                )
                assert service.stats()["centres"]["west"]["pending"] == 0
                # a flush (what an overflowing queue asks for) empties every centre
                for reader in readers.values():
                    await reader.cache.set(b"pyserver:counts:1", b"{}")
                assert await service.invalidate([], flush=True) == {
                    "users": 0, "done": ["east", "west"], "behind": [],
                }  # fmt: skip
                for reader in readers.values():
                    assert await reader.cache.get(b"pyserver:counts:1") is None
                    assert reader.stats()["cache_errors"] <= 1

        run(scenario)


# ---- separate processes: `pyserver dirty` and `pyserver run` ----


def test_separate_processes_keep_every_data_centre_fresh(
    memcached_servers: list[tuple[str, int]], tmp_path: Path
) -> None:
    import aiohttp

    centres = centres_of(memcached_servers)
    spec = ",".join(str(centre) for centre in centres)
    dirty_port = support.free_port()
    env = {"PYSERVER_SERVICE_KEY": KEY, "PYSERVER_LOG_LEVEL": "WARNING"}
    dc_args = [arg for centre in centres for arg in ("--dc", str(centre))]
    dirty = start(
        ["dirty", "--data", str(tmp_path / "dirty"), "--port", str(dirty_port), *dc_args],
        env,
        listening(dirty_port),
    )
    endpoints = tmp_path / "app" / "endpoints.json"
    app_env = {
        **env,
        "PYSERVER_MEMCACHED_DCS": spec,
        "PYSERVER_DIRTY_ADDR": f"127.0.0.1:{dirty_port}",
    }
    app = start(
        [
            "run",
            "--data",
            str(tmp_path / "app"),
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
    try:
        addresses = json.loads(endpoints.read_text())

        async def scenario() -> None:
            client = await Client.connect("127.0.0.1", addresses["server"]["port"], service_key=KEY)
            # the web tier of dc1: its own memcached, COUNTS from the app server
            west = CountReader(await memcached_client(centres[1]), client.counts)
            http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"})
            url = f"http://127.0.0.1:{addresses['http']['port']}/counts/"
            try:
                sender, user = fresh_user(), fresh_user()

                async def web_counts(user_id: int) -> dict[str, Any]:
                    async with http.get(url + str(user_id)) as response:
                        assert response.status == 200
                        return await response.json()

                for n in range(1, 4):
                    assert unread(await web_counts(user), "other") == n - 1  # fills dc0
                    assert unread(await west.read(user), "other") == n - 1  # fills dc1
                    await client.send(sender + n, [user], f"message {n}")
                    # the app server reports in the background; once both keys are gone
                    # (the dirty service acknowledged), every read is current
                    caches = [west.cache, await memcached_client(centres[0])]
                    for cache in caches:

                        async def gone(cache: Any = cache) -> bool:
                            return await cache.get(count_key(user)) is None

                        await wait_until(gone, 5, "the count key to be deleted")
                    await caches[1].close()
                    assert unread(await web_counts(user), "other") == n
                    assert unread(await west.read(user), "other") == n
                async with http.get(url + "x") as response:
                    assert response.status == 400
                # without the service key (none, a wrong one, a user's token): nobody's counts
                token = make_user_token(user, 2**40, KEY)
                for given in ("", "Bearer wrong", f"Bearer {token}"):
                    headers = {"Authorization": given} if given else {}
                    async with aiohttp.ClientSession(headers=headers) as anonymous:
                        response = await anonymous.get(url + str(user))
                        assert response.status == 401
                        assert "unread" not in await response.text()
                dirty_client = await Client.connect("127.0.0.1", dirty_port, service_key=KEY)
                stats = (await dirty_client.stats())["dirty"]
                await dirty_client.close()
                assert stats["users"] >= 3
                assert all(c["up"] and c["deleted"] >= 3 for c in stats["centres"].values())
            finally:
                await http.close()
                await west.cache.close()
                await client.close()

        run(scenario)
    finally:
        for proc in (app, dirty):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_config_of_the_services() -> None:
    from pyserver.config import ConfigError, load_config

    config = load_config(
        env={
            "PYSERVER_MEMCACHED_DCS": "east=127.0.0.1:11211,west=127.0.0.1:11212",
            "PYSERVER_DIRTY_ADDR": "127.0.0.1:7420",
            "PYSERVER_LOCAL_DC": "west",
        }
    )
    assert [c.name for c in parse_data_centres(config.memcached_dcs)] == ["east", "west"]
    assert (config.dirty_addr, config.local_dc, config.userindex_addr) == (
        "127.0.0.1:7420", "west", "",
    )  # fmt: skip
    for bad in (
        {"PYSERVER_MEMCACHED_DCS": "east"},
        {"PYSERVER_MEMCACHED_DCS": "east=h:1", "PYSERVER_LOCAL_DC": "west"},
        {"PYSERVER_USERINDEX_ADDR": "nohost"},
        {"PYSERVER_DIRTY_ADDR": "h:99999"},
    ):
        with pytest.raises(ConfigError):
            load_config(env=bad)
