"""The user index: who is whose friend, and so which folder a new conversation lands in.

Owns the social relation between a mailbox's user and a sender (friend, friend of a
friend, stranger) and the changes to friendships. `UserIndex` is the interface the
application server calls; `pyserver.userindex.local.LocalUserIndex` implements it on
the store's social table, and a separate user index service can implement it too.

May import: pyserver.errors, pyserver.userid, pyserver.wire, pyserver.store,
pyserver.client, pyserver.servicelink, pyserver.addresses, pyserver.servicekey.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

__all__ = ["RELATIONS", "Relation", "UserIndex"]

Relation = Literal["friend", "friend_of_friend", "stranger"]
RELATIONS: tuple[Relation, ...] = ("friend", "friend_of_friend", "stranger")


@runtime_checkable
class UserIndex(Protocol):
    """What the application server asks of a user index. Friendship is mutual."""

    async def relation(self, user_id: int, sender_id: int) -> Relation:
        """How `sender_id` stands to `user_id`: "friend", "friend_of_friend" or "stranger"."""
        ...

    async def friends(self, user_id: int) -> frozenset[int]:
        """The user's friends."""
        ...

    async def add_friend(self, user_id: int, friend_id: int) -> None:
        """Make the two users friends of each other (idempotent)."""
        ...

    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        """End the friendship both ways (idempotent)."""
        ...
