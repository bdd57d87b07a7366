"""The store interface every engine implements (DESIGN.md "Storage schema").

The per-user log, ordered by sequence number, is the truth; a snapshot is a
serialized user image at a log position. Appends are compare-and-set on the
user's last sequence number, so two writers that both believe they own a user
can never both append the same entry.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyserver.errors import PyserverError, Unavailable

# One user's search index write: (user id, index mark, (term, message id) pairs).
IndexMark = tuple[int, int, Sequence[tuple[str, str]]]
# `index_terms` calls under way at once in the default `index_terms_many`.
INDEX_WRITERS = 4


class WriteConflict(PyserverError):
    """The user's log moved on since the writer read it; reload and re-check ownership."""

    code = "CONFLICT"

    def __init__(self, user_id: int, expected_seq: int, actual_seq: int) -> None:
        super().__init__(
            f"log of user {user_id} is at seq {actual_seq}, the writer expected {expected_seq}"
        )
        self.user_id = user_id
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq


class Fenced(WriteConflict):
    """Another server claimed the user (`LogStore.claim`) after this writer did: the
    writer is a stale owner; it may write again only after claiming the user itself."""

    def __init__(self, user_id: int, seq: int, epoch: int, current: int) -> None:
        super().__init__(user_id, seq, seq)
        self.args = (
            f"user {user_id} was claimed by a newer owner (epoch {current}); "
            f"this writer holds epoch {epoch}",
        )
        self.epoch = epoch
        self.current_epoch = current


class StoreUnavailable(Unavailable):
    """The store cannot be reached or failed; nothing was acknowledged, retry later."""


# Rows of a user's `m` family that are not message bodies: records about the user's log,
# written in the same atomic append as the entries they describe (never a message id:
# those start with "m"). Whoever copies a user's log to another store copies them too.
RESTORES_RECORD = "~restores"  # the restores that wrote entries (pyserver.app.history)
USER_RECORDS: tuple[str, ...] = (RESTORES_RECORD,)


@dataclass(frozen=True, slots=True)
class LogAppend:
    """One atomic write to one user's data: log records plus what they refer to.

    `records` are encoded log records (pyserver.logcodec) with sequence numbers
    `expected_seq + 1, expected_seq + 2, ...`; the append succeeds only if the
    user's last stored sequence number is `expected_seq` (0: an empty log) and,
    when `owner_epoch` is given, the user's owner epoch is still that one (the
    fencing token its writer got from `LogStore.claim`; None: no owner, as for
    the importer and moves, whose compare-and-set is on the seq alone).
    """

    user_id: int
    expected_seq: int
    records: Sequence[bytes]
    # message id -> message body and metadata (JSON bytes), the `m` family
    messages: dict[str, bytes] = field(default_factory=dict)
    # (term, message id) pairs for the search index, the `x` family. The mailbox leaves
    # this empty on its hot path: the index is derived from the log (`index_terms`).
    terms: Sequence[tuple[str, str]] = ()
    owner_epoch: int | None = None

    @property
    def last_seq(self) -> int:
        return self.expected_seq + len(self.records)


class Lifecycle(ABC):
    """What every engine has: opening and closing."""

    @abstractmethod
    async def open(self) -> None:
        """Connect, create what is missing (safe to run twice)."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes, then release every resource."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Whether the engine answers a read now (the processes' health checks)."""


class LogStore(Lifecycle):
    """Per-user logs, snapshots, message bodies and the search index derived from the log:
    what an app server keeps for the users it owns."""

    @abstractmethod
    async def append(self, write: LogAppend) -> None:
        """Append atomically (records, messages and terms together), or raise WriteConflict."""

    @abstractmethod
    async def claim(self, user_id: int) -> int:
        """Make the caller the user's writer: raise the user's owner epoch by one,
        atomically, and return the new epoch. From then on an append carrying an older
        epoch fails with `Fenced`, so an owner that checked its ownership before another
        server claimed the user (paused, then woken) appends nothing."""

    @abstractmethod
    async def last_seq(self, user_id: int) -> int:
        """The user's last log sequence number; 0 for a user with no log."""

    @abstractmethod
    async def read_log(
        self, user_id: int, after_seq: int = 0, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        """(seq, record) pairs with seq > after_seq, in order, at most `limit` of them."""

    @abstractmethod
    async def write_snapshot(self, user_id: int, seq: int, image: bytes) -> None:
        """Keep `image` as the user's latest snapshot at log position `seq`.

        A snapshot older than the one stored is ignored, so a late writer never
        replaces a newer snapshot; one at the same position replaces it.
        """

    @abstractmethod
    async def read_snapshot(self, user_id: int) -> tuple[int, bytes] | None:
        """(seq, image) of the latest snapshot, or None."""

    @abstractmethod
    async def get_messages(self, user_id: int, message_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies of the given messages that exist, by message id."""

    @abstractmethod
    async def search(self, user_id: int, terms: Sequence[str]) -> list[str]:
        """Message ids of the user's messages indexed under every one of `terms`, sorted.

        No terms: no ids.
        """

    # ---- the search index, derived from the log (pyserver.app.indexer) ----

    @abstractmethod
    async def index_terms(
        self, user_id: int, indexed_seq: int, terms: Sequence[tuple[str, str]]
    ) -> None:
        """Add (term, message id) pairs to the user's search index and raise the user's
        index mark to `indexed_seq`: the log up to there is indexed. Idempotent; the
        mark never goes down (a late or repeated call leaves a higher one in place)."""

    async def index_terms_many(self, marks: Sequence[IndexMark]) -> None:
        """`index_terms` for many users (user id, mark, terms); an engine that can write
        them in one call overrides this. Here: `INDEX_WRITERS` calls at a time, and the
        first failure raised once every call has ended (some users may be written)."""
        writers = asyncio.Semaphore(INDEX_WRITERS)

        async def write(user_id: int, mark: int, terms: Sequence[tuple[str, str]]) -> None:
            async with writers:
                await self.index_terms(user_id, mark, terms)

        outcomes = await asyncio.gather(*(write(*m) for m in marks), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    @abstractmethod
    async def indexed_seq(self, user_id: int) -> int:
        """The user's index mark (`index_terms`); 0 when nothing was indexed that way."""

    @abstractmethod
    async def user_ids(self) -> list[int]:
        """Every user with a log, in ascending order (for export and rebuild tools)."""

    async def healthy(self) -> bool:
        try:
            await self.last_seq(0)
        except Exception:
            return False
        return True


class DirectoryStore(Lifecycle):
    """The global user -> cell directory (discovery's table)."""

    @abstractmethod
    async def get_cell(self, user_id: int) -> str | None: ...

    @abstractmethod
    async def set_cell(self, user_id: int, cell: str) -> None:
        """Point the user at `cell`, whatever it was."""

    @abstractmethod
    async def place_cell(self, user_id: int, cell: str) -> str:
        """Put a new user in `cell` unless the directory has the user already, as one atomic
        conditional insert; the user's cell (the first writer's), read back."""

    @abstractmethod
    async def count_users_by_cell(self) -> dict[str, int]:
        """How many users the directory places in each cell."""

    @abstractmethod
    async def users_in_cell(self, cell: str) -> list[int]:
        """The users the directory places in `cell`, in increasing order (a scan)."""

    async def healthy(self) -> bool:
        try:
            await self.get_cell(0)
        except Exception:
            return False
        return True


class SocialStore(Lifecycle):
    """Mutual friendships (the user index's table)."""

    @abstractmethod
    async def friends(self, user_id: int) -> set[int]: ...

    @abstractmethod
    async def add_friend(self, user_id: int, friend_id: int) -> None:
        """Make the two users friends of each other (idempotent); nobody is their own friend.

        Raises BadRequest when `user_id == friend_id`.
        """

    @abstractmethod
    async def remove_friend(self, user_id: int, friend_id: int) -> None:
        """End the friendship both ways (idempotent)."""


class AddressStore(Lifecycle):
    """Email addresses and phone numbers -> users (the MTA's and gateways' address book)."""

    @abstractmethod
    async def resolve_address(self, address: str) -> int | None:
        """The user an address belongs to (addresses are matched case-insensitively)."""

    @abstractmethod
    async def add_address(self, address: str, user_id: int) -> None:
        """Register (or re-point) an address."""


# The token id a revocation of every token a user was issued before it carries.
ALL_TOKENS = "*"


@dataclass(frozen=True, slots=True)
class Revocation:
    """A user token revoked (`token_id`), or every token of `user_id` issued before
    `revoked_at` (`token_id` ALL_TOKENS). Times are Unix seconds."""

    user_id: int
    token_id: str
    revoked_at: float


class RevocationStore(Lifecycle):
    """Revoked user tokens (read by every app server of the cell, a few times a minute)."""

    @abstractmethod
    async def revoke(self, revocation: Revocation) -> None:
        """Record a revocation (idempotent; a new time for the same token replaces the old)."""

    @abstractmethod
    async def revocations(self) -> list[Revocation]:
        """Every revocation recorded."""


class Store(LogStore, DirectoryStore, SocialStore, AddressStore, RevocationStore):
    """A pluggable store of every table family. Every method is a coroutine; a write is
    durable when it returns.

    Engines raise StoreUnavailable when they cannot serve (never a raw driver
    error), and WriteConflict when an append loses its compare-and-set. User ids
    and sequence numbers are unsigned 64-bit: anything outside that range is a
    BadRequest (a ValueError), raised before anything is written. A part that needs
    one family only takes that family (`LogStore`, `DirectoryStore`, `SocialStore`,
    `AddressStore`, `RevocationStore`), so an engine serving only some of them fits it.
    """
