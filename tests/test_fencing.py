"""Stale owners fenced by the store: an owner paused exactly between its ownership check and
its append (the one write its lease still lets through) writes nothing once another server
has claimed the user, even when that server has not written the user since.

The owner's store is the real store (SQLite, and HBase through the shared gateway in a
namespace of its own) behind a proxy that holds one append at a gate: the pause. The store
contract of `claim` and `owner_epoch` is in tests/test_store.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops

from pyserver.app.mailbox import Mailbox
from pyserver.errors import PyserverError
from pyserver.store.base import LogAppend, Store
from pyserver.store.hbase import HBaseStore
from pyserver.store.sqlite import SQLiteStore
from pyserver.wire.ops import Op


class PausedAppend:
    """A store whose next append, once `armed`, waits at `gate` (after the owner checked
    its ownership and decided the write); everything else passes through."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.armed = False
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append(self, write: LogAppend) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await self.gate.wait()
        await self._store.append(write)


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables() -> Iterator[None]:
    yield
    drop_made()
    wait_for_drops()


@pytest.fixture(params=["sqlite", "hbase", "hbase-thrift2"])
def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two store objects on the same data: one per app server."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[tuple[Store, Store]]:
        if request.param == "sqlite":
            stores: list[Store] = [SQLiteStore(tmp_path / "cell.sqlite") for _ in range(2)]
        else:
            host, port = request.getfixturevalue("hbase_thrift")
            namespace = fresh_namespace(host, port, "fencing")
            commit_port = None
            if request.param == "hbase-thrift2":  # appends by multi-cell compare-and-set
                commit_port = request.getfixturevalue("hbase_thrift2")[1]
            stores = [
                HBaseStore(host, port, namespace=namespace, commit_port=commit_port)
                for _ in range(2)
            ]
        for store in stores:
            await store.open()
        try:
            yield stores[0], stores[1]
        finally:
            for store in stores:
                await store.close()

    return opened


async def deliver(mailbox: Mailbox, user: int, text: str) -> dict[str, Any]:
    payload = {"user": user, "sender": 99, "text": text, "channel": "chat"}
    return await mailbox.execute(Op.DELIVER, payload)


async def mails(mailbox: Mailbox, user: int) -> int:
    """How many messages the user has (from a stranger: in the "other" folder)."""
    reply = await mailbox.execute(
        Op.FOLDER_MESSAGES, {"user": user, "folder": "other", "after_uid": 0, "limit": 100}
    )
    return len(reply["messages"])


def test_an_owner_paused_between_its_check_and_its_append_writes_nothing(
    two_stores: Any,
) -> None:
    async def scenario() -> None:
        async with two_stores() as (old_store, new_store):
            paused = PausedAppend(old_store)
            old_owns = True
            old = Mailbox(paused, owns=lambda user: old_owns)  # type: ignore[arg-type]
            await deliver(old, 7, "before")
            last = await old_store.last_seq(7)
            # the old owner checks its ownership, decides the write, and stops right
            # before the store's compare-and-set
            paused.armed = True
            stale = asyncio.create_task(deliver(old, 7, "stale"))
            await asyncio.wait_for(paused.reached.wait(), 30)
            # meanwhile its lease ran out; the new owner loads the user (a read: it
            # writes nothing, so the log's last seq is still the one the old owner saw)
            old_owns = False
            new = Mailbox(new_store)
            assert await mails(new, 7) == 1
            assert await new_store.last_seq(7) == last
            paused.gate.set()  # the old owner wakes up and appends
            with pytest.raises(PyserverError):
                await asyncio.wait_for(stale, 30)
            assert await new_store.last_seq(7) == last  # nothing of the stale owner
            await deliver(new, 7, "after")  # the new owner writes on
            assert await mails(new, 7) == 2
            await old.close()
            await new.close()

    asyncio.run(scenario())
