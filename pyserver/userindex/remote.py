"""`RemoteUserIndex`: the `UserIndex` an app server uses when the user index is its own process.

Owns the app server's one connection to the user index service (a pipelined,
reconnecting `pyserver.client.Client`): opened on first use, with a short pause
after a failed connect so a service that is down costs each DELIVER nothing but
a fast `Unavailable` (the mailbox then files the message in its default folder).
Calls only the client.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pyserver.client import Client
from pyserver.errors import PyserverError, Unavailable
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
        service_key: str,
        *,
        relation_timeout_s: float = 0.5,
        write_timeout_s: float = 5.0,
        connect_timeout_s: float = 0.5,
        retry_connect_after_s: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self._service_key = service_key
        self._relation_timeout_s = relation_timeout_s
        self._write_timeout_s = write_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._retry_connect_after_s = retry_connect_after_s
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._connect_failed_at: float | None = None
        self._closed = False

    @classmethod
    def from_address(cls, address: str, service_key: str, **options: Any) -> RemoteUserIndex:
        """A client of the service at "host:port"."""
        host, _, port = address.rpartition(":")
        return cls(host or "127.0.0.1", int(port), service_key, **options)

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
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _request(self, op: Op, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        client = self._client or await self._connect()
        if not client.connected:
            # It reconnects in the background; meanwhile answer at once, not after a timeout.
            raise Unavailable(f"the user index at {self.host}:{self.port} is not connected")
        return await client.request(op, payload, timeout)

    async def _connect(self) -> Client:
        async with self._connecting:
            if self._client is not None:
                return self._client
            if self._closed:
                raise Unavailable("the user index client is closed")
            failed_at = self._connect_failed_at
            if failed_at is not None and time.monotonic() - failed_at < self._retry_connect_after_s:
                raise Unavailable(f"the user index at {self.host}:{self.port} is down")
            try:
                # Once connected, the client reconnects by itself after a drop.
                self._client = await Client.connect(
                    self.host,
                    self.port,
                    service_key=self._service_key,
                    connect_timeout=self._connect_timeout_s,
                    request_timeout=self._write_timeout_s,
                )
            except Unavailable:
                self._connect_failed_at = time.monotonic()
                raise
            self._connect_failed_at = None
            return self._client
