"""`RemoteUserIndex`: the `UserIndex` an app server uses when the user index is its own process.

Owns the app server's links to the user index service (`pyserver.servicelink`), one
per instance: opened on first use, with a short pause after a failed connect, so an
instance that is down costs a request nothing but a fast `Unavailable`. With several
instances (on one shared store, HBase: docs/operations.md) a request goes to the
instance that answered last and, when that one cannot be reached or does not answer in
time, to the next: each operation is idempotent, so a retry elsewhere is safe. Only when
no instance answers is the request `Unavailable` (the mailbox then files the message in
its default folder).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from pyserver.addresses import parse_addresses, parse_host_port
from pyserver.errors import PyserverError, Unavailable
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLink
from pyserver.userindex import RELATIONS, Relation
from pyserver.wire.ops import Op

__all__ = ["RemoteUserIndex"]


class RemoteUserIndex:
    """`pyserver.userindex.UserIndex` over the user index service at host:port, and over the
    other instances at `more` ("host:port" each), tried in turn (see the module docstring).

    `relation` waits at most `relation_timeout_s` in all, shared by the instances (the
    mailbox bounds it too); friendship changes wait at most `write_timeout_s`. Every failure is a
    `PyserverError`: `Unavailable` when no instance can be reached.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        *,
        more: Sequence[str] = (),
        relation_timeout_s: float = 0.5,
        write_timeout_s: float = 5.0,
        connect_timeout_s: float = 0.5,
        retry_connect_after_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._relation_timeout_s = relation_timeout_s
        self._write_timeout_s = write_timeout_s
        addresses = [(host, port), *(parse_host_port(address) for address in more)]
        self._links = [
            ServiceLink(
                link_host,
                link_port,
                service_key,
                name="user index",
                connect_timeout_s=connect_timeout_s,
                request_timeout_s=write_timeout_s,
                retry_connect_after_s=retry_connect_after_s,
                tls=tls,
            )
            for link_host, link_port in addresses
        ]
        self._preferred = 0  # the instance that answered last
        self.failovers = 0  # requests another instance answered after one failed

    @classmethod
    def from_address(cls, address: str, service_key: ServiceKey, **options: Any) -> RemoteUserIndex:
        """A client of the service at "host:port", or of its instances at "host:port,host:port"."""
        first, *more = parse_addresses(address)
        host, port = parse_host_port(first)
        return cls(host, port, service_key, more=more, **options)

    async def relation(self, user_id: int, sender_id: int) -> Relation:
        # the instances share the bound, so one that hangs leaves time for the next
        timeout = self._relation_timeout_s / len(self._links)
        reply = await self._request(Op.RELATION, {"user": user_id, "sender": sender_id}, timeout)
        relation = reply.get("relation")
        if relation not in RELATIONS:
            raise PyserverError(f"the user index answered an unknown relation {relation!r}")
        return relation

    async def friends(self, user_id: int) -> frozenset[int]:
        reply = await self._request(Op.FRIENDS, {"user": user_id}, self._write_timeout_s)
        return frozenset(reply["friends"])

    async def add_friend(self, user_id: int, friend_id: int) -> None:
        payload = {"user": user_id, "friend": friend_id}
        await self._request(Op.INDEX_FRIEND_ADD, payload, self._write_timeout_s)

    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        payload = {"user": user_id, "friend": friend_id}
        await self._request(Op.INDEX_FRIEND_REMOVE, payload, self._write_timeout_s)

    async def close(self) -> None:
        for link in self._links:
            await link.close()

    async def _request(self, op: Op, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        count = len(self._links)
        failures: list[str] = []
        # A link refuses at once for a moment after a failed connect, so that an instance
        # that is down costs nothing while another answers; when none has answered, the
        # second round connects anyway (an instance back within that moment is used).
        for attempt in range(2 * count if count > 1 else 1):
            index = (self._preferred + attempt) % count
            try:
                reply = await self._links[index].request(
                    op, payload, timeout, retry_now=attempt >= count
                )
            except Unavailable as error:  # down, unreachable or silent: the next instance
                failures.append(str(error))
                continue
            if index != self._preferred:
                self._preferred = index
                self.failovers += 1
            return reply
        if count == 1:
            raise Unavailable(failures[0])
        raise Unavailable(f"no user index instance answered: {'; '.join(failures)}")
