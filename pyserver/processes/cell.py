"""A whole single-node cell in one process, on the embedded defaults.

Assembles, from one `Config`, the parts every app server has
(`processes.assembly.AppServerParts` on the embedded store: the user index, the
mailbox, the app server speaking the binary protocol, the HTTP endpoint with
/metrics and /health) and what a whole cell adds: the user index served to
other processes, the MTA proxy, the web tier (inbox and web chat, a client of the
cell's own app server) and the count reads (/counts/<user>). `serve()` is
`pyserver run`: it runs the cell on uvloop until SIGINT or SIGTERM, then stops
it gracefully (in-flight requests finish, cached images are snapshotted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from pyserver import doctor, endpoints
from pyserver.app.auth import check_service_key, make_user_token, read_user_token
from pyserver.app.loop import loop_implementation
from pyserver.app.mailbox import Mailbox
from pyserver.app.server import AppServer
from pyserver.client import Client
from pyserver.config import Config
from pyserver.dirty import local_memcached
from pyserver.errors import BadRequest, PyserverError, error_payload
from pyserver.imap.gateway import ImapGateway
from pyserver.mta.route import InProcessRoute
from pyserver.mta.service import MtaService
from pyserver.mta.submission import SubmissionProxy
from pyserver.processes.assembly import AppServerParts, service_server
from pyserver.processes.imap import imap_gateway
from pyserver.processes.runtime import (
    announce_ready,
    configure_logging,
    run,
    stop_signal,
    withdraw_ready,
)
from pyserver.processes.sms import SmsLink
from pyserver.processes.web import web_tier
from pyserver.store.sqlite import SQLiteStore, store_path
from pyserver.store.sqlite import open_cell_store as open_store
from pyserver.tls import TierTls
from pyserver.userid import is_user_id
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.service import UserIndexService
from pyserver.web.counts import CountReader
from pyserver.web.server import WebTier
from pyserver.wire.ops import Op

log = logging.getLogger(__name__)


class SingleNodeCell:
    """Every part of a cell, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config = config.with_service_key()
        self.parts = AppServerParts(
            config, SQLiteStore(store_path(config.data_dir)), health=self._health
        )
        # the cell serves its own user index to other processes (the MTA, the tools)
        self.userindex_server: AppServer | None = None
        if isinstance(self.parts.user_index, LocalUserIndex):
            self.userindex_server = service_server(
                config,
                UserIndexService(self.parts.user_index),
                f"userindex-{config.node_id}",
                stats_section="userindex",
            )
        # the MTA proxy, started once the app server it delivers to listens
        self.mta: MtaService | None = None
        # SMTP submission for mail clients (STARTTLS, AUTH), when a port is configured
        self.submission: SubmissionProxy | None = None
        self.counts: CountReader | None = None
        # the web tier and the IMAP gateway (when their ports are not -1), and their
        # connection to the app server
        self.web: WebTier | None = None
        self.imap: ImapGateway | None = None
        self._web_client: Client | None = None
        # the SMS gateway: texts in from the SMSCs, and out to users' phones (with `smsc`)
        self.sms: SmsLink | None = None
        self.parts.http.add_get("/counts/{user}", self._serve_counts)
        self.addresses: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        """Open the store, then listen; returns (and publishes) the addresses."""
        await self.parts.open()
        self.counts = CountReader(await local_memcached(self.config), self._counts_of)
        self.addresses = await self.parts.listen()
        host, port = self.addresses["server"]["host"], self.addresses["server"]["port"]
        self.addresses["addr"] = f"{host}:{port}"
        if self.userindex_server is not None:
            index_host, index_port = await self.userindex_server.start(self.config.host, 0)
            self.addresses["userindex"] = {"host": index_host, "port": index_port}
        # the proxy delivers to the app server of this process without a connection
        route = InProcessRoute(self.parts.dispatcher.call, self.config.mta_deliver_timeout_s)
        self.mta = MtaService(self.config, self.parts.store, self.parts.blobs, route)
        smtp_host, smtp_port = await self.mta.start()
        self.addresses["smtp"] = {"host": smtp_host, "port": smtp_port}
        if self.mta.implicit_address is not None:
            smtps_host, smtps_port = self.mta.implicit_address
            self.addresses["smtps"] = {"host": smtps_host, "port": smtps_port}
        if self.config.submission_port >= 0:
            self.submission = self._submission(route)
            sub_host, sub_port = await self.submission.start(
                self.config.host, self.config.submission_port
            )
            self.addresses["submission"] = {"host": sub_host, "port": sub_port}
        if self.config.web_port >= 0 or self.config.imap_port >= 0:
            self._web_client = await Client.connect(
                host, port, service_key=self.parts.keys, tls=self.config.client_tls()
            )
        if self.config.web_port >= 0:
            web_host, web_port = await self._start_web()
            self.addresses["web"] = {"host": web_host, "port": web_port}
        if self.config.imap_port >= 0:
            self.addresses.update(await self._start_imap())
        if self.config.smsc:
            self.addresses["smsc"] = self._start_sms()
        endpoints.publish(self.config.data_dir, self.addresses)
        return self.addresses

    async def stop(self) -> None:
        """Finish in-flight requests, snapshot cached images, close the store."""
        endpoints.withdraw(self.config.data_dir)
        if self.mta is not None:  # first: mail under way still reaches the app server
            await self.mta.stop()
        if self.submission is not None:
            await self.submission.stop()
        if self.web is not None:  # its pages close first; their scripts reconnect later
            await self.web.stop()
        if self.imap is not None:
            await self.imap.stop()
        if self.sms is not None:
            await self.sms.close()
        if self._web_client is not None:
            await self._web_client.close()
        await self.parts.stop_serving(self.config.shutdown_grace_s)
        if self.userindex_server is not None:
            await self.userindex_server.stop(self.config.shutdown_grace_s)
        if self.counts is not None and self.counts.cache is not None:
            await self.counts.cache.close()
        await self.parts.close()

    async def _start_imap(self) -> dict[str, Any]:
        """The IMAP gateway in front of this cell; its addresses (imap, imaps)."""
        config = self.config
        assert self._web_client is not None
        self.imap = imap_gateway(
            config,
            self._web_client,
            self.parts.keys,
            resolve=self.parts.store.resolve_address,
            revocations=self.parts.revocations,
            blobs=self.parts.blobs,
        )
        host, port = await self.imap.start(config.host, config.imap_port)
        found = {"imap": {"host": host, "port": port}}
        if config.imaps_port >= 0:
            host, port = await self.imap.start_implicit(config.host, config.imaps_port)
            found["imaps"] = {"host": host, "port": port}
        return found

    async def _start_web(self) -> tuple[str, int]:
        config = self.config
        assert self.counts is not None and self._web_client is not None
        self.web = web_tier(
            config,
            self._web_client,
            self.parts.keys,
            counts=self.counts.read,
            blobs=self.parts.blobs,
            revocations=self.parts.revocations,
        )
        return config.host, await self.web.start(config.host, config.web_port)

    def _start_sms(self) -> list[str]:
        """Bind to every SMSC (in the background: they rebind by themselves); the SMSCs."""
        self.sms = SmsLink(
            self.config, self.parts.mailbox.execute, self.parts.store.resolve_address
        )
        self.parts.sms_sender = self.sms.sender.send
        self.parts.metrics.watch_sms(self.sms.stats)
        return [esme.name for esme in self.sms.sessions]

    def sign_in_link(self, user: int, valid_s: int = 86_400) -> str:
        """A link that signs a browser in to the web tier as `user` (for a day)."""
        web_addr = self.addresses["web"]
        token = make_user_token(user, int(time.time()) + valid_s, self.parts.keys)
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{web_addr['host']}:{web_addr['port']}/login?token={token}"

    def _submission(self, route: InProcessRoute) -> SubmissionProxy:
        tls = TierTls(self.config.tls_cert_file, self.config.tls_key_file)
        return SubmissionProxy(
            self.parts.store,
            route,
            self._submission_user,
            tls.server_context(require_client_cert=False),
            blobs=self.parts.blobs,
            mail_domain=self.config.mail_domain,
            max_mail_bytes=self.config.max_mail_bytes,
        )

    def _submission_user(self, user_token: str) -> int:
        """The user a mail client's AUTH token grants (Unauthenticated if none, or revoked)."""
        revoked = self.parts.revocations.refuses
        return read_user_token(user_token, self.parts.keys, time.time(), revoked).user

    async def _counts_of(self, user_id: int) -> dict[str, Any]:
        return await self.parts.mailbox.execute(Op.COUNTS, {"user": user_id})

    async def _serve_counts(self, request: web.Request) -> web.Response:
        """GET /counts/<user>: the user's COUNTS reply, through the count cache; for the
        trusted tiers only (`Authorization: Bearer <service key>`): a person reads their
        counts through the web tier's session."""
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not check_service_key(given, self.parts.keys):
            why = "GET /counts needs Authorization: Bearer <service key>"
            refused = {"code": "UNAUTHENTICATED", "message": why}
            return web.json_response(
                refused, status=401, headers={"WWW-Authenticate": 'Bearer realm="pyserver"'}
            )
        raw = request.match_info["user"]
        if not raw.isdigit() or not is_user_id(int(raw)):
            bad = {"code": "BAD_REQUEST", "message": f"{raw!r} is not a user id"}
            return web.json_response(bad, status=400)
        assert self.counts is not None
        try:
            return web.json_response(await self.counts.read(int(raw)))
        except PyserverError as exc:
            status = 400 if isinstance(exc, BadRequest) else 503
            return web.json_response(error_payload(exc), status=status)

    async def _health(self) -> dict[str, Any]:
        healthy = await self.parts.store.healthy()
        return {
            "status": "ok" if healthy else "unavailable",
            "node": self.config.node_id,
            "store": "ok" if healthy else "unavailable",
        }


async def _serve_until_stopped(
    cell: SingleNodeCell, ready: Path | None, sign_in_links: tuple[int, ...]
) -> None:
    stopped = stop_signal()
    try:
        addresses = await cell.start()
    except BaseException:  # a port taken, the store unreadable: close what did open
        with contextlib.suppress(Exception):
            await cell.stop()
        raise
    server, http = addresses["server"], addresses["http"]
    print(f"pyserver: cell {cell.config.cell} node {cell.config.node_id} running", flush=True)
    print(f"  binary protocol  {server['host']}:{server['port']}", flush=True)
    print(f"  http             http://{http['host']}:{http['port']}/metrics  /health", flush=True)
    smtp = addresses["smtp"]
    print(f"  smtp (MTA proxy) {smtp['host']}:{smtp['port']}", flush=True)
    if "web" in addresses:
        web_addr = addresses["web"]
        print(f"  web (inbox, chat) http://{web_addr['host']}:{web_addr['port']}/", flush=True)
        for user in sign_in_links:
            print(f"    sign in as user {user}: {cell.sign_in_link(user)}", flush=True)
    if "imap" in addresses:
        imap = addresses["imap"]
        print(f"  imap (mail clients) {imap['host']}:{imap['port']}", end="", flush=True)
        print(f"  imaps {addresses['imaps']['port']}" if "imaps" in addresses else "", flush=True)
        for user in sign_in_links:
            print(
                f"    user u{user}@{cell.config.mail_domain}, password: a token"
                f" (pyserver admin token --user {user})",
                flush=True,
            )
    if "smsc" in addresses:
        print(f"  sms (SMPP ESME)  {', '.join(addresses['smsc'])}", flush=True)
    if "userindex" in addresses:
        index = addresses["userindex"]
        print(f"  user index       {index['host']}:{index['port']}", flush=True)
    if cell.parts.centres:
        where = cell.config.dirty_addr or "in-process"
        centres = " ".join(str(centre) for centre in cell.parts.centres)
        print(f"  dirty service    {where}, memcached {centres}", flush=True)
    print(f"  data             {cell.config.data_dir.resolve()}", flush=True)
    print(f"  service key      {cell.config.service_key_path.resolve()}", flush=True)
    loop = loop_implementation(asyncio.get_running_loop())
    print(f"  implementations  {doctor.report()} loop={loop}")
    sys.stdout.flush()
    announce_ready(ready, "cell", addresses["addr"], addresses)
    try:
        await stopped.wait()
    finally:
        withdraw_ready(ready)
        print("pyserver: stopping (finishing in-flight requests)", flush=True)
        await cell.stop()


def serve(
    config: Config, ready_file: Path | None = None, sign_in_links: tuple[int, ...] = ()
) -> int:
    """`pyserver run`: serve a single-node cell until SIGINT/SIGTERM; once it serves, its
    addresses are written to `ready_file` (if given) as well as to its data folder, and a
    sign-in link of the web tier is printed for each user of `sign_in_links`."""
    configure_logging(config.log_level)
    run(_serve_until_stopped(SingleNodeCell(config), ready_file, sign_in_links))
    return 0


@asynccontextmanager
async def open_mailbox(data_dir: Path) -> AsyncIterator[Mailbox]:
    """A mailbox over the cell's store on data_dir (admin tools: rebuild, export, import)."""
    async with open_store(data_dir) as store:
        mailbox = Mailbox(store, LocalUserIndex(store))
        try:
            yield mailbox
        finally:
            await mailbox.close()
