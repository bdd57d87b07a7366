"""`pyserver cluster up --cells 2 --nodes 3` on the real engines, used from the CLI, then down.

As a person would: up (engines, tables, discovery x2, the user index, the
dirty service, six app servers on HBase, the MTA proxy), status --json, a SEND
between two users of different cells and the reads through `--cluster`, a user
moved with `pyserver admin move-user`, then down --purge. And `up --tls`: the
same tools through mutual TLS and ZooKeeper ACLs, outsiders refused at every
node and in ZooKeeper, a token revoked on every node, the tree gone after down.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import run_cli as pyserver


def test_cluster_up_status_send_read_move_down(
    tmp_path: Path, zookeeper: str, hbase_thrift: tuple[str, int]
) -> None:
    folder = str(tmp_path / "cluster")
    started = time.monotonic()
    up = pyserver("cluster", "up", "--dir", folder, "--cells", "2", "--nodes", "3",
                  "--session-timeout", "5", timeout=240)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        up_s = time.monotonic() - started
        status = pyserver("cluster", "status", "--dir", folder, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        roles = sorted(p["role"] for p in report["processes"])
        assert roles.count("node") == 6 and roles.count("discovery") == 2
        assert {"userindex", "mta"} <= set(roles) and all(p["alive"] for p in report["processes"])
        assert sorted({p["cell"] for p in report["processes"] if p["role"] == "node"}) == [
            "cell-1",
            "cell-2",
        ]
        for process in report["processes"]:
            assert process["address"].startswith("127.0.0.1:"), process
        sent = pyserver("send", "--cluster", folder, "--user", "1", "--to", "2", "--json",
                        "lunch on friday?")  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        thread_id = json.loads(sent.stdout)["thread_id"]
        threads = pyserver("threads", "--cluster", folder, "--user", "2", "--folder", "other",
                           "--json")  # fmt: skip
        assert threads.returncode == 0, threads.stderr
        assert [t["thread_id"] for t in json.loads(threads.stdout)["threads"]] == [thread_id]
        thread = pyserver("thread", "--cluster", folder, "--user", "1", thread_id)
        assert thread.returncode == 0 and "lunch on friday?" in thread.stdout, thread.stderr
        for target in ("cell-2", "cell-1"):  # wherever user 2 was placed, it moves twice
            moved = pyserver("admin", "move-user", "--cluster", folder, "--user", "2", "--to",
                             target, "--json")  # fmt: skip
            assert moved.returncode == 0, moved.stderr
            assert json.loads(moved.stdout)["target"] == target
        assert json.loads(moved.stdout)["source"] == "cell-2"
        counts = pyserver("counts", "--cluster", folder, "--user", "2", "--json")
        assert json.loads(counts.stdout)["folders"]["other"]["unread"] == 1, counts.stderr
        # An attachment in the cluster's one blob store (where the MTA proxy writes) is
        # read back by the user's owner, wherever the user lives.
        attachment = bytes(range(256)) * 64
        assert asyncio.run(_blob_round_trip(folder, attachment)) == attachment
        print(f"cluster up (2 x 3 on HBase): {up_s:.1f} s")
    finally:
        down = pyserver("cluster", "down", "--dir", folder, "--purge", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
    assert not Path(folder).exists()


async def _blob_round_trip(folder: str, attachment: bytes) -> bytes:
    """Put a blob where the MTA proxy would, DELIVER a mail referencing it, GET_BLOB it."""
    from pyserver.blobs import blob_store_for
    from pyserver.cluster.state import read_state
    from pyserver.discovery.client import connect_to_cluster
    from pyserver.wire.ops import Op

    state = read_state(Path(folder))
    blobs = blob_store_for(
        SimpleNamespace(blob_store=state["directory_store"], store="", data_dir=state["data"])
    )
    await blobs.open()
    try:
        info = await blobs.put(attachment)
    finally:
        await blobs.close()
    cluster = await connect_to_cluster(folder)
    try:
        attached = {"ref": info.ref, "name": "a.bin", "type": "application/octet-stream",
                    "size": len(attachment)}  # fmt: skip
        await cluster.request(Op.DELIVER, {
            "user": 2, "sender": 0, "from": "carol@example.org", "text": "see attached",
            "channel": "email", "key": "<blob-1@example.org>",
            "extra": {"attachments": [attached]},
        })  # fmt: skip
        reply = await cluster.request(
            Op.GET_BLOB, {"user": 2, "ref": info.ref, "length": len(attachment)}
        )
        assert reply["eof"] is True
        return base64.b64decode(reply["data"])
    finally:
        await cluster.close()


def test_cluster_up_tls_puts_every_tier_behind_tls_and_the_tree_behind_acls(
    tmp_path: Path, zookeeper: str
) -> None:
    folder = str(tmp_path / "cluster")
    up = pyserver("cluster", "up", "--dir", folder, "--cells", "2", "--nodes", "1",
                  "--engine", "sqlite", "--session-timeout", "5", "--tls", timeout=240)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((Path(folder) / "cluster.json").read_text())
        assert (Path(folder) / "cluster.json").stat().st_mode & 0o077 == 0  # it holds secrets
        # the operator's tools work through TLS, and moves through the ACL'd tree
        sent = pyserver("send", "--cluster", folder, "--user", "1", "--to", "2", "--json", "hi")
        assert sent.returncode == 0, sent.stderr
        for target in ("cell-2", "cell-1"):
            moved = pyserver("admin", "move-user", "--cluster", folder, "--user", "2",
                             "--to", target)  # fmt: skip
            assert moved.returncode == 0, moved.stderr
        threads = pyserver("threads", "--cluster", folder, "--user", "2", "--folder", "other")
        assert threads.returncode == 0 and "hi" in threads.stdout, threads.stderr
        token = pyserver("admin", "token", "--data", state["data"], "--user", "2").stdout.strip()
        asyncio.run(_outsiders_refused(state, token))
        revoked = pyserver("admin", "revoke", "--cluster", folder, "--user", "2")
        assert revoked.returncode == 0, revoked.stderr
        asyncio.run(_revoked_everywhere(state, token))
    finally:
        down = pyserver("cluster", "down", "--dir", folder, "--purge", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
    asyncio.run(_tree_gone(state))


def _nodes(state: dict[str, Any]) -> list[tuple[str, int]]:
    addresses = [p["address"] for p in state["processes"] if p["role"] == "node"]
    return [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in addresses]


async def _outsiders_refused(state: dict[str, Any], token: str) -> None:
    from pyserver.client import Client
    from pyserver.cluster.zk import ZooKeeper, ZooKeeperForbidden
    from pyserver.errors import Unavailable
    from pyserver.tls import TierTls

    tier = TierTls(**state["tls"])
    anonymous = ssl.create_default_context(cafile=tier.ca_file)  # trusts it, no certificate
    for host, port in _nodes(state):
        for context in (None, anonymous):
            with pytest.raises(Unavailable):
                await Client.connect(host, port, user_token=token, tls=context, reconnect=False)
        async with await Client.connect(
            host, port, user_token=token, tls=tier.client_context()
        ) as client:
            assert client.hello is not None and client.hello["user"] == 2
    stranger = ZooKeeper(state["zookeeper"], chroot=state["chroot"])
    await stranger.start(10.0)
    try:
        with pytest.raises(ZooKeeperForbidden):
            await stranger.get_children("/cells")
    finally:
        await stranger.close()


async def _revoked_everywhere(state: dict[str, Any], token: str) -> None:
    from pyserver.client import Client
    from pyserver.errors import Unauthenticated
    from pyserver.tls import TierTls

    context = TierTls(**state["tls"]).client_context()
    deadline = time.monotonic() + 10
    for host, port in _nodes(state):  # every node of every cell refuses it within seconds
        while True:
            try:
                client = await Client.connect(
                    host, port, user_token=token, tls=context, reconnect=False
                )
            except Unauthenticated as refused:
                assert "revoked" in str(refused)
                break
            await client.close()
            assert time.monotonic() < deadline, f"{host}:{port} still takes the token"
            await asyncio.sleep(0.2)


async def _tree_gone(state: dict[str, Any]) -> None:
    from pyserver.cluster.zk import ZooKeeper

    zk = ZooKeeper(state["zookeeper"], chroot="")
    await zk.start(10.0)
    try:
        assert not await zk.exists(state["chroot"])
    finally:
        await zk.close()
