"""Revoked user tokens, as an app server refuses them: read from the store and kept fresh.

`pyserver admin revoke` records a revocation in the cell's store (one token, or
every token a user was issued until now); every app server of the cell reads the
store's revocations every `refresh_s` and refuses those tokens from then on, in
HELLO and on the connections they already opened (`Dispatcher.revoke_sessions`).
A store that cannot be read keeps the revocations last read (and says so in the
log): refusing everyone would turn a store hiccup into an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pyserver.app.auth import UserToken
from pyserver.store.base import ALL_TOKENS, Revocation, RevocationStore

__all__ = ["Revocations"]

log = logging.getLogger(__name__)


class Revocations:
    """The revocations a process enforces; `start()` reads them and keeps them fresh."""

    def __init__(
        self,
        store: RevocationStore,
        *,
        refresh_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self.refresh_s = refresh_s
        self._on_change = on_change
        self._tokens: dict[int, set[str]] = {}  # user -> revoked token ids
        self._issued_until: dict[int, float] = {}  # user -> tokens issued up to this refused
        self._seen: set[Revocation] = set()
        self._task: asyncio.Task[None] | None = None

    def refuses(self, token: UserToken) -> bool:
        """Whether `token` is revoked (by its id, or with every token of its user)."""
        if token.token_id in self._tokens.get(token.user, ()):
            return True
        until = self._issued_until.get(token.user)
        return until is not None and token.issued_at <= until

    async def start(self) -> None:
        """Read the revocations (the store's error if it cannot), then refresh them."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> bool:
        """Read the store's revocations now; whether any was new."""
        found = set(await self._store.revocations())
        if found == self._seen:
            return False
        tokens: dict[int, set[str]] = {}
        issued_until: dict[int, float] = {}
        for revocation in found:
            if revocation.token_id == ALL_TOKENS:
                issued_until[revocation.user_id] = revocation.revoked_at
            else:
                tokens.setdefault(revocation.user_id, set()).add(revocation.token_id)
        self._tokens, self._issued_until, self._seen = tokens, issued_until, found
        log.info("revocations read count=%d", len(found))
        if self._on_change is not None:
            self._on_change()
        return True

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as error:  # the store's trouble: keep what was read
                log.warning("revocations not refreshed error=%r", error)
