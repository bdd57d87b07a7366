"""Network addresses as settings give them: HOST:PORT, lists of them, data centres.

Parsed here once into typed values, so every process, client and check reads an
address the same way and refuses a bad one with the same message.

May import: pyserver.errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DataCentre", "parse_addresses", "parse_data_centres", "parse_host_port"]


def parse_host_port(address: str) -> tuple[str, int]:
    """(host, port) from "host:port"; ValueError unless both are there and the port fits."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def parse_addresses(addresses: str | Iterable[str]) -> list[str]:
    """["host:port", ...] from "host:port,host:port" or an iterable; ValueError if one is bad
    or there is none."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    result = []
    for item in (item.strip() for item in items):
        if item:
            parse_host_port(item)
            result.append(item)
    if not result:
        raise ValueError("no address (host:port) given")
    return result


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
        try:
            parsed = tuple(parse_host_port(server) for server in servers.split("+"))
        except ValueError as error:
            raise ValueError(f"data centre {spec!r}: {error}") from None
        return cls(name.strip(), parsed)

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
