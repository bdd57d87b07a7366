"""Fresh HBase namespaces for tests, and dropping them once a test module is done.

Every test that needs an empty store gets a namespace of its own (its own
tables), named after this test run, so runs on one HBase never see each
other's data. `drop_made` drops exactly the tables handed out so far (never
another run's), in a background thread while the next tests run, since HBase
takes about half a second per table; `wait_for_drops` waits for those threads
(call it before the interpreter starts shutting down: the Thrift client needs
the default executor).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid

from pyserver.store.hbase import HBaseStore

RUN = uuid.uuid4().hex[:8]
_numbers = itertools.count(1)
_made: list[tuple[str, int, str]] = []
_droppers: list[threading.Thread] = []


def fresh_namespace(host: str, port: int, label: str = "") -> str:
    """A namespace no store has used, remembered for `drop_made`."""
    namespace = f"pytest{RUN}n{next(_numbers)}{label}"
    _made.append((host, port, namespace))
    return namespace


def drop_made() -> None:
    """Start dropping the tables of every namespace handed out so far."""
    made = list(_made)
    _made.clear()
    if made:
        dropper = threading.Thread(target=asyncio.run, args=(_drop(made),), name="drop-tables")
        dropper.start()
        _droppers.append(dropper)


async def _drop(made: list[tuple[str, int, str]]) -> None:
    limit = asyncio.Semaphore(4)  # namespaces at once (4 tables each)

    async def drop(host: str, port: int, namespace: str) -> None:
        async with limit:
            await HBaseStore(host, port, namespace=namespace, timeout_s=60).drop_tables()

    await asyncio.gather(*(drop(*entry) for entry in made), return_exceptions=True)


def wait_for_drops() -> None:
    while _droppers:
        _droppers.pop().join(timeout=300)
