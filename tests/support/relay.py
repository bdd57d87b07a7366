"""A TCP relay in front of a real engine that tests can cut, so the engine itself never stops.

`Relay(target)` ("host:port" or (host, port)) listens on a free loopback port
(`port`, `address`) and relays every connection to `target`. `cut()` plays the
engine's death as its clients see it: every relayed connection reset, new ones
refused (nothing listens); `start()` listens on the same port again.
`drop_all()` resets the relayed connections and keeps listening. `async with
Relay(...)` starts it and cuts it at the end.

Subclasses shape the client-to-server direction (`_client_to_server`) or what a
new connection gets (`_accept`): `tests.support.zkcut.ZooKeeperCut` cuts a
ZooKeeper reconnection at chosen moments.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

__all__ = ["Relay"]


class Relay:
    """A cuttable TCP relay to one engine (see the module docstring)."""

    def __init__(self, target: str | tuple[str, int]) -> None:
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            target = (host, int(port))
        self._target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after a cut)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and reset every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_all()
        if server is not None:
            await server.wait_closed()

    def drop_all(self) -> None:
        """Reset every relayed connection now (new ones are still relayed)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- relaying ----

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> bool:
        """Whether to relay this new connection (a subclass may keep it to itself)."""
        return True

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_out: asyncio.StreamWriter | None = None
        try:
            if not await self._accept(client_in, client_out):
                return
            server_in, server_out = await asyncio.open_connection(*self._target)
            self._writers.update((client_out, server_out))
            back = asyncio.create_task(self._pump(server_in, client_out))
            self._tasks.add(back)
            back.add_done_callback(self._tasks.discard)
            await self._client_to_server(client_in, server_out, client_out)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_out, server_out):
                if writer is not None:
                    writer.transport.abort()
                    self._writers.discard(writer)
            self._tasks.discard(task)

    async def _client_to_server(
        self,
        client_in: asyncio.StreamReader,
        server_out: asyncio.StreamWriter,
        client_out: asyncio.StreamWriter,
    ) -> None:
        await self._pump(client_in, server_out)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65_536):
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()
