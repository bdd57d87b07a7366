"""`pyserver cluster up|status|down`: a whole cluster of cells on one machine, for people and tests.

`up --cells C --nodes N` starts, each as its own process on loopback:

* the engines it needs, if they are not running (`scripts/engines up`):
  ZooKeeper, HBase with its Thrift gateway (`--engine hbase`, the default),
  memcached (when it can, for the dirty service);
* the tables: a global namespace (directory, social, addresses) and one per
  cell (`<prefix>_cell_1`, ...), or SQLite files with `--engine sqlite`;
* each cell's ZooKeeper record (state "enabled", its store), under a chroot of
  the cluster's own;
* two discovery instances, the user index service, the dirty service (with
  memcached), C x N app servers (`pyserver node`, knowing discovery, the user
  index and the dirty service), the MTA proxy, the web tier and the IMAP gateway
  (all routing through discovery), and with `--smsc` the SMS gateway the nodes
  text through;

prints where each listens and returns once all serve (each writes its
addresses to `ready/<name>.json` when it does). The folder (default
`./pyserver-cluster`) keeps the state (`cluster.json`: settings, every
process's role, cell, node, address, pid and log), the logs and the service
key; `up` on a folder whose cluster is down starts it again on the same data.
`status [--json]` says whether each process is alive; `down` stops them
gracefully (app servers drain), in the reverse order, and `down --purge` also
deletes the cluster's ZooKeeper tree, its HBase tables and the folder. The
engines are left running (`scripts/engines down` stops them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import subprocess  # nosec B404
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.cluster.state import (
    DEFAULT_FOLDER,
    STATE_FILE,
    NoCluster,
    add_cluster_folder_argument,
    read_state,
    set_cell_record,
    write_state,
)
from pyserver.cluster.zk import NoNode, ZooKeeper, digest_id
from pyserver.servicekey import load_or_create_service_key
from pyserver.tls import TierTls, make_dev_certificates

__all__ = ["add_parser", "cluster_down", "cluster_status", "cluster_up"]

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_DIR = DEFAULT_FOLDER
# the engines `scripts/engines up` starts (the same variables choose their ports)
ZOOKEEPER = f"127.0.0.1:{os.environ.get('PYSERVER_ZOOKEEPER_PORT', '2181')}"
THRIFT = f"127.0.0.1:{os.environ.get('PYSERVER_THRIFT_PORT', '9090')}"
THRIFT2 = f"127.0.0.1:{os.environ.get('PYSERVER_THRIFT2_PORT', '9092')}"
# A store setting's HBase address: the Thrift1 gateway, + the Thrift2 gateway's port (appends)
HBASE_GATEWAYS = f"{THRIFT}+{THRIFT2.rpartition(':')[2]}"
# which engine answers at which address (HBase at both of its gateways)
_ENGINE_ADDRESSES = (("zookeeper", ZOOKEEPER), ("hbase", THRIFT), ("hbase", THRIFT2))
MEMCACHED = tuple(
    f"127.0.0.1:{port}"
    for port in os.environ.get("PYSERVER_MEMCACHED_PORTS", "11211,11212").split(",")[:2]
)
# down: app servers first (they drain), the services they call last
_STOP_ORDER = ("web", "imap", "mta", "node", "sms", "discovery", "dirty", "userindex")


class LaunchError(Exception):
    """The cluster could not be started or stopped; the message says why."""


# ---- the state folder ----


def alive(pid: int) -> bool:
    """The process runs and is one of ours (a pyserver command), not a reused pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"pyserver" in cmdline and status.split(")")[-1].split()[0] != "Z"


# ---- engines ----


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _ensure_engines(engine: str, say: Any) -> bool:
    """Start what is missing; whether memcached runs (for the dirty service)."""
    wanted = ["zookeeper"] + (["hbase"] if engine == "hbase" else [])
    missing = list(
        dict.fromkeys(
            name
            for name, address in _ENGINE_ADDRESSES
            if name in wanted and not _listening(address)
        )
    )
    memcached = all(_listening(address) for address in MEMCACHED)
    if not memcached:
        missing.append("memcached")
    if missing:
        script = REPO / "scripts" / "engines"
        if not script.exists():
            raise LaunchError(f"{', '.join(missing)} not running, and no {script} to start them")
        say(f"starting engines: {' '.join(missing)} (scripts/engines up)")
        done = subprocess.run([sys.executable, str(script), "up", *missing], cwd=REPO)  # nosec B603
        if done.returncode != 0:
            required = [name for name in missing if name != "memcached"]
            if required and not all(_listening(a) for n, a in _ENGINE_ADDRESSES if n in required):
                raise LaunchError(f"scripts/engines up {' '.join(missing)} failed")
        memcached = all(_listening(address) for address in MEMCACHED)
    return memcached


async def _create_tables(namespaces: list[str]) -> None:
    from pyserver.store.hbase import HBaseStore, parse_thrift_address

    host, port = parse_thrift_address(THRIFT)
    for namespace in namespaces:
        await HBaseStore(host, port, namespace=namespace).create_tables()


async def _drop_tables(namespaces: list[str]) -> None:
    from pyserver.store.hbase import HBaseStore, parse_thrift_address

    host, port = parse_thrift_address(THRIFT)
    for namespace in namespaces:
        try:
            await HBaseStore(host, port, namespace=namespace).drop_tables()
        except Exception as error:  # purge is best effort
            print(f"pyserver: dropping {namespace}'s tables: {error}", file=sys.stderr)


async def _write_cells(
    zookeeper: str, chroot: str, stores: dict[str, str], acl: dict[str, Any] | None = None
) -> None:
    """The cells' records (and the chroot, with the cluster's ACLs when it has them)."""
    zk = ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=10.0, **_zookeeper_identity(acl))
    await zk.start(15.0)
    try:
        for cell, store in stores.items():
            await set_cell_record(zk, cell, store=store)
    finally:
        await zk.close()


def _zookeeper_identity(acl: dict[str, Any] | None) -> dict[str, Any]:
    """The cluster's own ZooKeeper identity (`--tls`), as ZooKeeper() takes it."""
    return {"auth": acl["auth"], "read_ids": acl["read_ids"]} if acl else {}


async def _remove_tree(zookeeper: str, chroot: str, acl: dict[str, Any] | None = None) -> None:
    zk = ZooKeeper(zookeeper, chroot="", session_timeout_s=10.0, **_zookeeper_identity(acl))
    await zk.start(10.0)

    async def remove(path: str) -> None:
        for child in await zk.get_children(path):
            await remove(f"{path}/{child}")
        with contextlib.suppress(NoNode):
            await zk.delete(path)

    try:
        if await zk.exists(chroot):
            await remove(chroot)
    finally:
        await zk.close()


# ---- processes ----


def _spawn(
    folder: Path,
    base_env: dict[str, str],
    name: str,
    role: str,
    args: list[str],
    env: dict[str, str],
    cwd: Path | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Start one process of the cluster with `base_env` (every process's settings, TLS)
    and its own `env`, in `cwd` (default this one's: `python -m` imports from there)."""
    log_path = folder / "logs" / f"{name}.log"
    ready_path = folder / "ready" / f"{name}.json"
    ready_path.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "pyserver.cli", *args, "--ready-file", str(ready_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or os.getcwd(),
            env={**os.environ, **base_env, **env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # outlives `cluster up`; not hit by the terminal's ^C
        )
    return {
        "name": name,
        "role": role,
        "cell": fields.get("cell"),
        "node": fields.get("node"),
        "address": None,
        "pid": process.pid,
        "log": str(log_path),
        # how to start it again (`cluster rollout`, `node add`): its command and settings
        "args": args,
        "env": {**base_env, **env},
        "_ready": ready_path,
        "_process": process,
    }


def _wait_ready(entries: list[dict[str, Any]], timeout_s: float) -> None:
    """Fill in each entry's address from its ready file; LaunchError if one exits or stays
    silent."""
    deadline = time.monotonic() + timeout_s
    waiting = list(entries)
    while waiting:
        for entry in list(waiting):
            ready = endpoints.read_file(entry["_ready"])
            if ready is not None:
                entry["address"] = ready["addr"]
                if isinstance(ready.get("http"), dict):  # its /metrics and /health
                    entry["metrics"] = f"{ready['http']['host']}:{ready['http']['port']}"
                waiting.remove(entry)
            elif entry["_process"].poll() is not None:
                lines = Path(entry["log"]).read_text(errors="replace").splitlines()
                tail = "\n".join(lines[-15:])
                raise LaunchError(f"{entry['name']} exited while starting:\n{tail}")
        if waiting and time.monotonic() > deadline:
            names = ", ".join(entry["name"] for entry in waiting)
            raise LaunchError(f"{names} did not start within {timeout_s:g} s (see their logs)")
        if waiting:
            time.sleep(0.1)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def cluster_up(
    folder: Path,
    cells: int,
    nodes: int,
    *,
    engine: str = "hbase",
    session_timeout_s: float = 10.0,
    timeout_s: float = 120.0,
    smsc: str = "",
    short_codes: str = "",
    tls: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    """Start the cluster (module docstring); its state, once every process serves."""
    if cells < 1 or nodes < 1:
        raise LaunchError("--cells and --nodes must be at least 1")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "ready").mkdir(exist_ok=True)
    previous: dict[str, Any] | None = None
    if (folder / STATE_FILE).exists():
        previous = read_state(folder)
        running = [p["name"] for p in previous.get("processes", []) if alive(p["pid"])]
        if running:
            raise LaunchError(f"the cluster in {folder} is up ({len(running)} processes alive)")
        if previous["engine"] != engine or len(previous["cells"]) != cells:
            raise LaunchError(f"{folder} holds another cluster's data: use another --cluster DIR")
    tag = previous["tag"] if previous else uuid.uuid4().hex[:8]
    prefix = f"pc{tag}"
    chroot = f"/pyserver-cluster-{tag}"
    cell_names = [f"cell-{i}" for i in range(1, cells + 1)]
    data = (folder / "data").resolve()
    data.mkdir(exist_ok=True)
    # with --tls: a throwaway CA for the cluster, every process with a certificate from it,
    # every listener TLS and every connection between the tiers mutual TLS
    base_env: dict[str, str] = {}
    tier_tls: TierTls | None = None
    if tls:
        tier_tls = make_dev_certificates((folder / "tls").resolve())
        say(f"TLS: a CA for this cluster in {folder / 'tls'} (mutual TLS between the tiers)")
        base_env = {
            "PYSERVER_TLS": "1",
            "PYSERVER_TLS_CERT_FILE": tier_tls.cert_file,
            "PYSERVER_TLS_KEY_FILE": tier_tls.key_file,
            "PYSERVER_TLS_CA_FILE": tier_tls.ca_file,
            "PYSERVER_TLS_MUTUAL": "1",
        }
    if engine == "hbase":
        directory_store = f"hbase:{HBASE_GATEWAYS}/{prefix}"
        stores = {
            cell: f"hbase:{HBASE_GATEWAYS}/{prefix}_{cell.replace('-', '_')}" for cell in cell_names
        }
    else:
        directory_store = f"sqlite:{data / 'store.sqlite3'}"
        stores = {cell: f"sqlite:{data / (cell + '.sqlite3')}" for cell in cell_names}
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)  # it logs each connection it ends
    memcached = _ensure_engines(engine, say)
    if engine == "hbase":
        say(f"creating tables {prefix}, {prefix}_cell_1..{cells} (if missing)")
        asyncio.run(
            _create_tables([spec.rsplit("/", 1)[1] for spec in [directory_store, *stores.values()]])
        )
    # with --tls, ACLs too: the cluster's processes sign in to ZooKeeper as its own
    # identity (discovery as a read-only one), and nothing else may read or change its tree
    acl: dict[str, Any] | None = None
    if tls:
        acl = previous.get("zookeeper_acl") if previous else None
        if acl is None:
            reader = f"reader:{secrets.token_hex(16)}"
            acl = {
                "auth": f"pyserver:{secrets.token_hex(16)}",
                "reader_auth": reader,
                "read_ids": [digest_id(reader)],
            }
        base_env["PYSERVER_ZOOKEEPER_AUTH"] = acl["auth"]
        base_env["PYSERVER_ZOOKEEPER_READ_IDS"] = ",".join(acl["read_ids"])
    asyncio.run(_write_cells(ZOOKEEPER, chroot, stores, acl))

    load_or_create_service_key(data)
    state: dict[str, Any] = {
        "tag": tag,
        "engine": engine,
        "zookeeper": ZOOKEEPER,
        "chroot": chroot,
        "directory_store": directory_store,
        "cells": stores,
        "data": str(data),
        "service_key_file": str(data / "service.key"),
        "tls": dataclasses.asdict(tier_tls) if tier_tls is not None else None,
        "zookeeper_acl": acl,
        "discovery": [],
        "processes": [],
    }
    started: list[dict[str, Any]] = []
    # discovery only reads the cells' tree: it signs in as the read-only identity
    reader_env = {"PYSERVER_ZOOKEEPER_AUTH": acl["reader_auth"]} if acl else {}
    common = ["--data", str(data)]
    metrics = ["--http-port", "0"]  # every service's /metrics (the app servers pass their own)
    zk_args = ["--zookeeper", ZOOKEEPER, "--chroot", chroot]
    try:
        # discovery, the user index and the dirty service first: the app servers call them
        services = [
            _spawn(folder, base_env, f"discovery-{i}", "discovery",
                   ["discovery", *common, *metrics, "--port", "0", *zk_args,
                    "--store", directory_store, "--instance", str(i)], reader_env)
            for i in (1, 2)
        ]  # fmt: skip
        services.append(
            _spawn(
                folder,
                base_env,
                "userindex",
                "userindex",
                ["userindex", *common, *metrics, "--port", "0"],
                {},
            )
        )
        dcs = f"east={MEMCACHED[0]},west={MEMCACHED[1]}"
        if memcached:
            dirty_args = ["dirty", *common, *metrics, "--port", "0", "--dc", dcs.split(",")[0]]
            services.append(
                _spawn(
                    folder,
                    base_env,
                    "dirty",
                    "dirty",
                    [*dirty_args, "--dc", dcs.split(",")[1]],
                    {},
                )
            )
        started += services
        _wait_ready(services, timeout_s)
        by_role = {entry["role"]: entry for entry in services}
        discovery = ",".join(e["address"] for e in services if e["role"] == "discovery")
        state["discovery"] = discovery.split(",")
        env = {
            "PYSERVER_USERINDEX_ADDR": by_role["userindex"]["address"],
            # one blob store for the cluster, where the MTA proxy writes: the global one
            "PYSERVER_BLOB_STORE": directory_store,
        }
        if memcached:
            env |= {
                "PYSERVER_DIRTY_ADDR": by_role["dirty"]["address"],
                "PYSERVER_MEMCACHED_DCS": dcs,
            }
        if smsc:  # the SMS gateway: texts in through discovery, the nodes' texts out
            sms = _spawn(
                folder, base_env, "sms", "sms",
                ["sms", *common, *metrics, "--port", "0", "--discovery", discovery, "--smsc", smsc,
                 "--short-codes", short_codes],
                {"PYSERVER_STORE": directory_store},
            )  # fmt: skip
            started.append(sms)
            _wait_ready([sms], timeout_s)
            env["PYSERVER_SMS_GATEWAY_ADDR"] = sms["address"]
        app_servers = []
        for cell in cell_names:
            for n in range(1, nodes + 1):
                node_id = f"{cell}-n{n}"
                args = ["node", *common, "--cell", cell, "--node-id", node_id, "--port", "0",
                        "--http-port", "0", *zk_args, "--store", stores[cell],
                        "--discovery", discovery,
                        "--session-timeout", str(session_timeout_s)]  # fmt: skip
                app_servers.append(
                    _spawn(folder, base_env, node_id, "node", args, env, cell=cell, node=node_id)
                )
        started += app_servers
        _wait_ready(app_servers, timeout_s)
        mta = _spawn(
            folder, base_env, "mta", "mta",
            ["mta", *common, *metrics, "--smtp-port", "0", "--discovery", discovery],
            {"PYSERVER_STORE": directory_store},
        )  # fmt: skip
        started.append(mta)
        # the web tier: the inbox and web chat, every user's owner found through discovery
        web_env = {"PYSERVER_BLOB_STORE": directory_store, "PYSERVER_STORE": directory_store}
        # its operators' page (/ops) surveys this cluster (docs/operations.md)
        web_env["PYSERVER_OPS_CLUSTER"] = str(folder.resolve())
        if memcached:
            web_env["PYSERVER_MEMCACHED_DCS"] = dcs
        web = _spawn(
            folder, base_env, "web", "web",
            ["web", *common, *metrics, "--port", "0", "--discovery", discovery], web_env,
        )  # fmt: skip
        started.append(web)
        # the IMAP gateway: mail clients, every user's owner found through discovery
        imap = _spawn(
            folder, base_env, "imap", "imap",
            ["imap", *common, *metrics, "--port", "0", "--discovery", discovery],
            {"PYSERVER_STORE": directory_store},
        )  # fmt: skip
        started.append(imap)
        _wait_ready([mta, web, imap], timeout_s)
    except BaseException:
        state["processes"] = [_public(entry) for entry in started]
        write_state(folder, state)
        _stop(started, grace_s=10.0)
        raise
    state["processes"] = [_public(entry) for entry in started]
    write_state(folder, state)
    return state


def cluster_status(folder: Path) -> dict[str, Any]:
    """Each process: role, cell, node, address, pid, alive."""
    state = read_state(folder)
    processes = [
        {
            "name": p["name"],
            "role": p["role"],
            "cell": p["cell"],
            "node": p["node"],
            "address": p["address"],
            "metrics": p.get("metrics"),
            "pid": p["pid"],
            "alive": alive(p["pid"]),
        }
        for p in state["processes"]
    ]
    return {
        "dir": str(folder),
        "engine": state["engine"],
        "zookeeper": state["zookeeper"],
        "chroot": state["chroot"],
        "discovery": state["discovery"],
        "cells": state["cells"],
        "processes": processes,
        "up": bool(processes) and all(p["alive"] for p in processes),
    }


def _stop(entries: list[dict[str, Any]], grace_s: float) -> list[str]:
    """SIGTERM each role in `_STOP_ORDER`, wait, SIGKILL what remains; the names killed."""
    killed = []
    for role in _STOP_ORDER:
        group = [e for e in entries if e["role"] == role and alive(e["pid"])]
        for entry in group:
            os.kill(entry["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for entry in group:
            while alive(entry["pid"]) and time.monotonic() < deadline:
                _reap(entry)
                time.sleep(0.05)
            if alive(entry["pid"]):
                os.kill(entry["pid"], signal.SIGKILL)
                killed.append(entry["name"])
            _reap(entry)
    return killed


def _reap(entry: dict[str, Any]) -> None:
    process = entry.get("_process")
    if process is not None:
        process.poll()
    else:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(entry["pid"], os.WNOHANG)


def cluster_down(folder: Path, *, purge: bool = False, grace_s: float = 30.0) -> list[str]:
    """Stop every process (and with `purge` delete the cluster's data); the names killed."""
    state = read_state(folder)
    killed = _stop(state["processes"], grace_s)
    if purge:
        asyncio.run(_remove_tree(state["zookeeper"], state["chroot"], state.get("zookeeper_acl")))
        if state["engine"] == "hbase":
            specs = [state["directory_store"], *state["cells"].values()]
            asyncio.run(_drop_tables([spec.rsplit("/", 1)[1] for spec in specs]))
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return killed


# ---- the command line ----


def _print_status(report: dict[str, Any]) -> None:
    print(f"cluster {report['dir']}: {report['engine']}, ZooKeeper {report['zookeeper']}"
          f"{report['chroot']}")  # fmt: skip
    for p in report["processes"]:
        where = f"{p['cell'] or '':<8} {p['node'] or '':<10}"
        state = "alive" if p["alive"] else "DOWN"
        print(f"  {p['role']:<10} {where} {p['address'] or '-':<22} pid {p['pid']:<8} {state}")


def _up(args: argparse.Namespace) -> int:
    try:
        cluster_up(
            args.dir, args.cells, args.nodes, engine=args.engine,
            session_timeout_s=args.session_timeout, timeout_s=args.timeout,
            smsc=args.smsc or "", short_codes=args.short_codes or "", tls=args.tls,
        )  # fmt: skip
    except (LaunchError, NoCluster) as error:
        print(f"pyserver cluster: {error}", file=sys.stderr)
        return 1
    _print_status(cluster_status(args.dir))
    print(f"use it: pyserver send --cluster {args.dir} --user 1 --to 2 hello")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        report = cluster_status(args.dir)
    except (LaunchError, NoCluster) as error:
        print(f"pyserver cluster: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        _print_status(report)
    return 0 if report["up"] else 3


def _down(args: argparse.Namespace) -> int:
    try:
        killed = cluster_down(args.dir, purge=args.purge, grace_s=args.grace)
    except (LaunchError, NoCluster) as error:
        print(f"pyserver cluster: {error}", file=sys.stderr)
        return 1
    if killed:
        print(f"killed after {args.grace:g} s: {', '.join(killed)}")
    print(f"cluster {args.dir} is down" + (" and purged" if args.purge else ""))
    return 0


def add_parser(commands: Any, *more: Any) -> argparse.ArgumentParser:
    """Add `cluster up|status|down` to the `pyserver` command line, and the actions each
    of `more` adds (`more(action)`, `action(name, help)` making a sub-command)."""
    cluster = commands.add_parser("cluster", help="run cells of app servers on this machine")
    actions = cluster.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        add_cluster_folder_argument(sub, dest="dir", default=DEFAULT_DIR)
        return sub

    up = action("up", "start engines, discovery, services and C x N app servers")
    up.add_argument("--cells", type=int, default=2, help="cells (default 2)")
    up.add_argument("--nodes", type=int, default=3, help="app servers per cell (default 3)")
    up.add_argument("--engine", choices=("hbase", "sqlite"), default="hbase", help="the stores")
    up.add_argument("--session-timeout", type=float, default=10.0, help="ZooKeeper, seconds")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds for all to start")
    up.add_argument("--smsc", help="SMSCs for an SMS gateway (pyserver sms), host:port,...")
    up.add_argument("--short-codes", help="the SMS short codes and their owners, CODE=USER,...")
    up.add_argument(
        "--tls", action="store_true", help="TLS on every listener, mutual TLS between the tiers"
    )
    up.set_defaults(handler=_up)
    status = action("status", "each process: role, cell, node, address, pid, alive")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_status)
    down = action("down", "stop every process gracefully (the engines stay up)")
    down.add_argument("--purge", action="store_true", help="also delete the cluster's data")
    down.add_argument("--grace", type=float, default=30.0, help="seconds before SIGKILL")
    down.set_defaults(handler=_down)
    for add_actions in more:  # `rollout` (pyserver.processes.rollout), which uses this module
        add_actions(action)
    return cluster
