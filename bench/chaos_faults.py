"""The chaos soak's faults: each one injected, held, healed, on the soak's own processes.

A fault is an async function `(soak, rng)` that returns once the fault is over
(everything it stopped is started again and serving); `FAULTS` names them:

* `kill_node`: kill -9 of an app server, started again 2-6 s later;
* `pause_owner`: SIGSTOP of an app server for longer than its ZooKeeper session
  (until its node is gone from ZooKeeper and another node serves its users),
  with writes sent straight to it while it sleeps: woken, it must refuse every
  one (an acknowledgement is a stale owner's write), then SIGCONT;
* `zookeeper`: the cells' ZooKeeper stopped for 2-8 s and started again;
* `discovery`: kill -9 of one of the two discovery instances, started again
  (same port) 2-6 s later;
* `memcached`: one of the two memcached stopped for 2-6 s;
* `mta_mid_data`: kill -9 of the MTA proxy while a client is in the middle of
  DATA, started again (same port) 1-3 s later;
* `thrift_gateway`: kill -9 of one of the soak's own HBase Thrift gateways
  (Thrift1: the reads; Thrift2: the appends), started again 2-8 s later (a new
  JVM: about 10 s more before it serves);
* `hbase`: the soak's own HBase master (standalone: the master, its region
  server and its embedded ZooKeeper are one JVM) and its Thrift gateway
  stopped (`scripts/engines down hbase`: the gateway's JVM ended, the
  cluster shut down, which flushes every region, then the master's JVM
  ended), started again 2-8 s later; the fault ends when the gateway answers
  again (meta online). Not kill -9: HBase on a local filesystem (no
  hflush/hsync) loses the WAL's last acknowledged edits when its JVM is
  killed (docs/reliability.md). The shared HBase is never touched.

`Schedule(rng).next()` draws the next episode: one fault, or two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from pyserver.client import Client
from pyserver.cluster import layout
from pyserver.errors import PyserverError
from pyserver.wire.ops import Op

if TYPE_CHECKING:
    from bench.chaos import Soak
    from bench.chaos_cluster import Proc

__all__ = ["FAULTS", "HBASE_FAULTS", "Schedule"]

log = logging.getLogger(__name__)

Fault = Callable[["Soak", random.Random], Awaitable[None]]


async def _kill_and_restart(proc: Proc, down_s: float) -> None:
    """kill -9 of one of the soak's processes, `down_s` of nothing, then started again
    (same arguments, same port for those that have one) and waited until it serves."""
    proc.kill()
    await asyncio.sleep(down_s)
    proc.start()
    await asyncio.to_thread(proc.wait_ready)


async def kill_node(soak: Soak, rng: random.Random) -> None:
    await _kill_and_restart(rng.choice(soak.cluster.nodes), rng.uniform(2.0, 6.0))


async def pause_owner(soak: Soak, rng: random.Random) -> None:
    node = rng.choice(soak.cluster.nodes)
    assert node.cell is not None
    users = await soak.users_of(node.name)
    if not users:
        return
    user = rng.choice(users)
    host, _, port = node.addr.rpartition(":")
    direct = await Client.connect(host, int(port), service_key=soak.cluster.key)
    try:
        node.pause()
        paused = time.monotonic()
        path = layout.node_path(node.cell, node.name)
        # asleep until ZooKeeper has expired its session and another node serves its users
        while await _exists(soak, path) and time.monotonic() - paused < 60:
            await asyncio.sleep(0.2)
        await asyncio.sleep(
            max(0.0, soak.cluster.session_timeout_s + 1.0 - (time.monotonic() - paused))
        )
        with contextlib.suppress(PyserverError):
            await soak.client.request(Op.COUNTS, {"user": user}, timeout=20.0)
        tries = []
        for i in range(3):
            recipient = user % soak.users + 1
            key = f"stale-{soak.seed}-{node.name}-{node.starts}-{paused:.0f}-{i}"
            payload = {"sender": user, "recipients": [recipient], "text": f"stale {key}",
                       "channel": "chat", "key": key}  # fmt: skip
            tries.append((key, recipient, asyncio.ensure_future(
                direct.request(Op.SEND, payload, timeout=20.0))))  # fmt: skip
        await asyncio.sleep(0.2)  # the requests are in the sleeper's socket
        node.resume()
        for key, recipient, reply in tries:
            soak.history.stale_owner_tries += 1
            try:
                await reply
            except (PyserverError, OSError, TimeoutError):
                continue
            soak.history.stale_owner_acks += 1
            soak.history.writes.append(_acked(user, key, recipient))
            log.error("stale owner %s acknowledged %s of user %d", node.name, key, user)
    finally:
        if node.stopped:
            node.resume()
        await direct.close()
    await soak.wait_registered(node)


def _acked(user: int, key: str, recipient: int):  # type: ignore[no-untyped-def]
    from bench.chaos_check import AckedWrite

    return AckedWrite(user, key, (user, recipient))


async def _exists(soak: Soak, path: str) -> bool:
    try:
        return await soak.zk.exists(path)
    except PyserverError:
        return True  # cannot tell: keep waiting


async def zookeeper(soak: Soak, rng: random.Random) -> None:
    await asyncio.to_thread(soak.cluster.engines, "down", "zookeeper")
    await asyncio.sleep(rng.uniform(2.0, 8.0))
    await asyncio.to_thread(soak.cluster.engines, "up", "zookeeper")


async def discovery(soak: Soak, rng: random.Random) -> None:
    await _kill_and_restart(rng.choice(soak.cluster.discovery), rng.uniform(2.0, 6.0))


async def memcached(soak: Soak, rng: random.Random) -> None:
    name = rng.choice(soak.cluster.memcached_names)
    await asyncio.to_thread(soak.cluster.engines, "down", name)
    await asyncio.sleep(rng.uniform(2.0, 6.0))
    await asyncio.to_thread(soak.cluster.engines, "up", name)


async def mta_mid_data(soak: Soak, rng: random.Random) -> None:
    mta = soak.cluster.mta
    assert mta is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", soak.cluster.smtp_port)
    try:
        await reader.readline()  # 220
        recipient = rng.randint(1, soak.users)
        for line in ("EHLO chaos.test", "MAIL FROM:<outside@example.net>",
                     f"RCPT TO:<u{recipient}@chaos.test>", "DATA"):  # fmt: skip
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            while True:  # multi-line replies end with "NNN " (a space)
                reply = await asyncio.wait_for(reader.readline(), 15.0)
                if len(reply) < 4 or reply[3:4] != b"-":
                    break
        writer.write(b"Subject: cut short\r\nMessage-ID: <cut@chaos.test>\r\n\r\nhalf a ")
        await writer.drain()
        mta.kill()
    except (OSError, TimeoutError) as error:
        log.info("mta_mid_data: the conversation failed before the kill: %r", error)
        mta.kill()
    finally:
        writer.close()
    await asyncio.sleep(rng.uniform(1.0, 3.0))
    mta.start()
    await asyncio.to_thread(mta.wait_ready)


async def thrift_gateway(soak: Soak, rng: random.Random) -> None:
    # Thrift1 serves the stores' reads, Thrift2 their appends
    gateway = rng.choice(["hbase-thrift", "hbase-thrift2"])
    await asyncio.to_thread(soak.cluster.kill_engine, gateway)
    await asyncio.sleep(rng.uniform(2.0, 8.0))
    await asyncio.to_thread(soak.cluster.engines, "up", "thrift")


async def hbase(soak: Soak, rng: random.Random) -> None:
    await asyncio.to_thread(soak.cluster.engines, "down", "hbase")
    await asyncio.sleep(rng.uniform(2.0, 8.0))
    await asyncio.to_thread(soak.cluster.engines, "up", "hbase")


FAULTS: dict[str, Fault] = {
    "kill_node": kill_node,
    "pause_owner": pause_owner,
    "zookeeper": zookeeper,
    "discovery": discovery,
    "memcached": memcached,
    "mta_mid_data": mta_mid_data,
    "thrift_gateway": thrift_gateway,
    "hbase": hbase,
}

# Faults of the soak's HBase: drawn only when the store is HBase.
HBASE_FAULTS = ("thrift_gateway", "hbase")

# Faults that act on the same kind of process are not drawn together.
_CLASH = {
    frozenset({"kill_node", "pause_owner"}),
    frozenset({"pause_owner", "zookeeper"}),
    frozenset({"thrift_gateway", "hbase"}),
}


class Schedule:
    """The episodes' faults, drawn from the seed's `rng` among `allowed` (default: all):
    every kind once per round, in a shuffled order, so a short run meets them all; a
    third of the episodes take the next kind too (two faults at once, unless they act
    on the same processes)."""

    def __init__(self, rng: random.Random, allowed: Sequence[str] = ()) -> None:
        self._rng = rng
        self._names = sorted(allowed or FAULTS)
        self._bag: list[str] = []

    def _draw(self) -> str:
        if not self._bag:
            self._bag = list(self._names)
            self._rng.shuffle(self._bag)
        return self._bag.pop()

    def next(self) -> list[str]:
        first = self._draw()
        if self._rng.random() < 1 / 3 and self._bag:
            second = self._bag[-1]
            if second != first and frozenset({first, second}) not in _CLASH:
                return [first, self._draw()]
        return [first]
