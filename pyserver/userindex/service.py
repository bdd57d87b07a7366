"""The user index service: the social graph's operations behind the binary protocol.

Owns the answers to RELATION, FRIENDS, INDEX_FRIEND_ADD and INDEX_FRIEND_REMOVE
(docs/protocol.md, "User index service") over a `LocalUserIndex` (the store's
social table plus its cache of hot users). `UserIndexService` has the shape the
app server's `Dispatcher` drives (`execute`, `stats`), so the service reuses the
app server's wire shell as it is; `pyserver.processes.userindex` runs it as its own
process, `pyserver.processes.cell` in-process. Calls only the index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from pyserver.errors import BadRequest
from pyserver.userid import check_user_id
from pyserver.userindex.local import LocalUserIndex
from pyserver.wire.ops import Op

__all__ = ["UserIndexService"]


def _user(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if value is None:
        raise BadRequest(f"{name}: required")
    return check_user_id(value, name)


class UserIndexService:
    """The user index's operations for one `LocalUserIndex`, behind `execute(op, payload)`."""

    def __init__(self, index: LocalUserIndex) -> None:
        self.index = index
        self._requests: Counter[str] = Counter()
        self._relations: Counter[str] = Counter()
        self._handlers: dict[Op, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            Op.RELATION: self._relation,
            Op.FRIENDS: self._friends,
            Op.INDEX_FRIEND_ADD: self._friend_add,
            Op.INDEX_FRIEND_REMOVE: self._friend_remove,
        }

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        handler = self._handlers.get(op)
        if handler is None:
            raise BadRequest(f"op: {op.name} is not an operation of the user index service")
        self._requests[op.name] += 1
        return await handler(payload)

    async def _relation(self, p: dict[str, Any]) -> dict[str, Any]:
        relation = await self.index.relation(_user(p, "user"), _user(p, "sender"))
        self._relations[relation] += 1
        return {"relation": relation}

    async def _friends(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"friends": sorted(await self.index.friends(_user(p, "user")))}

    async def _friend_add(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.index.add_friend(_user(p, "user"), _user(p, "friend"))
        return {}

    async def _friend_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.index.remove_friend(_user(p, "user"), _user(p, "friend"))
        return {}

    # ---- what the dispatcher asks of every service ----

    def subscribe(self, user_id: int, callback: Callable[[dict[str, Any]], None]) -> Any:
        raise BadRequest("SUBSCRIBE: the user index service has no mailboxes to watch")

    def unsubscribe(self, token: Any) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        """Requests by operation, relations answered by kind, and the hot-user cache's figures."""
        return {
            "requests": dict(self._requests),
            "relations": dict(self._relations),
            "cache": self.index.stats(),
        }
