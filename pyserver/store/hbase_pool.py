"""Connections to HBase's Thrift1 gateway: a pool where a connection serves one task at a time.

Built on aiohappybase's `ConnectionPool` (its `Connection` objects, its queue),
with the lending rules the store needs:

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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohappybase
from thriftpy2.transport import TTransportException

__all__ = ["ThriftPool"]


def _socket_of(connection: aiohappybase.Connection) -> Any:
    """The thriftpy2 async socket under a connection's client (None when closed)."""
    client = connection.client
    if client is None:
        return None
    transport = client._iprot.trans  # TAsyncBufferedTransport
    return getattr(transport, "_trans", None)


def _peer_closed(connection: aiohappybase.Connection) -> bool:
    """True when the gateway closed this idle connection (its reader saw EOF)."""
    sock = _socket_of(connection)
    reader = getattr(sock, "reader", None)
    return reader is not None and reader.at_eof()


class ThriftPool(aiohappybase.ConnectionPool):
    """`size` connections to one Thrift1 gateway (buffered transport, binary protocol)."""

    def __init__(self, host: str, port: int, size: int, socket_timeout_s: float) -> None:
        super().__init__(
            size,
            host=host,
            port=port,
            timeout=max(1, int(socket_timeout_s * 1000)),
            transport="buffered",
            protocol="binary",
        )
        self._generation = 0
        self._opened_in: dict[int, int] = {}  # id(connection) -> generation it was opened in
        self.connects = 0

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[aiohappybase.Connection]:
        """A connection for the calling task alone, open, returned to the pool afterwards."""
        # Queue.get is cancellation-safe: a cancelled waiter never takes an item.
        connection = await self._queue.get()
        try:
            try:
                if connection.client is not None and (
                    self._opened_in.get(id(connection)) != self._generation
                    or _peer_closed(connection)
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

    def __del__(self) -> None:  # aiohappybase's warns when its queue is not deleted
        pass
