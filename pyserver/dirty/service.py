"""`DirtyService`: deletes reported users' count keys in memcached in every data centre.

Owns one worker per data centre, each with its own `DirtyQueue`, so a data
centre that is down (or slow) never holds up the others. A worker deletes its
users' keys in batches; when a batch fails (a timeout, a refused connection)
the data centre is *down*: its users stay queued, it is retried with
exponential backoff, and it catches up, oldest reports first, when it answers
again. A data centre that piles up more than `max_pending_users` while down is
flushed whole (memcached `flush_all` on each of its servers) when it returns.

Acknowledgement (`invalidate`, the DIRTY reply): a report is acknowledged once,
in every data centre, either its users' keys are deleted, or the data centre is
down (it is then named in `behind` and will catch up by itself). So once a
report is acknowledged, no data centre that is up holds a count older than the
write that caused the report. Calls only memcached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from pyserver.addresses import DataCentre
from pyserver.dirty import count_key, memcached_client
from pyserver.dirty.queue import Batch, DirtyQueue
from pyserver.errors import BadRequest, TooLarge
from pyserver.userid import check_user_id
from pyserver.wire.ops import Op

__all__ = ["MAX_REPORT_USERS", "DirtyService"]

log = logging.getLogger(__name__)

# Users in one DIRTY request.
MAX_REPORT_USERS = 10_000


class _CentreWorker:
    """One data centre: its queue, its memcached client and the loop that drains them."""

    def __init__(
        self,
        centre: DataCentre,
        client: Any,
        *,
        batch_size: int,
        max_pending_users: int,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self.centre = centre
        self.client = client
        self.queue = DirtyQueue(max_pending_users)
        self.up = True
        self._batch_size = batch_size
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.deleted = 0
        self.flushes = 0
        self.failures = 0
        self.down_since: float | None = None
        self.last_error = ""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.queue.release()

    def add(self, users: Sequence[int], flush: bool) -> int:
        ticket = self.queue.add_flush() if flush else self.queue.add(users)
        self._wake.set()
        return ticket

    async def settle(self, ticket: int) -> bool:
        """True once the ticket's keys are gone here; False at once while this centre is down."""
        if not self.up:
            return ticket <= self.queue.done_through
        return await self.queue.wait(ticket)

    async def _run(self) -> None:
        delay = self._retry_initial_s
        while True:
            batch = self.queue.take(self._batch_size)
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._apply(batch)
            except Exception as exc:
                self.queue.failed(batch)
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.up:
                    self.up = False
                    self.down_since = time.monotonic()
                    log.warning("data centre %s is down: %s", self.centre.name, self.last_error)
                # Reports waiting on this centre are acknowledged without it.
                self.queue.release()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self.queue.done(batch)
            delay = self._retry_initial_s
            if not self.up:
                self.up = True
                log.warning(
                    "data centre %s is back after %.1f s, %d users still to catch up",
                    self.centre.name,
                    time.monotonic() - (self.down_since or time.monotonic()),
                    len(self.queue),
                )
                self.down_since = None

    async def _apply(self, batch: Batch) -> None:
        import emcache

        if batch.flush:
            for host, port in self.centre.servers:
                await self.client.flush_all(emcache.MemcachedHostAddress(host, port))
            self.flushes += 1
            return
        results = await asyncio.gather(
            *(self.client.delete(count_key(user)) for user in batch.users),
            return_exceptions=True,
        )
        for result in results:
            # A key that is not there is as good as deleted.
            if isinstance(result, BaseException) and not isinstance(
                result, emcache.NotFoundCommandError
            ):
                raise result
        self.deleted += len(batch.users)

    def stats(self) -> dict[str, Any]:
        return {
            "servers": [f"{host}:{port}" for host, port in self.centre.servers],
            "up": self.up,
            "pending": len(self.queue),
            "deleted": self.deleted,
            "flushes": self.flushes,
            "failures": self.failures,
            "overflows": self.queue.overflows,
            "last_error": self.last_error,
        }


class DirtyService:
    """Every data centre's worker; `invalidate` is the DIRTY operation.

    `await start()` connects (a data centre that is down then is retried like any
    other), `await close()` stops the workers: what is still queued is lost, so a
    reporter that was not acknowledged reports again.
    """

    def __init__(
        self,
        centres: Sequence[DataCentre],
        *,
        op_timeout_s: float = 0.5,
        batch_size: int = 256,
        max_pending_users: int = 1_000_000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        if not centres:
            raise ValueError("the dirty service needs at least one data centre")
        self.centres = list(centres)
        self._op_timeout_s = op_timeout_s
        self._options = {
            "batch_size": batch_size,
            "max_pending_users": max_pending_users,
            "retry_initial_s": retry_initial_s,
            "retry_max_s": retry_max_s,
        }
        self._workers: list[_CentreWorker] = []
        self.reports = 0
        self.users_reported = 0

    async def start(self) -> None:
        for centre in self.centres:
            client = await memcached_client(centre, self._op_timeout_s)
            worker = _CentreWorker(centre, client, **self._options)
            worker.start()
            self._workers.append(worker)

    async def close(self) -> None:
        for worker in self._workers:
            await worker.stop()
            await worker.client.close()
        self._workers = []

    async def invalidate(self, users: Sequence[int], flush: bool = False) -> dict[str, Any]:
        """Delete the users' count keys (every key, with `flush`) everywhere; the DIRTY reply."""
        self.reports += 1
        self.users_reported += len(users)
        tickets = [(worker, worker.add(users, flush)) for worker in self._workers]
        settled = await asyncio.gather(*(worker.settle(ticket) for worker, ticket in tickets))
        done = [w.centre.name for (w, _), ok in zip(tickets, settled, strict=True) if ok]
        behind = [w.centre.name for (w, _), ok in zip(tickets, settled, strict=True) if not ok]
        return {"users": len(users), "done": done, "behind": behind}

    # ---- what the dispatcher asks of every service ----

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        if op is not Op.DIRTY:
            raise BadRequest(f"op: {op.name} is not an operation of the dirty service")
        users = payload.get("users", [])
        flush = payload.get("flush", False)
        if not isinstance(users, list):
            raise BadRequest("users: must be a list of user ids")
        if type(flush) is not bool:
            raise BadRequest("flush: must be true or false")
        if len(users) > MAX_REPORT_USERS:
            raise TooLarge(f"users: {len(users)} users, over the limit of {MAX_REPORT_USERS}")
        for user in users:
            check_user_id(user, "users")
        if not users and not flush:
            raise BadRequest("users: empty (and no flush asked)")
        return await self.invalidate(users, flush)

    def subscribe(self, user_id: int, callback: Any) -> Any:
        raise BadRequest("SUBSCRIBE: the dirty service has no mailboxes to watch")

    def unsubscribe(self, token: Any) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        """Reports received, and each data centre's state and figures."""
        return {
            "reports": self.reports,
            "users": self.users_reported,
            "centres": {worker.centre.name: worker.stats() for worker in self._workers},
        }
