"""The MTA proxy's view of the address book: lookups shared and remembered for a moment.

Every mail asks the address book twice or more (RCPT, the From address, the To
and Cc names), and a busy proxy asks the same few addresses again and again.
`AddressCache.resolve_address` answers like `AddressStore.resolve_address`,
but lookups of one address under way at once share one query, and a found
address is remembered for `found_ttl_s` (a re-pointed address reaches its new
user within that). An address found in nobody's book is not remembered, so a
newly added address is never refused (550) on a stale answer; `sender_user`
(the From address, where "nobody" only means "delivered as from outside")
remembers that too, for `absent_ttl_s`.

Imports only the store's interface.
"""

from __future__ import annotations

import asyncio
import time

from pyserver.store.base import AddressStore

__all__ = ["AddressCache"]

# Remembered addresses at most; past that the memory starts afresh.
_MAX_ENTRIES = 65_536


class AddressCache:
    """`resolve_address` of an `AddressStore`, shared and remembered (module docstring)."""

    def __init__(
        self, addresses: AddressStore, found_ttl_s: float = 5.0, absent_ttl_s: float = 2.0
    ) -> None:
        self._addresses = addresses
        self._found_ttl_s = found_ttl_s
        self._absent_ttl_s = absent_ttl_s
        # address (casefolded) -> (user or None, until when it holds)
        self._known: dict[str, tuple[int | None, float]] = {}
        self._asking: dict[str, asyncio.Future[int | None]] = {}

    async def resolve_address(self, address: str) -> int | None:
        """The user an address belongs to; a found one may be up to `found_ttl_s` old."""
        return await self._resolve(address, remember_absent=False)

    async def sender_user(self, address: str) -> int | None:
        """As `resolve_address`, with "nobody" remembered too (for From addresses)."""
        return await self._resolve(address, remember_absent=True)

    def remembered(self, address: str, *, absent_too: bool = False) -> tuple[bool, int | None]:
        """(whether it is remembered, the user) of an address, without asking: what
        `resolve_address` (`sender_user` with `absent_too`) would answer from memory."""
        known = self._known.get(address.casefold())
        if known is None or known[1] <= time.monotonic():
            return False, None
        return (known[0] is not None or absent_too), known[0]

    async def _resolve(self, address: str, remember_absent: bool) -> int | None:
        key = address.casefold()
        now = time.monotonic()
        known = self._known.get(key)
        if known is not None and known[1] > now and (known[0] is not None or remember_absent):
            return known[0]
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, address))
            self._asking[key] = asking
        return await asyncio.shield(asking)

    async def _ask(self, key: str, address: str) -> int | None:
        try:
            user = await self._addresses.resolve_address(address)
        finally:
            del self._asking[key]
        if len(self._known) >= _MAX_ENTRIES:
            self._known.clear()
        ttl = self._found_ttl_s if user is not None else self._absent_ttl_s
        self._known[key] = (user, time.monotonic() + ttl)
        return user
