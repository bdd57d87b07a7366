"""The MTA proxy end to end: real mail over real SMTP (smtplib and swaks) into a real app server.

A `MailCell` is an app server with its mailbox on SQLite, a blob store, and the proxy
(aiosmtpd) delivering to the app server through the client library, all on loopback in
the test's event loop; smtplib runs on a worker thread, swaks as a process. The corpus
of malformed and exotic messages in tests/mail/ (with what each must become in
tests/mail/expected.json) goes through the parser alone and through SMTP. The CLI test
runs `pyserver run`, `pyserver mta`, `pyserver thread` and `pyserver blob` as processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import quopri
import random
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from unittest import mock

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver import implementation
from pyserver.client import Client
from pyserver.errors import BadRequest, Unavailable
from pyserver.mta.emailobject import MAX_EXTRA_BYTES
from pyserver.mta.intake import MailIntake, MtaSettings
from pyserver.mta.parse import _byte_lines, parse_mail
from pyserver.mta.route import InProcessRoute, SingleServerRoute
from pyserver.mta.senders import check_dkim, from_domain
from pyserver.mta.skeleton import MIN_RUN, _dash_lines, skeleton_of
from pyserver.mta.smtp import MtaProxy, read_data
from pyserver.pure import frame as pure_frame
from pyserver.wire.ops import Op
from tests.conftest import implementation_params
from tests.support import start_serving
from tests.support.cells import KEY, InProcessCell
from tests.support.swaks import swaks

CORPUS = Path(__file__).parent / "mail"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
USERS = {"bob@example.com": 2, "carol@example.com": 3, "erin@example.org": 5}


# ---- the cell under test ----


class MailCell(InProcessCell):
    """App server, mailbox, blob store and MTA proxy on loopback (see the module docstring)."""

    def __init__(
        self, tmp_path: Path, codec: Any = None, in_process: bool = False, **settings: Any
    ) -> None:
        """`in_process`: the proxy delivers through the dispatcher's `call`, as in the
        single-node cell's own process, not over a connection to the app server."""
        super().__init__(tmp_path, blobs=True, codec=codec, node_id="mta-node")
        settings.setdefault("mta_deliver_timeout_s", 2.0)
        self.settings = MtaSettings(**settings)
        self.in_process = in_process

    async def __aenter__(self) -> MailCell:
        await super().__aenter__()
        assert self.blobs is not None
        for address, user in USERS.items():
            await self.store.add_address(address, user)
        await self.serve()
        self.route: SingleServerRoute | InProcessRoute = (
            InProcessRoute(self.dispatcher.call, 2.0)
            if self.in_process
            else SingleServerRoute("127.0.0.1", self.port, KEY, 2.0)
        )
        self.intake = MailIntake(self.store, self.blobs, self.route, self.settings)
        self.proxy = MtaProxy(self.intake, hostname="mx.test")
        _, self.smtp_port = await self.proxy.start("127.0.0.1", 0)
        self.client = await Client.connect("127.0.0.1", self.port, service_key=KEY)
        self.clients.append(self.client)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.proxy.stop(1.0)
        await self.route.close()
        await super().__aexit__(*exc_info)

    async def start_app_server(self) -> None:
        await self.serve()

    async def stop_app_server(self) -> None:
        await self.stop_serving(0.5)

    async def send(
        self, data: bytes, to: list[str], sender: str = "sender@example.org", **options: Any
    ) -> dict[str, Any]:
        """smtplib's sendmail on a worker thread: the refused recipients (raises on failure)."""
        return await asyncio.to_thread(_sendmail, self.smtp_port, sender, to, data, options)

    async def messages(self, user: int) -> list[dict[str, Any]]:
        """Every message of the user (with its extra), oldest first."""
        found = []
        for folder in ("inbox", "other"):
            threads = (await self.client.list_threads(user, folder=folder, limit=200))["threads"]
            for thread in threads:
                reply = await self.client.get_thread(user, thread["thread_id"], limit=200)
                for message in reply["messages"]:
                    full = await self.client.get_message(user, message["message_id"])
                    found.append({**full, "participants": reply["participants"]})
        return sorted(found, key=lambda m: m["ts"])

    async def blob(self, user: int, ref: str) -> bytes:
        return b"".join([piece async for piece in self.client.get_blob(user, ref)])


def _sendmail(
    port: int, sender: str, to: list[str], data: bytes, options: dict[str, Any]
) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.sendmail(sender, to, data, **options)


@pytest.fixture(params=implementation_params())
def impl(request: pytest.FixtureRequest) -> tuple[Callable[[], asyncio.AbstractEventLoop], Any]:
    if request.param == "native":
        import uvloop

        assert implementation.framecodec is not None, "the Cython frame codec is not built"
        return uvloop.new_event_loop, implementation.framecodec
    return asyncio.new_event_loop, pure_frame


def run(scenario: Callable[[], Awaitable[Any]], new_loop: Any = None, timeout: float = 60) -> None:
    loop = (new_loop or asyncio.new_event_loop)()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def mail(
    subject: str = "Hello",
    text: str = "Hello Bob,\nlunch on friday?\n",
    to: str = "bob@example.com",
    message_id: str | None = "<m1@example.org>",
    **headers: str,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Alice Example <alice@example.org>"
    message["To"] = to
    message["Subject"] = subject
    if message_id:
        message["Message-ID"] = message_id
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(text)
    return message


def wire(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=policy.SMTP)


# ---- delivery ----


def test_a_mail_reaches_every_recipient_in_one_thread(tmp_path: Path, impl: Any) -> None:
    new_loop, codec = impl
    data = wire(
        mail(
            to="bob@example.com, Carol <carol@example.com>",
            Cc="dave@elsewhere.net",
            In_Reply_To="<m0@example.org>",
            References="<m-1@example.org> <m0@example.org>",
        )
    )

    async def scenario() -> None:
        async with MailCell(tmp_path, codec) as cell:
            assert await cell.send(data, ["bob@example.com", "carol@example.com"]) == {}
            bob, carol = await cell.messages(2), await cell.messages(3)
            assert len(bob) == len(carol) == 1
            assert bob[0]["thread_id"] == carol[0]["thread_id"]
            message = bob[0]
            assert message["participants"] == [2, 3]
            assert message["from"] == "alice@example.org"
            assert message["channel"] == "email" and message["subject"] == "Hello"
            assert message["text"] == "Hello Bob,\nlunch on friday?"
            extra = message["extra"]
            assert extra["message_id_header"] == "<m1@example.org>"
            assert extra["in_reply_to"] == "<m0@example.org>"
            assert extra["references"] == ["<m-1@example.org>", "<m0@example.org>"]
            assert extra["from_name"] == "Alice Example"
            assert extra["to"] == ["bob@example.com", "carol@example.com"]
            assert extra["cc"] == ["dave@elsewhere.net"]
            assert extra["mail_from"] == "sender@example.org"
            assert extra.get("attachments", []) == [] and "malformed" not in extra
            # the raw message, exactly as received, from either recipient
            assert await cell.blob(2, extra["raw"]["ref"]) == data
            assert await cell.blob(3, extra["raw"]["ref"]) == data
            assert extra["raw"]["size"] == len(data) and extra["raw"]["inline"] is True

    run(scenario, new_loop)


def test_in_process_delivery_stores_what_a_connection_stores(tmp_path: Path) -> None:
    """The single-node cell's proxy delivers through `Dispatcher.call`: the copies are
    those a delivery over a connection makes, a retry makes none, and the app server
    counts each DELIVER as it counts a connection's."""
    data = wire(mail(to="bob@example.com, carol@example.com"))
    stored: dict[bool, list[dict[str, Any]]] = {}

    async def scenario(in_process: bool) -> None:
        async with MailCell(tmp_path / str(in_process), in_process=in_process) as cell:
            for _ in range(2):  # the retry changes nothing
                assert await cell.send(data, ["bob@example.com", "carol@example.com"]) == {}
            stored[in_process] = [*await cell.messages(2), *await cell.messages(3)]
            requests = (await cell.client.stats())["requests"]
            assert requests["DELIVER"] == 4

    for in_process in (False, True):
        run(lambda in_process=in_process: scenario(in_process))
    unique = ("message_id", "ts", "thread_id")
    by_connection, by_call = (
        [{k: v for k, v in m.items() if k not in unique} for m in stored[kind]]
        for kind in (False, True)
    )
    assert len(by_call) == 2 and by_call == by_connection


def test_dispatcher_call_answers_as_a_service_connection(tmp_path: Path) -> None:
    """`Dispatcher.call`: the mailbox's own errors, raised as they are; the caller's payload
    neither changed nor kept; only per-user requests."""
    payload = {"user": 2, "sender": 0, "from": "a@example.org", "participants": [2],
               "text": "hi", "subject": "s", "channel": "email", "key": "k1",
               "extra": {"to": ("bob@example.com",)}}  # fmt: skip

    async def scenario() -> None:
        async with MailCell(tmp_path, in_process=True) as cell:
            call = cell.dispatcher.call
            sent = json.loads(json.dumps(payload))
            reply = await call(Op.DELIVER, payload)
            payload["extra"]["to"] = ("someone else",)
            message = await cell.client.get_message(2, reply["message_id"])
            assert message["extra"]["to"] == ["bob@example.com"] and sent["key"] == "k1"
            with pytest.raises(BadRequest, match="channel"):
                await call(Op.DELIVER, {**sent, "key": "k2", "channel": "pigeon"})
            with pytest.raises(BadRequest, match="per-user"):
                await call(Op.PING, {})
            stats = await cell.client.stats()
            assert stats["requests"]["DELIVER"] == 2 and stats["errors"]["BAD_REQUEST"] == 1

    run(scenario)


def test_in_process_route_answers_451_when_the_app_server_does_not(tmp_path: Path) -> None:
    """A delivery the app server of the same process does not finish in time is
    Unavailable (the proxy answers 451; the sender retries)."""

    async def stuck(op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    async def scenario() -> None:
        async with MailCell(tmp_path, in_process=True) as cell:
            cell.intake._route = InProcessRoute(stuck, 0.2)
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(wire(mail()), ["bob@example.com"])
            assert error.value.smtp_code == 451
            with pytest.raises(Unavailable, match=r"DELIVER within 0\.1 s"):
                await InProcessRoute(stuck, 0.1).deliver({"user": 2})

    run(scenario)


def test_attachments_come_back_byte_identical(tmp_path: Path, impl: Any) -> None:
    new_loop, codec = impl
    big = random.Random(1).randbytes(1 << 20)
    small = "naïve, a CSV\r\n1,2\r\n".encode()
    picture = random.Random(2).randbytes(5000)
    message = mail(subject="Report", text="The report is attached.\n")
    message.add_attachment(big, maintype="application", subtype="pdf", filename="report.pdf")
    message.add_attachment(small, maintype="text", subtype="csv", filename="données.csv")
    message.add_attachment(picture, maintype="image", subtype="png", filename="p.png",
                           disposition="inline", cid="<pic@example.org>")  # fmt: skip
    data = wire(message)

    async def scenario() -> None:
        async with MailCell(tmp_path, codec) as cell:
            await cell.send(data, ["bob@example.com"])
            (delivered,) = await cell.messages(2)
            attachments = delivered["extra"]["attachments"]
            assert [(a["name"], a["type"], a["size"]) for a in attachments] == [
                ("report.pdf", "application/pdf", len(big)),
                ("données.csv", "text/csv", len(small)),
                ("p.png", "image/png", len(picture)),
            ]
            assert attachments[2]["inline"] is True
            assert attachments[2]["content_id"] == "<pic@example.org>"
            for attachment, original in zip(attachments, (big, small, picture), strict=True):
                assert await cell.blob(2, attachment["ref"]) == original
            assert delivered["text"] == "The report is attached."

    run(scenario, new_loop)


def test_an_unknown_recipient_is_refused_at_rcpt(tmp_path: Path) -> None:
    data = wire(mail())

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                await cell.send(data, ["nobody@example.com"])
            assert refused.value.recipients["nobody@example.com"][0] == 550
            partly = await cell.send(data, ["nobody@example.com", "BOB@Example.COM"])
            assert partly["nobody@example.com"][0] == 550
            assert len(await cell.messages(2)) == 1
            assert cell.intake.stats()["unknown_recipients"] == 2

    run(scenario)


def test_a_mail_over_the_size_limit_gets_552(tmp_path: Path) -> None:
    too_big = wire(mail(text="x" * 70 + "\n" * 1000 + "y" * 60_000))

    async def scenario() -> None:
        async with MailCell(tmp_path, max_mail_bytes=50_000) as cell:

            def over_then_under() -> None:
                with smtplib.SMTP("127.0.0.1", cell.smtp_port, timeout=30) as smtp:
                    smtp.ehlo()
                    smtp.mail("s@example.org")  # no SIZE declared: refused after DATA
                    smtp.rcpt("bob@example.com")
                    code, _ = smtp.data(too_big)
                    assert code == 552
                    # the connection stays in step: the next mail on it goes through
                    smtp.sendmail("s@example.org", ["bob@example.com"], wire(mail()))
                    # smtplib declares SIZE: refused at MAIL
                    with pytest.raises(smtplib.SMTPSenderRefused) as declared:
                        smtp.sendmail("s@example.org", ["bob@example.com"], too_big)
                    assert declared.value.smtp_code == 552

            await asyncio.to_thread(over_then_under)
            (only,) = await cell.messages(2)
            assert only["subject"] == "Hello"

    run(scenario)


def test_451_while_the_app_server_is_down_then_one_copy_on_retry(tmp_path: Path, impl: Any):
    new_loop, codec = impl
    data = wire(mail(message_id="<retry@example.org>"))

    async def scenario() -> None:
        async with MailCell(tmp_path, codec, mta_deliver_timeout_s=0.5) as cell:
            await cell.stop_app_server()
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(data, ["bob@example.com", "carol@example.com"])
            assert error.value.smtp_code == 451
            await cell.start_app_server()
            for _ in range(3):  # the sending MTA retries; a later retry changes nothing
                assert await cell.send(data, ["bob@example.com", "carol@example.com"]) == {}
            assert len(await cell.messages(2)) == 1
            assert len(await cell.messages(3)) == 1

    run(scenario, new_loop)


def test_451_when_one_owner_fails_and_the_retry_completes_without_duplicates(tmp_path: Path):
    data = wire(mail(message_id="<half@example.org>", to="bob@example.com, carol@example.com"))

    class FlakyRoute:
        """Delivers to everyone but carol the first time."""

        def __init__(self, route: SingleServerRoute) -> None:
            self.route, self.failed = route, False

        async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
            if payload["user"] == 3 and not self.failed:
                self.failed = True
                raise Unavailable("carol's owner is down")
            return await self.route.deliver(payload)

        async def close(self) -> None:
            await self.route.close()

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            cell.intake._route = FlakyRoute(cell.route)
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(data, ["bob@example.com", "carol@example.com"])
            assert error.value.smtp_code == 451
            assert len(await cell.messages(2)) == 1 and await cell.messages(3) == []
            await cell.send(data, ["bob@example.com", "carol@example.com"])
            assert len(await cell.messages(2)) == 1 and len(await cell.messages(3)) == 1

    run(scenario)


def test_a_refusal_for_good_is_554(tmp_path: Path) -> None:
    class RefusingRoute:
        async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
            raise BadRequest("text: not acceptable")

        async def close(self) -> None:
            return None

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            cell.intake._route = RefusingRoute()
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(wire(mail()), ["bob@example.com"])
            assert error.value.smtp_code == 554

    run(scenario)


def test_451_when_the_blob_store_cannot_keep_the_mail(tmp_path: Path) -> None:
    big = wire(mail(text="lunch on friday? " * 1000))  # over mail_inline_raw_bytes

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            assert len(big) > cell.intake.settings.mail_inline_raw_bytes
            await cell.blobs.close()
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(big, ["bob@example.com"])
            assert error.value.smtp_code == 451
            await cell.blobs.open()
            await cell.send(big, ["bob@example.com"])
            assert len(await cell.messages(2)) == 1

    run(scenario)


def test_a_small_mail_goes_with_its_copies_and_a_big_one_to_the_blob_store(
    tmp_path: Path,
) -> None:
    small = wire(mail())
    big = wire(mail(text="lunch on friday? " * 1000, message_id="<big@example.org>"))

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            limit = cell.intake.settings.mail_inline_raw_bytes
            assert len(small) <= limit < len(big)
            # The blob store is not on a small mail's path: it is taken with it down.
            await cell.blobs.close()
            assert await cell.send(small, ["bob@example.com", "carol@example.com"]) == {}
            await cell.blobs.open()
            await cell.send(big, ["bob@example.com"])
            kept, blobbed = sorted(await cell.messages(2), key=lambda m: len(m["text"]))
            raw = kept["extra"]["raw"]
            assert raw["inline"] is True and raw["size"] == len(small)
            assert await cell.blobs.stat(raw["ref"]) is None
            assert await cell.blob(2, raw["ref"]) == small
            assert await cell.blob(3, raw["ref"]) == small
            # a range of it, as IMAP's partial FETCH reads it
            part = await cell.client.get_blob_range(2, raw["ref"], offset=10, length=20)
            assert base64.b64decode(part["data"]) == small[10:30]
            assert part["size"] == len(small) and part["eof"] is False
            assert "inline" not in blobbed["extra"]["raw"]
            stored = await cell.blobs.stat(blobbed["extra"]["raw"]["ref"])
            assert stored is not None and stored.size == len(big)
            assert await cell.blob(2, blobbed["extra"]["raw"]["ref"]) == big
            # the image keeps no raw bytes: GET_MESSAGE has the ref alone
            message = await cell.client.get_message(2, kept["message_id"])
            assert "raw" not in message and message["extra"]["raw"] == raw

    run(scenario)


def test_451_when_the_blobs_barrier_fails_after_the_owner_stored_its_copy(tmp_path: Path):
    """The owner stores its copy while the blobs pass their durability barrier: a failed
    barrier answers 451 though the copy was made, and the retry rewrites the blob, finds
    the copy made (Message-ID) and answers 250: one copy, its raw message readable."""
    # over mail_inline_raw_bytes: its raw message is a blob too
    data = wire(mail(message_id="<barrier@example.org>", text="lunch on friday? " * 1000))

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            blobs = cell.blobs
            blobs.durable = True  # the barrier runs (the test cell's store skips it)
            real_sync, failures = blobs._sync, []

            def failing_once(paths: list[Path]) -> None:
                if not failures:
                    failures.append(paths)
                    raise OSError(5, "Input/output error")
                real_sync(paths)

            blobs._sync = failing_once
            with pytest.raises(smtplib.SMTPDataError) as error:
                await cell.send(data, ["bob@example.com"])
            assert error.value.smtp_code == 451 and failures
            assert len(await cell.messages(2)) == 1  # the copy was made meanwhile
            assert blobs.is_unsynced(failures[0][0])  # not behind a barrier yet
            assert await cell.send(data, ["bob@example.com"]) == {}
            assert not blobs.is_unsynced(failures[0][0])
            (message,) = await cell.messages(2)
            assert await cell.blob(2, message["extra"]["raw"]["ref"]) == data

    run(scenario)


def test_a_long_body_is_cut_inline_and_kept_whole(tmp_path: Path) -> None:
    text = "".join(f"line {n} of a long letter, ünïcode included\n" for n in range(400))

    async def scenario() -> None:
        async with MailCell(tmp_path, mail_inline_text_bytes=1000) as cell:
            await cell.send(wire(mail(text=text)), ["bob@example.com"])
            (message,) = await cell.messages(2)
            assert len(message["text"].encode()) <= 1000
            assert text.startswith(message["text"])
            body = message["extra"]["body"]
            assert (await cell.blob(2, body["ref"])).decode() == text.rstrip("\n")

    run(scenario)


def test_a_one_megabyte_text_body_arrives_whole_and_byte_identical(tmp_path: Path) -> None:
    # one big text part (parsed from its headers alone, its body read from the raw bytes),
    # in 8bit and in quoted-printable: the raw blob is the mail as sent, the body blob the text
    line = ".ligne numéro {} d'une très longue lettre\n"
    text = "".join(line.format(n) for n in range(20_000))
    heads = "From: a@example.org\nTo: bob@example.com\nSubject: big {0}\nMessage-ID: <big{0}@x>\n"
    plain = (heads.format(1) + "Content-Type: text/plain; charset=utf-8\n"
             "Content-Transfer-Encoding: 8bit\n\n" + text).encode()  # fmt: skip
    printable = (heads.format(2) + "Content-Type: text/plain; charset=utf-8\n"
                 "Content-Transfer-Encoding: quoted-printable\n\n").encode() + quopri.encodestring(
        text.encode()
    )  # fmt: skip

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            for raw in (plain, printable):
                wire_bytes = raw.replace(b"\n", b"\r\n")
                await cell.send(wire_bytes, ["bob@example.com"])
            messages = await cell.messages(2)
            assert [m["subject"] for m in messages] == ["big 1", "big 2"]
            for message, raw in zip(messages, (plain, printable), strict=True):
                assert text.startswith(message["text"]) and len(message["text"]) > 1000
                body = await cell.blob(2, message["extra"]["body"]["ref"])
                assert body.decode() == text.rstrip("\n")
                kept = await cell.blob(2, message["extra"]["raw"]["ref"])
                assert kept == raw.replace(b"\n", b"\r\n")

    run(scenario)


def test_a_mail_without_message_id_is_not_delivered_twice(tmp_path: Path) -> None:
    data = (CORPUS / "19-no-message-id.eml").read_bytes()

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            await cell.send(data, ["bob@example.com"])
            await cell.send(data, ["bob@example.com"])
            (message,) = await cell.messages(2)
            assert message["subject"] == "no message id"

    run(scenario)


def test_many_connections_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:

            def session(n: int) -> None:
                with smtplib.SMTP("127.0.0.1", cell.smtp_port, timeout=30) as smtp:
                    for k in range(5):
                        data = wire(mail(subject=f"s{n}-{k}", message_id=f"<c{n}.{k}@x>"))
                        smtp.sendmail("s@example.org", ["bob@example.com"], data)

            await asyncio.gather(*(asyncio.to_thread(session, n) for n in range(12)))
            subjects = sorted(m["subject"] for m in await cell.messages(2))
            assert subjects == sorted(f"s{n}-{k}" for n in range(12) for k in range(5))

    run(scenario)


# ---- the corpus: the parser alone, and through SMTP ----


def _check_parsed(name: str, subject: str, sender: str | None, text: str, extra: dict) -> None:
    expected = EXPECTED[name]
    assert subject == expected["subject"]
    assert sender == expected["from"]
    for fragment in expected["text"]:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    for fragment in expected.get("absent", []):
        assert fragment not in text
    for field in ("to", "cc", "in_reply_to", "references", "from_name"):
        if field in expected:
            assert extra.get(field) == expected[field], field
    assert bool(extra.get("html")) == expected.get("html", False)
    assert bool(extra.get("malformed")) == expected["malformed"]
    for defect in expected.get("defects", []):
        assert defect in extra.get("defects", [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_parser_reads_the_corpus(name: str) -> None:
    parsed = parse_mail((CORPUS / name).read_bytes())
    extra = {
        "to": parsed.to, "cc": parsed.cc, "in_reply_to": parsed.in_reply_to,
        "references": parsed.references, "from_name": parsed.from_name,
        "html": parsed.text_from_html, "malformed": parsed.malformed, "defects": parsed.defects,
    }  # fmt: skip
    _check_parsed(name, parsed.subject, parsed.from_address, parsed.text, extra)
    got = [(a.name, a.content_type) for a in parsed.attachments]
    assert got == [(n, t) for n, t, _ in EXPECTED[name]["attachments"]]
    for attachment, (_, _, size) in zip(
        parsed.attachments, EXPECTED[name]["attachments"], strict=True
    ):
        data = b"".join(attachment.pieces())
        assert size is None or len(data) == size


def test_the_corpus_through_smtp(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            for name in sorted(EXPECTED):
                sent = (CORPUS / name).read_bytes()
                await cell.send(sent, ["bob@example.com"], sender="envelope@example.org")
            delivered = await cell.messages(2)
            assert len(delivered) == len(EXPECTED)
            for name, message in zip(sorted(EXPECTED), delivered, strict=True):
                extra = message["extra"]
                sender = message["from"] if EXPECTED[name]["from"] else None
                if EXPECTED[name]["from"] is None:
                    assert message["from"] == "envelope@example.org"
                _check_parsed(name, message["subject"], sender, message["text"], extra)
                sent = (CORPUS / name).read_bytes()
                received = sent if sent.endswith(b"\r\n") else sent + b"\r\n"  # smtplib's doing
                assert await cell.blob(2, extra["raw"]["ref"]) == received, name
                attachments = extra.get("attachments", [])
                expected = EXPECTED[name]["attachments"]
                assert [(a["name"], a["type"]) for a in attachments] == [
                    (n, t) for n, t, _ in expected
                ]
                for attachment in attachments:
                    assert len(await cell.blob(2, attachment["ref"])) == attachment["size"]

    run(scenario, timeout=90)


# ---- swaks: a real SMTP client of its own ----


async def _swaks(port: int, *args: str) -> tuple[int, str]:
    done = await asyncio.to_thread(swaks, port, *args)
    return done.returncode, done.stdout + done.stderr


def test_swaks_sends_a_mail_with_an_attachment(tmp_path: Path) -> None:
    attached = tmp_path / "figures.bin"
    attached.write_bytes(random.Random(3).randbytes(200_000))

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            code, out = await _swaks(
                cell.smtp_port, "--from", "zed@example.net", "--to", "bob@example.com",
                "--header", "Subject: figures via swaks", "--body", "numbers attached",
                "--attach-type", "application/octet-stream", "--attach-name", "figures.bin",
                "--attach", f"@{attached}",
            )  # fmt: skip
            assert code == 0, out
            assert "250 2.0.0" in out
            (message,) = await cell.messages(2)
            assert message["subject"] == "figures via swaks"
            assert message["from"] == "zed@example.net"
            assert "numbers attached" in message["text"]
            (attachment,) = message["extra"]["attachments"]
            assert attachment["name"] == "figures.bin"
            assert await cell.blob(2, attachment["ref"]) == attached.read_bytes()

    run(scenario)


def test_swaks_to_an_unknown_address_gets_550(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            code, out = await _swaks(cell.smtp_port, "--to", "nobody@example.com")
            assert code != 0
            assert "550 5.1.1" in out
            assert await cell.messages(2) == []

    run(scenario)


def test_swaks_pipelined_data_and_dot_lines(tmp_path: Path) -> None:
    body = "first\n.\n..two dots\n.leading\nlast"

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            code, out = await _swaks(
                cell.smtp_port, "--to", "carol@example.com", "--pipeline",
                "--header", "Message-Id: <dots@swaks>", "--body", body,
            )  # fmt: skip
            assert code == 0, out
            (message,) = await cell.messages(3)
            assert message["text"] == body

    run(scenario)


# ---- DATA reading, skeletons and hostile input, by property ----


def _read_all(data: bytes, splits: list[int], limit: int) -> bytes | None:
    async def scenario() -> bytes | None:
        reader = asyncio.StreamReader(limit=1 << 10)
        positions = [*sorted({min(s, len(data)) for s in splits}), len(data)]
        start = 0
        for end in positions:
            reader.feed_data(data[start:end])
            start = end
        reader.feed_data(b"NEXT COMMAND\r\n")
        result = await read_data(reader, limit)
        assert await reader.readline() == b"NEXT COMMAND\r\n"  # nothing read past the end
        return result

    return asyncio.run(scenario())


_LINE = st.text(alphabet=st.sampled_from(".ab \t-"), max_size=12)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_LINE, max_size=30), splits=st.lists(st.integers(0, 400), max_size=8))
def test_read_data_undoes_dot_stuffing_whatever_the_packet_boundaries(lines, splits) -> None:
    message = "".join(line + "\r\n" for line in lines).encode()
    lines_out = message.splitlines(True)
    stuffed = b"".join(b"." + one if one.startswith(b".") else one for one in lines_out)
    assert _read_all(stuffed + b".\r\n", splits, 1 << 20) == message


def test_read_data_over_the_limit_reads_to_the_end() -> None:
    message = b"x" * 5000 + b"\r\n"
    assert _read_all(message + b".\r\n", [100, 3000], 1000) is None
    assert _read_all(message + b".\r\n", [100, 3000], 6000) == message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(MIN_RUN // 2, 3 * MIN_RUN),
    line=st.sampled_from([60, 64, 76, 77]),
    crlf=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_big_attachments_decode_exactly_as_the_email_package_does(size, line, crlf, seed):
    data = random.Random(seed).randbytes(size)
    encoded = base64.b64encode(data).decode()
    lines = "\n".join(encoded[i : i + line] for i in range(0, len(encoded), line))
    text = (
        "From: a@example.org\nSubject: big\nContent-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nsee attached\n--b\n"
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
        f'Content-Disposition: attachment; filename="d.bin"\n\n{lines}\n--b--\n'
    )
    raw = text.replace("\n", "\r\n" if crlf else "\n").encode()
    parsed = parse_mail(raw)
    (attachment,) = parsed.attachments
    assert b"".join(attachment.pieces()) == data
    assert parsed.text == "see attached"
    if size >= MIN_RUN:
        assert len(skeleton_of(raw).data) < len(raw) // 4, "the big body was set aside"


def _parsed_fields(raw: bytes) -> dict[str, Any]:
    parsed = parse_mail(raw)
    # the text's bytes, when kept, are its UTF-8 (kept or not, whichever way it was read)
    assert parsed.text_utf8 is None or parsed.text_utf8 == parsed.text.encode("utf-8")
    skipped = ("attachments", "text_utf8")
    fields = {name: getattr(parsed, name) for name in parsed.__slots__ if name not in skipped}
    fields["attachments"] = [
        (a.name, a.content_type, b"".join(a.pieces())) for a in parsed.attachments
    ]
    return fields


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunk=st.lists(
        st.sampled_from([b"=", b"=\n", b"=41", b"=\r\n", b"\xe9", b"--x", b"a", b" ", b"\n",
                         b".", b":", b"\r", b"\x00", b"==", b"=C3=A9", b"From: b"]),
        max_size=80,
    ).map(b"".join),
    content_type=st.sampled_from(
        ["", "text/plain", "text/plain; charset=utf-8", "TEXT/HTML; charset=latin-1",
         "text/plain;\n charset=\"cp1252\"", "application/pdf", "multipart/mixed; boundary=x"]
    ),
    encoding=st.sampled_from(["", "7bit", "8bit", "quoted-printable", "base64", "binary"]),
    disposition=st.sampled_from(["", "attachment; filename=a.txt"]),
    crlf=st.booleans(),
    odd_header=st.booleans(),
)  # fmt: skip
def test_a_big_one_part_body_parses_exactly_as_the_email_package_does(
    chunk, content_type, encoding, disposition, crlf, odd_header
):
    headers = ["From: a@example.org", "Subject: big"]
    if content_type:
        headers.append(f"Content-Type: {content_type}")
    if encoding:
        headers.append(f"Content-Transfer-Encoding: {encoding}")
    if disposition:
        headers.append(f"Content-Disposition: {disposition}")
    if odd_header:
        headers.append("this line is no header")
    body = chunk * (MIN_RUN // max(1, len(chunk)) + 1) if chunk else b"x" * MIN_RUN
    end = b"\r\n" if crlf else b"\n"
    raw = end.join(h.encode() for h in headers) + end + end + body
    if crlf:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    fast = _parsed_fields(raw)
    with mock.patch("pyserver.mta.skeleton._plain_body", return_value=None):
        assert fast == _parsed_fields(raw)  # the email package's reading, body and all
    plain = not content_type or content_type.lower().startswith("text/")
    if plain and encoding != "base64":
        assert len(skeleton_of(raw).data) < 1000, "the body was set aside"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"-", b"--", b"\n", b"\r\n", b"a", b"\n--x"]), max_size=300))
def test_the_skeleton_finds_every_line_starting_with_two_dashes(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)  # up to hundreds of dashes: memchr first, then the regex
    assert _dash_lines(raw) == [0, *(found.start() + 1 for found in re.finditer(b"\n--", raw))]
    # the first dash left to the regex starts such a line
    many = b"a-" * 64 + b"\n--x" + raw
    assert _dash_lines(many) == [0, *(found.start() + 1 for found in re.finditer(b"\n--", many))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\xe9", b" "]), max_size=40))
def test_line_ends_on_bytes_are_those_of_the_decoded_text(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    as_text = data.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")
    assert _byte_lines(data) == as_text.encode("latin-1")


def test_a_big_text_body_keeps_its_inner_line_ends_and_loses_those_at_its_ends() -> None:
    # set aside whole (its ends trimmed before decoding), then read as the email package
    # reads it: CRLF and a bare CR inside become LF, the blank lines around it go
    inner = b"first\r\n\r\n" + b"line\r\n" * (MIN_RUN // 6) + b"bare\rcr \r\nlast"
    raw = b"From: a@example.org\r\nSubject: big\r\n\r\n" + b"\r\n" * 100 + inner + b"\r\n" * 10
    assert len(skeleton_of(raw).data) < 1000, "the body was set aside"
    expected = inner.decode().replace("\r\n", "\n").replace("\r", "\n")
    assert parse_mail(raw).text == expected
    with mock.patch("pyserver.mta.skeleton._plain_body", return_value=None):
        assert parse_mail(raw).text == expected


@pytest.mark.parametrize("in_headers", [False, True])
def test_a_big_text_body_may_hold_the_token_text(in_headers: bool) -> None:
    # the token's nonce is drawn anew only when the parser would read it (the headers)
    first, second = "0123456789abcdef", "fedcba9876543210"
    subject = f"PYSRV-{first}-0" if in_headers else "big"
    body = (f"PYSRV-{first}-0 and PYSRV-{second}-0 {first}\r\n" * MIN_RUN).encode()
    raw = f"From: a@example.org\r\nSubject: {subject}\r\n\r\n".encode() + body
    with mock.patch("pyserver.mta.skeleton.secrets.token_hex", side_effect=[first, second]):
        skeleton = skeleton_of(raw)
        with mock.patch("pyserver.mta.parse.skeleton_of", return_value=skeleton):
            parsed = parse_mail(raw)
    assert skeleton.nonce == (second if in_headers else first)
    assert len(skeleton.data) < 1000, "the body was set aside"
    assert parsed.subject == subject
    assert parsed.text == body.decode().replace("\r\n", "\n").strip("\n")
    assert parsed.text_utf8 == parsed.text.encode(), "an ASCII body's bytes are kept"


def test_big_attachments_set_aside_with_a_nonce_the_parser_never_reads() -> None:
    first, second = "0123456789abcdef", "fedcba9876543210"
    blobs = [random.Random(n).randbytes(3 * MIN_RUN) for n in range(2)]
    message = EmailMessage()
    message["From"] = "a@example.org"
    message.set_content(f"see PYSRV-{first}-1 attached\n")  # read by the parser: redrawn
    for n, blob in enumerate(blobs):
        message.add_attachment(blob, maintype="application", subtype="pdf", filename=f"{n}.pdf")
    raw = message.as_bytes(policy=policy.SMTP)
    with mock.patch("pyserver.mta.skeleton.secrets.token_hex", side_effect=[first, second]):
        skeleton = skeleton_of(raw)
        with mock.patch("pyserver.mta.parse.skeleton_of", return_value=skeleton):
            parsed = parse_mail(raw)
    assert skeleton.nonce == second
    assert len(skeleton.runs) == 2 and len(skeleton.data) < 2000, "both bodies set aside"
    assert parsed.text == f"see PYSRV-{first}-1 attached"
    assert [b"".join(a.pieces()) for a in parsed.attachments] == blobs


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000))
def test_the_parser_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    parsed = parse_mail(raw)
    for text in (parsed.subject, parsed.text, parsed.from_name, *parsed.to):
        text.encode("utf-8")  # valid Unicode, storable as JSON
    for attachment in parsed.attachments:
        b"".join(attachment.pieces())


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(EXPECTED)),
    cuts=st.lists(st.tuples(st.integers(0, 5000), st.binary(max_size=20)), max_size=6),
)
def test_the_parser_never_raises_on_damaged_corpus_mail(name: str, cuts) -> None:
    raw = bytearray((CORPUS / name).read_bytes())
    for at, junk in cuts:
        at = min(at, len(raw))
        raw[at : at + len(junk)] = junk
    parsed = parse_mail(bytes(raw))
    parsed.text.encode("utf-8")
    for attachment in parsed.attachments:
        b"".join(attachment.pieces())


def test_a_flood_of_attachments_still_fits_deliver(tmp_path: Path) -> None:
    message = mail(subject="many")
    for n in range(400):
        message.add_attachment(b"x", maintype="application", subtype="octet-stream",
                               filename=f"{'long-name-' * 20}{n}.bin")  # fmt: skip

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            await cell.send(wire(message), ["bob@example.com"])
            (delivered,) = await cell.messages(2)
            extra = delivered["extra"]
            assert len(json.dumps(extra).encode()) <= MAX_EXTRA_BYTES
            kept = len(extra["attachments"])
            assert kept + extra.get("attachments_left_out", 0) == 400 and kept > 100

    run(scenario)


# ---- the command line: pyserver run, admin add-address, thread, blob, mta ----


def _cli(*args: str, data: Path, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyserver.cli", *args, "--data", str(data)],
        stdout=stdout, stderr=subprocess.PIPE, timeout=60, check=True,
    )  # fmt: skip


@pytest.fixture
def running_cell(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data = tmp_path / "cell"
    proc, ready = start_serving(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "-1"],
        tmp_path / "cell.ready.json", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    smtp = ready["smtp"]
    try:
        yield data, smtp["port"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"smtp (MTA proxy) 127.0.0.1:{smtp['port']}" in out


def test_the_cli_reads_mail_and_writes_attachments_out(running_cell: Any, tmp_path: Path):
    data, smtp_port = running_cell
    _cli("admin", "add-address", "--user", "7", "Reader@Example.com", data=data)
    report = random.Random(4).randbytes(300_000)
    message = mail(to="reader@example.com", subject="quarterly figures")
    message.add_attachment(report, maintype="application", subtype="pdf", filename="q3.pdf")
    raw = wire(message)
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        smtp.sendmail("alice@example.org", ["reader@example.com"], raw)

    threads = _cli("threads", "--user", "7", "--folder", "other", "--json", data=data)
    (thread,) = json.loads(threads.stdout)["threads"]
    shown = _cli("thread", "--user", "7", thread["thread_id"], data=data).stdout.decode()
    assert "quarterly figures" in shown and "alice@example.org via email" in shown
    assert "[attachment] q3.pdf (application/pdf, 300000 bytes) ref " in shown
    listed = json.loads(
        _cli("thread", "--user", "7", thread["thread_id"], "--json", data=data).stdout
    )
    extra = listed["messages"][0]["extra"]
    (attachment,) = extra["attachments"]

    out = tmp_path / "q3.pdf"
    with open(out, "wb") as sink:
        _cli("blob", "--user", "7", attachment["ref"], data=data, stdout=sink)
    assert out.read_bytes() == report
    raw_out = _cli("blob", "--user", "7", extra["raw"]["ref"], "--out", str(tmp_path / "raw.eml"),
                   data=data)  # fmt: skip
    assert raw_out.returncode == 0 and (tmp_path / "raw.eml").read_bytes() == raw
    refused = subprocess.run(
        [sys.executable, "-m", "pyserver.cli", "blob", "--data", str(data), "--user", "8",
         attachment["ref"]], capture_output=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and b"NOT_FOUND" in refused.stderr and not refused.stdout


def test_pyserver_mta_runs_alone_in_front_of_a_cell(running_cell: Any) -> None:
    data, _ = running_cell
    _cli("admin", "add-address", "--user", "9", "solo@example.com", data=data)
    proc, ready = start_serving(
        ["mta", "--data", str(data), "--smtp-port", "0"], data.parent / "mta.ready.json",
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert ready["role"] == "mta" and ready["addr"].startswith("127.0.0.1:")
        port = int(ready["addr"].rsplit(":", 1)[1])
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("a@example.org", ["solo@example.com"], wire(mail(to="solo@example.com")))
        threads = json.loads(_cli("threads", "--user", "9", "--folder", "other", "--json",
                                  data=data).stdout)  # fmt: skip
        assert [t["snippet"] for t in threads["threads"]] == ["Hello Bob, lunch on friday?"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        MtaSettings(max_mail_bytes=0)
    with pytest.raises(ValueError):
        MtaSettings(mta_deliver_timeout_s=0)


@pytest.mark.skipif(implementation.PURE_FORCED, reason="the benchmarks refuse the pure twins")
def test_the_mail_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "mail", "--json", "--quick"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    results = json.loads(out)
    for key in ("smtplib_small_per_s", "deliver_small_per_s", "smtplib_1mb_per_s",
                "deliver_1mb_per_s", "smtp_small_per_s", "aiosmtpd_sink_small_per_s",
                "smtp_sink_small_per_s", "smtp_1mb_per_s", "aiosmtpd_sink_1mb_per_s",
                "smtp_sink_1mb_per_s"):  # fmt: skip
        assert results[key] > 0, key
    assert results["mb_cost_ratio"] == pytest.approx(
        results["smtplib_small_per_s"] / results["smtplib_1mb_per_s"], rel=0.05
    )
    assert results["smtp_small_vs_aiosmtpd_sink"] == pytest.approx(
        results["smtp_small_per_s"] / results["aiosmtpd_sink_small_per_s"], rel=0.05
    )


# ---- known senders: mail that proves its From is a registered user's ----

DKIM_KEY = (Path(__file__).parent / "dkim" / "test-rsa.key").read_bytes()
DKIM_RECORD = (
    b"v=DKIM1; k=rsa; p=" + (Path(__file__).parent / "dkim" / "test-rsa.pub").read_bytes().strip()
)


def dkim_dns(records: dict[bytes, bytes]) -> Callable[..., bytes | None]:
    """dkimpy's DNS hook over a table (no network): name -> TXT record."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


def signed(message: EmailMessage, domain: str, selector: str = "test") -> bytes:
    data = wire(message)
    signature = dkim.sign(
        data, selector.encode(), domain.encode(), DKIM_KEY,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )  # fmt: skip
    return signature + data


# example.org publishes the test key under selector "test"; so does evil.example
KEYS = dkim_dns({
    b"test._domainkey.example.org.": DKIM_RECORD,
    b"test._domainkey.evil.example.": DKIM_RECORD,
})  # fmt: skip


async def _alice_and_bob_chat(cell: MailCell) -> str:
    """User 1 owns alice@example.org, is user 2's friend and chats with user 2; the chat's
    thread id."""
    await cell.store.add_address("alice@example.org", 1)
    await cell.store.add_address("alice@mail.example.org", 1)
    await cell.client.friend_add(1, 2)
    sent = await cell.client.send(1, [2], "see you at lunch", channel="chat")
    return sent["thread_id"]


def test_a_signed_mail_from_a_registered_address_joins_the_users_conversation(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path, dkim_dns=KEYS) as cell:
            chat_thread = await _alice_and_bob_chat(cell)
            data = signed(mail(text="Here is the agenda.\n"), "example.org")
            assert await cell.send(data, ["bob@example.com"]) == {}
            reply = await cell.client.get_thread(2, chat_thread, limit=10)
            assert reply["participants"] == [1, 2]
            texts = [m["text"] for m in reply["messages"]]
            assert texts == ["see you at lunch", "Here is the agenda."]
            email = reply["messages"][-1]
            assert email["sender"] == 1 and email["channel"] == "email"
            full = await cell.client.get_message(2, email["message_id"])
            assert full["extra"]["sender_proof"] == "dkim:example.org"
            inbox = await cell.client.list_threads(2, folder="inbox")
            assert [t["thread_id"] for t in inbox["threads"]] == [chat_thread]
            assert (await cell.client.list_threads(2, folder="other"))["threads"] == []
            assert cell.intake.counters["senders_proved"] == 1

    run(scenario)


def test_a_subdomain_of_the_signing_domain_is_aligned(tmp_path: Path) -> None:
    message = mail(message_id="<sub@example.org>")
    message.replace_header("From", "Alice <alice@mail.example.org>")

    async def scenario() -> None:
        async with MailCell(tmp_path, dkim_dns=KEYS) as cell:
            chat_thread = await _alice_and_bob_chat(cell)
            assert await cell.send(signed(message, "example.org"), ["bob@example.com"]) == {}
            reply = await cell.client.get_thread(2, chat_thread, limit=10)
            assert [m["sender"] for m in reply["messages"]] == [1, 1]

    run(scenario)


@pytest.mark.parametrize(
    ("forgery", "why"),
    [
        ("unsigned", "no DKIM signature"),
        ("tampered", "body hash mismatch"),
        ("other domain", "d=evil.example is not aligned"),
        ("unknown key", "signature 1"),
    ],
)
def test_a_forged_from_never_becomes_the_users_message(
    tmp_path: Path, forgery: str, why: str
) -> None:
    message = mail(text="Please wire the money.\n", message_id=f"<{forgery[:5]}@evil.example>")
    if forgery == "unsigned":
        data = wire(message)
    elif forgery == "tampered":
        data = signed(message, "example.org").replace(b"wire the money", b"wire more money")
    elif forgery == "other domain":
        data = signed(message, "evil.example")
    else:
        data = signed(message, "example.org", selector="absent")

    async def scenario() -> None:
        async with MailCell(tmp_path, dkim_dns=KEYS) as cell:
            chat_thread = await _alice_and_bob_chat(cell)
            assert await cell.send(data, ["bob@example.com"]) == {}
            chat = await cell.client.get_thread(2, chat_thread, limit=10)
            assert len(chat["messages"]) == 1  # nothing joined the users' conversation
            (thread,) = (await cell.client.list_threads(2, folder="other"))["threads"]
            reply = await cell.client.get_thread(2, thread["thread_id"], limit=10)
            assert reply["participants"] == [2]
            (message_entry,) = reply["messages"]
            assert message_entry["sender"] == 0
            full = await cell.client.get_message(2, message_entry["message_id"])
            assert full["from"] == "alice@example.org"
            assert why in full["extra"]["sender_unverified"]
            assert "sender_proof" not in full["extra"]
            assert cell.intake.counters["senders_unverified"] == 1

    run(scenario)


def test_mail_from_an_unregistered_address_is_not_checked(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path, dkim_dns=KEYS) as cell:
            assert await cell.send(wire(mail()), ["bob@example.com"]) == {}
            (message,) = await cell.messages(2)
            assert message["sender"] == 0
            assert "sender_unverified" not in message["extra"]
            assert cell.intake.counters["senders_unverified"] == 0

    run(scenario)


def test_alignment_is_the_from_domain_or_below_the_signing_domain() -> None:
    assert from_domain("Alice@Mail.Example.ORG.") == "mail.example.org"
    assert from_domain("no-domain") == ""
    proof = asyncio.run(check_dkim(b"From: x\r\n\r\nbody\r\n", "nobody"))
    assert not proof.verified and "no domain" in proof.detail
