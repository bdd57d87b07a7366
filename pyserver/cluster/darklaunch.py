"""Dark launch: an app server mirrors some users' requests to a shadow cell and compares.

The setting lives in the cell's ZooKeeper record (`/cells/<cell>`, field
`darklaunch`: `{"shadow": CELL, "fraction": F}`; `pyserver darklaunch`
sets and clears it). Each node of the cell reads it every `POLL_S`, so turning
it on, changing it or off needs no restart. While it is on:

* a user is mirrored when a hash of its id falls under `fraction` (the same
  users every time, so the shadow sees all of their writes and its reads are
  comparable);
* of those users' requests, the writes `MIRRORED_WRITES` (SEND and DELIVER with
  their idempotency keys, MARK_READ/UNREAD/SEEN, MOVE, DELETE) that succeeded live
  are sent again to the shadow cell's owner of the user, which writes them to the
  shadow's own store (a keyed SEND's message id and every thread id are derived
  from the request, so the shadow's ids are the live ones and the marks, moves and
  deletes find their messages); the reads `COMPARED_READS` (COUNTS, LIST_THREADS,
  GET_THREAD) are sent too and the shadow's reply is compared with the live one,
  less the times each store stamps itself (`comparable`): equal, or a mismatch
  (counted, and logged with the op, the user and both replies). A SEND without a
  key gets a random id on each side, so its thread reads differ;
* the live request never waits for any of it: the request, its payload and its
  live reply go on a bounded queue (`QUEUE_SIZE`) that one task empties in order;
  when the queue is full the mirror is dropped and counted. A shadow that fails
  or is slow costs the live request nothing.

A mirrored user's reads are not put in the node's reply table (the native cache
of identical reads), so each of them reaches the dispatcher and is mirrored.
Figures: `pyserver_darklaunch_total{outcome}` (mirrored, dropped, match,
mismatch, error) in the node's /metrics, its /health's `darklaunch`, and
`figures()`.

Imports the cluster's state, ZooKeeper layout, ring and router; nothing above them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from pyserver.cluster import layout
from pyserver.cluster.ringwatch import RingWatch
from pyserver.cluster.routing import OwnerRouter
from pyserver.cluster.state import (
    add_cluster_arguments,
    cell_record,
    cluster_settings,
    set_cell_record,
)
from pyserver.cluster.zk import NoNode, ZooKeeper
from pyserver.errors import NotFound
from pyserver.servicekey import ServiceKeys
from pyserver.servicelink import ServiceLinks
from pyserver.wire.ops import Op

__all__ = [
    "COMPARED_READS",
    "MIRRORED_WRITES",
    "DarkLaunch",
    "Setting",
    "add_parser",
    "comparable",
    "parse_setting",
]

log = logging.getLogger("pyserver.darklaunch")

MIRRORED_WRITES = frozenset(
    {Op.SEND, Op.DELIVER, Op.MARK_READ, Op.MARK_UNREAD, Op.MARK_SEEN, Op.MOVE, Op.DELETE}
)
COMPARED_READS = frozenset({Op.COUNTS, Op.LIST_THREADS, Op.GET_THREAD})
# what each store stamps for itself (times, and the cursors made of them): not compared
_OWN_STAMPS = frozenset({"ts", "last_ts", "next"})
QUEUE_SIZE = 1000
POLL_S = 1.0
SHADOW_TIMEOUT_S = 5.0
OUTCOMES = ("mirrored", "dropped", "match", "mismatch", "error")


@dataclass(frozen=True, slots=True)
class Setting:
    """Mirror `fraction` (0..1) of the users to cell `shadow`."""

    shadow: str
    fraction: float

    def chooses(self, user: int) -> bool:
        # a multiplicative hash spreads consecutive ids; the same users every time
        return ((user * 2654435761) % 4294967296) / 4294967296 < self.fraction


def parse_setting(value: Any) -> Setting | None:
    """The cell record's `darklaunch` field as a Setting; None when off or malformed."""
    if not isinstance(value, dict):
        return None
    shadow, fraction = value.get("shadow"), value.get("fraction")
    if not isinstance(shadow, str) or not shadow or isinstance(fraction, bool):
        return None
    if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        return None
    return Setting(shadow, float(fraction))


def comparable(op: Op, reply: Any) -> Any:
    """A read's reply as live and shadow must agree on it: without the times each store
    stamps for itself (a message's `ts`, a thread's `last_ts`, the `next` cursors), and a
    thread list in thread id order (threads written in the same instant may list either
    way)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _OWN_STAMPS}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    stripped = strip(reply)
    if op is Op.LIST_THREADS and isinstance(stripped, dict):
        threads = stripped.get("threads")
        if isinstance(threads, list):
            stripped["threads"] = sorted(threads, key=lambda t: str(t.get("thread_id", "")))
    return stripped


def _user_of(op: Op, payload: dict[str, Any]) -> int | None:
    user = payload.get("sender" if op is Op.SEND else "user")
    return user if isinstance(user, int) and not isinstance(user, bool) else None


class _Shadow:
    """The shadow cell's ring (on the node's own ZooKeeper session) and a router to it."""

    def __init__(
        self, zk: ZooKeeper, cell: str, keys: ServiceKeys, tls: ssl.SSLContext | None
    ) -> None:
        self.cell = cell
        self.ring = RingWatch(zk, cell)
        links = ServiceLinks(
            keys, name="shadow app server", connect_timeout_s=1.0,
            request_timeout_s=SHADOW_TIMEOUT_S, retry_connect_after_s=0, tls=tls,
        )  # fmt: skip
        self.router = OwnerRouter(
            lambda user: self.ring.view.owner_address(user), pool=links,
            timeout_s=SHADOW_TIMEOUT_S,
        )  # fmt: skip

    async def close(self) -> None:
        await self.router.close()
        await self.ring.close()


class DarkLaunch:
    """One node's mirror (module docstring): `wants` and `offer` from the dispatcher."""

    def __init__(
        self,
        zk: ZooKeeper,
        cell: str,
        keys: ServiceKeys,
        registry: CollectorRegistry | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        queue_size: int = QUEUE_SIZE,
        poll_s: float = POLL_S,
    ) -> None:
        self._zk = zk
        self._cell = cell
        self._keys = keys
        self._tls = tls
        self._poll_s = poll_s
        self.setting: Setting | None = None
        self._queue: asyncio.Queue[tuple[Op, dict[str, Any], dict[str, Any]]] = asyncio.Queue(
            queue_size
        )
        self._shadow: _Shadow | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._metric = PromCounter(
            "pyserver_darklaunch", "Dark launch: requests mirrored to the shadow cell, by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip

    # ---- the live path: never waits ----

    def wants(self, op: Op, payload: dict[str, Any]) -> bool:
        setting = self.setting
        if setting is None or (op not in MIRRORED_WRITES and op not in COMPARED_READS):
            return False
        user = _user_of(op, payload)
        return user is not None and setting.chooses(user)

    def offer(self, op: Op, payload: dict[str, Any], reply: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((op, payload, reply))
        except asyncio.QueueFull:
            self._count("dropped")

    # ---- the background ----

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._mirror())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._shadow is not None:
            await self._shadow.close()
            self._shadow = None

    def figures(self) -> dict[str, Any]:
        setting = self.setting
        return {
            "shadow": setting.shadow if setting else None,
            "fraction": setting.fraction if setting else 0.0,
            "queued": self._queue.qsize(),
            **self._counts,
        }

    def _count(self, outcome: str) -> None:
        self._counts[outcome] += 1
        self._metric.labels(outcome).inc()

    async def _watch(self) -> None:
        """Read the cell record's setting every poll; adopt it (and its shadow's ring)."""
        while True:
            try:
                data, _ = await self._zk.get(layout.cell_path(self._cell))
                record = orjson.loads(data) if data else {}
                setting = parse_setting(
                    record.get("darklaunch") if isinstance(record, dict) else None
                )
            except NoNode:
                setting = None
            except Exception as error:  # ZooKeeper away: keep what we had
                log.debug("dark launch setting unreadable: %s", error)
                setting = self.setting
            if setting != self.setting:
                log.info("dark launch of cell %s: %s", self._cell, setting or "off")
                await self._adopt(setting)
            await asyncio.sleep(self._poll_s)

    async def _adopt(self, setting: Setting | None) -> None:
        if self._shadow is not None and (setting is None or setting.shadow != self._shadow.cell):
            await self._shadow.close()
            self._shadow = None
        if setting is not None and self._shadow is None:
            shadow = _Shadow(self._zk, setting.shadow, self._keys, self._tls)
            try:
                await shadow.ring.start(10.0)
            except Exception as error:
                log.warning("dark launch: shadow cell %s unreachable: %s", setting.shadow, error)
                await shadow.close()
                return  # tried again at the next poll
            self._shadow = shadow
        self.setting = setting

    async def _mirror(self) -> None:
        while True:
            op, payload, live = await self._queue.get()
            shadow = self._shadow
            if shadow is None:
                continue
            user = _user_of(op, payload)
            assert user is not None  # checked in wants()
            try:
                reply = await shadow.router.request(user, op, payload, SHADOW_TIMEOUT_S)
            except Exception as error:
                self._count("error")
                log.info(
                    "dark launch: %s of user %d failed on the shadow: %s", op.name, user, error
                )
                continue
            self._count("mirrored")
            if op in COMPARED_READS:
                if comparable(op, reply) == comparable(op, live):
                    self._count("match")
                else:
                    self._count("mismatch")
                    log.warning(
                        "dark launch mismatch: %s of user %d: live %s, shadow %s",
                        op.name, user, orjson.dumps(live).decode(), orjson.dumps(reply).decode(),
                    )  # fmt: skip


# ---- the command line: `pyserver darklaunch` ----


def _darklaunch_command(args: argparse.Namespace) -> int:
    settings = cluster_settings(args)
    if args.off == (args.shadow is not None):
        print("pyserver darklaunch: give --shadow CELL (and --fraction) or --off", file=sys.stderr)
        return 1
    value: dict[str, Any] | None = None
    if not args.off:
        value = {"shadow": args.shadow, "fraction": args.fraction}
        if parse_setting(value) is None:
            print("pyserver darklaunch: --fraction must be over 0 and at most 1", file=sys.stderr)
            return 1
        if args.shadow == settings.cell:
            print("pyserver darklaunch: a cell cannot shadow itself", file=sys.stderr)
            return 1
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)

    async def run() -> int:
        zk = settings.session(session_timeout_s=10.0, call_timeout_s=5.0)
        await zk.start(10.0)
        try:
            for cell in {settings.cell, *([args.shadow] if args.shadow else [])}:
                await cell_record(zk, cell)  # NotFound: a typo must not create a cell
            await set_cell_record(zk, settings.cell, darklaunch=value)
        finally:
            await zk.close()
        return 0

    try:
        asyncio.run(run())
    except NotFound as error:
        print(f"pyserver darklaunch: {error}", file=sys.stderr)
        return 1
    if value is None:
        print(f"dark launch of cell {settings.cell}: off (its nodes stop within {POLL_S:g} s)")
    else:
        print(f"dark launch of cell {settings.cell}: {args.fraction:g} of its users mirrored to "
              f"cell {args.shadow} (its nodes start within {POLL_S:g} s)")  # fmt: skip
    return 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `darklaunch` to the `pyserver` command line."""
    command = commands.add_parser(
        "darklaunch", help="mirror a cell's users' requests to a shadow cell, or stop"
    )
    add_cluster_arguments(command, cell=True)
    command.add_argument("--shadow", help="the shadow cell (its own store) to mirror to")
    command.add_argument(
        "--fraction", type=float, default=0.01, help="share of the users mirrored (default 0.01)"
    )
    command.add_argument("--off", action="store_true", help="stop mirroring")
    command.set_defaults(handler=_darklaunch_command)
    return command
