"""The chaos soak's cluster: private engines and every pyserver process, each one killable.

`SoakCluster(folder, cells, nodes, store)` starts, on loopback:

* a ZooKeeper, two memcached and (`store="hbase"`) an HBase with its Thrift
  gateway, all of its own (`scripts/engines` with a private folder and free
  ports: the shared engines are never stopped), so the faults can stop and
  start them; or (`store="sqlite"`) SQLite files;
* two discovery instances, the user index, the dirty service, `cells` x `nodes`
  app servers (`pyserver node`) and the MTA proxy, each a `Proc` that can be
  killed (-9), started again with the same arguments (discovery and the MTA on
  the same port, so their clients find them again), stopped (SIGSTOP) and
  continued.

It owns nothing of the load or the faults' schedule (`bench.chaos`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.cluster.zk import NoNode, ZooKeeper
from pyserver.discovery.move import set_cell_record
from pyserver.servicekey import load_or_create_service_key

__all__ = ["Proc", "SoakCluster"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# the private HBase JVM's heap (the shared one has 2g; a soak's tables are small)
HBASE_HEAP = os.environ.get("PYSERVER_CHAOS_HBASE_HEAP", "768m")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}


class Proc:
    """One pyserver process of the soak; `start()` (again after a kill) with the same
    arguments."""

    def __init__(
        self, folder: Path, name: str, args: list[str], env: dict[str, str], **fields: Any
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.cell: str | None = fields.get("cell")
        self.log_path = folder / "logs" / f"{name}.log"
        self.ready_path = folder / "ready" / f"{name}.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.stopped = False
        self.starts = 0

    def start(self) -> None:
        self.ready_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pyserver.cli", *self.args,
                 "--ready-file", str(self.ready_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**_env(), **self.env, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.starts += 1
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while (ready := endpoints.read_file(self.ready_path)) is None:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited while starting: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not serve within {timeout_s:g} s")
            time.sleep(0.05)
        self.addr = str(ready["addr"])
        return self.addr

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.process is not None and self.process.poll() is None:
            if self.stopped:
                self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=30)
        self.stopped = False

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.stopped = False


class SoakCluster:
    """The soak's engines and processes (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        cells: int = 2,
        nodes: int = 3,
        store: str = "hbase",
        session_timeout_s: float = 4.0,
    ) -> None:
        if store not in ("hbase", "sqlite"):
            raise ValueError("store is hbase or sqlite")
        self.folder = folder
        self.tag = uuid.uuid4().hex[:8]
        self.session_timeout_s = session_timeout_s
        self.store_kind = store
        for sub in ("logs", "ready", "data", "engines"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.data = (folder / "data").resolve()
        self.key = load_or_create_service_key(self.data)
        self.zk_port = free_port()
        self.memcached_ports = (free_port(), free_port())
        self.zookeeper = f"127.0.0.1:{self.zk_port}"
        self.chroot = f"/pyserver-chaos-{self.tag}"
        self.cell_names = [f"cell-{i}" for i in range(1, cells + 1)]
        self.node_count = nodes
        # the private HBase: its embedded ZooKeeper, master, region server, Thrift gateways
        self.hbase_ports = {
            name: free_port()
            for name in ("ZOOKEEPER", "MASTER", "REGIONSERVER", "THRIFT", "THRIFT2")
        }
        self.thrift = f"127.0.0.1:{self.hbase_ports['THRIFT']}"
        if store == "hbase":
            prefix = f"ch{self.tag}"
            gateway = f"{self.thrift}+{self.hbase_ports['THRIFT2']}"  # appends via Thrift2
            self.directory_store = f"hbase:{gateway}/{prefix}"
            self.stores = {
                cell: f"hbase:{gateway}/{prefix}_{cell.replace('-', '_')}"
                for cell in self.cell_names
            }
        else:
            self.directory_store = f"sqlite:{self.data / 'store.sqlite3'}"
            self.stores = {
                cell: f"sqlite:{self.data / (cell + '.sqlite3')}" for cell in self.cell_names
            }
        self.discovery: list[Proc] = []
        self.nodes: list[Proc] = []
        self.services: dict[str, Proc] = {}
        self.mta: Proc | None = None
        self.discovery_ports = [free_port(), free_port()]
        self.smtp_port = free_port()

    # ---- engines (private) ----

    def engines(self, action: str, *names: str) -> None:
        """`scripts/engines ACTION NAMES` on this soak's own engines folder and ports."""
        env = {
            **_env(),
            "PYSERVER_ENGINES_DIR": str(self.folder / "engines"),
            "PYSERVER_ZOOKEEPER_PORT": str(self.zk_port),
            "PYSERVER_MEMCACHED_PORTS": ",".join(map(str, self.memcached_ports)),
            "PYSERVER_HBASE_ZOOKEEPER_PORT": str(self.hbase_ports["ZOOKEEPER"]),
            "PYSERVER_HBASE_MASTER_PORT": str(self.hbase_ports["MASTER"]),
            "PYSERVER_HBASE_REGIONSERVER_PORT": str(self.hbase_ports["REGIONSERVER"]),
            "PYSERVER_THRIFT_PORT": str(self.hbase_ports["THRIFT"]),
            "PYSERVER_THRIFT2_PORT": str(self.hbase_ports["THRIFT2"]),
            "PYSERVER_HBASE_HEAP": HBASE_HEAP,
        }
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "engines"), action, *names],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"scripts/engines {action} {' '.join(names)}: {done.stderr[-800:]}")

    @property
    def memcached_names(self) -> list[str]:
        return [f"memcached-{port}" for port in self.memcached_ports]

    def kill_engine(self, name: str) -> None:
        """kill -9 of one of this soak's engines (`hbase-master`, `zookeeper`,
        `memcached-PORT`...), by the pid file `scripts/engines` wrote in the soak's own
        folder; `engines("up", ...)` starts it again."""
        pid_file = self.folder / "engines" / name.split("-")[0] / f"{name}.pid"
        try:
            pid = int(json.loads(pid_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session: the group is its pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)

    # ---- life ----

    def start(self) -> None:
        # all at once: HBase's start (~15 s) is the longest
        began = time.monotonic()
        self.engines("up", "zookeeper", "memcached", *(["hbase"] if self.hbase else []))
        log.info("chaos: engines up in %.1f s", time.monotonic() - began)
        if self.hbase:
            asyncio.run(self._create_tables())
            log.info("chaos: tables created at %.1f s", time.monotonic() - began)
        asyncio.run(self._write_cells())
        common = ["--data", str(self.data)]
        zk_args = ["--zookeeper", self.zookeeper, "--chroot", self.chroot]
        for i, port in enumerate(self.discovery_ports, 1):
            self.discovery.append(
                Proc(self.folder, f"discovery-{i}",
                     ["discovery", *common, "--port", str(port), *zk_args,
                      "--store", self.directory_store, "--instance", str(i)], {})
            )  # fmt: skip
        east, west = (f"127.0.0.1:{port}" for port in self.memcached_ports)
        # ports chosen here, so that every process starts at once (they find each other
        # when they serve)
        userindex, dirty = free_port(), free_port()
        self.services["userindex"] = Proc(
            self.folder, "userindex", ["userindex", *common, "--port", str(userindex)], {}
        )
        self.services["dirty"] = Proc(
            self.folder, "dirty",
            ["dirty", *common, "--port", str(dirty), "--dc", f"east={east}", "--dc",
             f"west={west}"], {},
        )  # fmt: skip
        discovery = self.discovery_addresses
        env = {
            "PYSERVER_USERINDEX_ADDR": f"127.0.0.1:{userindex}",
            "PYSERVER_BLOB_STORE": self.directory_store,
            "PYSERVER_DIRTY_ADDR": f"127.0.0.1:{dirty}",
            "PYSERVER_MEMCACHED_DCS": f"east={east},west={west}",
        }
        for cell in self.cell_names:
            for n in range(1, self.node_count + 1):
                node_id = f"{cell}-n{n}"
                args = ["node", *common, "--cell", cell, "--node-id", node_id, "--port", "0",
                        "--http-port", "0", *zk_args, "--store", self.stores[cell],
                        "--discovery", discovery,
                        "--session-timeout", str(self.session_timeout_s)]  # fmt: skip
                self.nodes.append(Proc(self.folder, node_id, args, env, cell=cell))
        self.mta = Proc(
            self.folder, "mta",
            ["mta", *common, "--smtp-port", str(self.smtp_port), "--discovery", discovery],
            {"PYSERVER_STORE": self.directory_store},
        )  # fmt: skip
        for proc in self.processes():
            proc.start()
        for proc in self.processes():
            proc.wait_ready()
        log.info("chaos: every process serves at %.1f s", time.monotonic() - began)

    @property
    def discovery_addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.discovery_ports)

    def processes(self) -> list[Proc]:
        return [
            *self.discovery,
            *self.services.values(),
            *self.nodes,
            *([self.mta] if self.mta else []),
        ]

    @property
    def hbase(self) -> bool:
        return self.store_kind == "hbase"

    def close(self) -> None:
        """Everything stopped at once (the soak's data are thrown away or kept for a
        post-mortem, never reused: no polite HBase shutdown)."""
        for proc in self.processes():
            with contextlib.suppress(Exception):
                proc.kill()
        hbase = ["hbase-thrift", "hbase-thrift2", "hbase-master"] if self.hbase else []
        for name in [*hbase, "zookeeper", *self.memcached_names]:
            with contextlib.suppress(Exception):
                self.kill_engine(name)

    # ---- stores and ZooKeeper records ----

    def namespaces(self) -> list[str]:
        return [spec.rsplit("/", 1)[1] for spec in [self.directory_store, *self.stores.values()]]

    async def _create_tables(self) -> None:
        from pyserver.store.hbase import HBaseStore, parse_thrift_address

        host, port = parse_thrift_address(self.thrift)
        await asyncio.gather(
            *(HBaseStore(host, port, namespace=ns).create_tables() for ns in self.namespaces())
        )

    async def _write_cells(self) -> None:
        zk = ZooKeeper(self.zookeeper, chroot=self.chroot, session_timeout_s=10.0)
        await zk.start(15.0)
        try:
            for cell, store in self.stores.items():
                await set_cell_record(zk, cell, store=store)
        finally:
            await zk.close()

    async def session(self) -> ZooKeeper:
        """A ZooKeeper session of the soak's own (moves, the ring's view of a node)."""
        zk = ZooKeeper(self.zookeeper, chroot=self.chroot, session_timeout_s=10.0)
        await zk.start(15.0)
        return zk


async def node_registered(zk: ZooKeeper, cell: str, node_id: str) -> bool:
    from pyserver.cluster import layout

    try:
        return await zk.exists(layout.node_path(cell, node_id))
    except NoNode:
        return False
