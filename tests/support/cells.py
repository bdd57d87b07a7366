"""The in-process cell the test modules start: a SQLite store, a mailbox over it (with a blob
store when asked), and, when served, its app server on loopback with clients closed after
the test. Each module adds only what it tests (an MTA in front, a dirty service behind, a
mailbox that waits on a gate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyserver.app.dispatcher import Dispatcher, MailboxLike
from pyserver.app.mailbox import Mailbox
from pyserver.app.server import AppServer, ServerLimits
from pyserver.blobs.disk import DiskBlobStore
from pyserver.client import Client
from pyserver.store.sqlite import SQLiteStore

__all__ = ["KEY", "InProcessCell"]

KEY = "test-service-key-0123456789abcdef"


class InProcessCell:
    """Store, mailbox and (after `serve`) app server, opened and closed together.

    `blobs`: a disk blob store under the folder, given to the mailbox. `wrap`: what
    the app server serves instead of the mailbox itself (a test double around it).
    `codec`, `limits` and `dispatcher_options` go to the app server as they are.
    """

    def __init__(
        self,
        folder: Path,
        *,
        blobs: bool = False,
        synchronous: str = "NORMAL",
        codec: Any = None,
        limits: ServerLimits | None = None,
        node_id: str = "test-node",
        wrap: Callable[[Mailbox], MailboxLike] | None = None,
        mailbox_options: dict[str, Any] | None = None,
        dispatcher_options: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self.store = SQLiteStore(folder / "cell.sqlite", synchronous=synchronous)
        self.blobs = DiskBlobStore(folder / "blobs", durable=False) if blobs else None
        options = dict(mailbox_options or {})
        if self.blobs is not None:
            options["blobs"] = self.blobs
        self.mailbox = Mailbox(self.store, **options)
        self.served: MailboxLike = wrap(self.mailbox) if wrap is not None else self.mailbox
        self.codec = codec
        self.limits = limits
        self.node_id = node_id
        self.dispatcher_options = dispatcher_options or {}
        self.dispatcher: Dispatcher | None = None
        self.server: AppServer | None = None
        self.port = 0
        self.clients: list[Client] = []

    async def __aenter__(self) -> InProcessCell:
        self.folder.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        if self.blobs is not None:
            await self.blobs.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.close()
        await self.stop_serving()
        await self.mailbox.close()
        await self.store.close()
        if self.blobs is not None:
            await self.blobs.close()

    async def serve(self, port: int | None = None) -> int:
        """Start the app server (again on the same port by default); its port."""
        self.dispatcher = Dispatcher(self.served, KEY, self.node_id, **self.dispatcher_options)
        self.server = AppServer(self.dispatcher, self.limits, codec=self.codec)
        _, self.port = await self.server.start("127.0.0.1", self.port if port is None else port)
        return self.port

    async def stop_serving(self, grace_s: float = 1.0) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop(grace_s)

    async def client(self, **options: Any) -> Client:
        """A client of the app server (the service key unless a user token is given)."""
        if "user_token" not in options and "service_key" not in options:
            options["service_key"] = KEY
        options.setdefault("backoff_max_s", 0.2)
        client = await Client.connect("127.0.0.1", self.port, **options)
        self.clients.append(client)
        return client
