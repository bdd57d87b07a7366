"""`pyserver cell disable|enable|evacuate` on real app servers, ZooKeeper and discovery.

Two cells of `pyserver node` processes (the cluster harness), each with its own
SQLite store, and a discovery service; the commands run as `pyserver`
processes, as an operator runs them.

* A disabled cell gets no new user (discovery places them all elsewhere) while
  its own users are still served; enabled again, it takes new users.
* Evacuating a cell under a steady load of SENDs routed through discovery moves
  every user it held to the other cell, reports its progress, fails no request,
  and loses or doubles no message: every acknowledged message is in the sender's
  and each recipient's log, in the cell the directory now names, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pyserver import logcodec
from pyserver.app.loop import new_event_loop
from pyserver.cluster.state import set_cell_record
from pyserver.cluster.zk import ZooKeeper
from pyserver.config import load_config
from pyserver.discovery.client import ClusterClient
from pyserver.discovery.directory import Directory
from pyserver.processes.discovery import DiscoveryProcess
from pyserver.store.spec import open_store, parse_store_spec
from pyserver.wire.ops import Op
from tests.cluster_harness import REPO, Cluster, SendLoad, eventually

USERS = 40


class _Routed:
    """SendLoad's `request(user, op, payload, timeout)` over a ClusterClient."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client

    async def request(
        self, _user: int, op: Op, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await self.client.request(op, payload, timeout)


async def _pyserver(*args: str, timeout_s: float = 120.0) -> tuple[int, str, str]:
    """Run `pyserver ARGS` as its own process; (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyserver.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_disable_enable_and_evacuate_a_cell_under_load(tmp_path: Path, zookeeper: str) -> None:
    cluster = Cluster(tmp_path, zookeeper, session_timeout_s=5.0)
    stores = {"ca": cluster.store, "cb": f"sqlite:{cluster.data / 'cb.sqlite3'}"}
    flags = ["--zookeeper", zookeeper, "--chroot", cluster.chroot]

    async def prepare() -> DiscoveryProcess:
        zk = ZooKeeper(zookeeper, chroot=cluster.chroot, session_timeout_s=5.0)
        await zk.start(10.0)
        for cell, spec in stores.items():
            await set_cell_record(zk, cell, store=spec)
        await zk.close()
        config = load_config(
            env={},
            overrides={
                "data_dir": cluster.data,
                "zookeeper": zookeeper,
                "zookeeper_chroot": cluster.chroot,
                "store": cluster.store,
                "zookeeper_session_timeout_s": 5.0,
            },
        )
        process = DiscoveryProcess(config)
        await process.start("127.0.0.1", 0)
        return process

    loop = new_event_loop()
    try:
        discovery = loop.run_until_complete(prepare())
        assert discovery.server is not None and discovery.server.address is not None
        address = "{}:{}".format(*discovery.server.address)
        extra = ["--discovery", address]
        spawned = [cluster.spawn("a1", "ca", *extra), cluster.spawn("a2", "ca", *extra)]
        spawned.append(cluster.spawn("b1", "cb", "--store", stores["cb"], *extra))
        for node in spawned:
            node.wait_serving()

        async def scenario() -> None:
            client = await ClusterClient.connect([address], cluster.key, request_timeout=30.0)
            opened = {
                cell: open_store(parse_store_spec(spec, tmp_path)) for cell, spec in stores.items()
            }
            for store in opened.values():
                await store.open()
            directory = Directory(opened["ca"])
            try:
                await eventually(
                    lambda: _async(discovery.service.cells.placeable() == ["ca", "cb"]),
                    20,
                    "discovery follows both cells",
                )
                # -- disable: new users go elsewhere, the cell's own users are still served
                status, out, err = await _pyserver("cell", "disable", "cb", *flags)
                assert status == 0, err
                assert "cell cb is disabled" in out
                await eventually(
                    lambda: _async(discovery.service.cells.placeable() == ["ca"]),
                    20,
                    "discovery hears cb is disabled",
                )
                for user in range(1, USERS + 1):
                    await client.send(user, [user % USERS + 1], f"hello {user}")
                assert await directory.counts() == {"ca": USERS}
                status, out, err = await _pyserver("cell", "show", "cb", "--json", *flags)
                shown = json.loads(out)
                assert shown["state"] == "disabled" and [n["node"] for n in shown["nodes"]] == [
                    "b1"
                ]
                # a typo creates no cell and says so
                status, _, err = await _pyserver("cell", "disable", "cz", *flags)
                assert status == 1 and "no cell 'cz'" in err
                # -- enable: it takes new users again (the fewest users: all go there)
                status, out, err = await _pyserver("cell", "enable", "cb", *flags)
                assert status == 0 and "cell cb is enabled" in out, err
                await eventually(
                    lambda: _async(discovery.service.cells.placeable() == ["ca", "cb"]),
                    20,
                    "discovery hears cb is enabled",
                )
                for user in range(USERS + 1, USERS + 11):
                    await client.send(user, [1], f"new {user}")
                assert await directory.counts() == {"ca": USERS, "cb": 10}
                # -- evacuate ca into cb while SENDs flow through discovery
                load = SendLoad(_Routed(client), users=USERS + 10, workers=4, pause_s=0.01)  # type: ignore[arg-type]
                load.start()
                await asyncio.sleep(1.0)
                status, out, err = await _pyserver(
                    "cell", "evacuate", "ca", "--directory", stores["ca"], "--parallel", "4",
                    "--rate", "100", "--json", *flags,
                )  # fmt: skip
                await asyncio.sleep(1.0)
                await load.stop()
                assert status == 0, err
                report = json.loads(out)
                assert report["failed"] == {} and report["to"] == {"cb": USERS}, report
                assert report["moved"] == USERS
                assert f"evacuating ca: {USERS}/{USERS} moved, 0 failed" in err
                assert await directory.counts() == {"cb": USERS + 10}
                assert await directory.users_in("ca") == []
                assert not load.failed, f"requests failed: {load.failed}"
                assert len(load.acked) > 50
                # every acknowledged message once in each of its users' logs, in their cell
                holders: dict[str, Counter[int]] = {}
                for user in range(1, USERS + 11):
                    page = await opened["cb"].read_log(user, 0, 1_000_000)
                    assert [seq for seq, _ in page] == list(range(1, len(page) + 1)), user
                    ids = Counter(
                        entry["message_id"]
                        for entry in (logcodec.decode(record) for _, record in page)
                        if entry["action"] == "message_added"
                    )
                    assert max(ids.values(), default=1) == 1, f"user {user} holds one twice"
                    for message in ids:
                        holders.setdefault(message, Counter())[user] += 1
                for message, (sender, recipients) in load.acked.items():
                    missing = {sender, *recipients} - set(holders.get(message, ()))
                    assert not missing, f"acknowledged {message} missing for {sorted(missing)}"
                # the evacuated cell stays disabled: a new user goes to cb
                assert (await client.lookup(999, fresh=True))["cell"] == "cb"
                await client.send(999, [1], "after")
                assert (await client.lookup(999, fresh=True))["cell"] == "cb"
                # nowhere to go: a clear refusal, and every user stays where it was
                status, _, err = await _pyserver(
                    "cell", "evacuate", "cb", "--to", "ca", "--directory", stores["ca"], *flags
                )
                assert status == 1 and "cell ca is disabled" in err, err
                assert await directory.counts() == {"cb": USERS + 11}
                status, out, _ = await _pyserver("cell", "show", "cb", "--json", *flags)
                assert json.loads(out)["state"] == "enabled", "a refused evacuation changes nothing"
            finally:
                for store in opened.values():
                    await store.close()
                await client.close()
                await discovery.stop()

        loop.run_until_complete(asyncio.wait_for(scenario(), 240))
    finally:
        loop.close()
        cluster.close()


async def _async(value: bool) -> bool:
    return value
