"""The app server's side of the dirty service: report users whose counts changed.

Owns `DirtyReporter`, the mailbox's `counts_changed` hook: `report(user)` only
adds the user to a bounded, coalescing in-memory queue (`DirtyQueue`), so a
write never waits for it; a background task drains the queue in batches to the
dirty service and waits for each acknowledgement, retrying with backoff while
the service cannot be reached. Past its bound the queue stops listing users and
asks the service for one flush instead (every count key everywhere goes), so a
report is never silently lost. `RemoteDirtyService` is the link to a service in
another process; in `pyserver run` the reporter calls the in-process service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pyserver.addresses import parse_host_port
from pyserver.dirty.queue import DirtyQueue
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLink
from pyserver.wire.ops import Op

__all__ = ["DirtyReporter", "RemoteDirtyService"]

log = logging.getLogger(__name__)

# (users, flush) -> the service's reply
Invalidate = Callable[[Sequence[int], bool], Awaitable[dict[str, Any]]]


class DirtyReporter:
    """Reports users to `invalidate` (a `DirtyService.invalidate` or a remote one's).

    `start()` starts the background task, `close()` stops it (after giving what is
    queued up to `drain_s` to be acknowledged). `synced()` waits until every user
    reported before the call has been acknowledged.
    """

    def __init__(
        self,
        invalidate: Invalidate,
        *,
        batch_size: int = 1_000,
        max_pending_users: int = 100_000,
        linger_s: float = 0.002,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self._invalidate = invalidate
        self._queue = DirtyQueue(max_pending_users)
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reported = 0
        self.batches = 0
        self.failures = 0
        self.behind: dict[str, int] = {}  # data centre -> acknowledgements it was behind in
        self.last_error = ""

    def report(self, user_id: int) -> None:
        """The user's counts changed (called after the write committed). Never blocks."""
        self.reported += 1
        self._queue.add((user_id,))
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, drain_s: float = 2.0) -> None:
        if self._task is None:
            return
        if self._queue.busy:
            await self.synced(drain_s)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._queue.release()

    async def synced(self, timeout: float | None = None) -> bool:
        """Wait until every report made so far is acknowledged; False if `timeout` ran out."""
        waiter = self._queue.wait(self._queue.last_ticket)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter)
        except TimeoutError:
            return False

    async def _run(self) -> None:
        delay = self._retry_initial_s
        while True:
            if not self._queue.busy:
                self._wake.clear()
                await self._wake.wait()
                # A moment for the writes of the same burst to join this batch.
                await asyncio.sleep(self._linger_s)
            batch = self._queue.take(self._batch_size)
            if batch is None:
                continue
            try:
                reply = await self._invalidate(batch.users, batch.flush)
            except Exception as exc:
                self._queue.failed(batch)
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("dirty report failed, retrying in %.2f s: %s", delay, self.last_error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self._queue.done(batch)
            self.batches += 1
            delay = self._retry_initial_s
            for centre in reply.get("behind", ()):
                self.behind[centre] = self.behind.get(centre, 0) + 1

    def stats(self) -> dict[str, Any]:
        return {
            "reported": self.reported,
            "pending": len(self._queue),
            "batches": self.batches,
            "failures": self.failures,
            "overflows": self._queue.overflows,
            "behind": dict(self.behind),
            "last_error": self.last_error,
        }


class RemoteDirtyService:
    """The DIRTY operation of a dirty service in another process, as an `Invalidate`."""

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 1.0,
        retry_connect_after_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._link = ServiceLink(
            host,
            port,
            service_key,
            name="dirty service",
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=timeout_s,
            retry_connect_after_s=retry_connect_after_s,
            tls=tls,
        )

    @classmethod
    def from_address(
        cls, address: str, service_key: ServiceKey, **options: Any
    ) -> RemoteDirtyService:
        host, port = parse_host_port(address)
        return cls(host, port, service_key, **options)

    async def __call__(self, users: Sequence[int], flush: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {"users": list(users)}
        if flush:
            payload["flush"] = True
        return await self._link.request(Op.DIRTY, payload)

    async def close(self) -> None:
        await self._link.close()
