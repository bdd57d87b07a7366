"""A cluster's state in one module (`pyserver.cluster.state`), on the real ZooKeeper.

* Two commands changing one folder's `cluster.json` at once both keep their change.
* A cell's state is set only on a cell that exists, only to a known state; the
  cells' and nodes' records read back as written.
* Every command that names a cluster takes `--cluster DIR`; `pyserver cluster ...`
  keeps `--dir` too.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyserver.cli import build_parser
from pyserver.cluster import layout
from pyserver.cluster.state import (
    NoCluster,
    active_nodes,
    cell_names,
    cell_record,
    node_records,
    read_state,
    set_cell_record,
    set_cell_state,
    update_state,
    write_state,
)
from pyserver.cluster.zk import NoNode, ZooKeeper
from pyserver.errors import BadRequest, NotFound
from tests import support
from tests.cluster_harness import remove_tree


@pytest.fixture
def chroot(zookeeper: str) -> Iterator[str]:
    path = f"/pyserver-test-state-{uuid.uuid4().hex[:10]}"
    yield path
    asyncio.run(remove_tree(zookeeper, path))


def test_concurrent_updates_of_the_state_file_lose_nothing(tmp_path: Path) -> None:
    write_state(tmp_path, {"processes": []})
    errors: list[BaseException] = []

    def add(prefix: str) -> None:
        try:
            for i in range(40):
                update_state(tmp_path, lambda state, i=i: state["processes"].append(f"{prefix}{i}"))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=add, args=(prefix,)) for prefix in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    processes = read_state(tmp_path)["processes"]
    assert sorted(processes) == sorted(f"{p}{i}" for p in "abc" for i in range(40))
    assert (tmp_path / "cluster.json").stat().st_mode & 0o077 == 0


def test_a_folder_without_a_cluster_says_so(tmp_path: Path) -> None:
    with pytest.raises(NoCluster, match="no cluster in"):
        read_state(tmp_path)
    with pytest.raises(NoCluster):
        update_state(tmp_path, lambda state: None)


def test_cells_records_on_zookeeper(zookeeper: str, chroot: str) -> None:
    async def scenario() -> None:
        zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=5.0)
        await zk.start(10.0)
        try:
            assert await cell_names(zk) == []
            await set_cell_record(zk, "cell-b", store="sqlite:/b")
            await set_cell_record(zk, "cell-a")
            assert await cell_names(zk) == ["cell-a", "cell-b"]
            record = await set_cell_state(zk, "cell-b", "disabled")
            assert record == {"state": "disabled", "store": "sqlite:/b"}
            assert await cell_record(zk, "cell-b") == record
            assert (await set_cell_state(zk, "cell-b", "enabled"))["state"] == "enabled"
            # a typo creates no cell; an unknown state changes nothing
            with pytest.raises(NotFound, match="cell-x"):
                await set_cell_state(zk, "cell-x", "disabled")
            with pytest.raises(NoNode):
                await zk.get(layout.cell_path("cell-x"))
            with pytest.raises(BadRequest, match="paused"):
                await set_cell_state(zk, "cell-a", "paused")
            assert (await cell_record(zk, "cell-a"))["state"] == "enabled"
            # nodes: an unreadable record is left out, draining ones listed but not active
            for node_id, state in (("n1", "active"), ("n2", "draining")):
                record = layout.NodeRecord(node_id, f"127.0.0.1:{7000 + len(node_id)}", 8, state)
                await zk.create(
                    layout.node_path("cell-a", node_id), record.to_bytes(), ephemeral=True
                )
            await zk.create(layout.node_path("cell-a", "n3"), b"not json", ephemeral=True)
            records = await node_records(zk, "cell-a")
            assert [(r.node_id, r.state, r.tokens) for r in records] == [
                ("n1", "active", 8),
                ("n2", "draining", 8),
            ]
            assert await active_nodes(zk, "cell-a") == {"n1"}
            assert await node_records(zk, "cell-none") == []
        finally:
            await zk.close()

    support.run(scenario, timeout=60.0)


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["cluster", "up"], "dir"),
        (["cluster", "status"], "dir"),
        (["cluster", "down"], "dir"),
        (["admin", "nodes"], "cluster"),
        (["admin", "drain", "--node", "n1"], "cluster"),
        (["admin", "move-user", "--user", "1", "--to", "cell-2"], "cluster"),
        (["admin", "cell", "cell-1"], "cluster"),
        (["admin", "revoke", "--user", "1"], "cluster"),
        (["admin", "keys", "list"], "cluster"),
        (["send", "--user", "1", "--to", "2", "hi"], "cluster"),
        (["threads", "--user", "1"], "cluster"),
        (["web"], "cluster"),
        (["imap"], "cluster"),
    ],
)
def test_every_command_naming_a_cluster_takes_cluster_dir(argv: list[str], dest: str) -> None:
    parser = build_parser()
    command = argv[: 2 if argv[0] in ("cluster", "admin") else 1]
    rest = argv[len(command) :]
    args = parser.parse_args([*command, "--cluster", "/tmp/some-cluster", *rest])
    assert getattr(args, dest) == Path("/tmp/some-cluster")
    if dest == "dir":  # the older spelling keeps working
        args = parser.parse_args([*command, "--dir", "/tmp/older", *rest])
        assert args.dir == Path("/tmp/older")
        assert parser.parse_args([*command, *rest]).dir == Path("pyserver-cluster")
