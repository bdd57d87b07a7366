"""The SMSC the SMS tests bind to: a simulator on smpp34's server (an independent SMPP 3.4
implementation in Rust, so a mistake of the project's codec cannot agree with itself),
with the faults the gateway must survive: throttling, refusals, slow and lost answers; and a
relay in front of it that the test cuts, for network drops."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest

smpp34 = pytest.importorskip("smpp34")

__all__ = ["CuttableLink", "SimulatedSmsc"]


class SimulatedSmsc:
    """An SMSC on 127.0.0.1:`port`: records submits, pushes texts, injects faults."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: Any = None
        self.sessions: dict[str, Any] = {}
        self.submits: list[Any] = []
        self.binds = 0
        self.throttle_next = 0  # answer this many submits ESME_RTHROTTLED first
        self.refuse_next = 0  # and this many ESME_RINVDSTADR
        self.lose_next = 0  # and never answer this many (a lost response)
        self.lost: list[Any] = []
        self.answer_delay_s = 0.0
        self.bound = asyncio.Event()
        self._ids = itertools.count(1)
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> SimulatedSmsc:
        self.server = smpp34.Server("127.0.0.1", self.port, system_id="SIMSMSC")
        await self.server.start()
        self._pump = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.server.stop()

    async def _run(self) -> None:
        while True:
            event = await self.server.next()
            if isinstance(event, smpp34.Esme):
                self.sessions[event.session_id] = event
                self.binds += 1
                self.bound.set()
            elif isinstance(event, smpp34.SubmitSmEvent):
                asyncio.get_running_loop().create_task(self._answer(event))
            elif isinstance(event, smpp34.Unbound):
                self.sessions.pop(event.session_id, None)
                if not self.sessions:
                    self.bound.clear()

    async def _answer(self, event: Any) -> None:
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        if self.throttle_next > 0:
            self.throttle_next -= 1
            event.reject(smpp34.ESME_RTHROTTLED)
        elif self.refuse_next > 0:
            self.refuse_next -= 1
            event.reject(smpp34.ESME_RINVDSTADR)
        elif self.lose_next > 0:
            self.lose_next -= 1
            self.lost.append(event)  # taken, but its response never goes out
        else:
            self.submits.append(event)
            event.accept(message_id=f"sim-{next(self._ids)}")

    async def submitted(self, timeout_s: float = 10.0) -> list[Any]:
        """The submits accepted so far, once there is at least one (or none after `timeout_s`)."""
        for _ in range(int(timeout_s / 0.05)):
            if self.submits:
                break
            await asyncio.sleep(0.05)
        return self.submits

    async def text(self, source: str, short_code: str, body: bytes, **fields: Any) -> int:
        """A text from a phone, pushed to the bound gateway; the status it answered."""
        await asyncio.wait_for(self.bound.wait(), 10)
        session = next(iter(self.sessions.values()))
        answer = await session.deliver_sm(
            short_code, body, source_addr=source, source_addr_ton=1, **fields
        )
        return int(answer.command_status)


class CuttableLink:
    """A TCP relay between the gateway and the SMSC that the test can cut: `cut()` drops
    every connection at once (a network failure, whatever is in flight), and while
    `refusing` new connections are closed as soon as they open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
