"""Connections to an HBase Thrift gateway: a pool where a connection serves one task at a time.

Each connection is a `pyserver.store.hbase_thrift.ThriftClient` (thriftpy2's
compiled binary protocol over the gateway's buffered transport), lent by these rules:

* a connection is lent to one task until that task gives it back;
* a call that failed, timed out or was cancelled may have left a request half
  sent or a reply half read, so its connection is closed, not reused; the
  pool reopens it lazily for the next borrower;
* a transport failure (the gateway restarted, say) retires every connection
  opened before it, and an idle connection whose socket the gateway closed is
  reopened before it is lent, so service resumes by itself after a restart;
* waiting for a connection is cancellation-safe (no connection is ever lost).

Deadlines belong to the caller (`asyncio.timeout` around the borrow); the
socket timeout given here is only a backstop.

May import: pyserver.store.hbase_thrift, thriftpy2.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from thriftpy2.transport import TTransportException

from pyserver.store.hbase_thrift import THRIFT1, ThriftClient, connect

__all__ = ["PooledConnection", "ThriftPool"]


class PooledConnection:
    """One slot of the pool: its client while open (`client`), None while closed."""

    def __init__(
        self, host: str, port: int, socket_timeout_s: float, service: Any = THRIFT1
    ) -> None:
        self._host, self._port = host, port
        self._timeout_s = socket_timeout_s
        self._service = service
        self.client: ThriftClient | None = None

    async def open(self) -> None:
        if self.client is None:
            self.client = await connect(self._host, self._port, self._timeout_s, self._service)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class ThriftPool:
    """`size` connections to one gateway (of `service`: `THRIFT1` or `THRIFT2`), opened
    when first lent."""

    def __init__(
        self, host: str, port: int, size: int, socket_timeout_s: float, service: Any = THRIFT1
    ) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError("the pool size must be a positive int")
        self._queue: asyncio.LifoQueue[PooledConnection] = asyncio.LifoQueue(maxsize=size)
        for _ in range(size):
            self._queue.put_nowait(PooledConnection(host, port, socket_timeout_s, service))
        self._generation = 0
        self._opened_in: dict[int, int] = {}  # id(connection) -> generation it was opened in
        self.connects = 0

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[PooledConnection]:
        """A connection for the calling task alone, open, returned to the pool afterwards."""
        # Queue.get is cancellation-safe: a cancelled waiter never takes an item.
        connection = await self._queue.get()
        try:
            try:
                client = connection.client
                if client is not None and (
                    self._opened_in.get(id(connection)) != self._generation or client.closed
                ):
                    connection.close()
                if connection.client is None:
                    await connection.open()
                    self._opened_in[id(connection)] = self._generation
                    self.connects += 1
                yield connection
            except BaseException as exc:
                connection.close()
                if isinstance(exc, TTransportException | OSError | EOFError):
                    self._generation += 1  # the gateway may have gone: retire older connections
                raise
        finally:
            self._queue.put_nowait(connection)

    def close(self) -> None:
        """Close every connection (the ones lent out are closed when they come back)."""
        while True:
            try:
                self._queue.get_nowait().close()
            except asyncio.QueueEmpty:
                break
        self._opened_in.clear()
