"""`python -m bench ops`, its rollout part: a 3-node cell rolled under load.

`pyserver cluster up --cells 1 --nodes 3 --engine sqlite` in a folder of its own,
then a steady load through `ClusterClient` (discovery-routed, as any client of
the cluster): `WORKERS` tasks each alternating a SEND (with an idempotency key,
retried by the client until acknowledged) and a read (COUNTS or LIST_THREADS)
among `USERS` users. The load runs `REST_S` seconds at rest (its p99 there is the
ceiling the rollout is compared with), then through `pyserver cluster rollout`
(every node drained, stopped, started again and waited for, in turn), then
stops. Figures:

* `rollout_failed_requests`: requests the client saw fail (must be 0);
* `rollout_lost_writes` / `rollout_doubled_writes`: acknowledged SENDs missing
  from, or present twice in, the logs of their sender and recipients, read from
  the cell's store afterwards (must be 0);
* `rollout_p50_ms` / `rollout_p99_ms` of the load's requests during the rollout,
  `rest_p99_ms` before it, and `rollout_p99_vs_rest`;
* `rollout_s` and each node's drain and start times.

The module's `LoadDuringRollout` and `check_writes` are what the test of the
rollout (tests/test_rollout.py) uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyserver import logcodec
from pyserver.cluster.state import read_state
from pyserver.discovery.client import ClusterClient, connect_to_cluster
from pyserver.errors import PyserverError
from pyserver.processes.launcher import cluster_down, cluster_up
from pyserver.processes.rollout import cluster_rollout
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.wire.ops import Op

USERS = 60
WORKERS = 6
REST_S = 3.0


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class LoadDuringRollout:
    """SENDs and reads through a ClusterClient; each request's latency and the phase it
    started in ("rest", "rollout", "after")."""

    client: ClusterClient
    users: int = USERS
    workers: int = WORKERS
    pause_s: float = 0.01
    phase: str = "rest"
    acked: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    failed: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(w)) for w in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, worker: int) -> None:
        rng = random.Random(worker)  # nosec B311 (a load, not a secret)
        count = 0
        while not self._stop.is_set():
            count += 1
            user = rng.randint(1, self.users)
            if count % 2:
                others = [u for u in range(1, self.users + 1) if u != user]
                recipients = tuple(sorted(rng.sample(others, rng.choice((1, 1, 2)))))
                op, payload = Op.SEND, {
                    "sender": user, "recipients": list(recipients), "channel": "chat",
                    "text": f"load {worker}-{count}", "key": f"w{worker}-{count}",
                }  # fmt: skip
            elif count % 4 == 0:
                op, payload, recipients = Op.COUNTS, {"user": user}, ()
            else:
                op, payload, recipients = Op.LIST_THREADS, {"user": user, "limit": 5}, ()
            phase = self.phase
            started = time.perf_counter()
            try:
                reply = await self.client.request(op, payload)
            except PyserverError as error:
                self.failed[f"{op.name} {error.code}"] += 1
            else:
                self.latencies.setdefault(phase, []).append(time.perf_counter() - started)
                self.requests[phase] += 1
                if op is Op.SEND:
                    self.acked[reply["message_id"]] = (user, recipients)
            await asyncio.sleep(self.pause_s)

    def p_ms(self, phase: str, fraction: float) -> float:
        return round(_percentile(self.latencies.get(phase, []), fraction) * 1000, 2)


async def check_writes(
    folder: Path, acked: dict[str, tuple[int, tuple[int, ...]]], users: int
) -> tuple[int, int]:
    """(lost, doubled): acknowledged SENDs missing from a log of their sender or a recipient,
    and messages held twice in one user's log, over every cell's store."""
    state = read_state(folder)
    held: dict[int, Counter[str]] = {user: Counter() for user in range(1, users + 1)}
    for spec in state["cells"].values():
        store = open_store(parse_store_spec(spec, Path(state["data"])))
        await store.open()
        try:
            for user in held:
                for _, record in await store.read_log(user, 0, 1_000_000):
                    entry = logcodec.decode(record)
                    if entry["action"] == "message_added":
                        held[user][entry["message_id"]] += 1
        finally:
            await store.close()
    lost = sum(
        1
        for message, (sender, recipients) in acked.items()
        if any(held[user][message] == 0 for user in (sender, *recipients))
    )
    doubled = sum(1 for counts in held.values() for n in counts.values() if n > 1)
    return lost, doubled


async def rollout_under_load(
    folder: Path, *, release: str = "next", rest_s: float = REST_S, say: Any = print
) -> dict[str, Any]:
    """The load at rest, then through a rollout of every cell, then checked (module doc)."""
    client = await connect_to_cluster(folder)
    try:
        load = LoadDuringRollout(client)
        load.start()
        await asyncio.sleep(rest_s)
        load.phase = "rollout"
        started = time.monotonic()
        try:
            steps = await asyncio.to_thread(
                cluster_rollout, folder, release=release, say=lambda line: say(f"  {line}")
            )
        finally:
            rollout_s = time.monotonic() - started
            load.phase = "after"
            await asyncio.sleep(1.0)
            await load.stop()
    finally:
        await client.close()
    lost, doubled = await check_writes(folder, load.acked, load.users)
    rest_p99 = load.p_ms("rest", 0.99)
    during_p99 = load.p_ms("rollout", 0.99)
    return {
        "rollout_failed_requests": sum(load.failed.values()),
        "rollout_failures": dict(load.failed),
        "rollout_lost_writes": lost,
        "rollout_doubled_writes": doubled,
        "rollout_acknowledged_sends": len(load.acked),
        "rollout_requests": load.requests["rollout"],
        "rollout_p50_ms": load.p_ms("rollout", 0.50),
        "rollout_p99_ms": during_p99,
        "rest_p99_ms": rest_p99,
        "rollout_p99_vs_rest": round(during_p99 / rest_p99, 2) if rest_p99 else None,
        "rollout_s": round(rollout_s, 2),
        "rollout_rerouted": client.figures["rerouted"],
        "rollout_steps": [
            {k: v for k, v in asdict(step).items() if k in ("node", "drain_s", "start_s", "forced")}
            for step in steps
        ],
    }


def run(quick: bool = False) -> dict[str, object]:
    """A cluster of one 3-node cell on SQLite, rolled under load; then down and purged."""
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        folder = Path(tmp) / "cluster"

        def say(line: str) -> None:  # progress on stderr: stdout is the JSON
            print(line, file=sys.stderr, flush=True)

        cluster_up(folder, 1, 3, engine="sqlite", session_timeout_s=5.0, say=say)
        try:
            return asyncio.run(
                rollout_under_load(folder, rest_s=REST_S / 2 if quick else REST_S, say=say)
            )
        finally:
            with contextlib.suppress(Exception):
                cluster_down(folder, purge=True)
