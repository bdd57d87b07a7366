"""A TCP relay in front of a real ZooKeeper that can cut a client's connections at the
moments that matter to a reconnection.

`ZooKeeperCut(target)` is a `tests.support.relay.Relay` to `target` ("host:port"):
it listens on a free loopback port (`address`) and relays every connection.
Besides plain relaying it can be told, once each:

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

from tests.support.relay import Relay

__all__ = ["ZooKeeperCut"]

_FOUR_LETTER = b"srvr"


class ZooKeeperCut(Relay):
    """A relay to one ZooKeeper (see the module docstring); `async with` starts and stops it."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._cut_after_connect = False
        self._refuse_connect = False
        self.hold = False
        self.held = 0
        self.cuts = 0

    def cut_after_connect(self) -> None:
        self._cut_after_connect = True

    def refuse_next_connect(self) -> None:
        self._refuse_connect = True

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> bool:
        if not self.hold:
            return True
        self.held += 1
        self._writers.add(client_out)
        with contextlib.suppress(OSError):
            while await client_in.read(65_536):
                pass  # read and never answer
        return False

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
