"""The MTA proxy assembled: intake and SMTP listener over an address book, a blob store and a
route to the owners. `pyserver run` starts one in-process; `pyserver mta` runs one alone.
"""

from __future__ import annotations

import socket
from typing import Any

from pyserver.blobs.base import BlobStore
from pyserver.mta.intake import MailIntake, MtaSettings
from pyserver.mta.route import OwnerRoute
from pyserver.mta.smtp import MtaProxy
from pyserver.store.base import AddressStore

__all__ = ["MtaService"]


class MtaService:
    """One proxy: `start()` listens on the config's host and `smtp_port`; `stop()` ends it.

    The address book and blob store belong to the caller (opened and closed
    there); the route is the service's own and is closed with it.
    """

    def __init__(
        self, config: Any, addresses: AddressStore, blobs: BlobStore, route: OwnerRoute
    ) -> None:
        self.config = config
        self.route = route
        self.intake = MailIntake(addresses, blobs, route, MtaSettings.from_config(config))
        self.proxy = MtaProxy(
            self.intake,
            hostname=_hostname(),
            timeout_s=config.idle_timeout_s,
            tls=config.public_tls(),
        )
        # the implicit-TLS port bound (with `smtps_port`), for the caller to publish
        self.implicit_address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Listen on the SMTP port (and the implicit-TLS port when configured)."""
        if self.config.smtps_port >= 0:
            self.implicit_address = await self.proxy.start_implicit(
                self.config.host, self.config.smtps_port
            )
        return await self.proxy.start(self.config.host, self.config.smtp_port)

    async def stop(self) -> None:
        try:
            await self.proxy.stop(self.config.shutdown_grace_s)
        finally:
            await self.route.close()

    def stats(self) -> dict[str, int]:
        return self.intake.stats()


def _hostname() -> str:
    # gethostname, not getfqdn: no DNS lookup at start-up
    return socket.gethostname() or "pyserver"
