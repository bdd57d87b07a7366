"""`python -m bench.chaos_relay --port P --target HOST:PORT`: a TCP relay that can play dead.

The chaos soak puts one in front of the shared HBase Thrift gateway, and every
process of the soak reaches HBase through it, so the gateway's outage can be
played without stopping the gateway everyone else uses: on SIGUSR1 the relay
resets every connection and stops listening (clients see what a stopped
gateway gives them: connections reset, then refused); on SIGUSR2 it listens on
the same port again. It prints "ready" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


class Relay:
    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(
                self._relay, "127.0.0.1", self.port, reuse_address=True
            )

    async def down(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.writers.add(client_out)
        try:
            server_in, server_out = await asyncio.open_connection(*self.target)
        except OSError:
            client_out.transport.abort()
            self.writers.discard(client_out)
            return
        self.writers.add(server_out)
        await asyncio.gather(self._pump(client_in, server_out), self._pump(server_in, client_out))
        self.writers.discard(client_out)
        self.writers.discard(server_out)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65_536):
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()


async def main(port: int, target: tuple[str, int]) -> None:
    relay = Relay(port, target)
    await relay.up()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(relay.down()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(relay.up()))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await relay.down()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    asyncio.run(main(args.port, (host, int(port))))
