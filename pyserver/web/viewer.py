"""What a signed-in person may ask of the app servers: every request scoped to their user.

The web tier talks to app servers as a trusted tier (the service key), so the
app server would answer for any user it is asked about. `Viewer` is the seam
that keeps a browser to its own mailbox: it is built from the session alone,
and every payload it sends names the session's user (`user`, or `sender` for
SEND); nothing a browser sends can name another. Ids a browser gives (threads,
messages, blob refs) are looked up by the app server inside that user's own
mailbox, so another user's ids are simply not found.

`AppServers` is what it calls: `pyserver.client.Client` in front of one app
server, `pyserver.discovery.client.ClusterClient` in front of a cluster (which
follows moves and failovers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from pyserver.client import Subscription
from pyserver.wire.ops import Op

__all__ = ["FOLDERS", "AppServers", "Viewer"]

# The folders of the web inbox, in the order the page lists them.
FOLDERS = ("inbox", "other", "archived", "sent", "spam")


class AppServers(Protocol):
    async def request(
        self, op: Op | int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]: ...

    def subscribe(self, user: int) -> Subscription: ...

    def get_blob(
        self, user: int, ref: str, message_id: str | None = None, window: int = 4
    ) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Viewer:
    """The app servers as one signed-in user sees them."""

    __slots__ = ("_counts", "_servers", "user")

    def __init__(
        self,
        servers: AppServers,
        user: int,
        counts: Callable[[int], Awaitable[dict[str, Any]]],
    ) -> None:
        self._servers = servers
        self._counts = counts
        self.user = user

    async def _ask(self, op: Op, **fields: Any) -> dict[str, Any]:
        fields["user"] = self.user
        return await self._servers.request(op, fields)

    async def counts(self) -> dict[str, int]:
        """Unread threads per folder (through the count cache when there is one)."""
        return dict((await self._counts(self.user))["folders"])

    async def threads(self, folder: str, before: str | None = None, limit: int = 25) -> dict:
        fields: dict[str, Any] = {"folder": folder, "limit": limit}
        if before:
            fields["before"] = before
        return await self._ask(Op.LIST_THREADS, **fields)

    async def thread(self, thread_id: str, before: str | None = None, limit: int = 50) -> dict:
        fields: dict[str, Any] = {"thread_id": thread_id, "limit": limit}
        if before:
            fields["before"] = before
        return await self._ask(Op.GET_THREAD, **fields)

    async def message(self, message_id: str) -> dict[str, Any]:
        """One message with its `extra` (attachments, mail headers)."""
        return await self._ask(Op.GET_MESSAGE, message_id=message_id)

    async def search(self, query: str, limit: int = 50) -> dict[str, Any]:
        return await self._ask(Op.SEARCH, query=query, limit=limit)

    async def send(
        self,
        recipients: Sequence[int | str],
        text: str,
        *,
        channel: str = "web",
        subject: str = "",
        attachments: Sequence[dict[str, Any]] = (),
        key: str | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "sender": self.user,
            "recipients": list(recipients),
            "text": text,
            "channel": channel,
            "subject": subject,
        }
        if attachments:
            payload["attachments"] = list(attachments)
        if key:
            payload["key"] = key
        return await self._servers.request(Op.SEND, payload)

    async def mark_read(self, thread_id: str) -> dict[str, Any]:
        return await self._ask(Op.MARK_READ, thread_id=thread_id)

    async def mark_unread(self, thread_id: str) -> dict[str, Any]:
        return await self._ask(Op.MARK_UNREAD, thread_id=thread_id)

    async def move(self, thread_id: str, folder: str) -> dict[str, Any]:
        return await self._ask(Op.MOVE, thread_id=thread_id, folder=folder)

    async def delete(self, thread_id: str) -> dict[str, Any]:
        return await self._ask(Op.DELETE, thread_id=thread_id)

    async def friends(self) -> list[int]:
        return sorted((await self._ask(Op.FRIENDS))["friends"])

    async def add_friend(self, friend: int) -> dict[str, Any]:
        return await self._ask(Op.FRIEND_ADD, friend=friend)

    async def remove_friend(self, friend: int) -> dict[str, Any]:
        return await self._ask(Op.FRIEND_REMOVE, friend=friend)

    def blob(self, ref: str, message_id: str) -> AsyncIterator[bytes]:
        """A blob one of this user's messages references, in pieces."""
        return self._servers.get_blob(self.user, ref, message_id)

    def subscribe(self) -> Subscription:
        return self._servers.subscribe(self.user)
