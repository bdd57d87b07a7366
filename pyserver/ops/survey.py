"""A survey of a running cluster: its cells, their app servers and the services, each with
the figures of its own `/metrics`.

Where to look comes from the cluster's state (`pyserver.cluster.state`): the
cells, their state and their app servers from ZooKeeper (each node's record
names its `/metrics` address), and the services (discovery, user index, dirty,
MTA, web, IMAP, SMS) from the `pyserver cluster up` folder when there is one. A
`Surveyor` scrapes every target at once and keeps each one's last reading, so
its next survey reports rates and recent percentiles (`pyserver.ops.figures`),
and the slowest operations and store calls across them (`pyserver.ops.slowest`).
A target that does not answer is reported down, with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pyserver.cluster.state import (
    ClusterSettings,
    NoCluster,
    cell_names,
    cell_record,
    node_records,
    read_state,
)
from pyserver.cluster.zk import ZooKeeper
from pyserver.ops.figures import Reading, figures
from pyserver.ops.slowest import slowest
from pyserver.tls import TierTls

__all__ = ["Surveyor", "Target", "find_targets"]

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Target:
    """One process to scrape: its name, role and `/metrics` address (host:port)."""

    name: str
    role: str
    metrics: str | None
    cell: str | None = None
    addr: str | None = None
    # an app server's state in its cell ("active", "draining"; "absent": not registered)
    state: str | None = None


async def find_targets(
    zk: ZooKeeper, state: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[Target]]:
    """The cells (name, state, store) and every process to scrape: each cell's registered
    app servers (and those the folder knows that are not registered: "absent"), then the
    folder's services."""
    cells = []
    targets: list[Target] = []
    launched = [p for p in (state or {}).get("processes", []) if isinstance(p, dict)]
    for name in await cell_names(zk):
        try:
            record = await cell_record(zk, name)
        except LookupError:
            continue  # removed meanwhile
        state_of_cell = record.get("state", "enabled")
        cells.append({"cell": name, "state": state_of_cell, "store": record.get("store")})
        registered = set()
        for node in await node_records(zk, name):
            registered.add(node.node_id)
            http = node.data.get("http")
            metrics = http if isinstance(http, str) else None
            targets.append(Target(node.node_id, "node", metrics, name, node.addr, node.state))
        for process in launched:
            mine = process.get("role") == "node" and process.get("cell") == name
            if mine and process.get("node") not in registered:
                metrics, addr = process.get("metrics"), process.get("address")
                targets.append(Target(process["node"], "node", metrics, name, addr, "absent"))
    for process in launched:
        if process.get("role") != "node":
            metrics, addr = process.get("metrics"), process.get("address")
            targets.append(Target(process["name"], process["role"], metrics, addr=addr))
    return cells, targets


class Surveyor:
    """Surveys one cluster again and again (module docstring)."""

    def __init__(self, settings: ClusterSettings, folder: Path | None = None) -> None:
        self.settings = settings
        self.folder = folder
        self.zk: ZooKeeper | None = None
        self._readings: dict[str, Reading] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
        self.zk = self.settings.session(session_timeout_s=10.0)
        await self.zk.start(timeout_s)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self.zk is not None:
            await self.zk.close()

    async def __aenter__(self) -> Surveyor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _state(self) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        try:
            state = read_state(self.folder)
        except NoCluster:
            return None
        if state.get("tls") and self._tls is None:
            self._tls = TierTls(**state["tls"]).client_context()
        return state

    async def survey(self) -> dict[str, Any]:
        """Every cell with its app servers, and the services, with their figures."""
        assert self.zk is not None, "start() first"
        state = self._state()
        cells, targets = await find_targets(self.zk, state)
        results = await asyncio.gather(*(self._scrape(target) for target in targets))
        by_cell: dict[str, list[dict[str, Any]]] = {cell["cell"]: [] for cell in cells}
        services = []
        for target, result in zip(targets, results, strict=True):
            entry = {**{k: v for k, v in asdict(target).items() if v is not None}, **result}
            if target.role == "node" and target.cell in by_cell:
                by_cell[target.cell].append(entry)
            else:
                services.append(entry)
        for cell in cells:
            nodes = by_cell[cell["cell"]]
            cell["nodes"] = nodes
            cell["ops_per_s"] = _total(node.get("ops_per_s") for node in nodes)
            cell["errors"] = sum(node.get("errors") or 0 for node in nodes)
            cell["users_cached"] = _total(node.get("users_cached") for node in nodes)
            cell["nodes_up"] = sum(1 for node in nodes if node["up"])
        report = {
            "time": time.time(),
            "zookeeper": self.settings.zookeeper,
            "chroot": self.settings.chroot,
            "cluster": str(self.folder) if self.folder is not None else None,
            "cells": cells,
            "services": services,
        }
        # where the time goes, across the cluster (pyserver.ops.slowest)
        report["slowest"] = slowest(report)
        return report

    async def _scrape(self, target: Target) -> dict[str, Any]:
        if not target.metrics:
            return {"up": False, "error": "no /metrics address known"}
        assert self._http is not None
        scheme = "https" if self._tls is not None else "http"
        try:
            async with self._http.get(
                f"{scheme}://{target.metrics}/metrics", ssl=self._tls or False
            ) as response:
                if response.status != 200:
                    return {"up": False, "error": f"HTTP {response.status}"}
                text = await response.text()
            reading = Reading.parse(text, time.monotonic())
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as error:
            self._readings.pop(target.name, None)
            return {"up": False, "error": str(error) or type(error).__name__}
        before = self._readings.get(target.name)
        self._readings[target.name] = reading
        return {"up": True, **figures(reading, before)}


def _total(values: Any) -> float | None:
    present = [value for value in values if value is not None]
    return round(sum(present), 2) if present else None
