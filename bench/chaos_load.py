"""The chaos soak's clients: a mixed load that records what it saw for the checker.

`Load(client, users, history, ...)` runs, until `stop()`:

* senders: SENDs between users 1..`users` (who live in either cell), each with
  an idempotency key, retried with the same key until acknowledged (a SEND
  never acknowledged is not in the history: it may or may not be stored, but
  never twice); now and then the thread is moved in the sender's mailbox and
  the position MOVE answered is recorded;
* readers: FOLDER_MESSAGES of a user's inbox, each reader a client of its own,
  recording the log position and the messages it saw;
* a mailer: mail from outside through the MTA proxy over SMTP, to one or two
  users' addresses; each recipient is acknowledged by its own RCPT answer and the
  final 250, and the mail is sent again with the same Message-ID to the
  recipients not yet accepted until every one is;
* a mover: one user at a time moved to the other cell (`pyserver admin
  move-user`'s `move_user`), retried until the move is done.

Everything acknowledged goes into `history` (`bench.chaos_check.History`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from bench.chaos_check import AckedWrite, History, PositionedWrite, Read
from pyserver.discovery.client import ClusterClient
from pyserver.errors import PyserverError
from pyserver.wire.ops import Op

__all__ = ["Load", "address_of"]

log = logging.getLogger(__name__)

MAIL_DOMAIN = "chaos.test"


def address_of(user: int) -> str:
    return f"u{user}@{MAIL_DOMAIN}"


class Load:
    """The soak's load (see the module docstring)."""

    def __init__(
        self,
        client: ClusterClient,
        users: int,
        history: History,
        *,
        smtp_port: int,
        seed: int,
        mover: Any = None,
        senders: int = 4,
        readers: int = 2,
        pause_s: float = 0.02,
    ) -> None:
        self.client = client
        self.users = users
        self.history = history
        self.smtp_port = smtp_port
        self.seed = seed
        self.mover = mover
        self.senders = senders
        self.readers = readers
        self.pause_s = pause_s
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.figures: dict[str, int] = dict.fromkeys(
            ("sends", "send_retries", "moves_in_mailbox", "reads", "read_failures", "mails",
             "mail_retries", "user_moves", "user_move_retries", "given_up"),
            0,
        )  # fmt: skip

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sender(i)) for i in range(self.senders)]
        self._tasks += [loop.create_task(self._reader(i)) for i in range(self.readers)]
        self._tasks.append(loop.create_task(self._mailer()))
        if self.mover is not None:
            self._tasks.append(loop.create_task(self._moving()))

    async def stop(self, finish_s: float = 90.0) -> None:
        """Stop starting new work; what is under way is retried for `finish_s` at most."""
        self._stopping.set()
        self._finish_by = time.monotonic() + finish_s
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _giving_up(self) -> bool:
        return self._stopping.is_set() and time.monotonic() > self._finish_by

    # ---- SENDs ----

    async def _sender(self, worker: int) -> None:
        rng = random.Random(self.seed * 1_000 + worker)
        for count in itertools.count(1):
            if self._stopping.is_set():
                return
            sender = rng.randint(1, self.users)
            others = [u for u in range(1, self.users + 1) if u != sender]
            recipients = sorted(rng.sample(others, rng.choice((1, 1, 2))))
            key = f"s{self.seed}-{worker}-{count}"
            payload = {"sender": sender, "recipients": recipients, "text": f"chaos {key}",
                       "channel": "chat", "key": key}  # fmt: skip
            reply = await self._until_acknowledged(sender, Op.SEND, payload, "send_retries")
            if reply is None:
                return
            self.history.writes.append(AckedWrite(sender, key, (sender, *recipients)))
            self.figures["sends"] += 1
            if rng.random() < 0.2:
                await self._move_thread(sender, reply["thread_id"], rng)
            await asyncio.sleep(self.pause_s)

    async def _move_thread(self, user: int, thread_id: str, rng: random.Random) -> None:
        folder = rng.choice(("archived", "inbox"))
        payload = {"user": user, "thread_id": thread_id, "folder": folder}
        try:
            reply = await self.client.request(Op.MOVE, payload, timeout=10.0)
        except PyserverError:
            return  # not acknowledged: nothing to check (it may or may not be in the log)
        self.history.positioned.append(
            PositionedWrite(user, int(reply["seq"]), "moved", thread_id, folder)
        )
        self.figures["moves_in_mailbox"] += 1

    async def _until_acknowledged(
        self, user: int, op: Op, payload: dict[str, Any], retries: str
    ) -> dict[str, Any] | None:
        while True:
            try:
                return await self.client.request(op, payload, timeout=10.0)
            except PyserverError as error:
                if error.code not in ("UNAVAILABLE", "CONFLICT", "NOT_OWNER"):
                    log.warning("user %d: %s refused: %s", user, op.name, error)
                self.figures[retries] += 1
                if self._giving_up():
                    self.figures["given_up"] += 1
                    return None
                await asyncio.sleep(0.2)

    # ---- reads ----

    async def _reader(self, reader: int) -> None:
        rng = random.Random(self.seed * 1_000 + 500 + reader)
        name = f"reader-{reader}"
        for order in itertools.count(1):
            if self._stopping.is_set():
                return
            user = rng.randint(1, self.users)
            payload = {"user": user, "folder": "inbox", "after_uid": 0, "limit": 5000}
            try:
                reply = await self.client.request(Op.FOLDER_MESSAGES, payload, timeout=10.0)
            except PyserverError:
                self.figures["read_failures"] += 1
                await asyncio.sleep(0.2)
                continue
            seen = frozenset(str(m["message_id"]) for m in reply["messages"])
            self.history.reads.append(Read(name, user, order, int(reply["seq"]), seen))
            self.figures["reads"] += 1
            await asyncio.sleep(self.pause_s)

    # ---- mail through the MTA proxy ----

    async def _mailer(self) -> None:
        rng = random.Random(self.seed * 1_000 + 900)
        for count in itertools.count(1):
            if self._stopping.is_set():
                return
            recipients = sorted(rng.sample(range(1, self.users + 1), rng.choice((1, 1, 2))))
            message_id = f"<chaos-{self.seed}-{count}@bench.{MAIL_DOMAIN}>"
            mail = EmailMessage()
            mail["From"] = "outside@example.net"
            mail["To"] = ", ".join(address_of(u) for u in recipients)
            mail["Subject"] = f"chaos mail {count}"
            mail["Message-ID"] = message_id
            mail.set_content(f"mail {count} of the chaos soak\n")
            pending = {address_of(u): u for u in recipients}
            while pending:
                try:
                    refused, _ = await aiosmtplib.send(
                        mail,
                        sender="outside@example.net",
                        recipients=list(pending),
                        hostname="127.0.0.1",
                        port=self.smtp_port,
                        timeout=15.0,
                    )
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                    refused = {address: error for address in pending}
                # aiosmtplib returns normally once any recipient is accepted: only the
                # accepted ones are acknowledged; the refused (451 while an address
                # lookup fails) are sent again, alone, with the same Message-ID
                accepted = [u for address, u in pending.items() if address not in refused]
                if accepted:
                    self.history.writes.append(
                        AckedWrite(0, message_id, tuple(accepted), kind="mail")
                    )
                pending = {address: pending[address] for address in refused}
                if pending:
                    self.figures["mail_retries"] += 1
                    log.info("mail %d to %s: %r; again", count, sorted(pending), refused)
                    if self._giving_up():
                        self.figures["given_up"] += 1
                        return
                    await asyncio.sleep(0.5)
            self.figures["mails"] += 1
            await asyncio.sleep(0.3)

    # ---- users moved between cells ----

    async def _moving(self) -> None:
        rng = random.Random(self.seed * 1_000 + 950)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), rng.uniform(4.0, 10.0))
            user = rng.randint(1, self.users)
            while True:  # a move started is finished: a user is never left frozen
                try:
                    await self.mover(user)
                    self.figures["user_moves"] += 1
                    break
                except Exception as error:
                    self.figures["user_move_retries"] += 1
                    log.info("moving user %d: %r; again", user, error)
                    if self._giving_up():
                        self.figures["given_up"] += 1
                        return
                    await asyncio.sleep(1.0)
