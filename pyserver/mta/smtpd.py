"""The MTA port's SMTP server: one `asyncio.Protocol` per connection, answering from the intake.

aiosmtpd (still the submission port's server) runs a coroutine per connection
that reads and answers a line at a time through streams, and builds each
session by scanning its own and its handler's members; that costs more than
the proxy's whole durable work on a small mail. This protocol keeps its state
in a few attributes and answers synchronously everything that needs nothing
outside the connection (EHLO, MAIL, RSET, NOOP...); RCPT and DATA ask the
intake in a task, and input that arrives meanwhile (pipelining) waits in the
buffer. DATA is gathered in blocks by `DataReader` (the terminating line
found across packet boundaries, dot-stuffing undone in one pass).

Spoken: HELO, EHLO (SIZE, 8BITMIME, SMTPUTF8, PIPELINING, STARTTLS when the
listener has TLS), MAIL (SIZE, BODY, SMTPUTF8 parameters), RCPT, DATA, RSET,
NOOP, VRFY (252), HELP, QUIT, STARTTLS; an idle connection is closed after
the timeout with 421. May import pyserver.mta.intake only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

from pyserver.mta.intake import MailIntake

__all__ = ["DataReader", "SmtpProtocol"]

log = logging.getLogger(__name__)

_END = b"\r\n.\r\n"
# A line starting with ".", and the terminating line (regular expressions: about twice as
# fast as bytearray.find over a big message); see `_dot_line`
_DOT_LINE = re.compile(rb"\r\n\.")
_END_LINE = re.compile(re.escape(_END))
# Dots `_dot_line` looks at one by one before it leaves the rest to `_DOT_LINE`
_DOTS_LOOKED_AT = 8
# the longest command line taken (RFC 5321's 512 plus room for extension parameters)
_COMMAND_LIMIT = 2048
# input kept while a RCPT or DATA is being answered, before reading pauses
_PAUSE_AT = 1 << 20
_PATH = re.compile(r"\s*<([^<>]*)>(.*)", re.DOTALL)
# a source route before the mailbox (RFC 5321 4.1.2: taken and ignored)
_SOURCE_ROUTE = re.compile(r"@[^:]*:")


class DataReader:
    """One message's DATA, fed as it arrives: `feed(block)` returns the bytes that came
    after the terminating line once it was seen (else None); then `content()` is the
    message with its dot-stuffing undone, or None when it was over `limit` bytes (read to
    its end all the same, so the connection stays in step)."""

    __slots__ = ("_data", "_limit", "_over", "_scanned", "_stuffed", "ended")

    def __init__(self, limit: int) -> None:
        # the DATA line's CRLF starts the buffer, so an empty message's "." line is found too
        self._data = bytearray(b"\r\n")
        self._limit = limit
        self._over = False
        self._scanned = 0  # where the next look for a line starting with "." begins
        self._stuffed = False  # a line of the message starts with "."
        self.ended = False

    def feed(self, block: bytes | bytearray) -> bytes | None:
        data = self._data
        data += block
        # one pass finds both the lines that start with "." and the terminating one
        at = self._next_line(data, self._scanned)
        while at >= 0:
            if len(data) < at + len(_END):  # maybe the end: decided by the next block
                break
            if data[at + 3 : at + 5] == b"\r\n":
                self.ended = True
                rest = bytes(data[at + len(_END) :])
                del data[at + 2 :]  # the message keeps its last line's CRLF
                if len(data) - 2 > self._limit:
                    self._over = True
                return rest
            self._stuffed = True
            at = self._next_line(data, at + 3)
        self._scanned = max(0, len(data) - (len(_END) - 1)) if at < 0 else at
        if len(data) - 2 > self._limit + len(_END):
            # over the limit: keep only the tail the terminator could start in
            self._over = True
            del data[: self._scanned]
            self._scanned = 0
        return None

    def _next_line(self, data: bytearray, start: int) -> int:
        """Where the next line starting with "." begins (at its CRLF), or -1; once one was
        seen (dot-stuffing is undone in `content`), only the terminating line is looked for,
        so a message of many such lines is not read a line at a time."""
        if not self._stuffed:
            return _dot_line(data, start)
        found = _END_LINE.search(data, start)
        return found.start() if found is not None else -1

    def content(self) -> bytes | None:
        if self._over:
            return None
        data = self._data
        # RFC 5321 4.5.2: a line's leading "." was added by the sender; take it away
        if self._stuffed:
            data = data.replace(b"\r\n.", b"\r\n")
        with memoryview(data) as view:
            return bytes(view[2:])


class SmtpProtocol(asyncio.Protocol):
    """One SMTP connection of the MTA port (see the module docstring)."""

    def __init__(
        self,
        intake: MailIntake,
        *,
        hostname: str,
        ident: str,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._intake = intake
        self._hostname = hostname
        self._ident = ident
        self._timeout_s = timeout_s
        self._tls = tls
        self._limit = intake.settings.max_mail_bytes
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # a RCPT, DATA or STARTTLS is being answered
        self._paused = False
        self._skipping = False  # inside an over-long command line, dropped to its end
        self._data: DataReader | None = None
        self._helo: str | None = None
        self._encrypted = False  # after STARTTLS (an implicit-TLS listener passes no `tls`)
        self._mail_from: str | None = None
        self._recipients: dict[str, int] = {}
        self._idle = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # ---- the connection ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(f"220 {self._hostname} ESMTP {self._ident}\r\n".encode())
        self._timer = self._loop.call_later(self._timeout_s, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def in_transaction(self) -> bool:
        """Whether a mail is under way (a recipient taken, its reply not yet given)."""
        return self.transport is not None and bool(self._recipients)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        if self._busy or self._idle == 0:  # something happened since the last check
            self._idle = 1
            self._timer = self._loop.call_later(self._timeout_s, self._check_idle)
            return
        self._timer = None
        self.transport.write(b"421 4.4.2 Timeout, closing the connection\r\n")
        self.transport.close()

    def _reply(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write(line.encode() + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self._idle = 0
        if self._data is not None and not self._buffer and not self._busy:
            rest = self._data.feed(data)  # the common case of DATA: no copy into the buffer
            if rest is None:
                return
            self._message_read(rest)
            return
        self._buffer += data
        if self._busy:
            if len(self._buffer) > _PAUSE_AT and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            return
        self._process()

    # ---- commands ----

    def _process(self) -> None:
        """Answer what the buffer holds, until it runs out or an answer has to wait."""
        buffer = self._buffer
        while not self._busy and self.transport is not None and not self.transport.is_closing():
            if self._data is not None:
                if not buffer:
                    return
                block = bytes(buffer)
                buffer.clear()
                rest = self._data.feed(block)
                if rest is None:
                    return
                buffer += rest
                self._message_read(b"")
                continue
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > _COMMAND_LIMIT:
                    buffer.clear()
                    if not self._skipping:
                        self._skipping = True
                        self._reply("500 5.5.2 Command line too long")
                return
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > _COMMAND_LIMIT:
                self._reply("500 5.5.2 Command line too long")
                continue
            try:
                self._command(line)
            except Exception:  # never let one command take the proxy down
                log.exception("SMTP command failed: %r", line[:100])
                self._reply("451 4.3.0 Internal error, try again later")
        if self._paused and not self._busy and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply("500 5.5.2 Error: command is not UTF-8")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        if verb == "MAIL":
            self._mail(arg)
        elif verb == "RCPT":
            self._rcpt(arg)
        elif verb == "DATA":
            self._data_command(arg)
        elif verb == "EHLO" or verb == "HELO":
            self._hello(verb, arg)
        elif verb == "RSET":
            self._reset()
            self._reply("250 2.0.0 OK")
        elif verb == "NOOP":
            self._reply("250 2.0.0 OK")
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            if self.transport is not None:
                self.transport.close()
        elif verb == "VRFY":
            self._reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
        elif verb == "HELP":
            self._reply("250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY")
        elif verb == "STARTTLS":
            self._starttls(arg)
        elif not verb:
            self._reply("500 5.5.2 Error: bad syntax")
        else:
            self._reply(f'500 5.5.1 Error: command "{verb[:32]}" not recognized')

    def _reset(self) -> None:
        self._mail_from = None
        self._recipients = {}

    def _hello(self, verb: str, arg: str) -> None:
        if not arg:
            self._reply(f"501 5.5.4 Syntax: {verb} hostname")
            return
        self._reset()
        self._helo = arg
        if verb == "HELO":
            self._reply(f"250 {self._hostname}")
            return
        lines = [
            self._hostname,
            f"SIZE {self._limit}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
        ]
        if self._tls is not None and not self._encrypted:
            lines.append("STARTTLS")
        lines.append("HELP")
        reply = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        self._reply(reply)

    def _mail(self, arg: str) -> None:
        if self._helo is None:
            self._reply("503 5.5.1 Error: send HELO first")
            return
        if self._mail_from is not None:
            self._reply("503 5.5.1 Error: nested MAIL command")
            return
        path = _path(arg, "FROM:")
        if path is None:
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, params = path
        for param in params.split():
            name, _, value = param.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    self._reply("501 5.5.4 Syntax: MAIL FROM:<address> [SIZE=<size>]")
                    return
                if int(value) > self._limit:
                    self._reply("552 5.3.4 Error: message size exceeds fixed maximum message size")
                    return
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
                    return
            elif name != "SMTPUTF8" or value:
                self._reply(f"555 5.5.4 MAIL FROM parameter not recognized: {name[:32]}")
                return
        self._mail_from = address
        self._reply("250 2.1.0 OK")

    def _rcpt(self, arg: str) -> None:
        if self._helo is None:
            self._reply("503 5.5.1 Error: send HELO first")
            return
        if self._mail_from is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        path = _path(arg, "TO:")
        if path is None or not path[0] or path[1].strip():
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(self._recipients) >= self._intake.settings.max_recipients:
            self._reply("452 4.5.3 Too many recipients")
            return
        answer = self._intake.recipient_now(path[0])  # most often: no lookup needed
        if answer is None:
            self._wait(self._recipient(path[0]))
        else:
            self._recipient_answered(path[0], *answer)

    async def _recipient(self, address: str) -> None:
        self._recipient_answered(address, *await self._intake.recipient(address))

    def _recipient_answered(self, address: str, reply: str, user: int | None) -> None:
        if user is not None and self._mail_from is not None:
            self._recipients[address] = user
        self._reply(reply)

    def _data_command(self, arg: str) -> None:
        if self._helo is None:
            self._reply("503 5.5.1 Error: send HELO first")
            return
        if not self._recipients:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._data = DataReader(self._limit)

    def _message_read(self, rest: bytes) -> None:
        """DATA's terminating line was read: the message goes to the intake; `rest` (what
        came after it, pipelined) waits in the buffer for the reply."""
        reader, self._data = self._data, None
        assert reader is not None
        if rest:
            self._buffer[:0] = rest
        raw = reader.content()
        if raw is None:
            self._reset()
            self._reply(f"552 5.3.4 Message over the size limit of {self._limit} bytes")
            self._process()
            return
        self._wait(self._accept(raw))

    async def _accept(self, raw: bytes) -> None:
        try:
            reply = await self._intake.accept(raw, self._mail_from, self._recipients)
        except Exception:
            # Never let one message take the proxy down; the sender keeps it and retries.
            log.exception("failed to take a message of %d bytes", len(raw))
            reply = "451 4.3.0 Internal error, try again later"
        finally:
            self._reset()  # the transaction ends with its reply
        self._reply(reply)

    def _starttls(self, arg: str) -> None:
        if self._tls is None or self._encrypted:
            self._reply("502 5.5.1 Error: command not implemented")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: STARTTLS")
            return
        self._reply("220 2.0.0 Ready to start TLS")
        self._buffer.clear()  # nothing sent before the handshake counts after it
        self._wait(self._upgrade())

    async def _upgrade(self) -> None:
        assert self.transport is not None and self._tls is not None
        transport = await self._loop.start_tls(
            self.transport, self, self._tls, server_side=True, ssl_handshake_timeout=30
        )
        if transport is None:
            return
        self.transport = transport
        self._encrypted = True
        self._helo = None  # RFC 3207: the client says EHLO again
        self._reset()

    # ---- answers that wait ----

    def _wait(self, work: Any) -> None:
        """Run `work` (a coroutine that replies) with further input held until it is done."""
        self._busy = True
        task = self._loop.create_task(work)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._busy = False
        if not task.cancelled() and (error := task.exception()) is not None:
            if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
                log.info("STARTTLS failed: %r", error)
                self.close()
                return
            log.error("SMTP session error", exc_info=error)
            self._reply("451 4.3.0 Internal error, try again later")
        self._process()


def _dot_line(data: bytearray, start: int) -> int:
    """Where the first line starting with "." from `start` on begins (at its preceding
    CRLF), or -1. Big bodies seldom hold a "." (base64 never does), and memchr finds the
    next one at once; where dots are many (text), one regex pass beats a look at each."""
    at = data.find(b".", start + 2)
    for _ in range(_DOTS_LOOKED_AT):
        if at < 0:
            return -1
        if data[at - 2 : at] == b"\r\n":
            return at - 2
        at = data.find(b".", at + 1)
    if at < 0:
        return -1
    found = _DOT_LINE.search(data, at - 2)
    return found.start() if found is not None else -1


def _path(arg: str, keyword: str) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL FROM:/RCPT TO: argument, or None when malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    found = _PATH.fullmatch(arg[len(keyword) :])
    if found is None:
        return None
    address = found.group(1).strip()
    route = _SOURCE_ROUTE.match(address)
    if route is not None:
        address = address[route.end() :]
    if any(c.isspace() for c in address) and not address.startswith('"'):
        return None
    return address, found.group(2)
