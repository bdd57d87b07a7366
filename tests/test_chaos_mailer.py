"""The chaos soak's mailer (bench.chaos_load) against a real SMTP server (aiosmtpd) that
refuses one address every other time with 451, as the MTA proxy does while an address
lookup fails: a recipient counts as acknowledged only once a DATA that named it was
accepted, and a refused one is sent the same mail again, alone.

aiosmtplib returns normally when any recipient is accepted; the soak once took that as
every recipient acknowledged, and its checker reported mail copies "lost" that the
proxy had refused with 451 (issue 16)."""

from __future__ import annotations

import asyncio
from email import message_from_bytes

from aiosmtpd.controller import Controller

from bench.chaos_check import History
from bench.chaos_load import Load, address_of
from tests.support import free_port


class RefusingEverySecondRcpt:
    """Refuses `address` on its 1st, 3rd, 5th... RCPT; keeps every accepted envelope."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked = 0
        self.accepted: list[tuple[str, tuple[str, ...]]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.address:
            self.asked += 1
            if self.asked % 2:
                return "451 4.3.0 Address lookup failed, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message_id = message_from_bytes(envelope.content)["Message-ID"]
        self.accepted.append((message_id, tuple(envelope.rcpt_tos)))
        return "250 OK"


def test_a_recipient_refused_with_451_is_acknowledged_only_after_its_own_retry() -> None:
    handler = RefusingEverySecondRcpt(address_of(2))
    history = History()

    async def scenario() -> Load:
        controller = Controller(handler, hostname="127.0.0.1", port=free_port())
        controller.start()
        try:
            load = Load(None, users=2, history=history, smtp_port=controller.port, seed=7)
            mailer = asyncio.create_task(load._mailer())
            deadline = asyncio.get_running_loop().time() + 30.0
            while len(history.writes) < 6 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            await load.stop(finish_s=10.0)
            await asyncio.wait_for(mailer, 15.0)
            return load
        finally:
            controller.stop()

    load = asyncio.run(scenario())
    delivered = {(mid, address) for mid, rcpts in handler.accepted for address in rcpts}
    acknowledged = {(w.key, address_of(u)) for w in history.writes for u in w.participants}
    assert acknowledged <= delivered, acknowledged - delivered
    # a mail to both had user 2 refused while user 1 was accepted: user 2's copy went again,
    # alone, and only then was it acknowledged
    both = {mid for mid, rcpts in handler.accepted if rcpts == (address_of(1),)} & {
        mid for mid, rcpts in handler.accepted if rcpts == (address_of(2),)
    }
    assert both, handler.accepted
    assert load.figures["mail_retries"] >= 1
    assert all((mid, address_of(2)) in acknowledged for mid in both)
