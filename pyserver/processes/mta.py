"""`pyserver mta`: the MTA proxy as its own process, in front of a running cell.

Opens the cell's store (for the addresses table) and blob store, finds the
app server in the cell's data folder (or `--server`), and serves SMTP until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyserver import endpoints
from pyserver.blobs import blob_store_for
from pyserver.config import load_config
from pyserver.discovery.client import ClusterRoute
from pyserver.metrics import Metrics
from pyserver.mta.route import SingleServerRoute
from pyserver.mta.service import MtaService
from pyserver.observe import time_replies
from pyserver.processes.runtime import (
    add_http_port_argument,
    add_ready_file_argument,
    announce_ready,
    configure_logging,
    run,
    start_metrics_endpoint,
    stop_signal,
    withdraw_ready,
)
from pyserver.store.spec import open_store, parse_store_spec

__all__ = ["add_parser"]


class _Described:
    """What `start_metrics_endpoint` needs of the MTA proxy: its configuration (TLS) and its
    figures (each RCPT and DATA answered, timed: `pyserver.observe`)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.metrics = Metrics()

    def observe(self, service: MtaService) -> None:
        intake = service.intake
        intake.accept = time_replies(self.metrics, "SMTP DATA", intake.accept)  # type: ignore[method-assign]
        intake.recipient = time_replies(self.metrics, "SMTP RCPT", intake.recipient)  # type: ignore[method-assign]


async def _serve(
    config: Any, server: str | None, ready: Path | None, http_port: int | None = None
) -> None:
    stopped = stop_signal()
    store = open_store(parse_store_spec(config.store, config.data_dir))
    blobs = blob_store_for(config)
    route: Any
    keys, tls = config.service_keys(), config.client_tls()
    if config.discovery_addrs:  # a cluster: each recipient's owner, through discovery
        target = f"discovery {config.discovery_addrs}"
        route = ClusterRoute(config.discovery_addrs, keys, config.mta_deliver_timeout_s, tls=tls)
    else:
        host, port = endpoints.server_address(config.data_dir, server)
        target = f"{host}:{port}"
        route = SingleServerRoute(host, port, keys, config.mta_deliver_timeout_s, tls=tls)
    await store.open()
    try:
        await blobs.open()
        try:
            service = MtaService(config, store, blobs, route)
            described = _Described(config)
            described.observe(service)
            smtp_host, smtp_port = await service.start()
            try:
                http, http_address = await start_metrics_endpoint(
                    described, "mta", config.host, http_port
                )
            except BaseException:
                await service.stop()
                raise
            print(f"pyserver: MTA proxy listening on {smtp_host}:{smtp_port}", flush=True)
            print(f"  delivering to     {target}", flush=True)
            extra: dict[str, Any] = {"delivering_to": target}
            if service.implicit_address is not None:
                smtps_host, smtps_port = service.implicit_address
                print(f"  SMTP over TLS     {smtps_host}:{smtps_port}", flush=True)
                extra["smtps"] = f"{smtps_host}:{smtps_port}"
            announce_ready(ready, "mta", f"{smtp_host}:{smtp_port}", {**extra, **http_address})
            try:
                await stopped.wait()
            finally:
                withdraw_ready(ready)
                if http is not None:
                    await http.stop()
                await service.stop()
        finally:
            await blobs.close()
    finally:
        await store.close()


def _run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        overrides={
            "data_dir": args.data,
            "host": args.host,
            "smtp_port": args.smtp_port,
            "discovery_addrs": args.discovery,
        },
    ).with_service_key()
    configure_logging(config.log_level)
    run(_serve(config, args.server, args.ready_file, args.http_port))
    return 0


def add_parser(commands: Any, default_data: Path) -> argparse.ArgumentParser:
    """Add `mta` to the `pyserver` command line."""
    mta = commands.add_parser("mta", help="run the MTA proxy (SMTP in) in front of a cell")
    mta.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    mta.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
    mta.add_argument("--server", help="the app server, HOST:PORT (default: the cell's)")
    mta.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    mta.add_argument("--smtp-port", type=int, help="SMTP port (default 2525; 0: any)")
    mta.add_argument("--discovery", help="a cluster's discovery, host:port[,...] (not --server)")
    add_http_port_argument(mta)
    add_ready_file_argument(mta)
    mta.set_defaults(handler=_run)
    return mta
