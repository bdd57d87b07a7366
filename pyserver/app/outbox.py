"""The outbox: mail users send to outside addresses, relayed until each address's copy is
settled in the sender's log.

The queue is the log itself. A SEND to email addresses writes the sender's copy
with the addresses to send to (`Mailbox` calls `queued` once it is durable);
the outbox hands the mail to `send` (the MTA's relay sender) and records each
address's outcome with `Mailbox.settle_outbound` (an `outbound_settled` entry).
An address the relay refuses for good is settled `failed`; one it cannot take
now is tried again with a doubling pause, and settled `failed` once the mail is
`give_up_after_s` old. After a crash or restart nothing is lost: `recover`
reads the users' images and queues every mail not settled yet. Settling comes
after the relay's acceptance, so a crash between the two sends that address's
copy once more (the receiving side sees the same Message-ID); nothing is ever
dropped.

`send(mail)` gets a dict: `user`, `sender`, `from`, `channel`, `message_id`,
`thread_id`, `addresses` (those still queued: email addresses, and the phone a
recipient's copy is texted to), `subject`, `text`, `ts`, `references` (the earlier
mail headers of the conversation, oldest first; none for texts alone), `attachments`
(blob refs with name, type, size), and answers `{address: (outcome, detail)}` with
outcome "sent", "delivered", "failed" or "retry".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pyserver.errors import NotOwner, PyserverError, Unavailable

__all__ = ["Outbox", "SendMail"]

log = logging.getLogger(__name__)

SendMail = Callable[[dict[str, Any]], Awaitable[dict[str, tuple[str, str]]]]


class Outbox:
    """Relays queued mail (see the module docstring); `queued` is the mailbox's hook."""

    def __init__(
        self,
        mailbox: Any,
        send: SendMail,
        *,
        workers: int = 32,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 300.0,
        give_up_after_s: float = 4 * 86_400.0,
    ) -> None:
        self._mailbox = mailbox
        self._send = send
        self._workers_wanted = workers
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._give_up_after_s = give_up_after_s
        self._queue: asyncio.Queue[tuple[int, str, int]] = asyncio.Queue()
        self._waiting: set[tuple[int, str]] = set()  # queued or being sent: not queued twice
        self._workers: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self.counters: Counter[str] = Counter()

    def queued(self, user_id: int, message_id: str) -> None:
        """A mail of `user_id` to outside addresses is durable: send it."""
        self._put(user_id, message_id, attempt=0)

    def _put(self, user_id: int, message_id: str, attempt: int) -> None:
        if attempt == 0 and (user_id, message_id) in self._waiting:
            return
        self._waiting.add((user_id, message_id))
        self._queue.put_nowait((user_id, message_id, attempt))

    def start(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._work()) for _ in range(self._workers_wanted)]

    async def recover(self, user_ids: Iterable[int]) -> int:
        """Queue every unsettled mail of these users (after a start); how many were queued.
        Users this server does not serve now are skipped: their owner recovers them."""
        found = 0
        for user_id in user_ids:
            try:
                pending = await self._mailbox.pending_outbound(user_id)
            except (NotOwner, Unavailable):
                continue
            for message_id, _ in pending:
                self.queued(user_id, message_id)
                found += 1
        if found:
            log.info("outbox: %d unsettled mail(s) queued again", found)
        return found

    async def idle(self) -> None:
        """Wait until nothing is queued, being sent or waiting for a retry (tests, benches)."""
        while self._waiting:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
        closing = getattr(self._send, "close", None)
        if closing is not None:
            await closing()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "waiting": len(self._waiting)}

    # ---- the workers ----

    async def _work(self) -> None:
        while True:
            user_id, message_id, attempt = await self._queue.get()
            retry = False
            try:
                retry = await self._relay(user_id, message_id, attempt)
            except asyncio.CancelledError:
                raise
            except Exception:
                # a bug or the store down: try again later, never drop the mail
                log.exception("outbox: sending %s of user %d failed", message_id, user_id)
                retry = True
            if retry:
                self._later(user_id, message_id, attempt + 1)
            else:
                self._waiting.discard((user_id, message_id))

    async def _relay(self, user_id: int, message_id: str, attempt: int) -> bool:
        """One attempt at a mail; whether some address needs another."""
        try:
            mail = await self._mailbox.outbound_message(user_id, message_id)
        except (NotOwner, Unavailable):
            return False  # moved to another server, whose recovery takes it over
        if mail is None:
            return False
        queued = [a for a, state in mail["extra"].get("delivery", {}).items()
                  if state["state"] == "queued"]  # fmt: skip
        if not queued:
            return False
        outgoing = {
            "user": user_id,
            "sender": mail["sender"],
            "from": mail["from"],
            "channel": mail["channel"],
            "message_id": message_id,
            "thread_id": mail["thread_id"],
            "addresses": queued,
            "subject": mail["subject"] or mail["thread_subject"],
            "text": mail["text"],
            "ts": mail["ts"],
            "references": mail["references"],
            "attachments": mail["extra"].get("attachments", []),
        }
        outcomes = await self._send(outgoing)
        age_s = time.time() - mail["ts"] / 1_000_000
        again = False
        for address in queued:
            outcome, detail = outcomes.get(address, ("retry", "no answer for this address"))
            if outcome == "retry" and age_s >= self._give_up_after_s:
                outcome, detail = "failed", f"gave up after {age_s:.0f} s: {detail}"
            if outcome == "retry":
                again = True
                self.counters["retries"] += 1
                continue
            try:
                await self._mailbox.settle_outbound(user_id, message_id, address, outcome, detail)
            except PyserverError as error:
                # settled on the next attempt: the relay may see this copy twice
                log.warning("outbox: could not record %s for %s: %r", outcome, address, error)
                again = True
                continue
            self.counters[outcome] += 1
        return again

    def _later(self, user_id: int, message_id: str, attempt: int) -> None:
        delay = min(self._retry_max_s, self._retry_initial_s * 2 ** min(attempt - 1, 20))
        loop = asyncio.get_running_loop()

        def again() -> None:
            self._timers.discard(timer)
            self._put(user_id, message_id, attempt)

        timer = loop.call_later(delay, again)
        self._timers.add(timer)
