"""`pyserver imap`: the IMAP gateway as its own process, in front of one app server or a cluster.

Reaches the app servers as the web tier does (`frontend`); users sign in with
their address and a user token; the addresses are the store's (the cell's, or a
cluster's directory store). STARTTLS, and `--imaps-port` for IMAP over TLS,
with `tls`. Serves until SIGINT or SIGTERM (docs/imap.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyserver.app.revocations import Revocations
from pyserver.blobs import BlobStore, blob_store_for
from pyserver.config import Config, load_config
from pyserver.imap.folders import AppServers
from pyserver.imap.gateway import ImapGateway
from pyserver.imap.login import Resolve
from pyserver.metrics import Metrics
from pyserver.processes.frontend import FrontEnd, add_frontend_arguments, frontend_overrides
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.servicekey import ServiceKey

__all__ = ["ImapProcess", "add_parser", "imap_gateway"]

DEFAULT_PORT = 1143


def imap_gateway(
    config: Config,
    servers: AppServers,
    keys: ServiceKey,
    *,
    resolve: Resolve,
    revocations: Revocations,
    blobs: BlobStore | None = None,
    metrics: Metrics | None = None,
) -> ImapGateway:
    """The IMAP gateway `config` sets up, in front of `servers` (`pyserver imap`,
    `pyserver run`)."""
    return ImapGateway(
        servers,
        keys,
        resolve=resolve,
        mail_domain=config.mail_domain,
        revoked=revocations.refuses,
        tls=config.public_tls(),
        max_message_bytes=config.max_mail_bytes,
        blobs=blobs,
        metrics=metrics,
    )


class ImapProcess:
    """The IMAP gateway and what it stands on, started together."""

    def __init__(self, config: Config, server: str | None) -> None:
        self.config = config = config.with_service_key()
        self.frontend = FrontEnd(config, server)
        self.gateway: ImapGateway | None = None
        self.blobs = blob_store_for(config)  # where APPENDed mail is kept
        self.metrics = Metrics()  # each IMAP command timed: its /metrics
        self._implicit = ""

    async def start(self, host: str, port: int) -> tuple[str, int]:
        config = self.config
        servers = await self.frontend.open()
        await self.blobs.open()
        self.gateway = imap_gateway(
            config,
            servers,
            self.frontend.keys,
            resolve=self.frontend.store.resolve_address,
            revocations=self.frontend.revocations,
            blobs=self.blobs,
            metrics=self.metrics,
        )
        if config.imaps_port >= 0:
            implicit_host, implicit_port = await self.gateway.start_implicit(
                host, config.imaps_port
            )
            self._implicit = f"{implicit_host}:{implicit_port}"
        return await self.gateway.start(host, port)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.blobs.close()
        await self.frontend.close()

    def banner(self) -> list[str]:
        lines = [f"app servers {self.frontend.target}"]
        if self._implicit:
            lines.append(f"imaps       {self._implicit}")
        return lines


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = frontend_overrides(args)
    overrides["imaps_port"] = args.imaps_port
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.log_level)
    port = args.port if args.port is not None else config.imap_port
    process = ImapProcess(config, args.server)
    run(
        serve_service(
            process,
            "imap",
            "IMAP gateway",
            args.host or config.host,
            port,
            args.ready_file,
            args.http_port,
        )
    )
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `imap` to the `pyserver` command line."""
    sub = commands.add_parser("imap", help="run the IMAP gateway in front of a cell or cluster")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "data folder (service key, app server)")
    sub.set_defaults(port=None)
    sub.add_argument("--imaps-port", type=int, help="IMAP over TLS (needs tls; default none)")
    add_frontend_arguments(sub)
    sub.set_defaults(handler=_run)
    return sub
