"""The IMAP gateway's listeners: pymap's IMAP server on this package's backend.

`ImapGateway.start(host, port)` listens for IMAP (STARTTLS offered when given a
TLS context; sign-in needs it except from loopback); `start_implicit` listens
for IMAP over TLS from the first byte (RFC 8314). Each connection is pymap's;
the user's folders come from the app servers (`folders`), sign-in from user
tokens (`login`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from argparse import Namespace
from collections.abc import Callable
from typing import Any

from proxyprotocol.reader import ProxyProtocolReader
from pymap.config import BackendCapability, IMAPConfig
from pymap.imap import IMAPServer
from pymap.parsing.commands import Commands

from pyserver.app.auth import UserToken
from pyserver.blobs.base import BlobStore
from pyserver.imap import append, condstore, corrections, fastfetch, headerfields, qresync
from pyserver.imap.append import MailFiling
from pyserver.imap.commandclock import CommandClock
from pyserver.imap.folders import AppServers
from pyserver.imap.login import ImapLogin, Resolve, SignInGuard
from pyserver.metrics import Metrics
from pyserver.mta.intake import MtaSettings
from pyserver.servicekey import ServiceKey

__all__ = ["ImapGateway"]

log = logging.getLogger(__name__)

# pymap logs every command and response at DEBUG and each connection at INFO
logging.getLogger("pymap").setLevel(logging.WARNING)
corrections.apply()
append.apply()
headerfields.apply()
condstore.apply()
qresync.apply()
fastfetch.apply()  # after condstore: it leaves CONDSTORE sessions to it


class _Config(IMAPConfig):
    """pymap's settings for the gateway: its capabilities, no password hashing (tokens
    are checked by `login`), a fixed greeting (no DNS lookup per connection)."""

    def __init__(self, *, tls: ssl.SSLContext | None, max_append_len: int) -> None:
        args = Namespace(passlib_cfg=None, proxy_protocol=None, debug=False)
        super().__init__(
            args,
            host=None,
            port=0,
            ssl_context=tls or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            tls_enabled=tls is not None,
            invalid_user_sleep=0.0,  # `login.SignInGuard` delays refusals itself
            reject_dnsbl=False,
            max_append_len=max_append_len,
            bad_command_limit=5,
        )

    @property
    def backend_capability(self) -> BackendCapability:
        return BackendCapability(
            idle=True,
            object_id=True,
            multi_append=False,
            custom=[b"SPECIAL-USE", *condstore.CAPABILITIES, *qresync.CAPABILITIES],
        )

    @property
    def commands(self) -> Commands:
        return condstore.commands()  # pymap's, and ENABLE

    @property
    def greeting(self) -> bytes:
        return b"pyserver IMAP gateway ready"


class _ResponseWriter:
    """The writer pymap answers a connection with, sending each response whole: pymap
    writes a response piece by piece as it formats it (`* 4 FETCH (`, then each item),
    which would go out as that many small segments, and a client reading a response
    line as it arrives (imapclient in IDLE) could see half a line. The pieces are kept
    until pymap drains the writer, which it does after every response."""

    def __init__(self, writer: asyncio.StreamWriter, clock: CommandClock | None) -> None:
        self._writer = writer
        self._clock = clock
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    def _send(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._writer.write(data)
            self._pending.clear()
            if self._clock is not None:
                self._clock.sent(data)

    async def drain(self) -> None:
        self._send()
        await self._writer.drain()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self._send()
        await self._writer.start_tls(context)

    def close(self) -> None:
        self._send()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class _BoundedReader:
    """The reader pymap reads a connection with, held to limits: a command line of at
    most the reader's limit (64 KiB), a literal of at most `max_literal` bytes arriving
    within `literal_timeout_s`, and a line within `line_timeout_s` (clients idle, so
    this one is long). Past a limit the connection closes: pymap ends a session quietly
    on ConnectionError, and never sees an oversized literal it would buffer whole."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        max_literal: int,
        literal_timeout_s: float,
        line_timeout_s: float,
        clock: CommandClock | None = None,
    ) -> None:
        self._reader = reader
        self._clock = clock
        self._max_literal = max_literal
        self._literal_timeout_s = literal_timeout_s
        self._line_timeout_s = line_timeout_s

    async def readline(self) -> bytes:
        try:
            async with asyncio.timeout(self._line_timeout_s):
                line = await self._reader.readline()
        except (TimeoutError, ValueError) as exc:  # ValueError: a line over the limit
            raise ConnectionError(f"imap: command line refused: {exc!r}") from None
        if self._clock is not None:
            self._clock.command_read(line)
        return line

    async def readexactly(self, size: int) -> bytes:
        if size > self._max_literal:
            raise ConnectionError(f"imap: a literal of {size} bytes is over the limit")
        try:
            async with asyncio.timeout(self._literal_timeout_s):
                return await self._reader.readexactly(size)
        except TimeoutError:
            raise ConnectionError("imap: a literal did not arrive in time") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class ImapGateway:
    """IMAP in front of one app server or a cluster (`servers`)."""

    def __init__(
        self,
        servers: AppServers,
        keys: ServiceKey,
        *,
        resolve: Resolve,
        mail_domain: str,
        revoked: Callable[[UserToken], bool] | None = None,
        tls: ssl.SSLContext | None = None,
        max_message_bytes: int = 25 << 20,
        guard: SignInGuard | None = None,
        literal_timeout_s: float = 30.0,
        idle_timeout_s: float = 1800.0,
        max_connections_per_peer: int = 64,
        blobs: BlobStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.tls = tls
        self.metrics = metrics  # each command timed there (`commandclock`) when given
        self._max_message_bytes = max_message_bytes
        self._limits = {
            "max_literal": max_message_bytes + (64 << 10),
            "literal_timeout_s": literal_timeout_s,
            "line_timeout_s": idle_timeout_s,
        }
        self._max_per_peer = max_connections_per_peer
        self._per_peer: dict[str, int] = {}
        common: dict[str, Any] = {
            "resolve": resolve,
            "mail_domain": mail_domain,
            "revoked": revoked,
            "guard": guard or SignInGuard(),
        }
        self._config = _Config(tls=tls, max_append_len=max_message_bytes)
        if blobs is not None:  # APPEND keeps the mail's bytes there (else it is refused)
            settings = MtaSettings(max_mail_bytes=max_message_bytes, mail_domain=mail_domain)
            common["filing"] = MailFiling(servers, blobs, resolve, settings)
        self.login = ImapLogin(self._config, servers, keys, **common)
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen for IMAP (STARTTLS when a TLS context was given); the bound address."""
        return await self._listen(self.login, self._config, host, port, None)

    async def start_implicit(self, host: str, port: int) -> tuple[str, int]:
        """Listen for IMAP over TLS from the first byte; the bound address."""
        if self.tls is None:
            raise ValueError("implicit TLS needs a TLS context")
        # already TLS: no STARTTLS offered, sign-in allowed at once
        config = _Config(tls=None, max_append_len=self._max_message_bytes)
        return await self._listen(self.login.for_config(config), config, host, port, self.tls)

    async def _listen(
        self,
        login: ImapLogin,
        config: IMAPConfig,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
    ) -> tuple[str, int]:
        imap = IMAPServer(login, config)

        async def bounded(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: Any
        ) -> None:
            peer = str((writer.get_extra_info("peername") or ("?",))[0])
            if self._per_peer.get(peer, 0) >= self._max_per_peer:
                writer.write(b"* BYE too many connections from your address\r\n")
                writer.close()
                return
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            try:
                clock = CommandClock(self.metrics) if self.metrics is not None else None
                guarded = _BoundedReader(reader, **self._limits, clock=clock)
                await imap(guarded, _ResponseWriter(writer, clock), info)  # type: ignore[arg-type]
            finally:
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

        handler = ProxyProtocolReader(config.proxy_protocol).get_callback(bounded)
        server = await asyncio.start_server(handler, host, port, ssl=tls)
        self._servers.append(server)
        address: Any = server.sockets[0].getsockname()
        log.info("imap listening addr=%s:%d tls=%s", address[0], address[1], tls is not None)
        return address[0], address[1]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await server.wait_closed()
        self._servers.clear()
        await self.login.watch.close()
