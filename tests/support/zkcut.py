"""A TCP relay in front of a real ZooKeeper that can cut a client's connections at the
moments that matter to a reconnection.

`ZooKeeperCut(target)` listens on a free loopback port and relays every connection
to `target` ("host:port"). Besides plain relaying it can be told, once each:

* `cut_after_connect()`: the next session connection is relayed up to and with
  its ConnectRequest and the server's answer, then closed when the client sends
  its first request (aiozk's restore of the watches): a connection lost in the
  middle of a reconnection;
* `refuse_next_connect()`: the next session connection is closed as soon as its
  ConnectRequest arrives, unanswered (a server still starting does that), which
  makes aiozk give the session up and open a new one;
* `drop_all()`: close every relayed connection now;
* `hold = True`: connections made from now on are accepted and never answered
  (a ZooKeeper listening but not yet serving, or going away), until `hold` is
  False again (those held stay unanswered).

Four-letter-word probes (`srvr`, which aiozk sends on a connection of its own
before each session connection) are always relayed untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

__all__ = ["ZooKeeperCut"]

_FOUR_LETTER = b"srvr"


class ZooKeeperCut:
    """A relay to one ZooKeeper (see the module docstring); `async with` starts and stops it."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut_after_connect = False
        self._refuse_connect = False
        self.hold = False
        self.held = 0
        self.cuts = 0
        self.address = ""

    async def __aenter__(self) -> ZooKeeperCut:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut_after_connect(self) -> None:
        self._cut_after_connect = True

    def refuse_next_connect(self) -> None:
        self._refuse_connect = True

    def drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_out: asyncio.StreamWriter | None = None
        if self.hold:
            self.held += 1
            self._writers.add(client_out)
            with contextlib.suppress(OSError):
                while await client_in.read(65_536):
                    pass  # read and never answer
            client_out.transport.abort()
            self._tasks.discard(task)
            return
        try:
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
        head = await client_in.readexactly(4)
        if head == _FOUR_LETTER:
            server_out.write(head)
            await self._pump(client_in, server_out)
            return
        # a session connection: length-prefixed frames, the ConnectRequest first
        frames = 0
        while True:
            (size,) = struct.unpack("!i", head)
            body = await client_in.readexactly(size)
            frames += 1
            if frames == 1 and self._refuse_connect:
                self._refuse_connect = False
                self.cuts += 1
                return
            if frames == 2 and self._cut_after_connect:
                self._cut_after_connect = False
                self.cuts += 1
                return
            server_out.write(head + body)
            await server_out.drain()
            head = await client_in.readexactly(4)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65_536):
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()
