"""The durable user -> cell directory, over the store's global `directory` table.

`Directory(store)` checks what discovery asks of it and reads and writes
through the store's directory family (`pyserver.store.base.DirectoryStore`).
A new user's placement is the store's conditional insert (`place_cell`), so
two discovery instances placing the same new user at once both end up with
the cell of the first writer; a move's flip (`assign`) overwrites.
"""

from __future__ import annotations

from pyserver.errors import BadRequest
from pyserver.store.base import DirectoryStore
from pyserver.userid import check_user_id

__all__ = ["Directory"]


class Directory:
    """User -> cell over an opened store (see the module docstring)."""

    def __init__(self, store: DirectoryStore) -> None:
        self.store = store

    async def cell_of(self, user_id: int) -> str | None:
        """The user's cell, or None for a user not placed yet."""
        return await self.store.get_cell(check_user_id(user_id, minimum=0))

    async def place(self, user_id: int, cell: str) -> str:
        """Put a new user in `cell` unless the directory has it already; the user's cell."""
        check_user_id(user_id, minimum=0)
        if not isinstance(cell, str) or not cell:
            raise BadRequest(f"cell: {cell!r} is not a cell name")
        return await self.store.place_cell(user_id, cell)

    async def assign(self, user_id: int, cell: str) -> None:
        """Point the user at `cell`, whatever it was (the flip of a move)."""
        await self.store.set_cell(check_user_id(user_id, minimum=0), cell)

    async def users_in(self, cell: str) -> list[int]:
        """The users placed in `cell`, in increasing order (a scan: call it rarely)."""
        if not isinstance(cell, str) or not cell:
            raise BadRequest(f"cell: {cell!r} is not a cell name")
        return await self.store.users_in_cell(cell)

    async def counts(self) -> dict[str, int]:
        """How many users each cell has (a scan: call it rarely)."""
        return await self.store.count_users_by_cell()
