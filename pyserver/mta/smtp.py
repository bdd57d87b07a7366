"""The SMTP listeners of the MTA proxy, feeding `MailIntake`: `MtaProxy` serves the MTA port
with `pyserver.mta.smtpd`'s protocol; `SmtpSession` is aiosmtpd, which the submission
port (`pyserver.mta.submission`, AUTH) still speaks through.

aiosmtpd speaks the protocol (greeting, EHLO with SIZE, 8BITMIME and
SMTPUTF8, MAIL, RCPT, RSET, QUIT, timeouts); this module answers RCPT and
DATA through the intake, and reads DATA itself: aiosmtpd reads it a line at
a time in Python, which costs more than everything else a megabyte of
attachment costs, so `read_data` takes it in large blocks up to the
terminating line and undoes the dot-stuffing in one pass. A message over the
size limit is read to its end, then refused with 552.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import weakref
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from pyserver.mta.intake import MailIntake
from pyserver.mta.smtpd import SmtpProtocol

__all__ = ["MtaProxy", "SmtpSession", "read_data"]

log = logging.getLogger(__name__)

# aiosmtpd logs every command at INFO: far too much for a mail server under load.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# The StreamReader's limit: how much DATA one read may take (commands are still held to
# aiosmtpd's own command-length limits).
_READ_LIMIT = 1 << 18
_END = b".\r\n"
# The everyday MAIL/RCPT address, <local@domain> in plain ASCII: read without the header parser.
_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>(.*)", re.DOTALL)


async def read_data(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One message's DATA, up to the line holding only ".", dot-stuffing undone.

    None when the message was over `limit` bytes: it is read to its end all the
    same, so the connection stays in step.
    """
    pieces: list[bytes] = []
    size = 0
    over = False
    before = b"\r\n"  # the two bytes before the next piece: the DATA line's end at first
    while True:
        try:
            piece = await reader.readuntil(_END)
            last = piece if len(piece) >= 5 else before + piece
            ended = last[-5:-3] == b"\r\n"
        except asyncio.LimitOverrunError as exc:  # no terminator in a buffer's worth
            piece = await reader.read(exc.consumed)
            ended = False
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("connection closed during DATA") from None
        size += len(piece)
        if not over and size > limit + len(_END):
            over = True
            pieces.clear()
        if not over:
            pieces.append(piece)
        if ended:
            break
        before = piece[-2:] if len(piece) >= 2 else (before + piece)[-2:]
    if over:
        return None
    pieces[-1] = pieces[-1][: -len(_END)]
    data = b"".join(pieces)
    # RFC 5321 4.5.2: a line's leading "." was added by the sender; take it away.
    if data.startswith(b"."):
        data = data[1:]
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n")
    return data


class _Envelope(Envelope):
    """aiosmtpd's envelope plus the user each accepted recipient address resolved to."""

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, int] = {}


class SmtpSession(SMTP):
    """One SMTP connection: aiosmtpd, with DATA read in blocks (see `read_data`)."""

    line_length_limit = _READ_LIMIT

    def _create_envelope(self) -> Envelope:
        return _Envelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd reads every path with the email header parser; most are plain.
        plain = _PLAIN_PATH.fullmatch(arg) if arg else None
        if plain is None:
            return super()._getaddr(arg)
        address = plain.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, plain.group(2).lstrip()

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or (1 << 62)
        data = await read_data(self._reader, limit)
        if data is None:
            self._set_post_data_state()
            await self.push(f"552 5.3.4 Message over the size limit of {limit} bytes")
            return
        envelope.content = envelope.original_content = data
        status = await self.event_handler.handle_DATA(self, self.session, envelope)
        self._set_post_data_state()
        await self.push(status)


class _Handler:
    """aiosmtpd's handler hooks, answered by the intake."""

    def __init__(self, intake: MailIntake) -> None:
        self._intake = intake

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        assert isinstance(envelope, _Envelope)
        if len(envelope.rcpt_tos) >= self._intake.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        reply, user = await self._intake.recipient(address)
        if user is not None:
            envelope.rcpt_tos.append(address)
            envelope.users[address] = user
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, _Envelope)
        raw = envelope.original_content or b""
        try:
            return await self._intake.accept(raw, envelope.mail_from, envelope.users)
        except Exception:
            # Never let one message take the proxy down; the sender keeps it and retries.
            log.exception("failed to take a message of %d bytes", len(raw))
            return "451 4.3.0 Internal error, try again later"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


class MtaProxy:
    """The SMTP listener: `await start(host, port)` returns the bound (host, port).

    With `tls`, the plain port offers STARTTLS (opportunistic, as between MTAs: a sender
    that does not ask is still served), and `start_implicit` listens for TLS from the
    first byte (RFC 8314).
    """

    def __init__(
        self,
        intake: MailIntake,
        *,
        hostname: str = "pyserver",
        timeout_s: float = 300,
        tls: ssl.SSLContext | None = None,
    ):
        self.intake = intake
        self._handler = _Handler(intake)
        self._hostname = hostname
        self._timeout_s = timeout_s
        self.tls = tls
        self._server: asyncio.base_events.Server | None = None
        self._implicit: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet[SmtpSession | SmtpProtocol] = weakref.WeakSet()

    def _session(self, starttls: bool = True) -> SmtpSession | SmtpProtocol:
        session = SmtpProtocol(
            self.intake,
            hostname=self._hostname,
            ident="pyserver MTA proxy",
            timeout_s=self._timeout_s,
            tls=self.tls if starttls else None,
        )
        self._sessions.add(session)
        return session

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, host, port)
        sockname: Any = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start_implicit(self, host: str, port: int) -> tuple[str, int]:
        """Listen for SMTP over TLS from the first byte (needs `tls`)."""
        if self.tls is None:
            raise ValueError("implicit TLS needs a TLS context")
        loop = asyncio.get_running_loop()
        self._implicit = await loop.create_server(
            lambda: self._session(starttls=False),
            host,
            port,
            ssl=self.tls,
            ssl_handshake_timeout=min(self._timeout_s, 30.0),
        )
        sockname: Any = self._implicit.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening; give transactions under way `grace_s`, then close every connection."""
        server, self._server = self._server, None
        implicit, self._implicit = self._implicit, None
        if implicit is not None:
            implicit.close()
        if server is None:
            return
        server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline and any(_busy(s) for s in list(self._sessions)):
            await asyncio.sleep(0.05)
        for session in list(self._sessions):
            if session.transport is not None:
                with contextlib.suppress(Exception):
                    session.transport.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace_s):
                await server.wait_closed()


def _busy(session: SmtpSession | SmtpProtocol) -> bool:
    """Whether a connection is inside a transaction (after RCPT, before its reply)."""
    if isinstance(session, SmtpProtocol):
        return session.in_transaction
    envelope = session.envelope
    return session.transport is not None and envelope is not None and bool(envelope.rcpt_tos)
