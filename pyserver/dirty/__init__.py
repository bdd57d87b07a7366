"""The memcache dirty service: no home page shows a stale unread count for long.

The web tier caches each user's COUNTS reply in memcached, in every data centre,
under `count_key(user)`. App servers report the users whose counts changed
(`pyserver.dirty.reporter`); the service (`pyserver.dirty.service`) deletes
those keys in every data centre and acknowledges the report; the web tier's
read (`pyserver.web.counts`) fills the keys again. This module owns what they
share: the key of a user's counts and the data centres' addresses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["COUNT_KEY_PREFIX", "DataCentre", "count_key", "memcached_client", "parse_data_centres"]

COUNT_KEY_PREFIX = b"pyserver:counts:"


def count_key(user_id: int) -> bytes:
    """The memcached key of a user's cached counts."""
    return COUNT_KEY_PREFIX + str(user_id).encode()


@dataclass(frozen=True, slots=True)
class DataCentre:
    """One data centre's memcached servers (keys spread over them by the client's hashing)."""

    name: str
    servers: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, spec: str) -> DataCentre:
        """`NAME=HOST:PORT[+HOST:PORT...]`, e.g. `east=127.0.0.1:11211`."""
        name, sep, servers = spec.strip().partition("=")
        if not sep or not name.strip() or not servers.strip():
            raise ValueError(f"data centre {spec!r}: want NAME=HOST:PORT[+HOST:PORT...]")
        parsed = []
        for server in servers.split("+"):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"data centre {spec!r}: {server!r} is not HOST:PORT")
            parsed.append((host, int(port)))
        return cls(name.strip(), tuple(parsed))

    def __str__(self) -> str:
        return f"{self.name}=" + "+".join(f"{host}:{port}" for host, port in self.servers)


def parse_data_centres(specs: str | list[str] | tuple[str, ...]) -> list[DataCentre]:
    """Data centres from `--dc` values or one comma-separated string; names must differ."""
    if isinstance(specs, str):
        specs = [spec for spec in specs.split(",") if spec.strip()]
    centres = [DataCentre.parse(spec) for spec in specs]
    names = [centre.name for centre in centres]
    if len(set(names)) != len(names):
        raise ValueError(f"data centres: a name is given twice in {', '.join(names)}")
    return centres


async def memcached_client(centre: DataCentre, timeout_s: float = 0.5) -> Any:
    """An emcache client of one data centre's servers; every call times out after `timeout_s`.

    The service and the web tier build theirs here, so both spread keys over a
    data centre's servers the same way (emcache's rendezvous hashing).
    """
    import emcache

    # emcache logs each connection it opens at INFO: keep its warnings only.
    logging.getLogger("emcache").setLevel(max(logging.WARNING, logging.getLogger().level))
    addresses = [emcache.MemcachedHostAddress(host, port) for host, port in centre.servers]
    return await emcache.create_client(
        addresses,
        timeout=timeout_s,
        connection_timeout=timeout_s,
        max_connections=8,
        # A server that was down is tried again on its next use.
        purge_unhealthy_nodes=False,
    )
