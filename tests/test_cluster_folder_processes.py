"""`pyserver discovery --cluster DIR` and `pyserver node --cluster DIR --cell C`: a process
started by hand into a cluster takes its ZooKeeper, chroot, stores, discovery and service
key from the cluster's folder (`cluster.json`), like every other command that names a
cluster, on the real ZooKeeper in a chroot of the test's own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyserver import endpoints
from pyserver.cluster.state import active_nodes, set_cell_record
from pyserver.cluster.zk import ZooKeeper
from pyserver.discovery.client import connect_to_cluster
from pyserver.servicekey import load_or_create_service_key
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.wire.ops import Op
from tests.cluster_harness import REPO, remove_tree
from tests.support.relay import Relay


@pytest.fixture
def chroot(zookeeper: str) -> Iterator[str]:
    path = f"/pyserver-test-folder-{uuid.uuid4().hex[:10]}"
    yield path
    asyncio.run(remove_tree(zookeeper, path))


def _cluster_json(folder: Path, zookeeper: str, chroot: str) -> dict[str, object]:
    data = folder / "data"
    data.mkdir(parents=True)
    load_or_create_service_key(data)
    state = {
        "engine": "sqlite",
        "zookeeper": zookeeper,
        "chroot": chroot,
        "directory_store": f"sqlite:{folder / 'directory.sqlite3'}",
        "cells": {"c1": f"sqlite:{folder / 'c1.sqlite3'}"},
        "data": str(data),
        "service_key_file": str(data / "service.key"),
        "tls": None,
        "zookeeper_acl": None,
        "discovery": [],
        "processes": [],
    }
    (folder / "cluster.json").write_text(json.dumps(state))
    return state


def _start(folder: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    ready = folder / f"{name}.ready.json"
    with open(folder / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "pyserver.cli", *args, "--ready-file", str(ready)],
            stdout=log, stderr=log, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    return proc, ready


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while (found := endpoints.read_file(ready)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return found


async def _active(zookeeper: str, chroot: str) -> set[str]:
    """Cell c1's active app servers, as ZooKeeper lists them."""
    zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=5.0)
    await zk.start(10.0)
    try:
        return set(await active_nodes(zk, "c1"))
    finally:
        await zk.close()


def test_node_and_discovery_take_the_cluster_folder(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    state = _cluster_json(tmp_path, zookeeper, chroot)

    async def make_cell() -> None:
        zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=5.0)
        await zk.start(10.0)
        await set_cell_record(zk, "c1", store=str(state["cells"]["c1"]))  # type: ignore[index]
        await zk.close()

    asyncio.run(make_cell())
    started: list[subprocess.Popen[bytes]] = []
    try:
        # nothing but the folder: ZooKeeper, chroot, the directory's store from cluster.json
        proc, ready = _start(tmp_path, "discovery", "discovery", "--cluster", str(tmp_path),
                             "--port", "0")  # fmt: skip
        started.append(proc)
        found = _wait_ready(proc, ready, tmp_path / "discovery.log")
        address = str(found["addr"])
        state["discovery"] = [address]
        (tmp_path / "cluster.json").write_text(json.dumps(state))
        # the app server: the cell's store and discovery from the folder too
        proc, ready = _start(tmp_path, "node", "node", "--cluster", str(tmp_path), "--cell", "c1",
                             "--node-id", "c1-n1", "--port", "0", "--http-port", "0")  # fmt: skip
        started.append(proc)
        _wait_ready(proc, ready, tmp_path / "node.log")

        async def check() -> None:
            assert await _active(zookeeper, chroot) == {"c1-n1"}
            async with await connect_to_cluster(tmp_path) as client:
                reply = await client.request(
                    Op.SEND,
                    {"sender": 7, "recipients": [8], "channel": "chat", "text": "via the folder"},
                )
                assert reply.get("message_id") and not reply["duplicate"], reply
            # discovery placed the users in c1, whose node wrote to c1's store named in the folder
            store = open_store(parse_store_spec(str(state["cells"]["c1"]), tmp_path))  # type: ignore[index]
            await store.open()
            try:
                assert await store.last_seq(7) >= 1 and await store.last_seq(8) >= 1
            finally:
                await store.close()
            directory = open_store(parse_store_spec(str(state["directory_store"]), tmp_path))
            await directory.open()
            try:
                assert await directory.get_cell(7) == "c1"
            finally:
                await directory.close()

        asyncio.run(check())
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_cell_the_folder_does_not_know_is_refused(
    zookeeper: str, chroot: str, tmp_path: Path
) -> None:
    _cluster_json(tmp_path, zookeeper, chroot)
    done = subprocess.run(  # nosec B603
        [sys.executable, "-m", "pyserver.cli", "node", "--cluster", str(tmp_path), "--cell", "c9"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "has no cell 'c9'" in done.stderr and "c1" in done.stderr


@pytest.mark.parametrize("role", ["node", "discovery"])
def test_a_process_started_while_zookeeper_is_down_waits_and_serves_once_it_answers(
    zookeeper: str, chroot: str, tmp_path: Path, role: str
) -> None:
    """A node or discovery instance restarted during an outage used to exit ("could not
    start"), so a cell came back short of it; it now waits for its engines and serves once
    they answer."""
    state = _cluster_json(tmp_path, zookeeper, chroot)
    log = tmp_path / f"{role}.log"
    own = {
        "node": ["--cell", "c1", "--node-id", "c1-n1", "--http-port", "0"],
        "discovery": [],
    }[role]

    async def scenario() -> None:
        zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=5.0)
        await zk.start(10.0)
        await set_cell_record(zk, "c1", store=str(state["cells"]["c1"]))  # type: ignore[index]
        await zk.close()
        # ZooKeeper behind a relay that is not listening yet: connections are refused
        relay = Relay(zookeeper)
        await relay.start()
        await relay.cut()
        proc, ready = _start(tmp_path, role, role, "--cluster", str(tmp_path), "--port", "0",
                             *own, "--zookeeper", relay.address)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while "waiting for its engines" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            assert proc.poll() is None, log.read_text()[-3000:]  # still waiting, not gone
            await relay.start()  # ZooKeeper answers again, on the same address
            while endpoints.read_file(ready) is None:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            if role == "node":
                assert await _active(zookeeper, chroot) == {"c1-n1"}
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            await relay.cut()

    asyncio.run(scenario())
