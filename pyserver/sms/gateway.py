"""Texts from phones into conversations: what the SMS gateway does with each deliver_sm.

Owns the mapping of SMS to the mailbox, inbound:

1. A deliver_sm that is a delivery receipt (`esm_class` 0x04) settles the texted
   copy it is about (`outbound.Receipts`), and is answered.
2. A part of a long text waits for the others (`concat.Reassembler`); every part
   of a text is answered together, once the whole text is durable, so an SMSC
   that got no answer sends the part again and nothing is lost. Parts that do not
   all come within `reassembly_timeout_s` become what arrived, marked
   `incomplete`.
3. The text is decoded by its data coding (`codings.read_body`; bytes that are not
   text, binary data or a character set not decoded, are kept whole in the
   message's `extra` as `body_base64` with its `data_coding`, beside a text saying
   what they are) and filed by who sent it and to which
   short code: the sender's phone (E.164, `+` and digits) is looked up among the
   registered addresses (`pyserver admin add-phone`), the short code among
   `short_codes` (short code -> the user that owns it).
   - From a registered phone that was texted a message lately (`reply_window_s`):
     a reply, a SEND from the phone's user on channel `sms` to the others of the
     conversation that message was in.
   - From a registered phone otherwise: a SEND from the phone's user to the short
     code's owner on channel `sms`, so it is in the one conversation of those two
     people, beside their chat and email.
   - From any other phone: a DELIVER to the short code's owner from the phone, as
     mail from an outside address is (it lands in Other).
   - To a short code nobody owns: refused (`ESME_RINVDSTADR`), nothing stored.
4. A text the SMSC sends again after its answer was lost (same sender, short code
   and text within `duplicate_window_s`) is answered without being stored twice:
   each SEND and DELIVER carries a key made from the first copy.

Calls the route to the app servers (`request(op, payload)`) and the address
lookup it is given.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pyserver.errors import NotFound, PyserverError
from pyserver.sms import codings, concat
from pyserver.sms.outbound import Receipts
from pyserver.sms.pdu import Pdu, Status, Tag
from pyserver.sms.state import SmsState
from pyserver.wire.ops import Op

__all__ = ["SmsGateway", "normalise_phone"]

log = logging.getLogger(__name__)

_RECEIPT = 0x04  # esm_class message type: an SMSC delivery receipt
_MESSAGE_TYPE = 0x3C
_TON_INTERNATIONAL = 1

Request = Callable[[Op, dict[str, Any]], Awaitable[dict[str, Any]]]
ResolvePhone = Callable[[str], Awaitable[int | None]]


def normalise_phone(text: str, ton: int = _TON_INTERNATIONAL) -> str | None:
    """A phone number as the gateway keys it: `+` and 8-15 digits (E.164), or None."""
    digits = text.strip().removeprefix("+").replace(" ", "").replace("-", "")
    if not digits.isascii() or not digits.isdigit() or not 8 <= len(digits) <= 15:
        return None
    if digits[0] == "0" and ton == _TON_INTERNATIONAL:
        return None
    return "+" + digits


class SmsGateway:
    """Inbound texts into conversations (see the module docstring)."""

    def __init__(
        self,
        request: Request,
        resolve_phone: ResolvePhone,
        short_codes: dict[str, int],
        *,
        receipts: Receipts | None = None,
        reassembly_timeout_s: float = 120.0,
        duplicate_window_s: float = 600.0,
        reply_window_s: float = 86_400.0,
        clock: Callable[[], float] = time.time,
        state: SmsState | None = None,
    ) -> None:
        self._request = request
        self.receipts = receipts
        # texts' first sightings, kept across restarts (None: in memory only); read back
        # once, at the first text after a start
        self.state = state
        self._warm = False
        self._reply_window_s = reply_window_s
        self._resolve_phone = resolve_phone
        self.short_codes = dict(short_codes)
        self._reassembler = concat.Reassembler(timeout_s=reassembly_timeout_s)
        # a set's key -> the future every part of it waits on (the text made durable)
        self._sets: dict[tuple[object, ...], asyncio.Future[int]] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._duplicate_window_s = duplicate_window_s
        self._clock = clock
        self._sweeper: asyncio.Task[None] | None = None
        self.counters: Counter[str] = Counter()

    def start(self) -> None:
        """Give up incomplete sets on time (a task, until `close`)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def on_deliver(self, pdu: Pdu) -> int:
        """The status to answer a deliver_sm with, once what it brings is durable."""
        esm_class = int(pdu.get("esm_class", 0))
        if esm_class & _MESSAGE_TYPE == _RECEIPT:
            self.counters["receipts"] += 1
            if self.receipts is not None:
                await self.receipts.receipt(pdu)
            return Status.OK
        source = str(pdu.get("source_addr", ""))
        destination = str(pdu.get("destination_addr", ""))
        if destination not in self.short_codes:
            self.counters["unknown_short_code"] += 1
            return Status.INVDSTADR
        phone = normalise_phone(source, int(pdu.get("source_addr_ton", _TON_INTERNATIONAL)))
        if phone is None:
            self.counters["bad_source"] += 1
            return Status.INVSRCADR
        part = concat.read_part(
            bytes(pdu.get("short_message", b"")) or pdu.tlvs.get(Tag.MESSAGE_PAYLOAD, b""),
            esm_class,
            _sar(pdu.tlvs),
        )
        coding = int(pdu.get("data_coding", 0))
        done = self._reassembler.add((phone, destination, coding), part, self._clock())
        if part.reference is None or part.total == 1:
            assert done is not None
            return await self._file(phone, destination, coding, done)
        key = (phone, destination, coding, part.reference, part.total)
        waiting = self._sets.get(key)
        if waiting is None:
            waiting = self._sets[key] = asyncio.get_running_loop().create_future()
        if done is not None:  # the last part: file the text, then answer every part
            asyncio.get_running_loop().create_task(self._finish(key, waiting, done))
        return await asyncio.shield(waiting)

    async def _finish(
        self, key: tuple[object, ...], waiting: asyncio.Future[int], done: concat.Reassembled
    ) -> None:
        phone, destination, coding = str(key[0]), str(key[1]), int(key[2])  # type: ignore[call-overload]
        status = await self._file(phone, destination, coding, done)
        self._sets.pop(key, None)
        if not waiting.done():
            waiting.set_result(status)

    async def _file(
        self, phone: str, destination: str, coding: int, text_parts: concat.Reassembled
    ) -> int:
        body = codings.read_body(b"".join(text_parts.bodies), coding)
        text = body.text
        owner = self.short_codes[destination]
        kept = base64.b64encode(body.kept).decode("ascii") if body.kept is not None else None
        seen = f"{phone}\0{destination}\0{text}" + (f"\0{kept}" if kept is not None else "")
        fingerprint = hashlib.sha256(seen.encode()).hexdigest()
        now = self._clock()
        if self.state is not None and not self._warm:  # the sightings before a restart
            self._warm = True
            since = now - self._duplicate_window_s
            for known, at in sorted((await self.state.sightings(since)).items(), key=_second):
                self._recent.setdefault(known, at)
        first_seen = self._recent.get(fingerprint)
        if first_seen is None or now - first_seen > self._duplicate_window_s:
            first_seen = now
        key = f"sms:{fingerprint[:32]}:{int(first_seen * 1000)}"
        if self.state is not None:  # before it is stored: a resend after a crash finds it
            forget = now - self._duplicate_window_s
            await self.state.seen(fingerprint, first_seen, forget_before=forget)
        extra: dict[str, Any] = {"phone": phone, "short_code": destination}
        undecoded = {"data_coding": coding, "body_base64": kept} if kept is not None else {}
        extra.update(undecoded)
        if not text_parts.complete:
            extra["incomplete"] = True
            extra["missing_parts"] = text_parts.missing
        try:
            user = await self._resolve_phone(phone)
            recipients = await self._answering(phone, user) if user is not None else None
            if user is not None and (recipients or user != owner):
                await self._request(
                    Op.SEND,
                    {"sender": user, "recipients": recipients or [owner], "text": text,
                     "channel": "sms", "key": key,
                     **({"extra": undecoded} if undecoded else {})},
                )  # fmt: skip
                self.counters["replies" if recipients else "texts_from_users"] += 1
            else:
                await self._request(
                    Op.DELIVER,
                    {"user": owner, "sender": 0, "from": phone, "text": text, "channel": "sms",
                     "key": key, "extra": extra},
                )  # fmt: skip
                self.counters["texts_from_phones"] += 1
        except PyserverError as error:
            log.warning("text from %s to %s not stored: %s", phone, destination, error)
            self.counters["not_stored"] += 1
            return Status.SYSERR  # the SMSC will send it again
        self._recent[fingerprint] = first_seen
        self._recent.move_to_end(fingerprint)
        while self._recent and now - next(iter(self._recent.values())) > self._duplicate_window_s:
            self._recent.popitem(last=False)
        if not text_parts.complete:
            self.counters["incomplete"] += 1
        return Status.OK

    async def _answering(self, phone: str, user: int) -> list[int | str] | None:
        """The others of the conversation last texted to this phone of `user`, if lately."""
        if self.receipts is None:
            return None
        last = await self.receipts.last_texted_to(phone)
        if last is None or last[0] != user or time.time() - last[2] > self._reply_window_s:
            return None
        try:
            thread = await self._request(
                Op.GET_THREAD, {"user": user, "thread_id": last[1], "limit": 1}
            )
        except NotFound:  # deleted since: a new conversation with the short code's owner
            return None
        others: list[int | str] = [p for p in thread["participants"] if p != user]
        return others + list(thread.get("addresses", ())) or None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self._reassembler.timeout_s / 4))
            for given_up in self._reassembler.expired(self._clock()):
                key = given_up.key
                waiting = self._sets.get(key)
                if waiting is not None:
                    await self._finish(key, waiting, given_up)

    def stats(self) -> dict[str, Any]:
        return {"waiting_sets": len(self._reassembler), **self.counters}


def _sar(tlvs: dict[int, bytes]) -> tuple[int, int, int] | None:
    try:
        return (
            int.from_bytes(tlvs[Tag.SAR_MSG_REF_NUM], "big"),
            tlvs[Tag.SAR_TOTAL_SEGMENTS][0],
            tlvs[Tag.SAR_SEGMENT_SEQNUM][0],
        )
    except (KeyError, IndexError):
        return None


def _second(pair: tuple[str, float]) -> float:
    return pair[1]
