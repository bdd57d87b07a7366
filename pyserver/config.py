"""Configuration: one typed object, built once at start-up and passed down.

Sources, later ones winning: the defaults below (a single-node cell on
`./pyserver-data`), a TOML file (`--config FILE` or `PYSERVER_CONFIG`),
environment variables `PYSERVER_<FIELD>` (upper case), then command-line flags.
docs/configuration.md lists every field.

A running cluster's state (a `pyserver cluster up` folder, the cells' records in
ZooKeeper) is not configuration: `pyserver.cluster.state` reads it and sits above
this module, which imports neither the cluster, discovery nor the processes
(tests/test_layers.py checks it, and that no import circle comes back).

May import: pyserver.errors, pyserver.addresses, pyserver.servicekey, pyserver.store,
pyserver.tls.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pyserver.addresses import DataCentre, parse_addresses, parse_data_centres, parse_host_port
from pyserver.errors import PyserverError
from pyserver.servicekey import (
    SERVICE_KEY_FILE,
    ServiceKey,
    ServiceKeys,
    load_or_create_service_key,
)
from pyserver.store.spec import StoreSpec, parse_store_spec
from pyserver.tls import TierTls


class ConfigError(PyserverError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class Config:
    # where the embedded store and the service key live
    data_dir: Path = Path("pyserver-data")
    # the application server (binary protocol)
    host: str = "127.0.0.1"
    port: int = 7400
    # HTTP: /metrics (Prometheus) and /health
    http_port: int = 7480
    node_id: str = "node-1"
    cell: str = "cell-1"
    # trusted tiers' key, fixed; when unset, the keys of service_key_file
    service_key: str = ""
    # the key file (one key a line, the first current), re-read as it changes so keys
    # rotate without a restart; empty: data_dir/service.key (created on first start)
    service_key_file: str = ""
    # how often an app server reads the store's revoked user tokens
    revocation_refresh_s: float = 1.0
    max_frame_size: int = 1 << 20
    max_in_flight_per_connection: int = 256
    # requests a second one user-token user may make of an app server, and the burst
    # allowed above it (TOO_MANY beyond); 0: unlimited. Service connections are not limited.
    user_requests_per_s: float = 1000.0
    user_request_burst: int = 2000
    # requests one user-token user may have running at once, over all connections (0: any)
    user_max_in_flight: int = 1024
    # requests running at once from one peer address on connections that are not
    # service connections (0: any)
    peer_max_in_flight: int = 4096
    # requests a second from one peer address on connections that are not service
    # connections (user tokens, and HELLOs: token guessing), and the burst; 0: unlimited
    peer_requests_per_s: float = 5000.0
    peer_request_burst: int = 10000
    # a frame must arrive whole within this long of its first byte (slow senders)
    frame_timeout_s: float = 30.0
    # connections from one peer address at once (TOO_MANY and closed beyond)
    max_connections_per_peer: int = 4096
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 10.0
    shutdown_grace_s: float = 10.0
    # write-through cache of user images
    cache_max_users: int = 100_000
    cache_max_bytes: int = 512 << 20
    snapshot_every: int = 200
    max_text_bytes: int = 256 << 10
    # folder for new threads when the user index cannot answer
    default_folder: str = "inbox"
    log_level: str = "INFO"
    # the user index service, "host:port" (or its instances, "host:port,host:port", tried
    # in turn); empty: the cell's own index, in-process
    userindex_addr: str = ""
    # memcached of each data centre, for the unread-count caches:
    # "east=HOST:PORT,west=HOST:PORT[+HOST:PORT]"; empty: no count caches, no dirty reports
    memcached_dcs: str = ""
    # the dirty service, "host:port"; empty: in-process (when memcached_dcs is set)
    dirty_addr: str = ""
    # the data centre whose memcached this process's count reads use (default: the first)
    local_dc: str = ""
    # ---- cells of several app servers: `pyserver node` (docs/cluster.md) ----
    # ZooKeeper, "host:port[,host:port...]"; empty: no cluster (`pyserver run` needs none)
    zookeeper: str = ""
    # the ZooKeeper path every cell lives under
    zookeeper_chroot: str = "/pyserver"
    # ZooKeeper expires a silent node's session (and registration) after this long
    zookeeper_session_timeout_s: float = 10.0
    # the digest identity this process signs in to ZooKeeper with, "user:password"; the
    # nodes it creates are its own (and readable by zookeeper_read_ids); empty: no ACLs
    zookeeper_auth: str = ""
    # digest ids ("user:base64", `pyserver admin zk-digest`) that may read the cells' tree
    zookeeper_read_ids: str = ""
    # this node's tokens on its cell's ring (every node of a cell should use the same)
    tokens_per_node: int = 64
    # the store: "sqlite:PATH" or "hbase:HOST:PORT[/namespace]"; empty: SQLite in data_dir
    store: str = ""
    # where attachments and raw mail live, a store spec like `store` (one blob store for
    # the whole cluster: the MTA proxy writes there, every app server reads); empty:
    # beside `store`
    blob_store: str = ""
    # the host other servers and clients reach this node at; empty: host
    advertise_host: str = ""
    # how long a SEND's copy may take to reach a recipient's owner, retries included
    relay_timeout_s: float = 5.0
    # a draining node answers NOT_OWNER this long before it stops listening
    drain_settle_s: float = 1.0
    # discovery instances, "host:port[,host:port...]": app servers reach other cells' users
    # through them, the MTA proxy and the CLI route by them; empty: a cell on its own
    discovery_addrs: str = ""
    # a discovery instance removes a "moved" marker this long after the move, once every
    # live instance has seen it (0: never), and looks for such markers this often
    moved_marker_grace_s: float = 3600.0
    moved_marker_sweep_s: float = 30.0
    # ---- the MTA proxy (SMTP in; docs/mail.md) ----
    # its SMTP port (`pyserver run` and `pyserver mta`; 0: any free port)
    smtp_port: int = 2525
    # the largest message accepted (SMTP SIZE; larger: 552)
    max_mail_bytes: int = 80 << 20
    # a mail body longer than this (UTF-8 bytes) is delivered cut, whole in the blob store
    mail_inline_text_bytes: int = 64 << 10
    # a mail of at most this many bytes goes with each copy, committed with its log entry,
    # instead of into the blob store (0: every raw mail is a blob; at most 65536)
    mail_inline_raw_bytes: int = 8 << 10
    # one delivery to a recipient's owner, connecting included; past it the proxy answers 451
    mta_deliver_timeout_s: float = 10.0
    # ---- mail out: SEND to email addresses (docs/mail.md, "Mail out") ----
    # the smart host outgoing mail is relayed through, "host:port"; empty: such mail waits
    # in its sender's log, queued, until a relay is configured
    relay_addr: str = ""
    # this cell's mail domain: users' mail goes out from u<user>@<mail_domain>, and mail to
    # those addresses comes back to them
    mail_domain: str = "pyserver.localhost"
    # an address the relay keeps deferring is given up (failed) once the mail is this old
    outbound_give_up_s: float = 345_600.0
    # a PEM RSA key: outgoing mail is DKIM-signed for mail_domain with it; empty: unsigned
    dkim_key_file: str = ""
    # the DKIM selector the key's public half is published under
    dkim_selector: str = "pyserver"
    # SMTP submission for mail clients (STARTTLS, then AUTH with a user token): its port;
    # -1: none, 0: any free port. Needs tls_cert_file and tls_key_file (PEM).
    submission_port: int = -1
    # SMTP with implicit TLS (RFC 8314), beside the plain port; -1: none. Needs `tls`.
    smtps_port: int = -1
    # ---- TLS between the tiers (docs/security.md) ----
    # every listener speaks TLS and every connection to another tier is made with it
    tls: bool = False
    # this process's certificate and key (PEM); submission's STARTTLS uses them too
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # the CA servers (and, with tls_mutual, clients) are checked against; empty: the system's
    tls_ca_file: str = ""
    # listeners of the binary protocol accept only clients with a certificate from the CA
    tls_mutual: bool = False
    # ---- the web tier: the inbox and web chat (docs/web.md) ----
    # its HTTP port (`pyserver run` and `pyserver web`); -1: none, 0: any free port
    web_port: int = 7488
    # the largest request a browser may send (a message with its files)
    web_max_upload_bytes: int = 25 << 20
    # how long a browser stays signed in (never past its sign-in token's expiry)
    web_session_s: int = 7 * 86_400
    # the operators' page /ops (docs/operations.md): the `pyserver cluster up` folder it
    # surveys (empty: no page), and a token accepted there besides the service key
    ops_cluster: str = ""
    ops_token: str = ""
    # ---- the IMAP gateway: conversations in mail clients (docs/imap.md) ----
    # its IMAP port (STARTTLS with `tls`), `pyserver run` and `pyserver imap`; -1: none
    imap_port: int = 1143
    # IMAP over TLS from the first byte (RFC 8314); needs `tls`; -1: none
    imaps_port: int = -1
    # ---- the SMS gateway: SMPP 3.4 to SMSCs (docs/sms.md) ----
    # the SMSCs to bind to as a transceiver, "host:port[,host:port...]"; empty: no SMS
    smsc: str = ""
    sms_system_id: str = "pyserver"
    sms_password: str = ""
    # the short codes texts are sent to, and the user owning each: "12345=7,54321=9"
    sms_short_codes: str = ""
    # submit_sm sent and not yet answered, per SMSC
    sms_window: int = 32
    # a cluster's SMS gateway (`pyserver sms`), "host:port": app servers text their
    # users' copies through it; empty: texted by this process's own sessions (`smsc`)
    sms_gateway_addr: str = ""

    @property
    def service_key_path(self) -> Path:
        if self.service_key_file:
            return Path(self.service_key_file)
        return self.data_dir / SERVICE_KEY_FILE

    def with_service_key(self) -> Config:
        """This config with its current service key filled in from the key file (created
        in data_dir on first start)."""
        if self.service_key:
            return self
        try:
            if self.service_key_file:
                key = ServiceKeys.from_file(self.service_key_path).current
            else:
                key = load_or_create_service_key(self.data_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return dataclasses.replace(
            self, service_key=key, service_key_file=str(self.service_key_path)
        )

    def service_keys(self) -> ServiceKey:
        """The keys this process accepts and the current one it uses: the key file's, re-read
        as it changes (after `with_service_key`), or the fixed `service_key`."""
        if self.service_key_file:
            try:
                return ServiceKeys.from_file(self.service_key_path)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self.service_key

    # The settings below are strings in files and flags; these are their parsed values,
    # checked once by load_config.

    @property
    def store_spec(self) -> StoreSpec:
        """The metadata store to open (`store`)."""
        return parse_store_spec(self.store, self.data_dir)

    @property
    def data_centres(self) -> list[DataCentre]:
        """Each data centre's memcached (`memcached_dcs`); empty: no count caches."""
        return parse_data_centres(self.memcached_dcs)

    @property
    def tier_tls(self) -> TierTls | None:
        """The TLS contexts' source when `tls` is on; None: plain text."""
        if not self.tls:
            return None
        return TierTls(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_mutual)

    def server_tls(self) -> ssl.SSLContext | None:
        """The context of this process's binary-protocol listener (or None): with
        `tls_mutual`, clients must present a certificate from the CA."""
        tier = self.tier_tls
        return tier.server_context() if tier is not None else None

    def public_tls(self) -> ssl.SSLContext | None:
        """The context of the listeners people and outside programs reach (HTTP, the web
        tier, SMTP): no client certificate asked (or None)."""
        tier = self.tier_tls
        return tier.server_context(require_client_cert=False) if tier is not None else None

    def client_tls(self) -> ssl.SSLContext | None:
        """The context of every connection this process makes to another tier (or None)."""
        tier = self.tier_tls
        return tier.client_context() if tier is not None else None

    @property
    def zookeeper_read_id_list(self) -> list[str]:
        """The digest ids of `zookeeper_read_ids`."""
        return [part.strip() for part in self.zookeeper_read_ids.split(",") if part.strip()]

    @property
    def discovery(self) -> list[str]:
        """The discovery instances, "host:port" each (`discovery_addrs`); empty: none."""
        return parse_addresses(self.discovery_addrs) if self.discovery_addrs else []


def _convert(name: str, kind: type, value: Any) -> Any:
    """A raw value (TOML or environment string) converted to the field's type."""
    try:
        if kind is Path:
            return Path(value)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind is int and isinstance(value, float):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config {name}: {value!r} is not a valid {kind.__name__}") from None


_TYPES = {"Path": Path, "str": str, "int": int, "float": float, "bool": bool}


def load_config(
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the TOML file, then PYSERVER_* variables, then overrides (flags)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: _TYPES[str(f.type)] for f in fields(Config)}

    file = file or env.get("PYSERVER_CONFIG") or None
    if file:
        try:
            with open(file, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
        for name, value in document.items():
            if name not in known:
                raise ConfigError(f"config file {file}: unknown setting {name!r}")
            values[name] = _convert(name, known[name], value)
    for name, kind in known.items():
        raw = env.get(f"PYSERVER_{name.upper()}")
        if raw is not None:
            values[name] = _convert(name, kind, raw)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, known[name], value)
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    for name in ("port", "http_port", "smtp_port"):
        if not 0 <= getattr(config, name) <= 65535:
            raise ConfigError(f"config {name}: {getattr(config, name)} is not a TCP port")
    positive = (
        "max_frame_size",
        "max_in_flight_per_connection",
        "cache_max_users",
        "cache_max_bytes",
        "snapshot_every",
        "max_text_bytes",
        "idle_timeout_s",
        "request_timeout_s",
        "frame_timeout_s",
        "max_connections_per_peer",
        "revocation_refresh_s",
        "web_max_upload_bytes",
        "web_session_s",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"config {name}: must be positive, not {getattr(config, name)}")
    _check_services(config)
    _check_cluster(config)
    for name in ("submission_port", "smtps_port", "web_port", "imap_port", "imaps_port"):
        if not -1 <= getattr(config, name) <= 65535:
            raise ConfigError(f"config {name}: {getattr(config, name)} is not a port or -1")
    _check_sms(config)
    if config.user_requests_per_s < 0 or config.user_request_burst < 1:
        raise ConfigError("config user_requests_per_s / user_request_burst: >= 0 and >= 1")
    if config.peer_requests_per_s < 0 or config.peer_request_burst < 1:
        raise ConfigError("config peer_requests_per_s / peer_request_burst: >= 0 and >= 1")
    if config.user_max_in_flight < 0 or config.peer_max_in_flight < 0:
        raise ConfigError("config user_max_in_flight / peer_max_in_flight: >= 0")
    _check_tls(config)
    if config.dkim_key_file and not os.access(config.dkim_key_file, os.R_OK):
        raise ConfigError(f"config dkim_key_file: cannot read {config.dkim_key_file!r}")
    if config.outbound_give_up_s <= 0:
        raise ConfigError("config outbound_give_up_s: must be positive")
    if not 0 <= config.mail_inline_raw_bytes <= 64 << 10:
        raise ConfigError("config mail_inline_raw_bytes: must be in 0..65536")
    domain = config.mail_domain
    if "." not in domain or any(c.isspace() or c in "@<>" for c in domain):
        raise ConfigError(f"config mail_domain: {domain!r} is not a domain name")
    if config.default_folder not in ("inbox", "other"):
        raise ConfigError(f"config default_folder: {config.default_folder!r} is not inbox or other")


def _check_tls(config: Config) -> None:
    for name in ("smtps_port", "imaps_port"):
        if getattr(config, name) >= 0 and not config.tls:
            raise ConfigError(f"config {name}: implicit TLS needs tls = true")
    needs = [
        ("tls_cert_file", config.submission_port >= 0 or config.tls, "a readable PEM file"),
        ("tls_key_file", config.submission_port >= 0 or config.tls, "a readable PEM file"),
        ("tls_ca_file", config.tls_mutual, "the CA of mutual TLS, a readable PEM file"),
    ]
    for name, needed, what in needs:
        path = getattr(config, name)
        if (needed or path) and (not path or not os.access(path, os.R_OK)):
            raise ConfigError(f"config {name}: needs {what}, not {path!r}")
    if config.tls_mutual and not config.tls:
        raise ConfigError("config tls_mutual: needs tls = true")


def _check_sms(config: Config) -> None:
    try:
        if config.smsc:
            parse_addresses(config.smsc)
        short_codes(config)
    except ValueError as exc:
        raise ConfigError(f"config smsc / sms_short_codes: {exc}") from None
    if config.sms_window < 1:
        raise ConfigError("config sms_window: must be at least 1")


def short_codes(config: Config) -> dict[str, int]:
    """`sms_short_codes` parsed: short code -> the user owning it (ValueError if malformed)."""
    found: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in config.sms_short_codes.split(","))):
        code, equals, user = item.partition("=")
        if not equals or not code.strip().isdigit() or not user.strip().isdigit():
            raise ValueError(f"{item!r} is not SHORTCODE=USER")
        found[code.strip()] = int(user)
    return found


def _check_services(config: Config) -> None:
    """The user index, dirty service and memcached settings."""
    for name in ("userindex_addr", "dirty_addr", "relay_addr", "sms_gateway_addr"):
        address = getattr(config, name)
        try:
            if address and name == "userindex_addr":
                parse_addresses(address)
            elif address:
                parse_host_port(address)
        except ValueError as exc:
            raise ConfigError(f"config {name}: {exc}") from None
    try:
        centres = parse_data_centres(config.memcached_dcs)
    except ValueError as exc:
        raise ConfigError(f"config memcached_dcs: {exc}") from None
    if config.local_dc and config.local_dc not in [centre.name for centre in centres]:
        raise ConfigError(f"config local_dc: {config.local_dc!r} is not in memcached_dcs")


def _check_cluster(config: Config) -> None:
    """The settings of `pyserver node`."""
    for name in ("zookeeper_session_timeout_s", "relay_timeout_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"config {name}: must be positive, not {getattr(config, name)}")
    if config.drain_settle_s < 0:
        raise ConfigError(f"config drain_settle_s: must be >= 0, not {config.drain_settle_s}")
    if config.moved_marker_grace_s < 0 or config.moved_marker_sweep_s <= 0:
        raise ConfigError("config moved_marker_grace_s / moved_marker_sweep_s: >= 0 and > 0")
    if config.discovery_addrs:
        try:
            parse_addresses(config.discovery_addrs)
        except ValueError as exc:
            raise ConfigError(f"config discovery_addrs: {exc}") from None
    if config.zookeeper_auth and ":" not in config.zookeeper_auth.strip(":"):
        raise ConfigError("config zookeeper_auth: expected user:password")
    if not 1 <= config.tokens_per_node <= 65_536:
        raise ConfigError(f"config tokens_per_node: {config.tokens_per_node} is not in 1..65536")
    try:
        parse_store_spec(config.store, config.data_dir)
    except ValueError as exc:
        raise ConfigError(f"config store: {exc}") from None
