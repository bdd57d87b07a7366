"""The gateway's session with one SMSC: an SMPP 3.4 ESME bound as a transceiver.

Owns the life of the link: connect, `bind_transceiver`, `enquire_link` every
`enquire_link_s` (a link that does not answer one within `response_timeout_s` is
dropped), and, after any drop or refused bind, connecting and binding again with a
doubling pause (`rebind_initial_s` up to `rebind_max_s`) until `close()`.

Outbound, `submit(fields)` sends a submit_sm once the session is bound and a slot
of the submit window (`window`, outstanding submits) is free, and returns the
SMSC's message id. `ESME_RTHROTTLED` and `ESME_RMSGQFUL` are retried after a
doubling pause (the SMSC asked us to slow down); any other refusal raises
`SubmitRefused` with its status; a submit whose response does not come in time,
or whose link drops, raises `Unavailable` (it may have been taken: the caller
decides whether to send it again).

Inbound, each deliver_sm (a text from a phone, or a delivery receipt) is handed to
`on_deliver(pdu)`, and answered with the status it returns: the gateway returns
only once the text is durable, so the SMSC keeps a text it got no answer for and
sends it again. A malformed PDU is answered with its error status (or
generic_nack) and the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from pyserver.errors import PyserverError, Unavailable
from pyserver.sms.pdu import (
    RESPONSE,
    BadPdu,
    Command,
    FramingError,
    Pdu,
    PduDecoder,
    Status,
    encode,
)

__all__ = ["Esme", "SubmitRefused"]

log = logging.getLogger(__name__)

OnDeliver = Callable[[Pdu], Awaitable[int]]
_RETRY_LATER = frozenset({Status.THROTTLED, Status.MSGQFUL})


class SubmitRefused(PyserverError):
    """The SMSC refused a submit_sm for good (its command_status says why)."""

    code = "FORBIDDEN"

    def __init__(self, status: int) -> None:
        super().__init__(f"the SMSC refused the message: status 0x{status:02x}")
        self.status = status


class _Link(asyncio.Protocol):
    """One TCP connection: PDUs in and out, responses matched to requests."""

    def __init__(self, esme: Esme) -> None:
        self.esme = esme
        self.decoder = PduDecoder()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Pdu]] = {}
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.tasks: set[asyncio.Task[None]] = set()
        # PDUs sent in this turn of the event loop, written together at its end
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            items = self.decoder.feed(data)
        except FramingError as error:
            log.warning("SMSC %s: %s; dropping the link", self.esme.name, error)
            self.close()
            return
        for item in items:
            if isinstance(item, BadPdu):
                self.esme.counters["bad_pdus"] += 1
                log.warning("SMSC %s sent a bad PDU: %s", self.esme.name, item.reason)
                if not item.command & RESPONSE:  # a bad response is dropped: it times out
                    answer = Pdu(item.command, item.sequence).response(item.status)
                    self.send(answer)
            elif item.is_response:
                future = self.pending.pop(item.sequence, None)
                if future is not None and not future.done():
                    future.set_result(item)
            else:
                self._request(item)

    def _request(self, pdu: Pdu) -> None:
        if pdu.command == Command.ENQUIRE_LINK:
            self.send(pdu.response())
        elif pdu.command == Command.UNBIND:
            self.send(pdu.response())
            self.close()
        elif pdu.command == Command.DELIVER_SM:
            task = asyncio.get_running_loop().create_task(self._deliver(pdu))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.send(Pdu(Command.GENERIC_NACK, pdu.sequence, Status.INVCMDID))

    async def _deliver(self, pdu: Pdu) -> None:
        self.esme.counters["delivers"] += 1
        try:
            status = await self.esme.on_deliver(pdu)
        except Exception:
            log.exception("SMSC %s: a deliver_sm failed", self.esme.name)
            status = Status.SYSERR
        self.send(pdu.response(status))

    def send(self, pdu: Pdu) -> None:
        """Queue a PDU; the PDUs of one turn of the event loop go out in one write (a
        window of submits is one system call, not 32)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(encode(pdu))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    async def request(self, pdu: Pdu, timeout_s: float) -> Pdu:
        future: asyncio.Future[Pdu] = self.loop.create_future()
        self.pending[pdu.sequence] = future
        self.send(pdu)
        # a timer rather than asyncio.timeout: one per submit, so kept cheap
        timer = self.loop.call_later(timeout_s, _expire, future, self.esme.name, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()
            self.pending.pop(pdu.sequence, None)

    def close(self) -> None:
        if self.transport is not None:
            self._flush()  # (an unbind_resp goes out before the link closes)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"SMSC {self.esme.name}: the link dropped"))
        self.pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)


def _expire(future: asyncio.Future[Pdu], name: str, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(Unavailable(f"SMSC {name}: no response in {timeout_s:g} s"))


class Esme:
    """A transceiver session with one SMSC, kept bound (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        system_id: str,
        password: str,
        on_deliver: OnDeliver,
        *,
        system_type: str = "",
        window: int = 32,
        enquire_link_s: float = 30.0,
        response_timeout_s: float = 10.0,
        rebind_initial_s: float = 0.1,
        rebind_max_s: float = 30.0,
        throttle_initial_s: float = 0.05,
        throttle_max_s: float = 5.0,
    ) -> None:
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self._bind_fields = {
            "system_id": system_id,
            "password": password,
            "system_type": system_type,
            "interface_version": 0x34,
        }
        self.on_deliver = on_deliver
        self.window = window
        self._slots = asyncio.Semaphore(window)
        self.enquire_link_s = enquire_link_s
        self.response_timeout_s = response_timeout_s
        self._rebind = (rebind_initial_s, rebind_max_s)
        self._throttle = (throttle_initial_s, throttle_max_s)
        self._sequence = itertools.count(1)
        self._link: _Link | None = None
        self.bound = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.counters: Counter[str] = Counter()

    # ---- life ----

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Unbind (briefly), close the link and stop rebinding."""
        self._closing = True
        link = self._link
        if link is not None and self.bound.is_set():
            with contextlib.suppress(PyserverError):
                await link.request(Pdu(Command.UNBIND, self._next()), 2.0)
        if link is not None:
            link.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _next(self) -> int:
        sequence = next(self._sequence)
        if sequence > 0x7FFFFFFF:  # SMPP sequence numbers are 1..0x7FFFFFFF
            self._sequence = itertools.count(2)
            sequence = 1
        return sequence

    async def _run(self) -> None:
        delay, most = self._rebind
        loop = asyncio.get_running_loop()
        while not self._closing:
            link: _Link | None = None
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(lambda: _Link(self), self.host, self.port),
                    self.response_timeout_s,
                )
                reply = await link.request(
                    Pdu(Command.BIND_TRANSCEIVER, self._next(), fields=self._bind_fields),
                    self.response_timeout_s,
                )
                if reply.status != Status.OK:
                    raise Unavailable(f"SMSC {self.name} refused the bind: 0x{reply.status:02x}")
                self._link = link
                self.counters["binds"] += 1
                self.bound.set()
                delay = self._rebind[0]
                log.info("bound to SMSC %s as %s", self.name, self._bind_fields["system_id"])
                await self._keep_alive(link)
            except (OSError, TimeoutError, PyserverError) as error:
                log.info("SMSC %s: %s", self.name, error)
            finally:
                self.bound.clear()
                self._link = None
                if link is not None:
                    link.close()
                    for task in list(link.tasks):
                        # a text not yet durable is not answered: the SMSC sends it again
                        task.cancel()
            if self._closing:
                return
            self.counters["drops"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)

    async def _keep_alive(self, link: _Link) -> None:
        """enquire_link every enquire_link_s until the link drops (or stays silent)."""
        while not link.closed.done():
            done, _ = await asyncio.wait({link.closed}, timeout=self.enquire_link_s)
            if done:
                return
            await link.request(Pdu(Command.ENQUIRE_LINK, self._next()), self.response_timeout_s)

    # ---- outbound ----

    async def submit(self, fields: dict[str, Any], tlvs: dict[int, bytes] | None = None) -> str:
        """Send one submit_sm; the SMSC's message id (see the module docstring)."""
        delay, most = self._throttle
        async with self._slots:
            while True:
                link = await self._bound_link()
                self.counters["submits"] += 1
                reply = await link.request(
                    Pdu(Command.SUBMIT_SM, self._next(), fields=fields, tlvs=tlvs or {}),
                    self.response_timeout_s,
                )
                if reply.status == Status.OK:
                    return str(reply.get("message_id", ""))
                if reply.status not in _RETRY_LATER:
                    self.counters["refused"] += 1
                    raise SubmitRefused(reply.status)
                self.counters["throttled"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)

    async def _bound_link(self) -> _Link:
        if self._link is not None and self.bound.is_set():
            return self._link
        try:
            async with asyncio.timeout(self.response_timeout_s):
                while True:
                    await self.bound.wait()
                    if self._link is not None:
                        return self._link
                    await asyncio.sleep(0)
        except TimeoutError:
            raise Unavailable(f"SMSC {self.name}: not bound") from None

    @property
    def in_window(self) -> int:
        """Submits sent and not answered yet."""
        return self.window - self._slots._value

    def stats(self) -> dict[str, Any]:
        return {"bound": self.bound.is_set(), "in_window": self.in_window, **self.counters}
