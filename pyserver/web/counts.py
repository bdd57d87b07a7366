"""The web tier's count read: memcached first, else COUNTS on the app server, then fill.

Owns `CountReader`, the read the home page's unread "jewels" make. The filling
is a lease, so a fill can never put back a count older than a delete of the
dirty service:

1. `get` the user's key: a cached COUNTS reply is the answer.
2. On a miss, `add` a lease (a unique token, with a short expiry) under the key;
   `add` fails if anyone else holds one or has filled it meanwhile.
3. Read COUNTS from the app server, then `cas` the reply over our lease. The
   dirty service's delete removes the lease too, so if a write committed (and
   was reported) after the lease was taken, the `cas` finds no lease and the
   stale reply is not stored; a fill that lands first is deleted by it.

A reader that finds a lease, or that cannot reach memcached, answers from COUNTS
without filling. A memcached that failed is skipped for `skip_after_failure_s`,
so a data centre whose cache is down costs the page one COUNTS call, not a
timeout per read. Calls memcached and the COUNTS callable it is given.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from pyserver.dirty import count_key

__all__ = ["CountReader"]

log = logging.getLogger(__name__)

# user id -> the app server's COUNTS reply ({"folders": {...}})
CountsFn = Callable[[int], Awaitable[dict[str, Any]]]

_LEASE = b"lease:"


class CountReader:
    """Counts of a user for the web tier, through one data centre's memcached.

    `cache` is an emcache client (`pyserver.dirty.memcached_client`) or None
    (no memcached: every read is a COUNTS call).
    """

    def __init__(
        self,
        cache: Any,
        counts: CountsFn,
        *,
        ttl_s: int = 600,
        lease_s: int = 10,
        skip_after_failure_s: float = 1.0,
    ) -> None:
        self._cache = cache
        self._counts = counts
        self._ttl_s = ttl_s
        self._lease_s = lease_s
        self._skip_after_failure_s = skip_after_failure_s
        self._failed_at: float | None = None
        self.figures = dict.fromkeys(("hits", "misses", "fills", "lost_leases", "cache_errors"), 0)

    @property
    def cache(self) -> Any:
        """The memcached client (None without one)."""
        return self._cache

    async def read(self, user_id: int) -> dict[str, Any]:
        """The user's COUNTS reply, from memcached when it holds a current one."""
        if not self._cache_usable():
            return await self._counts(user_id)
        key = count_key(user_id)
        try:
            item = await self._cache.get(key)
        except Exception as exc:
            self._cache_failed(exc)
            return await self._counts(user_id)
        if item is not None and not item.value.startswith(_LEASE):
            try:
                cached = orjson.loads(item.value)
            except orjson.JSONDecodeError:
                cached = None
            if isinstance(cached, dict):
                self.figures["hits"] += 1
                return cached
        self.figures["misses"] += 1
        if item is not None:
            # someone else's lease (or junk): answer without filling
            return await self._counts(user_id)
        return await self._read_and_fill(user_id, key)

    async def _read_and_fill(self, user_id: int, key: bytes) -> dict[str, Any]:
        import emcache

        lease = _LEASE + secrets.token_hex(8).encode()
        try:
            await self._cache.add(key, lease, exptime=self._lease_s)
            held = await self._cache.gets(key)
        except emcache.NotStoredStorageCommandError:
            # another reader's lease, or a fill, got there first
            return await self._counts(user_id)
        except Exception as exc:
            self._cache_failed(exc)
            return await self._counts(user_id)
        counts = await self._counts(user_id)
        if held is None or held.value != lease:
            self.figures["lost_leases"] += 1
            return counts
        try:
            await self._cache.cas(key, orjson.dumps(counts), held.cas, exptime=self._ttl_s)
        except emcache.StorageCommandError:
            # the dirty service deleted our lease: this reply may be older than a write
            self.figures["lost_leases"] += 1
        except Exception as exc:
            self._cache_failed(exc)
        else:
            self.figures["fills"] += 1
        return counts

    def _cache_usable(self) -> bool:
        if self._cache is None:
            return False
        failed_at = self._failed_at
        if failed_at is None:
            return True
        if time.monotonic() - failed_at >= self._skip_after_failure_s:
            self._failed_at = None
            return True
        return False

    def _cache_failed(self, exc: BaseException) -> None:
        self.figures["cache_errors"] += 1
        self._failed_at = time.monotonic()
        log.warning(
            "count cache failed, reading COUNTS for %.1f s: %r", self._skip_after_failure_s, exc
        )

    def stats(self) -> dict[str, int]:
        return dict(self.figures)
