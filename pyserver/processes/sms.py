"""`pyserver sms`: the SMS gateway as its own process, bound to the configured SMSCs.

Opens the cell's store (for the registered phones), reaches the app servers as the
MTA proxy does (the app server of `--data`, or `--server`, or a cluster through
`--discovery`), binds one `Esme` per SMSC of `smsc`, and files every text they
deliver with `SmsGateway`, until SIGINT or SIGTERM. Its STATS-like figures are
printed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.addresses import parse_addresses, parse_host_port
from pyserver.config import Config, ConfigError, load_config, short_codes
from pyserver.discovery.client import ClusterRoute
from pyserver.mta.route import SingleServerRoute
from pyserver.processes.runtime import add_service_arguments, configure_logging, run, serve_service
from pyserver.sms.esme import Esme, OnDeliver
from pyserver.sms.gateway import SmsGateway
from pyserver.store.spec import open_store, parse_store_spec

__all__ = ["SmsProcess", "add_parser", "bind_sessions"]


def bind_sessions(config: Config, on_deliver: OnDeliver) -> list[Esme]:
    """One transceiver per SMSC of `smsc`, started (each binds, and rebinds, by itself)."""
    sessions = []
    for address in parse_addresses(config.smsc):
        host, port = parse_host_port(address)
        esme = Esme(host, port, config.sms_system_id, config.sms_password, on_deliver,
                    window=config.sms_window)  # fmt: skip
        esme.start()
        sessions.append(esme)
    return sessions


class SmsProcess:
    """The gateway, its SMSC sessions, its store and route, started and stopped together."""

    def __init__(self, config: Config, server: str | None) -> None:
        if not config.smsc:
            raise ConfigError("config smsc: name the SMSC to bind to (host:port)")
        self.config = config = config.with_service_key()
        self._server = server
        self.store: Any = open_store(parse_store_spec(config.store, config.data_dir))
        self.route: Any = None
        self.gateway: SmsGateway | None = None
        self.sessions: list[Esme] = []

    async def start(self, host: str, port: int) -> tuple[str, int]:
        config = self.config
        await self.store.open()
        timeout = config.mta_deliver_timeout_s
        if config.discovery_addrs:
            self.route = ClusterRoute(config.discovery_addrs, config.service_key, timeout)
        else:
            server_host, server_port = endpoints.server_address(config.data_dir, self._server)
            self.route = SingleServerRoute(server_host, server_port, config.service_key, timeout)
        self.gateway = SmsGateway(
            self.route.request, self.store.resolve_address, short_codes(config)
        )
        self.gateway.start()
        self.sessions = bind_sessions(config, self.gateway.on_deliver)
        # bound within a few seconds, or serving on while it rebinds
        await asyncio.wait(
            [asyncio.ensure_future(s.bound.wait()) for s in self.sessions], timeout=5.0
        )
        first = self.sessions[0]
        return first.host, first.port

    async def stop(self) -> None:
        for esme in self.sessions:
            await esme.close()
        if self.gateway is not None:
            await self.gateway.close()
            print(json.dumps({"sms": self.stats()}), flush=True)
        if self.route is not None:
            await self.route.close()
        await self.store.close()

    def stats(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway.stats() if self.gateway else {},
            "smsc": {esme.name: esme.stats() for esme in self.sessions},
        }

    def banner(self) -> list[str]:
        bound = [f"{e.name} ({'bound' if e.bound.is_set() else 'binding'})" for e in self.sessions]
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
    run(serve_service(process, "sms", "SMS gateway (ESME)", "", 0, args.ready_file))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `sms` to the `pyserver` command line."""
    sub = commands.add_parser("sms", help="run the SMS gateway: bind to SMSCs over SMPP 3.4")
    add_service_arguments(sub, default_data, 0, "data folder (store, service key, app server)")
    sub.add_argument("--smsc", help="SMSCs, host:port[,host:port...] (config smsc)")
    sub.add_argument("--short-codes", help="SHORTCODE=USER[,...] (config sms_short_codes)")
    sub.add_argument("--server", help="one app server, HOST:PORT (default: the data folder's)")
    sub.add_argument("--discovery", help="discovery instances of a cluster")
    sub.set_defaults(handler=_run)
    return sub
