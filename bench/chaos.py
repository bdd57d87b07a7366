"""`python -m bench chaos [--minutes N] [--seed S] [--json]`: faults under load, then a checker.

A cluster of 2 cells x 3 app servers (`bench.chaos_cluster`: private ZooKeeper,
memcached and HBase with its Thrift gateway, two discovery instances, the user
index, the dirty service, the MTA proxy) runs a
mixed load (`bench.chaos_load`: SENDs across cells, reads, threads moved,
mail through the MTA, users moved between cells) while a schedule of faults
drawn from the seed (`bench.chaos_faults`) runs one or two at a time for N
minutes. After each episode every user is probed until served again (the time
after the end of the fault is its unavailability). Then the load stops, the
run quiesces, every user's log is read from the store and every user's counts
asked of its owner, and `bench.chaos_check` compares them with what the clients
saw. The report holds the checker's figures (all zero in a correct run but
`max_unavailable_s`, whose target is the ZooKeeper session timeout plus 5 s),
the faults injected, the load's figures and the seed; the same seed draws the
same schedule (the timings, under a loaded machine, differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chaos_check import History, Recovery, check
from bench.chaos_cluster import Proc, SoakCluster
from bench.chaos_faults import FAULTS, HBASE_FAULTS, Schedule
from bench.chaos_load import Load, address_of
from pyserver import logcodec
from pyserver.cluster import layout
from pyserver.cluster.zk import ZooKeeper
from pyserver.discovery.client import ClusterClient
from pyserver.discovery.directory import Directory
from pyserver.discovery.move import move_user
from pyserver.errors import PyserverError
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.wire.ops import Op

__all__ = ["Soak", "run"]

log = logging.getLogger(__name__)

USERS = 60
SESSION_S = 4.0
# how long a user is probed after a fault before it counts as never served again
PROBE_LIMIT_S = 60.0


class Soak:
    """One soak's state, as the faults and the load see it."""

    def __init__(self, cluster: SoakCluster, seed: int, users: int) -> None:
        self.cluster = cluster
        self.seed = seed
        self.users = users
        self.history = History()
        self.client: ClusterClient = None  # type: ignore[assignment]
        self.zk: ZooKeeper = None  # type: ignore[assignment]
        self.stores: dict[str, Any] = {}
        self.directory: Directory = None  # type: ignore[assignment]
        self.faults: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        # the faults drawn from (PYSERVER_CHAOS_FAULTS=a,b to try a few; default: all)
        self.allowed = [n for n in os.environ.get("PYSERVER_CHAOS_FAULTS", "").split(",") if n]
        if not self.allowed and cluster.store_kind != "hbase":
            self.allowed = [n for n in FAULTS if n not in HBASE_FAULTS]
        unknown = set(self.allowed) - set(FAULTS)
        if unknown:
            raise ValueError(f"PYSERVER_CHAOS_FAULTS: no fault named {sorted(unknown)}")

    async def open(self) -> None:
        self.zk = await self.cluster.session()
        directory_store = open_store(
            parse_store_spec(self.cluster.directory_store, self.cluster.data)
        )
        await directory_store.open()
        self.stores["directory"] = directory_store
        self.directory = Directory(directory_store)
        for cell, spec in self.cluster.stores.items():
            store = open_store(parse_store_spec(spec, self.cluster.data))
            await store.open()
            self.stores[cell] = store
        for user in range(1, self.users + 1):
            await directory_store.add_address(address_of(user), user)
        self.client = await ClusterClient.connect(
            self.cluster.discovery_addresses, self.cluster.key, request_timeout=30.0
        )
        for user in range(1, self.users + 1):  # placed in the cells before the load
            await self.client.lookup(user)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        for store in self.stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        if self.zk is not None:
            await self.zk.close()

    # ---- what the faults ask ----

    async def users_of(self, node_id: str) -> list[int]:
        owned = []
        for user in range(1, self.users + 1):
            with contextlib.suppress(PyserverError):
                if (await self.client.lookup(user, fresh=True)).get("node") == node_id:
                    owned.append(user)
        return owned

    async def wait_registered(self, node: Proc, timeout_s: float = 60.0) -> None:
        assert node.cell is not None
        path = layout.node_path(node.cell, node.name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(PyserverError):
                if await self.zk.exists(path):
                    return
            await asyncio.sleep(0.2)

    async def move(self, user: int) -> None:
        """Move the user to the other cell."""
        source = await self.directory.cell_of(user)
        target = next(c for c in self.cluster.cell_names if c != source)
        cells = {c: self.stores[c] for c in self.cluster.cell_names}
        await asyncio.wait_for(move_user(self.zk, self.directory, cells, user, target), 60.0)

    # ---- measuring ----

    async def probe(self, ended: float) -> dict[int, float | None]:
        """How long after `ended` each user was served a read again (None: not within
        PROBE_LIMIT_S)."""

        async def one(user: int) -> float | None:
            while time.monotonic() - ended < PROBE_LIMIT_S:
                try:
                    await self.client.request(Op.COUNTS, {"user": user}, timeout=2.0)
                    return max(0.0, time.monotonic() - ended)
                except PyserverError:
                    await asyncio.sleep(0.1)
            return None

        waits = await asyncio.gather(*(one(user) for user in range(1, self.users + 1)))
        return dict(zip(range(1, self.users + 1), waits, strict=True))

    async def episodes_until(self, deadline: float, rng: random.Random) -> None:
        """Episodes until `deadline`, and past it until every kind of fault ran once."""
        schedule = Schedule(rng, self.allowed)
        kinds = set(self.allowed or FAULTS)
        while time.monotonic() < deadline or not kinds <= set(self.faults):
            names = schedule.next()
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(FAULTS[name](self, rng) for name in names), return_exceptions=True
            )
            ended = time.monotonic()
            waits = await self.probe(ended)
            for name, outcome in zip(names, outcomes, strict=True):
                self.faults[name] = self.faults.get(name, 0) + 1
                if isinstance(outcome, BaseException):
                    log.error("fault %s failed to run: %r", name, outcome)
                self.history.recoveries.append(Recovery(name, waits))
            known = [w for w in waits.values() if w is not None]
            self.episodes.append({
                "faults": names,
                "at_s": round(started - self.began, 1),
                "held_s": round(ended - started, 1),
                "worst_wait_s": round(max(known, default=0.0), 2),
                "never_served": sum(w is None for w in waits.values()),
            })  # fmt: skip
            log.info("episode %s: %s", names, self.episodes[-1])
            await asyncio.sleep(rng.uniform(2.0, 5.0))

    async def final_logs(self) -> dict[int, list[dict[str, Any]]]:
        logs = {}
        for user in range(1, self.users + 1):

            async def read(user: int = user) -> list[tuple[int, bytes]]:
                cell = await self.directory.cell_of(user)
                return await self.stores[cell].read_log(user, 0, 10_000_000)

            page = await _patiently(read)
            logs[user] = [{**logcodec.decode(record), "seq": seq} for seq, record in page]
        return logs

    async def final_counts(self) -> dict[int, dict[str, dict[str, int]]]:
        counts = {}
        for user in range(1, self.users + 1):

            async def ask(user: int = user) -> dict[str, Any]:
                return await self.client.request(Op.COUNTS, {"user": user}, timeout=30.0)

            counts[user] = (await _patiently(ask))["folders"]
        return counts

    async def main(self, minutes: float) -> dict[str, Any]:
        await self.open()
        rng = random.Random(self.seed)
        load = Load(self.client, self.users, self.history, smtp_port=self.cluster.smtp_port,
                    seed=self.seed, mover=self.move)  # fmt: skip
        self.began = time.monotonic()
        load.start()
        await asyncio.sleep(3.0)
        await self.episodes_until(self.began + minutes * 60.0, rng)
        soaked_s = time.monotonic() - self.began
        log.info("chaos: faults over after %d episodes; stopping the load", len(self.episodes))
        await load.stop(finish_s=90.0)
        log.info("chaos: load stopped %s; reading every log", load.figures)
        for proc in self.cluster.processes():  # every fault healed: all of them serve
            if not proc.alive:
                log.error("%s is not running at the end: %s", proc.name, proc.tail())
        logs = await self.final_logs()
        counts = await self.final_counts()
        report = check(self.history, logs, counts)
        target = self.cluster.session_timeout_s + 5.0
        worst = report["max_unavailable_s"]
        report["target_unavailable_s"] = target
        report["unavailable_within_target"] = all(
            value is not None and value <= target for value in worst.values()
        )
        report["faults"] = self.faults
        report["episodes"] = len(self.episodes)
        report["episode_log"] = self.episodes
        report["load"] = load.figures
        report["soaked_s"] = round(soaked_s, 1)
        return report


async def _patiently(attempt: Any, limit_s: float = 180.0) -> Any:
    """`attempt()` until it answers (the shared HBase may be slow on a loaded
    machine): the run has quiesced, nothing is faulted any more, every read must end."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return await attempt()
        except PyserverError as error:
            if time.monotonic() > deadline:
                raise
            log.warning("chaos: reading after the run: %r; again", error)
            await asyncio.sleep(1.0)


def run(
    quick: bool = False,
    minutes: float | None = None,
    seed: int | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """The soak (module docstring); `quick` is a 1-minute smoke run."""
    minutes = minutes if minutes is not None else (1.0 if quick else 3.0)
    seed = seed if seed is not None else int.from_bytes(os.urandom(3), "big")
    store = store or os.environ.get("PYSERVER_CHAOS_STORE", "hbase")
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)
    if not logging.getLogger().handlers:  # progress on stderr; the report goes to stdout
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("bench").setLevel(logging.INFO)
    folder = Path(tempfile.mkdtemp(prefix="pyserver-chaos-"))
    cluster = SoakCluster(folder, cells=2, nodes=3, store=store, session_timeout_s=SESSION_S)
    soak = Soak(cluster, seed, USERS)
    clean = False
    try:
        log.info("chaos: starting the cluster in %s (seed %d)", folder, seed)
        cluster.start()
        log.info("chaos: cluster up; %g minutes of faults under load", minutes)

        async def scenario() -> dict[str, Any]:
            try:
                return await soak.main(minutes)
            finally:
                await soak.close()

        report = asyncio.run(scenario())
        clean = all(
            report[figure] == 0
            for figure in ("lost_writes", "doubled_writes", "gaps", "forks",
                           "monotonic_violations", "stale_owner_writes", "count_mismatches")
        ) and report["unavailable_within_target"]  # fmt: skip
    finally:
        cluster.close()
        if clean and not os.environ.get("PYSERVER_CHAOS_KEEP"):
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "chaos": report,
        "settings": {
            "minutes": minutes,
            "seed": seed,
            "cells": len(cluster.cell_names),
            "nodes_per_cell": cluster.node_count,
            "store": store,
            "users": USERS,
            "session_timeout_s": SESSION_S,
            "logs": str(folder) if folder.exists() else None,
        },
    }
