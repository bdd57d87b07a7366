"""The SMS gateway against a simulated SMSC (smpp34's server): texts from phones land in
the conversation of the same people as their chat, long texts are reassembled from parts
in any order, an SMSC's resend stores nothing twice, and the session binds again after a
drop, keeps its submit window and rides out throttling."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pyserver.app.outbox import Outbox
from pyserver.errors import Unavailable
from pyserver.sms import concat, gsm
from pyserver.sms.esme import Esme, SubmitRefused
from pyserver.sms.gateway import SmsGateway, normalise_phone
from pyserver.sms.outbound import Receipts, SmsSender
from pyserver.sms.pdu import Command, Pdu, Status, Tag
from pyserver.sms.state import SmsState
from pyserver.wire.ops import Op
from tests.support import free_port, run
from tests.support.cells import InProcessCell
from tests.support.smsc import CuttableLink, SimulatedSmsc

OWNER = 7  # owns short code 12345
ALICE, ALICE_PHONE = 1, "+15550001111"
SHORT_CODE = "12345"


class Rig:
    def __init__(
        self, cell: InProcessCell, client: Any, smsc: SimulatedSmsc, link: CuttableLink
    ) -> None:
        self.cell, self.client, self.smsc, self.link = cell, client, smsc, link
        self.gateway: SmsGateway | None = None
        self.esme: Esme | None = None
        self.outbox: Outbox | None = None

    async def thread_of(self, user: int, folder: str = "inbox") -> dict[str, Any]:
        threads = (await self.client.list_threads(user, folder=folder))["threads"]
        assert len(threads) == 1, threads
        return await self.client.get_thread(user, threads[0]["thread_id"])


@asynccontextmanager
async def rig(
    tmp_path: Path, reassembly_timeout_s: float = 60.0, **esme_options: Any
) -> AsyncIterator[Rig]:
    queued: list[Callable[[int, str], None]] = []  # the outbox's hook, once it exists
    hooks = {"outbound_queued": lambda user, message: queued[0](user, message)}
    async with InProcessCell(tmp_path / "cell", mailbox_options=hooks) as cell:
        await cell.serve()
        client = await cell.client()
        await cell.store.add_address(ALICE_PHONE, ALICE)
        await client.friend_add(ALICE, OWNER)
        smsc = await SimulatedSmsc(free_port()).start()
        link = await CuttableLink(smsc.port).start()
        here = Rig(cell, client, smsc, link)
        request = cell.mailbox.execute
        receipts = Receipts(request, state=SmsState(tmp_path / "sms-state.sqlite3"))
        gateway = SmsGateway(
            request,
            cell.store.resolve_address,
            {SHORT_CODE: OWNER},
            receipts=receipts,
            reassembly_timeout_s=reassembly_timeout_s,
        )
        gateway.start()
        esme = Esme("127.0.0.1", link.port, "pyserver", "secret", gateway.on_deliver,
                    rebind_initial_s=0.05, rebind_max_s=0.2, **esme_options)  # fmt: skip
        esme.start()
        await asyncio.wait_for(esme.bound.wait(), 10)
        here.gateway, here.esme = gateway, esme
        here.outbox = Outbox(
            cell.mailbox, SmsSender([esme], SHORT_CODE, receipts).send, retry_initial_s=0.1
        )
        queued.append(here.outbox.queued)
        here.outbox.start()
        try:
            yield here
        finally:
            await here.outbox.close()
            await esme.close()
            await gateway.close()
            assert receipts.state is not None
            await receipts.state.close()
            await link.stop()
            await smsc.stop()


def scenario(tmp_path: Path, body: Callable[[Rig], Awaitable[None]], **options: Any) -> None:
    async def go() -> None:
        async with rig(tmp_path, **options) as here:
            await body(here)

    run(go, timeout=60)


def test_a_text_from_a_registered_phone_joins_the_chat_of_the_same_people(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        await here.client.send(OWNER, [ALICE], "shall we meet?")
        status = await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"yes, at noon")
        assert status == Status.OK
        thread = await here.thread_of(OWNER)
        assert [(m["channel"], m["sender"], m["text"]) for m in thread["messages"]] == [
            ("chat", OWNER, "shall we meet?"),
            ("sms", ALICE, "yes, at noon"),
        ]

    scenario(tmp_path, body)


def test_gsm_extension_characters_and_ucs2_are_decoded_exactly(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"\x1b\x65 10 \x1b\x3c\x1b\x3e \x00")
        await here.smsc.text(
            ALICE_PHONE, SHORT_CODE, "Grüße ☃ 😀".encode("utf-16-be"), data_coding=8
        )
        texts = [m["text"] for m in (await here.thread_of(OWNER))["messages"]]
        assert texts == ["€ 10 [] @", "Grüße ☃ 😀"]

    scenario(tmp_path, body)


def test_other_data_codings_are_read_as_smpp_says_and_binary_is_kept(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        hebrew, cyrillic = "שלום", "Привет"
        for coding, data in ((7, hebrew.encode("iso8859_8")), (6, cyrillic.encode("iso8859_5"))):
            assert await here.smsc.text(ALICE_PHONE, SHORT_CODE, data, data_coding=coding) == 0
        texts = [m["text"] for m in (await here.thread_of(OWNER))["messages"]]
        assert texts == [hebrew, cyrillic]
        # binary from a phone nobody registered: kept whole with the owner's copy
        ringtone = bytes([0x02, 0x4A, 0x3A, 0x00, 0xFF, 0x80])
        status = await here.smsc.text("+15559990000", SHORT_CODE, ringtone, data_coding=4)
        assert status == Status.OK
        other = await here.thread_of(OWNER, folder="other")
        (message,) = other["messages"]
        assert message["text"] == "[binary (octets, unspecified): data_coding 0x04, 6 bytes, kept]"
        stored = await here.client.get_message(OWNER, message["message_id"])
        assert base64.b64decode(stored["extra"]["body_base64"]) == ringtone
        assert stored["extra"]["data_coding"] == 4

    scenario(tmp_path, body)


def test_parts_in_any_order_with_duplicates_make_one_message(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        words = [b"one ", b"two ", b"three"]
        order = [3, 1, 1, 2]  # part 1 twice
        pushes = [
            here.smsc.text(
                ALICE_PHONE, SHORT_CODE, concat.udh_for(42, 3, n) + words[n - 1], esm_class=0x40
            )
            for n in order
        ]
        statuses = await asyncio.gather(*pushes)
        # every part is answered once the whole text is durable, the duplicate too
        assert statuses == [Status.OK] * 4
        texts = [m["text"] for m in (await here.thread_of(OWNER))["messages"]]
        assert texts == ["one two three"]

        # sar_* TLVs (16-bit reference) work the same way
        def sar_tlvs(number: int) -> list[Any]:
            return [
                _tlv(Tag.SAR_MSG_REF_NUM, 0x0102.to_bytes(2, "big")),
                _tlv(Tag.SAR_TOTAL_SEGMENTS, b"\x02"),
                _tlv(Tag.SAR_SEGMENT_SEQNUM, bytes([number])),
            ]

        sar = [
            here.smsc.text(ALICE_PHONE, SHORT_CODE, word, tlvs=sar_tlvs(n))
            for n, word in ((2, b"world"), (1, b"hello "))
        ]
        assert await asyncio.gather(*sar) == [Status.OK, Status.OK]
        texts = [m["text"] for m in (await here.thread_of(OWNER))["messages"]]
        assert texts == ["one two three", "hello world"]

    scenario(tmp_path, body)


def test_an_incomplete_text_times_out_into_what_arrived_marked(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        stranger = "+4915112345678"
        part = concat.udh_for(9, 2, 1) + b"only the first half"
        status = await here.smsc.text(stranger, SHORT_CODE, part, esm_class=0x40)
        assert status == Status.OK
        thread = await here.thread_of(OWNER, folder="other")
        [message] = thread["messages"]
        assert message["text"] == "only the first half" and message["from"] == stranger
        full = await here.client.get_message(OWNER, message["message_id"])
        assert full["extra"]["incomplete"] is True and full["extra"]["missing_parts"] == [2]

    scenario(tmp_path, body, reassembly_timeout_s=0.5)


def test_a_resent_text_is_stored_once_and_unknown_short_codes_are_refused(
    tmp_path: Path,
) -> None:
    async def body(here: Rig) -> None:
        assert await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"ping") == Status.OK
        assert await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"ping") == Status.OK
        assert [m["text"] for m in (await here.thread_of(OWNER))["messages"]] == ["ping"]
        assert await here.smsc.text(ALICE_PHONE, "99999", b"lost?") == Status.INVDSTADR
        assert await here.smsc.text("not-a-phone", SHORT_CODE, b"x") == Status.INVSRCADR
        assert len((await here.thread_of(OWNER))["messages"]) == 1

    scenario(tmp_path, body)


def test_the_session_binds_again_after_the_link_drops(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        esme = here.esme
        assert esme is not None
        # a submit in flight when the link is cut fails as "may have been taken"
        here.smsc.answer_delay_s = 0.5
        fields = {"source_addr": SHORT_CODE, "destination_addr": "15550001111"}
        in_flight = asyncio.ensure_future(esme.submit({**fields, "short_message": b"lost?"}))
        await asyncio.sleep(0.1)
        here.link.refusing = True
        here.link.cut()
        with pytest.raises(Unavailable):
            await in_flight
        await asyncio.sleep(0.3)
        assert not esme.bound.is_set() and esme.counters["drops"] >= 2
        here.smsc.answer_delay_s = 0.0
        here.link.refusing = False
        await asyncio.wait_for(esme.bound.wait(), 10)
        assert esme.counters["binds"] == 2
        assert await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"back again") == Status.OK
        assert [m["text"] for m in (await here.thread_of(OWNER))["messages"]] == ["back again"]
        assert (await esme.submit({**fields, "short_message": b"ok"})).startswith("sim-")

    scenario(tmp_path, body)


def test_submits_ride_out_throttling_keep_their_window_and_report_refusals(
    tmp_path: Path,
) -> None:
    async def body(here: Rig) -> None:
        esme = here.esme
        assert esme is not None
        here.smsc.throttle_next = 3
        fields = {"source_addr": SHORT_CODE, "destination_addr": "15550001111"}
        message_id = await esme.submit({**fields, "short_message": b"hello"})
        assert message_id.startswith("sim-") and esme.counters["throttled"] == 3
        # a window of 4: eight slow submits never have more than 4 outstanding
        here.smsc.answer_delay_s = 0.1
        seen: list[int] = []

        async def one(n: int) -> str:
            seen.append(esme.in_window)
            return await esme.submit({**fields, "short_message": f"n{n}".encode()})

        ids = await asyncio.gather(*(one(n) for n in range(8)))
        assert len(set(ids)) == 8 and max(seen) <= 4
        here.smsc.answer_delay_s = 0.0
        here.smsc.refuse_next = 1
        with pytest.raises(SubmitRefused) as refused:
            await esme.submit({**fields, "short_message": b"nope"})
        assert refused.value.status == Status.INVDSTADR
        assert bytes(here.smsc.submits[0].short_message) == b"hello"

    scenario(tmp_path, body, window=4)


def test_a_chat_is_texted_in_parts_receipts_settle_it_and_the_reply_joins_it(
    tmp_path: Path,
) -> None:
    bob = 2
    text = "Lunch at noon? Bring the €20 you owe me " + "and the {book} " * 12

    async def body(here: Rig) -> None:
        client = here.client
        await client.request(Op.SET_SMS, {"user": ALICE, "phone": ALICE_PHONE, "mode": "all"})
        sent = await client.send(bob, [ALICE], text)
        assert here.outbox is not None
        await asyncio.wait_for(here.outbox.idle(), 10)
        # the phone gets parts that reassemble to who sent it and the text
        submits = here.smsc.submits
        assert len(submits) == 2 and all(s.destination_addr == "15550001111" for s in submits)
        assert all(s.source_addr == SHORT_CODE and s.registered_delivery == 1 for s in submits)
        reassembler = concat.Reassembler()
        whole = None
        for submit in reversed(submits):
            part = concat.read_part(bytes(submit.short_message), submit.esm_class)
            whole = reassembler.add(("sim",), part, 0) or whole
        assert whole is not None and whole.complete
        assert gsm.decode_body(b"".join(whole.bodies), submits[0].data_coding) == (
            f"user {bob}: {text}"
        )
        message = (await client.get_thread(ALICE, sent["thread_id"]))["messages"][-1]
        assert message["delivery"][ALICE_PHONE]["state"] == "sent"
        # one receipt per part: delivered once both are
        for n, submit_id in enumerate(["sim-1", "sim-2"]):
            receipt = f"id:{submit_id} sub:001 dlvrd:001 stat:DELIVRD err:000 text:x".encode()
            status = await here.smsc.text(ALICE_PHONE, SHORT_CODE, receipt, esm_class=0x04)
            assert status == Status.OK
            message = (await client.get_thread(ALICE, sent["thread_id"]))["messages"][-1]
            expected = "sent" if n == 0 else "delivered"
            assert message["delivery"][ALICE_PHONE]["state"] == expected
        # Alice answers from her phone: it joins the conversation with Bob
        assert await here.smsc.text(ALICE_PHONE, SHORT_CODE, b"yes, see you") == Status.OK
        thread = await client.get_thread(bob, sent["thread_id"])
        assert [(m["sender"], m["channel"], m["text"]) for m in thread["messages"]] == [
            (bob, "chat", text),
            (ALICE, "sms", "yes, see you"),
        ]
        # a restart's recovery finds nothing unsettled: nothing is texted twice
        again = Outbox(here.cell.mailbox, SmsSender([here.esme], SHORT_CODE, Receipts(
            here.cell.mailbox.execute)).send)  # fmt: skip
        assert await again.recover([ALICE, bob]) == 0
        await again.close()
        assert len(here.smsc.submits) == 2
        # with "inbox", a stranger's message is not texted
        await client.request(Op.SET_SMS, {"user": ALICE, "phone": ALICE_PHONE, "mode": "inbox"})
        await client.send(99, [ALICE], "from a stranger")
        await asyncio.wait_for(here.outbox.idle(), 10)
        assert len(here.smsc.submits) == 2

    scenario(tmp_path, body)


def test_a_lost_response_is_texted_again_and_settled_once(tmp_path: Path) -> None:
    async def body(here: Rig) -> None:
        client = here.client
        await client.request(Op.SET_SMS, {"user": ALICE, "phone": ALICE_PHONE, "mode": "all"})
        here.smsc.lose_next = 1
        sent = await client.send(2, [ALICE], "are you there?")
        assert here.outbox is not None
        await asyncio.wait_for(here.outbox.idle(), 20)
        # the first submit was taken but never answered: the outbox sent it again
        assert len(here.smsc.lost) == 1 and len(here.smsc.submits) == 1
        assert here.smsc.lost[0].short_message == here.smsc.submits[0].short_message
        message = (await client.get_thread(ALICE, sent["thread_id"]))["messages"][-1]
        assert message["delivery"][ALICE_PHONE]["state"] == "sent"
        assert here.outbox.counters["retries"] == 1 and here.outbox.counters["sent"] == 1

    scenario(tmp_path, body, response_timeout_s=0.5)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("+15550001111", "+15550001111"), ("15550001111", "+15550001111"),
     ("+1 555-000-1111", "+15550001111"), ("123", None), ("+0155500011", None),
     ("phone", None), ("+١٢٣٤٥٦٧٨٩", None)],
)  # fmt: skip
def test_phones_are_e164(given: str, expected: str | None) -> None:
    assert normalise_phone(given) == expected


def _tlv(tag: int, value: bytes) -> Any:
    import smpp34

    return smpp34.Tlv(tag, value)


def test_receipts_and_replies_still_find_their_conversation_after_a_restart(
    tmp_path: Path,
) -> None:
    """What the gateway must remember (which SMSC ids make a copy, which conversation a
    phone was texted) is in its state file: a new gateway, after a restart, settles the
    copy on its receipts and files the phone's reply where it belongs."""
    settled: list[dict[str, Any]] = []

    async def request(op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        assert op is Op.OUTBOUND_SETTLE
        settled.append(payload)
        return {}

    def receipt(smsc_id: str) -> Pdu:
        text = f"id:{smsc_id} sub:001 dlvrd:001 stat:DELIVRD err:000 text:x".encode()
        return Pdu(Command.DELIVER_SM, 1, fields={"short_message": text, "esm_class": 0x04})

    async def go() -> None:
        path = tmp_path / "sms-state.sqlite3"
        before = Receipts(request, state=SmsState(path))
        await before.sent(["s-1", "s-2"], ALICE, "m-1", ALICE_PHONE, "t-1")
        assert before.state is not None
        await before.state.close()
        # the restart: nothing in memory, the same file
        after = Receipts(request, state=SmsState(path))
        assert after.last_texted == {}
        (user, thread_id, _at) = await after.last_texted_to(ALICE_PHONE) or (0, "", 0)
        assert (user, thread_id) == (ALICE, "t-1")
        await after.receipt(receipt("s-2"))
        assert settled == []  # one part of two delivered: not settled yet
        await after.receipt(receipt("s-1"))
        assert [(s["user"], s["message_id"], s["outcome"]) for s in settled] == [
            (ALICE, "m-1", "delivered")
        ]
        await after.receipt(receipt("s-1"))  # a receipt sent again changes nothing
        assert len(settled) == 1 and after.counters["receipts_unmatched"] == 1
        assert after.state is not None
        assert await after.state.copy_of("s-2") is None  # settled copies are forgotten
        await after.state.close()

    run(go)


def test_copies_texted_together_are_written_together_and_all_kept(tmp_path: Path) -> None:
    """A window's copies reported in one turn go in one write; each caller returns once it
    is committed, and every copy (and each phone's latest conversation) is in the file."""

    async def go() -> None:
        path = tmp_path / "sms-state.sqlite3"
        state = SmsState(path)
        assert await state.last_texted("+15550000000") is None  # (opened)
        copies = [([f"s-{n}a", f"s-{n}b"], 10 + n % 3, f"m-{n}", f"+1555000{n % 3:04d}")
                  for n in range(30)]  # fmt: skip
        await asyncio.gather(*(
            state.texted_copy(ids, user, message_id, phone, f"t-{message_id}", float(n))
            for n, (ids, user, message_id, phone) in enumerate(copies)
        ))  # fmt: skip
        assert state._file.writes == 1  # thirty copies, one write
        await state.close()
        again = SmsState(path)
        for ids, user, message_id, phone in copies:
            assert await again.copy_of(ids[1]) == (user, message_id, phone, set(ids))
        for n in range(3):  # the copy texted last to each phone
            last = max(i for i in range(30) if i % 3 == n)
            assert await again.last_texted(f"+1555000{n:04d}") == (10 + n, f"t-m-{last}", last)
        await again.close()

    run(go)


def test_a_text_sent_again_across_a_restart_keeps_its_key(tmp_path: Path) -> None:
    """An SMSC that never got the answer to a deliver_sm (the gateway crashed after the
    text was stored) sends it again to the restarted gateway: the same key reaches the
    mailbox, which stores the text once."""
    keys: list[str] = []

    async def request(op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        keys.append(payload["key"])
        return {}

    async def nobody(phone: str) -> int | None:
        return None

    text = Pdu(Command.DELIVER_SM, 7, fields={
        "source_addr": "15550009999", "source_addr_ton": 1, "destination_addr": SHORT_CODE,
        "short_message": b"are you open today?", "data_coding": 0, "esm_class": 0,
    })  # fmt: skip

    async def go() -> None:
        for _ in range(2):  # a gateway, then the same after a restart
            state = SmsState(tmp_path / "sms-state.sqlite3")
            gateway = SmsGateway(request, nobody, {SHORT_CODE: OWNER}, state=state)
            assert await gateway.on_deliver(text) == Status.OK
            await gateway.close()
            await state.close()
        assert len(keys) == 2 and keys[0] == keys[1]

    run(go)
