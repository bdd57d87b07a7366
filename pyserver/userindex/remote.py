"""`RemoteUserIndex`: the `UserIndex` an app server uses when the user index is its own process.

Owns the app server's link to the user index service (`pyserver.servicelink`):
opened on first use, with a short pause after a failed connect, so a service
that is down costs each DELIVER nothing but a fast `Unavailable` (the mailbox
then files the message in its default folder).
"""

from __future__ import annotations

import ssl
from typing import Any

from pyserver.addresses import parse_host_port
from pyserver.errors import PyserverError
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLink
from pyserver.userindex import RELATIONS, Relation
from pyserver.wire.ops import Op

__all__ = ["RemoteUserIndex"]


class RemoteUserIndex:
    """`pyserver.userindex.UserIndex` over the user index service at host:port.

    `relation` waits at most `relation_timeout_s` (the mailbox bounds it too);
    friendship changes wait at most `write_timeout_s`. Every failure is a
    `PyserverError`: `Unavailable` when the service cannot be reached.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        *,
        relation_timeout_s: float = 0.5,
        write_timeout_s: float = 5.0,
        connect_timeout_s: float = 0.5,
        retry_connect_after_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._relation_timeout_s = relation_timeout_s
        self._write_timeout_s = write_timeout_s
        self._link = ServiceLink(
            host,
            port,
            service_key,
            name="user index",
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=write_timeout_s,
            retry_connect_after_s=retry_connect_after_s,
            tls=tls,
        )

    @classmethod
    def from_address(cls, address: str, service_key: ServiceKey, **options: Any) -> RemoteUserIndex:
        """A client of the service at "host:port"."""
        host, port = parse_host_port(address)
        return cls(host, port, service_key, **options)

    async def relation(self, user_id: int, sender_id: int) -> Relation:
        reply = await self._request(
            Op.RELATION, {"user": user_id, "sender": sender_id}, self._relation_timeout_s
        )
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
        await self._link.close()

    async def _request(self, op: Op, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await self._link.request(op, payload, timeout)
