"""The MTA's address cache over a real SQLite address book: concurrent lookups share one
query, a found address is remembered for its time, an unknown recipient never is (a
newly added address is not refused), an unknown sender is for its own time."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pyserver.mta.addresscache import AddressCache
from pyserver.store.sqlite import SQLiteStore


class CountingStore:
    """The real store, with its lookups counted."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store, self.asked = store, 0

    async def resolve_address(self, address: str) -> int | None:
        self.asked += 1
        return await self.store.resolve_address(address)


def test_lookups_are_shared_and_remembered_but_absence_only_for_senders(tmp_path: Path):
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "store.db")
        await store.open()
        try:
            await store.add_address("bob@example.com", 2)
            counting = CountingStore(store)
            cache = AddressCache(counting, found_ttl_s=0.3, absent_ttl_s=0.3)  # type: ignore[arg-type]
            found = await asyncio.gather(
                *(cache.resolve_address("Bob@Example.com") for _ in range(20))
            )
            assert found == [2] * 20 and counting.asked == 1
            assert await cache.resolve_address("bob@example.com") == 2 and counting.asked == 1
            # a recipient nobody has is asked every time: adding it takes effect at once
            assert await cache.resolve_address("new@example.com") is None
            await store.add_address("new@example.com", 5)
            assert await cache.resolve_address("new@example.com") == 5
            asked = counting.asked
            # a sender nobody has is remembered for its time
            assert await cache.sender_user("out@example.net") is None
            assert await cache.sender_user("out@example.net") is None
            assert counting.asked == asked + 1
            # what is remembered is answered without asking (RCPT answered at once)
            asked = counting.asked
            assert cache.remembered("BOB@example.com") == (True, 2)
            assert cache.remembered("nobody@example.com") == (False, None)
            assert cache.remembered("out@example.net") == (False, None)  # absent: no RCPT
            assert cache.remembered("out@example.net", absent_too=True) == (True, None)
            assert counting.asked == asked
            # a re-pointed address reaches its new user once its time is over
            await store.add_address("bob@example.com", 3)
            await asyncio.sleep(0.35)
            assert cache.remembered("bob@example.com") == (False, None)
            assert await cache.resolve_address("bob@example.com") == 3
        finally:
            await store.close()

    asyncio.run(scenario())
