"""Texts to phones: the outbox's sender for phone addresses, and the receipts that settle them.

Owns the outbound half of the gateway. The queue is the user's log (the outbox,
`pyserver.app.outbox`): a copy filed for a user whose SMS setting wants it lists
the user's phone as an address to send to, and the outbox hands it to
`SmsSender.send` until it is settled.

1. The text is what the phone shows: who sent it (`user 1`, or the mail's sender),
   the subject of a mail, then the text, cut at `max_chars`.
2. It is encoded (GSM 03.38 when it can be, else UCS-2) and split into
   concatenated parts (8-bit reference from the message id), each a submit_sm
   from `source_addr` (the short code replies come back to) with a delivery
   receipt requested and `replace_if_present_flag` set (an SMSC that supports it
   replaces rather than repeats a part sent again after a lost response).
3. Accepted by the SMSC: `sent` (with the SMSC's message ids); refused for good:
   `failed`; no answer or no link: `retry` (the outbox tries again).
4. `Receipts` remembers which SMSC ids make up which copy; a receipt (`stat:` in
   the text, or the `message_state` and `receipted_message_id` TLVs) settles the
   copy `delivered` once every part is delivered, `failed` as soon as one is not.

It also remembers, per phone, the conversation last texted to it, so a reply
from that phone goes back into that conversation (`SmsGateway`). Both are kept
in memory and, with an `SmsState`, in the gateway's data folder before a copy is
reported sent: a receipt, or a reply, that comes after a restart still finds them.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pyserver.errors import PyserverError, Unavailable
from pyserver.sms import concat, gsm
from pyserver.sms.esme import Esme, SubmitRefused
from pyserver.sms.pdu import Pdu, Tag
from pyserver.sms.state import SmsState
from pyserver.wire.ops import Op

__all__ = ["Receipts", "SmsSender", "notification_text"]

log = logging.getLogger(__name__)

Request = Callable[[Op, dict[str, Any]], Awaitable[dict[str, Any]]]
_STAT = re.compile(rb"stat:([A-Z]{5,8})")
_ID = re.compile(rb"id:(\S+)")
# message_state TLV values (SMPP 3.4, 5.3.2.35)
_STATES = {2: "DELIVRD", 3: "EXPIRED", 4: "DELETED", 5: "UNDELIV", 8: "REJECTD"}


def notification_text(mail: dict[str, Any], max_chars: int = 612) -> str:
    """What the phone shows of a message: its sender, a mail's subject, its text."""
    sender = mail.get("sender")
    who = f"user {sender}" if sender else str(mail.get("from") or "someone")
    subject = str(mail.get("subject") or "")
    body = f"{subject}: {mail['text']}" if subject and mail.get("channel") == "email" else ""
    text = f"{who}: {body or mail['text']}"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


@dataclass(slots=True)
class _Copy:
    user: int
    message_id: str
    phone: str
    parts: set[str] = field(default_factory=set)
    sent_at: float | None = field(default_factory=time.monotonic)


class Receipts:
    """Which SMSC ids make up which texted copy, until their receipts settle it."""

    def __init__(
        self, request: Request, max_copies: int = 200_000, state: SmsState | None = None
    ) -> None:
        self._request = request
        self._by_id: OrderedDict[str, _Copy] = OrderedDict()
        self._max = max_copies
        # what survives a restart (None: memory only)
        self.state = state
        self.counters: Counter[str] = Counter()
        # phone -> (user, thread id, when): the conversation last texted to the phone
        self.last_texted: OrderedDict[str, tuple[int, str, float]] = OrderedDict()

    async def sent(
        self, ids: list[str], user: int, message_id: str, phone: str, thread_id: str
    ) -> None:
        """A copy texted to `phone` in parts `ids`: its receipts are awaited, and a reply
        from the phone answers its conversation."""
        copy = _Copy(user, message_id, phone, set(ids))
        for smsc_id in ids:
            self._by_id[smsc_id] = copy
        while len(self._by_id) > self._max:
            self._by_id.popitem(last=False)
        at = time.time()
        self.last_texted[phone] = (user, thread_id, at)
        self.last_texted.move_to_end(phone)
        while len(self.last_texted) > self._max:
            self.last_texted.popitem(last=False)
        if self.state is not None:
            await self.state.texted_copy(ids, user, message_id, phone, thread_id, at)

    async def last_texted_to(self, phone: str) -> tuple[int, str, float] | None:
        """(user, thread id, when) of the conversation last texted to the phone, if any."""
        found = self.last_texted.get(phone)
        if found is None and self.state is not None:
            found = await self.state.last_texted(phone)
        return found

    async def _copy(self, smsc_id: str) -> _Copy | None:
        copy = self._by_id.pop(smsc_id, None)
        if copy is None and self.state is not None:  # sent before a restart
            stored = await self.state.copy_of(smsc_id)
            if stored is not None:
                user, message_id, phone, parts = stored
                copy = _Copy(user, message_id, phone, parts, sent_at=None)
                for other in parts - {smsc_id}:
                    self._by_id[other] = copy
        return copy

    async def receipt(self, pdu: Pdu) -> None:
        """Settle what a delivery receipt says (errors are logged: the receipt is answered
        either way, and the copy stays `sent`)."""
        body = bytes(pdu.get("short_message", b""))
        found = pdu.tlvs.get(Tag.RECEIPTED_MESSAGE_ID)
        smsc_id = found.rstrip(b"\0").decode("latin-1") if found else None
        if smsc_id is None and (match := _ID.search(body)):
            smsc_id = match.group(1).decode("latin-1")
        state_tlv = pdu.tlvs.get(Tag.MESSAGE_STATE)
        stat = _STATES.get(state_tlv[0]) if state_tlv else None
        if stat is None and (match := _STAT.search(body)):
            stat = match.group(1).decode("ascii")
        copy = await self._copy(smsc_id) if smsc_id else None
        if copy is None or stat is None or smsc_id is None:
            self.counters["receipts_unmatched"] += 1
            return
        self.counters[f"receipt_{stat.lower()}"] += 1
        self.counters["count"] += 1
        if copy.sent_at is not None:  # (unknown for a copy sent before a restart)
            self.counters["seconds"] += time.monotonic() - copy.sent_at  # type: ignore[assignment]
        copy.parts.discard(smsc_id)
        if stat == "DELIVRD" and copy.parts:
            if self.state is not None:
                await self.state.settled([smsc_id])
            return  # more parts to come
        for other in copy.parts:  # settled now: the others' receipts change nothing
            self._by_id.pop(other, None)
        if self.state is not None:
            await self.state.settled([smsc_id, *copy.parts])
        outcome = "delivered" if stat == "DELIVRD" else "failed"
        payload = {"user": copy.user, "message_id": copy.message_id, "address": copy.phone,
                   "outcome": outcome, "detail": f"SMSC receipt: {stat}"}  # fmt: skip
        try:
            await self._request(Op.OUTBOUND_SETTLE, payload)
        except PyserverError as error:
            log.warning("receipt for %s not recorded: %s", copy.message_id, error)


class SmsSender:
    """The outbox's sender for phones (see the module docstring)."""

    def __init__(
        self,
        sessions: list[Esme],
        source_addr: str,
        receipts: Receipts,
        *,
        max_chars: int = 612,
    ) -> None:
        self.sessions = sessions
        self.source_addr = source_addr
        self.receipts = receipts
        self.max_chars = max_chars
        self._turn = 0
        self.counters: Counter[str] = Counter()

    def _session(self) -> Esme:
        bound = [s for s in self.sessions if s.bound.is_set()] or self.sessions
        self._turn = (self._turn + 1) % len(bound)
        return bound[self._turn]

    async def send(self, mail: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Each phone of `mail["addresses"]`: ("sent", ids), ("failed", why) or ("retry", why)."""
        text = notification_text(mail, self.max_chars)
        encoded = gsm.split_text(text)
        reference = zlib.crc32(mail["message_id"].encode()) & 0xFF
        outcomes: dict[str, tuple[str, str]] = {}
        for phone in mail["addresses"]:
            try:
                ids = [
                    await self._session().submit(self._part(phone, encoded, n, reference))
                    for n in range(1, len(encoded.parts) + 1)
                ]
            except SubmitRefused as refused:
                outcomes[phone] = ("failed", str(refused))
                self.counters["failed"] += 1
                continue
            except Unavailable as error:
                outcomes[phone] = ("retry", str(error))
                self.counters["retried"] += 1
                continue
            await self.receipts.sent(
                ids, mail["user"], mail["message_id"], phone, mail["thread_id"]
            )
            outcomes[phone] = ("sent", f"SMSC ids {','.join(ids)}")
            self.counters["texts"] += 1
            self.counters["parts"] += len(ids)
        return outcomes

    def _part(self, phone: str, encoded: gsm.Encoded, number: int, reference: int) -> dict:
        total = len(encoded.parts)
        body = encoded.parts[number - 1]
        if total > 1:
            body = concat.udh_for(reference, total, number) + body
        return {
            "source_addr": self.source_addr,
            "dest_addr_ton": 1,  # international
            "dest_addr_npi": 1,  # E.164
            "destination_addr": phone.removeprefix("+"),
            "esm_class": concat.UDHI if total > 1 else 0,
            "registered_delivery": 1,  # a receipt, delivered or not
            "replace_if_present_flag": 1,
            "data_coding": encoded.data_coding,
            "short_message": body,
        }
