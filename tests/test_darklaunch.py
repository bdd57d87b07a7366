"""Dark launch: a live cell's node mirrors users' requests to a shadow cell on its own store.

Real `pyserver node` processes on ZooKeeper (tests/cluster_harness.py): cell
`c1` (node n1) and cell `shadow` (node s1, a SQLite store of its own). With the
dark launch off, nothing reaches the shadow. `pyserver darklaunch --shadow
shadow --fraction 1` turns it on without a restart: SENDs land in the shadow's
store too and COUNTS replies match; a message written only to the shadow makes
the next COUNTS of that user a mismatch (counted in /metrics and /health, and
logged). With the shadow killed, live requests still succeed at once and the
shadow's failures are counted. `--off` stops the mirroring. The sampling of
users, the setting's parsing and the bounded queue's dropping are checked as
pure logic too.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyserver import endpoints
from pyserver.app.image import thread_id_for
from pyserver.cluster.darklaunch import DarkLaunch, Setting, comparable, parse_setting
from pyserver.wire.ops import Op
from tests import support
from tests.cluster_harness import Cluster, NodeProcess
from tests.support import run_cli as pyserver


@pytest.fixture
def cluster(tmp_path: Path, zookeeper: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, zookeeper)
    try:
        yield cluster
    finally:
        cluster.close()


def _health(node: NodeProcess) -> dict[str, Any]:
    http = endpoints.read_file(node.ready_file)["http"]
    try:
        with urllib.request.urlopen(f"http://{http['host']}:{http['port']}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def _metric(node: NodeProcess, outcome: str) -> float:
    http = endpoints.read_file(node.ready_file)["http"]
    with urllib.request.urlopen(f"http://{http['host']}:{http['port']}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'pyserver_darklaunch_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


async def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


def _send(sender: int, to: int, text: str) -> dict[str, Any]:
    return {"sender": sender, "recipients": [to], "text": text, "channel": "chat",
            "key": f"{sender}-{text}"}  # fmt: skip


def test_a_dark_launch_mirrors_compares_and_never_fails_the_live_request(
    cluster: Cluster, tmp_path: Path
) -> None:
    (n1,) = cluster.start("n1", cell="c1")
    s1 = cluster.spawn("s1", "shadow", "--store", f"sqlite:{tmp_path / 'shadow.sqlite3'}")
    s1.wait_serving()
    zk = ["--zookeeper", cluster.zookeeper, "--chroot", cluster.chroot]

    async def scenario() -> None:
        async with await cluster.client("c1") as live, await cluster.client("shadow") as shadow:
            await live.request(1, Op.SEND, _send(1, 2, "before"))
            assert (await shadow.request(2, Op.COUNTS, {"user": 2})) != (
                await live.request(2, Op.COUNTS, {"user": 2})
            ), "the shadow got a message while the dark launch was off"

            on = await asyncio.to_thread(pyserver, "darklaunch", "--cell", "c1", "--shadow",
                                         "shadow", "--fraction", "1", *zk)  # fmt: skip
            assert on.returncode == 0, on.stdout + on.stderr
            await _until(lambda: _health(n1)["darklaunch"]["shadow"] == "shadow", 15, "on")
            for i in range(6):
                await live.request(10, Op.SEND, _send(10, 11, f"m{i}"))
            await _until(lambda: _health(n1)["darklaunch"]["mirrored"] >= 6, 15, "mirrored")
            assert await shadow.request(11, Op.COUNTS, {"user": 11}) == await live.request(
                11, Op.COUNTS, {"user": 11}
            )
            await _until(lambda: _health(n1)["darklaunch"]["match"] >= 1, 15, "a match")
            assert _health(n1)["darklaunch"]["mismatch"] == 0

            # marks and moves are mirrored too (the shadow's ids are the live ones), and the
            # thread reads compared: they match, less the times each store stamps itself
            thread = thread_id_for([10, 11])
            mirrored = _health(n1)["darklaunch"]["mirrored"]
            await live.request(11, Op.MARK_READ, {"user": 11, "thread_id": thread})
            await live.request(11, Op.MOVE, {"user": 11, "thread_id": thread, "folder": "archived"})
            await _until(
                lambda: _health(n1)["darklaunch"]["mirrored"] >= mirrored + 2, 15, "marks mirrored"
            )  # the mark and the move
            archived = {"user": 11, "folder": "archived"}
            shadow_archived = await shadow.request(11, Op.LIST_THREADS, archived)
            assert [t["thread_id"] for t in shadow_archived["threads"]] == [thread]
            assert shadow_archived["threads"][0]["unread"] == 0
            matches = _health(n1)["darklaunch"]["match"]
            await live.request(11, Op.LIST_THREADS, archived)
            await live.request(11, Op.GET_THREAD, {"user": 11, "thread_id": thread})
            await _until(lambda: _health(n1)["darklaunch"]["match"] >= matches + 2, 15, "matches")
            assert _health(n1)["darklaunch"]["mismatch"] == 0, n1.tail(50)

            # a message only the shadow holds: the next COUNTS of user 11 differs
            await shadow.request(12, Op.SEND, _send(12, 11, "shadow only"))
            await live.request(10, Op.SEND, _send(10, 11, "one more"))  # mirrored too
            await live.request(11, Op.COUNTS, {"user": 11})
            await _until(lambda: _metric(n1, "mismatch") >= 1, 15, "the mismatch counted")
            assert "dark launch mismatch: COUNTS of user 11" in n1.tail(200)

            # the shadow gone: live requests go on at once, the failures are the mirror's
            s1.kill()
            for i in range(5):
                started = time.monotonic()
                await live.request(10, Op.SEND, _send(10, 11, f"gone{i}"), timeout_s=10)
                await live.request(11, Op.COUNTS, {"user": 11}, timeout_s=10)
                assert time.monotonic() - started < 2.0
            await _until(lambda: _health(n1)["darklaunch"]["error"] >= 1, 30, "errors counted")

            off = await asyncio.to_thread(pyserver, "darklaunch", "--cell", "c1", "--off", *zk)
            assert off.returncode == 0, off.stdout + off.stderr
            await _until(lambda: _health(n1)["darklaunch"]["shadow"] is None, 15, "off")
            await _until(lambda: _health(n1)["darklaunch"]["queued"] == 0, 30, "queue empty")
            before = _health(n1)["darklaunch"]
            await live.request(10, Op.SEND, _send(10, 11, "after"))
            await asyncio.sleep(0.5)
            after = _health(n1)["darklaunch"]
            assert {k: after[k] for k in ("mirrored", "error", "dropped")} == {
                k: before[k] for k in ("mirrored", "error", "dropped")
            }

    support.run(scenario, timeout=180.0)
    bad = pyserver("darklaunch", "--cell", "c1", "--shadow", "nowhere", "--fraction", "0.5",
                   "--zookeeper", cluster.zookeeper, "--chroot", cluster.chroot)  # fmt: skip
    assert bad.returncode == 1 and "no cell 'nowhere'" in bad.stderr


def test_users_are_sampled_by_fraction_and_a_full_queue_drops() -> None:
    setting = Setting("shadow", 0.2)
    chosen = sum(setting.chooses(user) for user in range(1, 20_001)) / 20_000
    assert 0.18 <= chosen <= 0.22
    assert setting.chooses(7) == setting.chooses(7)
    assert parse_setting({"shadow": "s", "fraction": 0.5}) == Setting("s", 0.5)
    for bad in (None, {}, {"shadow": "s"}, {"shadow": "s", "fraction": 0},
                {"shadow": "s", "fraction": 1.5}, {"shadow": "", "fraction": 0.5},
                {"shadow": "s", "fraction": True}, "s:0.5"):  # fmt: skip
        assert parse_setting(bad) is None, bad

    # replies compared less the times each store stamps itself, thread lists by id
    def thread(ts: int, text: str) -> dict[str, Any]:
        return {"messages": [{"message_id": "m1", "ts": ts, "text": text}], "next": f"c{ts}"}

    assert comparable(Op.GET_THREAD, thread(1, "a")) == comparable(Op.GET_THREAD, thread(2, "a"))
    assert comparable(Op.GET_THREAD, thread(1, "a")) != comparable(Op.GET_THREAD, thread(1, "b"))
    one, two = {"thread_id": "t1", "last_ts": 5}, {"thread_id": "t2", "last_ts": 5}
    assert comparable(Op.LIST_THREADS, {"threads": [one, two]}) == comparable(
        Op.LIST_THREADS, {"threads": [two, one]}
    )

    async def scenario() -> None:
        mirror = DarkLaunch(None, "c1", None, queue_size=2)  # type: ignore[arg-type]
        assert not mirror.wants(Op.SEND, {"sender": 1})  # off
        mirror.setting = Setting("shadow", 1.0)
        assert mirror.wants(Op.SEND, {"sender": 1}) and mirror.wants(Op.COUNTS, {"user": 1})
        assert mirror.wants(Op.MARK_READ, {"user": 1}) and mirror.wants(Op.GET_THREAD, {"user": 1})
        assert not mirror.wants(Op.SEARCH, {"user": 1})  # neither mirrored nor compared
        for _ in range(5):
            mirror.offer(Op.COUNTS, {"user": 1}, {})
        figures = mirror.figures()
        assert figures["queued"] == 2 and figures["dropped"] == 3

    support.run(scenario, timeout=10.0)
