"""One assembler for every process that serves the binary protocol.

`service_server` puts any handler (the mailbox, the user index, the dirty
service, discovery) on the app server's wire shell with the configuration's
frame size and limits. `AppServerParts` builds, from one `Config` and a store,
what `pyserver run` (`processes.cell`) and `pyserver node` (`processes.node`)
share: metrics, the blob store, the user index (in-process or remote), the
dirty reports (in-process or remote, when memcached is configured), the
mailbox with the hooks the process gives it, the outbox relaying mail to
outside addresses (with `relay_addr`), its app server and the HTTP endpoint,
and opens and closes them in one order. The cell and the node add only what
is theirs (the MTA, submission and the count endpoint; ZooKeeper, the ring and
the fence).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pyserver.addresses import parse_host_port
from pyserver.app.dispatcher import Dispatcher, MailboxLike, RequestObserver
from pyserver.app.limits import InFlightLimit, UserRateLimiter
from pyserver.app.mailbox import Mailbox, MailboxSettings
from pyserver.app.outbox import Outbox, SendMail
from pyserver.app.revocations import Revocations
from pyserver.app.server import AppServer, ServerLimits
from pyserver.blobs import blob_store_for
from pyserver.cluster.zk import ZooKeeper
from pyserver.config import Config
from pyserver.dirty.reporter import DirtyReporter, RemoteDirtyService
from pyserver.dirty.service import DirtyService
from pyserver.httpapi import HttpEndpoint
from pyserver.metrics import Metrics, TimedStore
from pyserver.mta.outbound import RelaySender
from pyserver.sms.service import RemoteSmsSender
from pyserver.store.base import Store
from pyserver.userindex.local import LocalUserIndex
from pyserver.userindex.remote import RemoteUserIndex

__all__ = ["AppServerParts", "service_server", "zookeeper_session"]

log = logging.getLogger(__name__)


def service_server(
    config: Config,
    handler: MailboxLike,
    name: str,
    *,
    stats_section: str = "mailbox",
    health_check: Callable[[], Awaitable[bool]] | None = None,
    observer: RequestObserver | None = None,
    user_limiter: UserRateLimiter | None = None,
    peer_limiter: UserRateLimiter | None = None,
    user_in_flight: InFlightLimit | None = None,
    peer_in_flight: InFlightLimit | None = None,
    revocations: Revocations | None = None,
) -> AppServer:
    """`handler` served on the wire shell with the configured frame size, limits and TLS,
    under the process name `name`; `config` must carry its service key
    (`Config.with_service_key`)."""
    dispatcher = Dispatcher(
        handler,
        config.service_keys(),
        name,
        max_frame_size=config.max_frame_size,
        observer=observer,
        health_check=health_check,
        stats_section=stats_section,
        user_limiter=user_limiter,
        peer_limiter=peer_limiter,
        user_in_flight=user_in_flight,
        peer_in_flight=peer_in_flight,
        revocations=revocations,
    )
    return AppServer(dispatcher, ServerLimits.from_config(config), tls=config.server_tls())


def zookeeper_session(config: Config) -> ZooKeeper:
    """The process's ZooKeeper session as the configuration sets it (not started): each
    call waits up to the session timeout, kept between 1 and 5 s."""
    return ZooKeeper(
        config.zookeeper,
        chroot=config.zookeeper_chroot,
        session_timeout_s=config.zookeeper_session_timeout_s,
        call_timeout_s=max(1.0, min(5.0, config.zookeeper_session_timeout_s)),
        auth=config.zookeeper_auth,
        read_ids=config.zookeeper_read_id_list,
    )


class AppServerParts:
    """The parts of an app-server process, built (not started) from one configuration.

    `mailbox_hooks` go to the `Mailbox` as they are (ownership, relay, ...);
    `health` answers the HTTP endpoint's /health.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        health: Callable[[], Awaitable[dict[str, Any]]],
        mailbox_hooks: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = store
        # the trusted tiers' keys (re-read as they rotate) and TLS to the other tiers
        self.keys = keys = config.service_keys()
        tls = config.client_tls()
        timed_store: Any = TimedStore(store, self.metrics)
        # attachments, long mail bodies and raw mail (GET_BLOB reads them; the MTA writes them)
        self.blobs = blob_store_for(config)
        # the user index: this process's own, or the user index service's
        self.user_index: LocalUserIndex | RemoteUserIndex = (
            RemoteUserIndex.from_address(config.userindex_addr, keys, tls=tls)
            if config.userindex_addr
            else LocalUserIndex(timed_store)
        )
        # count-change reports, only with memcached: to the dirty service, or one in-process
        self.centres = config.data_centres
        self.dirty_service: DirtyService | None = None
        self.dirty_reporter: DirtyReporter | None = None
        if self.centres:
            if config.dirty_addr:
                invalidate: Any = RemoteDirtyService.from_address(config.dirty_addr, keys, tls=tls)
            else:
                self.dirty_service = DirtyService(self.centres)
                invalidate = self.dirty_service.invalidate
            self.dirty_reporter = DirtyReporter(invalidate)
        self.mailbox = Mailbox(
            timed_store,
            self.user_index,
            MailboxSettings.from_config(config),
            counts_changed=self.dirty_reporter.report if self.dirty_reporter else None,
            blobs=self.blobs,
            outbound_queued=self._outbound_queued,
            **(mailbox_hooks or {}),
        )
        # mail to outside addresses, relayed through the smart host (none: it waits
        # queued), and texts to users' phones, through the SMS gateway's sender
        self.outbox: Outbox | None = None
        self.relay: RelaySender | None = None
        # set by the process that binds to the SMSCs (`pyserver run` with `smsc`), or the
        # cluster's SMS gateway
        self.sms_sender: SendMail | None = None
        self.sms_gateway: RemoteSmsSender | None = None
        if config.sms_gateway_addr:
            host, port = parse_host_port(config.sms_gateway_addr)
            self.sms_gateway = RemoteSmsSender(host, port, keys, tls=tls)
            self.sms_sender = self.sms_gateway.send
        if config.relay_addr:
            host, port = parse_host_port(config.relay_addr)
            key = Path(config.dkim_key_file).read_bytes() if config.dkim_key_file else None
            self.relay = RelaySender(
                host,
                port,
                config.mail_domain,
                dkim_key=key,
                dkim_selector=config.dkim_selector,
                blobs=self.blobs,
            )
        if config.relay_addr or config.smsc or config.sms_gateway_addr:
            self.outbox = Outbox(
                self.mailbox,
                self._send_outbound,
                give_up_after_s=config.outbound_give_up_s,
            )
            self.metrics.watch_outbox(self.outbox.stats)
        # revoked user tokens, read from the store; sessions using one are signed out
        self.revocations = Revocations(
            store, refresh_s=config.revocation_refresh_s, on_change=self._revoke_sessions
        )
        self.server = service_server(
            config,
            self.mailbox,
            config.node_id,
            revocations=self.revocations,
            observer=self.metrics,
            health_check=store.healthy,
            user_limiter=(
                UserRateLimiter(config.user_requests_per_s, config.user_request_burst)
                if config.user_requests_per_s > 0
                else None
            ),
            peer_limiter=(
                UserRateLimiter(config.peer_requests_per_s, config.peer_request_burst)
                if config.peer_requests_per_s > 0
                else None
            ),
            user_in_flight=(
                InFlightLimit(config.user_max_in_flight) if config.user_max_in_flight else None
            ),
            peer_in_flight=(
                InFlightLimit(config.peer_max_in_flight) if config.peer_max_in_flight else None
            ),
        )
        self.dispatcher = self.server.dispatcher
        self.http = HttpEndpoint(self.metrics, health, head_timeout_s=config.frame_timeout_s)
        self.metrics.watch_cache(self.mailbox.stats)
        self.metrics.connections.set_function(lambda: self.dispatcher.connections)
        self._opened: list[str] = []
        self._listening = False
        self._recovery: asyncio.Task[None] | None = None

    def _revoke_sessions(self) -> None:
        self.dispatcher.revoke_sessions()

    async def open(self) -> None:
        """Open the store and the blob store, read the revocations, start the dirty reports
        (nothing listens yet)."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        self._opened.append("store")
        await self.revocations.start()
        self._opened.append("revocations")
        await self.blobs.open()
        self._opened.append("blobs")
        if self.dirty_service is not None:
            await self.dirty_service.start()
            self._opened.append("dirty service")
        if self.dirty_reporter is not None:
            self.dirty_reporter.start()
            self._opened.append("dirty reporter")

    async def _send_outbound(self, mail: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Phones to the SMS sender, email addresses to the relay; an address with neither
        configured waits (retry)."""
        phones = [a for a in mail["addresses"] if a.startswith("+")]
        emails = [a for a in mail["addresses"] if not a.startswith("+")]
        outcomes: dict[str, tuple[str, str]] = {}
        senders: tuple[tuple[list[str], SendMail | None], ...] = (
            (phones, self.sms_sender),
            (emails, self.relay),
        )
        for addresses, send in senders:
            if not addresses:
                continue
            if send is None:
                outcomes.update(dict.fromkeys(addresses, ("retry", "no sender configured")))
                continue
            outcomes.update(await send({**mail, "addresses": addresses}))
        return outcomes

    def _outbound_queued(self, user_id: int, message_id: str) -> None:
        if self.outbox is not None:
            self.outbox.queued(user_id, message_id)

    async def listen(self) -> dict[str, Any]:
        """Listen on the configured ports; the addresses bound, as endpoints files hold them.
        The outbox starts too, and queues again the mail a previous run left unsettled."""
        self._listening = True
        host, port = await self.server.start(self.config.host, self.config.port)
        http_port = await self.http.start(
            self.config.host, self.config.http_port, tls=self.config.public_tls()
        )
        if self.outbox is not None:
            self.outbox.start()
            self._recovery = asyncio.get_running_loop().create_task(self._recover_outbound())
        return {
            "node": self.config.node_id,
            "server": {"host": host, "port": port},
            "http": {"host": self.config.host, "port": http_port},
        }

    async def _recover_outbound(self) -> None:
        assert self.outbox is not None
        try:
            await self.outbox.recover(await self.store.user_ids())
        except Exception:  # the store down at start: the next start recovers them
            log.exception("outbox: recovering unsettled mail failed")

    async def stop_serving(self, grace_s: float) -> None:
        """Answer in-flight requests (for up to grace_s), stop listening, snapshot what the
        mailbox holds."""
        if self._recovery is not None:
            self._recovery.cancel()
        if self.outbox is not None:
            await self.outbox.close()
        if self.relay is not None:
            await self.relay.close()
        if self.sms_gateway is not None:
            await self.sms_gateway.close()
        if self._listening:
            await self.server.stop(grace_s)
            await self.http.stop()
            self._listening = False
        await self.mailbox.close()

    async def close(self) -> None:
        """Close what `open` opened and the user index's connection (after stop_serving)."""
        if isinstance(self.user_index, RemoteUserIndex):
            await self.user_index.close()
        opened = set(self._opened)
        if "dirty reporter" in opened and self.dirty_reporter is not None:
            await self.dirty_reporter.close()
        if "dirty service" in opened and self.dirty_service is not None:
            await self.dirty_service.close()
        if "blobs" in opened:
            await self.blobs.close()
        if "revocations" in opened:
            await self.revocations.close()
        if "store" in opened:
            await self.store.close()
        self._opened.clear()
