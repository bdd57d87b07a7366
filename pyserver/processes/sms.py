"""`pyserver sms`: the SMS gateway as its own process, bound to the configured SMSCs.

Opens the store with the registered phones (the cell's, or a cluster's directory
store), reaches the app servers as the MTA proxy does (the app server of `--data`,
or `--server`, or a cluster through `--discovery`), binds one `Esme` per SMSC of
`smsc`, files every text they deliver with `SmsGateway`, and serves SMS_SUBMIT on
`--port` (default 7460) for the app servers that text their users' copies through
it (their `sms_gateway_addr`), until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.addresses import parse_addresses, parse_host_port
from pyserver.app.server import AppServer
from pyserver.config import Config, ConfigError, load_config, short_codes
from pyserver.discovery.client import ClusterRoute
from pyserver.metrics import Metrics
from pyserver.mta.route import SingleServerRoute
from pyserver.processes.assembly import service_server
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.sms.esme import Esme
from pyserver.sms.gateway import Request, ResolvePhone, SmsGateway
from pyserver.sms.outbound import Receipts, SmsSender
from pyserver.sms.service import SmsService
from pyserver.sms.state import SmsState
from pyserver.store.spec import open_store, parse_store_spec

__all__ = ["DEFAULT_PORT", "SmsLink", "SmsProcess", "add_parser"]

DEFAULT_PORT = 7460
# the gateway's own state in its data folder (pyserver.sms.state)
STATE_FILE = "sms-state.sqlite3"


class SmsLink:
    """A process's SMS: the gateway (texts in), one transceiver per SMSC of `smsc` (each
    binds, and rebinds, by itself), the sender (texts out, from the first short code) and
    the receipts between them; `pyserver run` and `pyserver sms` each start one.
    `request` reaches the users' owners, `resolve_phone` finds a phone's user."""

    def __init__(self, config: Config, request: Request, resolve_phone: ResolvePhone) -> None:
        codes = short_codes(config)
        # which texts await receipts, which phones were texted what, which texts came in
        # lately: kept across restarts in the data folder
        self.state = SmsState(config.data_dir / STATE_FILE)
        self.receipts = Receipts(request, state=self.state)
        self.gateway = SmsGateway(
            request, resolve_phone, codes, receipts=self.receipts, state=self.state
        )
        self.gateway.start()
        self.sessions: list[Esme] = []
        for address in parse_addresses(config.smsc):
            host, port = parse_host_port(address)
            esme = Esme(host, port, config.sms_system_id, config.sms_password,
                        self.gateway.on_deliver, window=config.sms_window)  # fmt: skip
            esme.start()
            self.sessions.append(esme)
        self.sender = SmsSender(self.sessions, next(iter(codes), ""), self.receipts)

    async def close(self) -> None:
        """Unbind (a text not answered yet is sent again by its SMSC), stop the gateway."""
        for esme in self.sessions:
            await esme.close()
        await self.gateway.close()
        await self.state.close()

    def stats(self) -> dict[str, Any]:
        return {
            "smsc": {esme.name: esme.stats() for esme in self.sessions},
            "gateway": self.gateway.stats(),
            "receipts": dict(self.receipts.counters),
            "sender": dict(self.sender.counters),
        }


class SmsProcess:
    """The gateway, its SMSC sessions, its store and route, started and stopped together."""

    def __init__(self, config: Config, server: str | None) -> None:
        if not config.smsc:
            raise ConfigError("config smsc: name the SMSC to bind to (host:port)")
        self.config = config = config.with_service_key()
        self._server = server
        self.store: Any = open_store(parse_store_spec(config.store, config.data_dir))
        self.route: Any = None
        self.sms: SmsLink | None = None
        self.server: AppServer | None = None
        # served on --http-port (processes.runtime): the SMS_SUBMITs it answers, timed, and
        # its SMSC sessions' and texts' counters (pyserver_sms_*)
        self.metrics = Metrics()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        config = self.config
        await self.store.open()
        timeout = config.mta_deliver_timeout_s
        keys, tls = config.service_keys(), config.client_tls()
        if config.discovery_addrs:
            self.route = ClusterRoute(config.discovery_addrs, keys, timeout, tls=tls)
        else:
            server_host, server_port = endpoints.server_address(config.data_dir, self._server)
            self.route = SingleServerRoute(server_host, server_port, keys, timeout, tls=tls)
        self.sms = sms = SmsLink(config, self.route.request, self.store.resolve_address)
        # bound within a few seconds, or serving on while it rebinds
        await asyncio.wait(
            [asyncio.ensure_future(s.bound.wait()) for s in sms.sessions], timeout=5.0
        )
        service = SmsService(sms.sender.send, sms.stats)
        self.metrics.watch_sms(sms.stats)
        self.server = service_server(
            config, service, "sms-gateway", stats_section="sms", observer=self.metrics
        )
        return await self.server.start(host, port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_s)
        if self.sms is not None:
            await self.sms.close()
            print(json.dumps({"sms": self.sms.stats()}), flush=True)
        if self.route is not None:
            await self.route.close()
        await self.store.close()

    def banner(self) -> list[str]:
        sessions = self.sms.sessions if self.sms is not None else []
        bound = [f"{e.name} ({'bound' if e.bound.is_set() else 'binding'})" for e in sessions]
        return [f"smsc        {', '.join(bound)}", f"short codes {self.config.sms_short_codes}"]


def _run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        overrides={
            "data_dir": args.data,
            "smsc": args.smsc,
            "sms_short_codes": args.short_codes,
            "discovery_addrs": args.discovery,
        },
    )
    configure_logging(config.log_level)
    process = SmsProcess(config, args.server)
    host = args.host or config.host
    run(
        serve_service(
            process, "sms", "SMS gateway", host, args.port, args.ready_file, args.http_port
        )
    )
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `sms` to the `pyserver` command line."""
    sub = commands.add_parser("sms", help="run the SMS gateway: bind to SMSCs over SMPP 3.4")
    add_service_arguments(sub, default_data, DEFAULT_PORT, "data folder (store, service key)")
    sub.add_argument("--smsc", help="SMSCs, host:port[,host:port...] (config smsc)")
    sub.add_argument("--short-codes", help="SHORTCODE=USER[,...] (config sms_short_codes)")
    sub.add_argument("--server", help="one app server, HOST:PORT (default: the data folder's)")
    sub.add_argument("--discovery", help="discovery instances of a cluster")
    sub.set_defaults(handler=_run)
    return sub
