"""Mail out: SEND to email addresses, relayed through a real SMTP relay, and the answers
coming back into the same conversation.

The relay is Postfix's `smtp-sink` on loopback, dumping each mail it accepts into a
folder (`-d`), or refusing every recipient for good (`-f rcpt`) or for now (`-r
rcpt`). The app side is the in-process cell with an `Outbox`; replies from outside
come in over real SMTP through the MTA proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from pyserver.app.auth import make_user_token, verify_user_token
from pyserver.app.mailbox import Mailbox
from pyserver.app.outbox import Outbox
from pyserver.errors import Forbidden
from pyserver.mta.intake import MailIntake, MtaSettings
from pyserver.mta.outbound import RelaySender, thread_of_message_id, user_of_address
from pyserver.mta.route import SingleServerRoute
from pyserver.mta.senders import check_dkim
from pyserver.mta.smtp import MtaProxy
from pyserver.mta.submission import SubmissionProxy
from pyserver.wire.ops import Op
from tests import support
from tests.conftest import REQUIRE_ENGINES
from tests.support.cells import KEY, InProcessCell
from tests.support.postfix import OUTSIDE, Postfix
from tests.support.swaks import swaks

DOMAIN = "cell.test"
# the tests' DKIM key (tests/dkim/README.md) and its key record
DKIM_KEY = (Path(__file__).parent / "dkim" / "test-rsa.key").read_bytes()
DKIM_RECORD = b"v=DKIM1; k=rsa; p=" + (Path(__file__).parent / "dkim" / "test-rsa.pub").read_bytes()
SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


class Relay:
    """`smtp-sink` on a loopback port, its accepted mail dumped into a folder of its own
    (directly under the system's temporary folder: as root, smtp-sink runs as nobody, who
    cannot reach into the test's private folders)."""

    def __init__(self, *flags: str, port: int | None = None) -> None:
        if SMTP_SINK is None:
            message = "smtp-sink is not installed (apt-get install postfix)"
            if REQUIRE_ENGINES:
                pytest.fail(message)
            pytest.skip(message)
        self.folder = folder = Path(tempfile.mkdtemp(prefix="pyserver-relay-"))
        folder.chmod(0o777)
        self.port = port or support.free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, *flags, "-d", f"{folder}/mail.", f"127.0.0.1:{self.port}", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _wait_listening(self.port, self.proc)

    def mails(self) -> list[EmailMessage]:
        found = []
        for path in sorted(self.folder.glob("mail.*")):
            found.append(message_from_bytes(path.read_bytes(), policy=policy.default))
        return found  # type: ignore[return-value]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"smtp-sink exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("smtp-sink did not listen")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    running = Relay()
    yield running
    running.stop()


class OutCell(InProcessCell):
    """A cell whose mailbox relays mail to outside addresses through `relay_port`, with the
    MTA proxy in front for the answers."""

    def __init__(
        self, folder: Path, relay_port: int, dkim_key: bytes | None = None, dkim_dns: Any = None
    ) -> None:
        super().__init__(folder, blobs=True, mailbox_options={"outbound_queued": self._queued})
        self.relay_port = relay_port
        self.dkim_key = dkim_key
        self.dkim_dns = dkim_dns
        self.outbox = self._outbox(self.mailbox)

    def _queued(self, user: int, message_id: str) -> None:
        self.outbox.queued(user, message_id)

    def _outbox(self, mailbox: Mailbox) -> Outbox:
        sender = RelaySender(
            "127.0.0.1", self.relay_port, DOMAIN, timeout_s=5, dkim_key=self.dkim_key,
            blobs=self.blobs,
        )  # fmt: skip
        return Outbox(mailbox, sender, retry_initial_s=0.1, retry_max_s=0.3, workers=2)

    async def __aenter__(self) -> OutCell:
        await super().__aenter__()
        await self.store.add_address("bob@example.com", 2)
        await self.serve()
        self.outbox.start()
        self.route = SingleServerRoute("127.0.0.1", self.port, KEY, 5.0)
        assert self.blobs is not None
        settings = MtaSettings(mail_domain=DOMAIN, dkim_dns=self.dkim_dns)
        intake = MailIntake(self.store, self.blobs, self.route, settings)
        self.proxy = MtaProxy(intake, hostname="mx.test")
        _, self.smtp_port = await self.proxy.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.proxy.stop(1.0)
        await self.outbox.close()
        await self.route.close()
        await super().__aexit__(*exc_info)

    async def send(self, sender: int, recipients: list[Any], text: str, **more: Any) -> dict:
        payload = {"sender": sender, "recipients": recipients, "text": text, "channel": "chat"}
        return await self.mailbox.execute(Op.SEND, {**payload, **more})

    async def deliver_by_smtp(self, message: EmailMessage, to: list[str]) -> None:
        await asyncio.to_thread(_sendmail, self.smtp_port, message, to)

    async def thread(self, user: int, thread_id: str) -> dict[str, Any]:
        return await self.mailbox.execute(Op.GET_THREAD, {"user": user, "thread_id": thread_id})


def test_a_send_to_an_address_goes_out_and_the_answer_comes_back(tmp_path: Path, relay: Relay):
    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", relay.port) as cell:
            sent = await cell.send(2, ["Alice@Outside.example", 3], "lunch?", subject="Lunch")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (mail,) = relay.mails()
            assert mail["From"] == f"u2@{DOMAIN}" and mail["To"] == "Alice@Outside.example"
            assert mail["Subject"] == "Lunch" and mail.get_content().strip() == "lunch?"
            our_id = mail["Message-ID"]
            assert thread_of_message_id(our_id, DOMAIN) == sent["thread_id"]
            thread = await cell.thread(2, sent["thread_id"])
            assert thread["participants"] == [2, 3]
            assert thread["addresses"] == ["Alice@Outside.example"]
            (message,) = thread["messages"]
            state = message["delivery"]["Alice@Outside.example"]
            assert state["state"] == "sent" and state["detail"].startswith("2")
            assert cell.outbox.counters["sent"] == 1
            # user 3, a user participant, got the message; it has no delivery of its own
            (copy,) = (await cell.thread(3, sent["thread_id"]))["messages"]
            assert "delivery" not in copy

            # alice answers from outside, to the address the mail came from
            answer = EmailMessage()
            answer["From"] = "Alice <alice@outside.example>"
            answer["To"] = f"u2@{DOMAIN}"
            answer["Subject"] = "Re: Lunch"
            answer["Message-ID"] = "<answer-1@outside.example>"
            answer["In-Reply-To"] = our_id
            answer["References"] = our_id
            answer.set_content("yes, at noon")
            await cell.deliver_by_smtp(answer, [f"u2@{DOMAIN}"])
            thread = await cell.thread(2, sent["thread_id"])
            assert [m["text"] for m in thread["messages"]] == ["lunch?", "yes, at noon"]
            assert thread["messages"][-1]["sender"] == 0
            assert thread["folder"] == "inbox"

            # user 2 answers back: the mail refers to alice's
            again = await cell.send(2, ["alice@outside.example", 3], "see you", subject="Lunch")
            assert again["thread_id"] == sent["thread_id"]
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (second,) = [m for m in relay.mails() if m["Message-ID"] != our_id]
            assert second["In-Reply-To"] == "<answer-1@outside.example>"

    support.run(scenario, timeout=60)


def test_mail_out_is_dkim_signed_for_the_mail_domain(tmp_path: Path, relay: Relay) -> None:
    key, record = DKIM_KEY, DKIM_RECORD
    records = {f"pyserver._domainkey.{DOMAIN}.".encode(): record.strip()}

    def published(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", relay.port, dkim_key=key) as cell:
            await cell.send(2, ["erin@outside.example"], "signed, sealed", subject="Proof")
            await asyncio.wait_for(cell.outbox.idle(), 10)
        (path,) = sorted(relay.folder.glob("mail.*"))
        # what the receiver got, the relay's own trace headers on top
        proof = await check_dkim(path.read_bytes(), f"u2@{DOMAIN}", published)
        assert proof.verified and proof.detail == f"dkim:{DOMAIN}"
        tampered = path.read_bytes().replace(b"signed, sealed", b"signed, altered")
        assert not (await check_dkim(tampered, f"u2@{DOMAIN}", published)).verified

    support.run(scenario, timeout=60)


def _bounce(to: str, failed: str, message_id: str) -> bytes:
    """A delivery status notification as Postfix writes one for an unknown remote user."""
    text = f"""From: MAILER-DAEMON@mx.outside.example (Mail Delivery System)
To: {to}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.outside.example

Final-Recipient: rfc822; {failed}
Original-Recipient: rfc822;{failed}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{failed}>: Recipient address rejected:
    User unknown in local recipient table

--B1
Content-Type: text/rfc822-headers

Message-ID: {message_id}

--B1--
"""
    return text.replace("\n", "\r\n").encode()


def test_a_bounce_marks_the_address_failed(tmp_path: Path, relay: Relay) -> None:
    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", relay.port) as cell:
            sent = await cell.send(2, ["ghost@outside.example", "fred@outside.example"], "hi")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (mail,) = relay.mails()
            envelope = mail["X-Mail-Args"].strip("<>")  # the sink's record of MAIL FROM
            assert envelope.startswith(f"b-2-{sent['message_id']}@")
            data = _bounce(envelope, "ghost@outside.example", mail["Message-ID"])
            await asyncio.to_thread(_sendmail_raw, cell.smtp_port, "", [envelope], data)
            (message,) = (await cell.thread(2, sent["thread_id"]))["messages"]
            ghost = message["delivery"]["ghost@outside.example"]
            assert ghost["state"] == "failed" and "User unknown" in ghost["detail"]
            assert message["delivery"]["fred@outside.example"]["state"] == "sent"
            # a bounce names only the mail it is about; nothing lands in a mailbox
            counts = (await cell.mailbox.execute(Op.COUNTS, {"user": 2}))["folders"]
            assert all(folder["unread"] == 0 for folder in counts.values())

    support.run(scenario, timeout=60)


def test_a_permanent_refusal_marks_the_mail_failed(tmp_path: Path) -> None:
    refusing = Relay("-f", "rcpt")

    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", refusing.port) as cell:
            sent = await cell.send(2, ["nobody@outside.example"], "hello?")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (message,) = (await cell.thread(2, sent["thread_id"]))["messages"]
            state = message["delivery"]["nobody@outside.example"]
            assert state["state"] == "failed" and state["detail"].startswith("5")
            assert refusing.mails() == []

    try:
        support.run(scenario, timeout=60)
    finally:
        refusing.stop()


def test_queued_mail_survives_a_restart_and_goes_out_once(tmp_path: Path) -> None:
    port = support.free_port()  # nothing listens yet: the relay is down

    async def first_run() -> str:
        async with OutCell(tmp_path / "cell", port) as cell:
            sent = await cell.send(2, ["carol@outside.example"], "queued while down", key="k1")
            await asyncio.sleep(0.5)  # a few attempts, each deferred
            assert cell.outbox.counters["retries"] >= 1
            (message,) = (await cell.thread(2, sent["thread_id"]))["messages"]
            assert message["delivery"]["carol@outside.example"]["state"] == "queued"
            return sent["thread_id"]

    thread_id = support.run(first_run, timeout=60)
    relay = Relay()  # the relay is back (the cell is pointed at it)

    async def second_run() -> None:
        async with OutCell(tmp_path / "cell", relay.port) as cell:
            assert await cell.outbox.recover(await cell.store.user_ids()) == 1
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (message,) = (await cell.thread(2, thread_id))["messages"]
            assert message["delivery"]["carol@outside.example"]["state"] == "sent"
            # once settled, a later recovery sends nothing again
            assert await cell.outbox.recover(await cell.store.user_ids()) == 0

    try:
        support.run(second_run, timeout=60)
        assert [m["To"] for m in relay.mails()] == ["carol@outside.example"]
    finally:
        relay.stop()


def test_addresses_of_the_cell_and_its_message_ids_are_read_back() -> None:
    assert user_of_address(f"U42@{DOMAIN}", DOMAIN) == 42
    assert user_of_address("u42@other.test", DOMAIN) is None
    assert user_of_address(f"bob@{DOMAIN}", DOMAIN) is None
    message_id = f"<m{'a' * 24}.t{'b' * 24}@{DOMAIN}>"
    assert thread_of_message_id(message_id, DOMAIN) == "t" + "b" * 24
    assert thread_of_message_id(message_id.replace(DOMAIN, "evil.test"), DOMAIN) is None
    assert thread_of_message_id("<whatever@cell.test>", DOMAIN) is None


def test_send_refuses_what_is_neither_a_user_nor_an_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCell(tmp_path) as cell:
            for bad in ["no-at-sign", "a@b", "two words@example.org", "<x@example.org>", 1.5]:
                with pytest.raises(Exception, match="recipients"):
                    await cell.mailbox.execute(
                        Op.SEND, {"sender": 2, "recipients": [bad], "text": "x", "channel": "chat"}
                    )

    support.run(scenario)


def _sendmail_raw(port: int, sender: str, to: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(sender, to, data)


def _sendmail(port: int, message: EmailMessage, to: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message, to_addrs=to)


# ---- the whole cell: `pyserver run --relay`, killed with mail queued ----


def _cli(*args: str, data: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pyserver.cli", *args, "--data", str(data)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def _run_cell(data: Path, relay_port: int, *more: str) -> subprocess.Popen[Any]:
    proc, ready = support.start_serving(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "-1", "--relay", f"127.0.0.1:{relay_port}",
         "--mail-domain", DOMAIN, *more],
        data.parent / "cell.ready.json", stdout=subprocess.DEVNULL,
    )  # fmt: skip
    proc.ready = ready  # type: ignore[attr-defined]
    return proc


def test_mail_queued_when_the_cell_is_killed_goes_out_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "cell"
    relay_port = support.free_port()  # the relay is down at first
    cell = _run_cell(data, relay_port)
    try:
        out = _cli("send", "--user", "2", "--to", "dora@outside.example", "--to", "3",
                   "--key", "once", "sent while the relay is down", data=data)  # fmt: skip
        assert out.startswith("sent ")
    finally:
        cell.kill()  # kill -9, with the mail queued
        cell.wait(timeout=10)
    # the outside provider comes back: a real Postfix, delivering into dora's Maildir
    postfix = Postfix(relay_port, ["dora"], DOMAIN, support.free_port())
    postfix.start()
    try:
        cell = _run_cell(data, relay_port)
        try:
            (mail,) = postfix.wait_for("dora", 1)
            time.sleep(1.0)  # a second copy, if there were one, would be here by now
            assert len(postfix.mailbox("dora")) == 1  # exactly once, by its Message-ID too
            assert thread_of_message_id(mail["Message-ID"], DOMAIN) is not None
            assert mail["From"] == f"u2@{DOMAIN}"
        finally:
            cell.terminate()
            cell.wait(timeout=30)
    finally:
        postfix.stop()


def test_composed_mail_reads_back_with_the_email_package() -> None:
    """Non-ASCII subject and body, long lines, a dot line, references: what the email
    package reads of the bytes is what was sent."""
    sender = RelaySender("127.0.0.1", 25, DOMAIN)
    text = "Zoë's café: ½ price\n.\nline " + "x" * 2000 + "\nend"
    mail = {
        "user": 7, "message_id": "m" + "1" * 24, "thread_id": "t" + "2" * 24,
        "addresses": ["a@outside.example", "B@Outside.example"],
        "subject": "Réunion — lundi " + "long " * 40, "text": text, "ts": 1_764_211_200_000_000,
        "references": ["<first@outside.example>", "not an id", "<second@outside.example>"],
    }  # fmt: skip
    data = sender.compose(mail)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["From"] == f"u7@{DOMAIN}"
    assert [a.addr_spec for a in parsed["To"].addresses] == mail["addresses"]
    assert parsed["Subject"] == " ".join(mail["subject"].split())
    assert parsed.get_content().replace("\r\n", "\n") == text + "\n"  # CRLF on the wire
    assert parsed["In-Reply-To"] == "<second@outside.example>"
    assert parsed["References"].split() == ["<first@outside.example>", "<second@outside.example>"]
    assert thread_of_message_id(parsed["Message-ID"], DOMAIN) == "t" + "2" * 24
    plain = sender.compose({**mail, "subject": "Lunch", "text": "lunch?"})
    assert b"Content-Transfer-Encoding: 7bit" in plain and plain.endswith(b"\r\n\r\nlunch?\r\n")


# ---- submission: a mail client sends as the user (swaks, STARTTLS, AUTH) ----


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, made by openssl: (cert, key) PEM files."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls(tmp_path: Path) -> ssl.SSLContext:
    """A self-signed certificate for localhost in a server context."""
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_a_mail_client_submits_as_the_user(tmp_path: Path, relay: Relay, tls: ssl.SSLContext):
    token = make_user_token(1, int(time.time()) + 3600, KEY)
    report = tmp_path / "report.pdf"
    report.write_bytes(bytes(range(256)) * 400)

    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", relay.port) as cell:
            await cell.store.add_address("alice@example.org", 1)
            submission = SubmissionProxy(
                cell.store, cell.route, lambda t: verify_user_token(t, KEY, time.time()), tls,
                blobs=cell.blobs, mail_domain=DOMAIN,
            )  # fmt: skip
            _, port = await submission.start("127.0.0.1", 0)
            try:
                auth = ["--auth", "PLAIN", "--auth-user", "alice@example.org",
                        "--auth-password", token]  # fmt: skip
                mail = ["--from", "alice@example.org",
                        "--to", "bob@example.com,gus@outside.example", "--header", "Subject: Plans",
                        "--header", "Message-ID: <plans-1@example.org>",
                        "--body", "Dinner on Saturday?"]  # fmt: skip
                # no TLS, then TLS without AUTH, then a token for another user: refused
                plain = await asyncio.to_thread(swaks, port, *auth, *mail)
                assert plain.returncode != 0  # AUTH is not even offered before STARTTLS
                assert "did not advertise authentication" in plain.stderr
                anonymous = await asyncio.to_thread(swaks, port, "--tls", *mail)
                assert anonymous.returncode != 0 and "530" in anonymous.stdout
                wrong = make_user_token(2, int(time.time()) + 3600, KEY)
                other = ["--auth", "PLAIN", "--auth-user", "alice@example.org",
                         "--auth-password", wrong]  # fmt: skip
                forged = await asyncio.to_thread(swaks, port, "--tls", *other, *mail)
                assert forged.returncode != 0 and "535 5.7.8" in forged.stdout
                attach = ["--attach-type", "application/pdf", "--attach-name", "report.pdf",
                          "--attach", f"@{report}"]  # fmt: skip
                done = await asyncio.to_thread(swaks, port, "--tls", *auth, *mail, *attach)
                assert done.returncode == 0, done.stdout + done.stderr
                assert "250 2.0.0 OK queued as m" in done.stdout
                await asyncio.wait_for(cell.outbox.idle(), 10)
            finally:
                await submission.stop(1.0)
            (thread,) = (
                await cell.mailbox.execute(Op.LIST_THREADS, {"user": 1, "folder": "sent"})
            )["threads"]
            reply = await cell.thread(1, thread["thread_id"])
            assert reply["participants"] == [1, 2], reply
            assert reply["addresses"] == ["gus@outside.example"]
            (message,) = reply["messages"]
            assert message["sender"] == 1 and message["text"].strip() == "Dinner on Saturday?"
            assert message["delivery"]["gus@outside.example"]["state"] == "sent"
            (out,) = relay.mails()
            assert out["To"] == "gus@outside.example" and out["Subject"] == "Plans"
            assert out["From"] == f"u1@{DOMAIN}"
            # the attachment went out whole, and bob can read it from his copy
            (file,) = list(out.iter_attachments())
            assert file.get_filename() == "report.pdf"
            assert file.get_content_type() == "application/pdf"
            assert file.get_content() == report.read_bytes()
            (copy,) = (await cell.thread(2, thread["thread_id"]))["messages"]
            full = await cell.mailbox.execute(
                Op.GET_MESSAGE, {"user": 2, "message_id": copy["message_id"]}
            )
            (listed,) = full["extra"]["attachments"]
            blob = await cell.mailbox.execute(Op.GET_BLOB, {"user": 2, "ref": listed["ref"]})
            assert blob["size"] == report.stat().st_size

    support.run(scenario, timeout=120)


def test_pyserver_run_takes_submissions_from_a_mail_client(tmp_path: Path, relay: Relay) -> None:
    """The whole path in processes: `pyserver run --submission-port --relay`, a user token
    from `pyserver admin token`, swaks as the mail client, smtp-sink as the relay."""
    cert, key = _self_signed(tmp_path)
    data = tmp_path / "cell"
    cell = _run_cell(data, relay.port, "--submission-port", "0", "--tls-cert", str(cert),
                     "--tls-key", str(key))  # fmt: skip
    try:
        port = cell.ready["submission"]["port"]  # type: ignore[attr-defined]
        token = _cli("admin", "token", "--user", "4", data=data).strip()
        done = swaks(port, "--tls", "--auth", "LOGIN", "--auth-user", f"u4@{DOMAIN}",
                      "--auth-password", token, "--from", f"u4@{DOMAIN}",
                      "--to", "hal@outside.example", "--header", "Subject: From my phone",
                      "--body", "sent from a mail client")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 20
        while not relay.mails() and time.monotonic() < deadline:
            time.sleep(0.1)
        (mail,) = relay.mails()
        assert mail["From"] == f"u4@{DOMAIN}" and mail["Subject"] == "From my phone"
        sent = json.loads(_cli("threads", "--user", "4", "--folder", "sent", "--json", data=data))
        assert [t["snippet"] for t in sent["threads"]] == ["sent from a mail client"]
        http = cell.ready["http"]  # type: ignore[attr-defined]
        with urllib.request.urlopen(f"http://127.0.0.1:{http['port']}/metrics") as page:
            metrics = page.read().decode()
        assert 'pyserver_outbound_settled_total{outcome="sent"} 1.0' in metrics
    finally:
        cell.terminate()
        cell.wait(timeout=30)


def test_the_issue_scenario_one_conversation_and_email_both_ways(
    tmp_path: Path, relay: Relay
) -> None:
    """User 1 owns alice@example.org, is user 2's friend and chats with user 2. Alice mails
    bob@example.com (user 2) from her own mail system, signed: it joins their Inbox
    conversation. User 2 answers there: user 1 gets it in the app, and alice's mail system
    gets it by mail, answering hers."""
    key, record = DKIM_KEY, DKIM_RECORD

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record.strip() if name == b"test._domainkey.example.org." else None

    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", relay.port, dkim_dns=dns) as cell:
            await cell.store.add_address("alice@example.org", 1)
            await cell.mailbox.execute(Op.FRIEND_ADD, {"user": 1, "friend": 2})
            chat = await cell.send(1, [2], "see you at lunch")
            mail = EmailMessage()
            mail["From"] = "Alice <alice@example.org>"
            mail["To"] = "bob@example.com"
            mail["Subject"] = "Agenda"
            mail["Message-ID"] = "<agenda-1@example.org>"
            mail.set_content("Here is the agenda.")
            data = mail.as_bytes(policy=policy.SMTP)
            signature = dkim.sign(
                data,
                b"test",
                b"example.org",
                key,
                include_headers=[b"from", b"to", b"subject", b"message-id"],
            )
            await asyncio.to_thread(
                _sendmail_raw, cell.smtp_port, "alice@example.org", ["bob@example.com"],
                signature + data,
            )  # fmt: skip
            inbox = await cell.mailbox.execute(Op.LIST_THREADS, {"user": 2, "folder": "inbox"})
            assert [t["thread_id"] for t in inbox["threads"]] == [chat["thread_id"]]

            answer = await cell.send(2, [1], "Thanks, looks good.", subject="Re: Agenda")
            assert answer["thread_id"] == chat["thread_id"]
            await asyncio.wait_for(cell.outbox.idle(), 10)
            thread = await cell.thread(2, chat["thread_id"])
            assert thread["participants"] == [1, 2] and thread["addresses"] == []
            texts = [m["text"].strip() for m in thread["messages"]]
            assert texts == ["see you at lunch", "Here is the agenda.", "Thanks, looks good."]
            assert thread["messages"][-1]["delivery"]["alice@example.org"]["state"] == "sent"
            # user 1 has it in the app too
            mine = await cell.thread(1, chat["thread_id"])
            assert mine["messages"][-1]["text"] == "Thanks, looks good."
            # and alice's mail system got it by mail, answering her mail
            (out,) = relay.mails()
            assert out["To"] == "alice@example.org" and out["From"] == f"u2@{DOMAIN}"
            assert out["In-Reply-To"] == "<agenda-1@example.org>"
            # a later chat from user 1 in the app: user 2's next answer stays in the app
            await cell.send(1, [2], "also, bring the slides")
            await cell.send(2, [1], "will do")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            assert len(relay.mails()) == 1

    support.run(scenario, timeout=60)


# ---- the outside world is a real Postfix ----


def test_through_a_real_postfix_mail_arrives_once_bounces_and_answers_come_back(
    tmp_path: Path,
) -> None:
    """Postfix is the relay and the outside provider: alice's copy lands in her Maildir
    once; ghost is unknown there, so Postfix bounces it to the mail's envelope sender,
    which it hands to the cell's MTA proxy: the message shows ghost failed. Alice's
    answer, from her Maildir's mail, comes back into the same conversation."""
    postfix_port = support.free_port()

    async def scenario() -> None:
        async with OutCell(tmp_path / "cell", postfix_port) as cell:
            postfix = Postfix(postfix_port, ["alice"], DOMAIN, cell.smtp_port)
            postfix.start()
            try:
                to = [f"alice@{OUTSIDE}", f"ghost@{OUTSIDE}"]
                sent = await cell.send(2, to, "lunch on friday?", subject="Lunch", key="l1")
                (received,) = await asyncio.to_thread(postfix.wait_for, "alice", 1)
                assert received["From"] == f"u2@{DOMAIN}"
                assert received.get_content().strip() == "lunch on friday?"
                deadline = time.monotonic() + 30
                while True:
                    thread = await cell.thread(2, sent["thread_id"])
                    delivery = thread["messages"][0]["delivery"]
                    if delivery[f"ghost@{OUTSIDE}"]["state"] == "failed":
                        break
                    assert time.monotonic() < deadline, (delivery, postfix.log())
                    await asyncio.sleep(0.1)
                assert delivery[f"alice@{OUTSIDE}"]["state"] == "sent"
                assert "5.1.1" in delivery[f"ghost@{OUTSIDE}"]["detail"]
                # alice answers the mail in her Maildir, through her provider
                answer = EmailMessage()
                answer["From"] = f"alice@{OUTSIDE}"
                answer["To"] = received["From"]
                answer["Subject"] = "Re: Lunch"
                answer["Message-ID"] = f"<answer@{OUTSIDE}>"
                answer["In-Reply-To"] = received["Message-ID"]
                answer.set_content("friday works")
                await asyncio.to_thread(_sendmail, cell.smtp_port, answer, [f"u2@{DOMAIN}"])
                thread = await cell.thread(2, sent["thread_id"])
                assert [m["text"].strip() for m in thread["messages"]] == [
                    "lunch on friday?",
                    "friday works",
                ]
                await asyncio.sleep(1.0)  # a second copy, if there were one, would be here
                assert len(postfix.mailbox("alice")) == 1
            finally:
                postfix.stop()

    support.run(scenario, timeout=90)


def test_a_user_token_connection_cannot_attach_blobs(tmp_path: Path) -> None:
    """A blob ref in a SEND is readable by every recipient afterwards: only a trusted tier,
    which stored the bytes, may name one."""

    async def scenario() -> None:
        async with InProcessCell(tmp_path) as cell:
            await cell.serve()
            token = make_user_token(5, int(time.time()) + 60, KEY)
            client = await cell.client(user_token=token)
            attachments = [{"ref": "a" * 64, "name": "x.bin", "type": "", "size": 1}]
            with pytest.raises(Forbidden, match="attachments"):
                await client.request(
                    Op.SEND,
                    {
                        "sender": 5,
                        "recipients": [6],
                        "text": "x",
                        "channel": "chat",
                        "attachments": attachments,
                    },
                )
            sent = await client.send(5, [6], "no files")  # the same user, without: fine
            assert sent["message_id"]

    support.run(scenario)


def test_done_when_the_answer_from_the_cli_reaches_alices_mailbox_at_postfix(
    tmp_path: Path,
) -> None:
    """The issue's "done when": user 1 (alice@outside.example) and user 2 chat; alice
    mails user 2 from her provider, signed: one Inbox conversation [1, 2] holds both;
    user 2 answers with `pyserver send` and the answer lands in alice's Maildir at her
    provider (a real Postfix), answering her mail."""
    key, record = DKIM_KEY, DKIM_RECORD

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record.strip() if name == f"test._domainkey.{OUTSIDE}.".encode() else None

    postfix_port = support.free_port()
    folder = tmp_path / "cell"

    async def scenario() -> None:
        async with OutCell(folder, postfix_port, dkim_dns=dns) as cell:
            postfix = Postfix(postfix_port, ["alice"], DOMAIN, cell.smtp_port)
            postfix.start()
            try:
                await cell.store.add_address(f"alice@{OUTSIDE}", 1)
                await cell.mailbox.execute(Op.FRIEND_ADD, {"user": 1, "friend": 2})
                chat = await cell.send(1, [2], "see you at lunch")
                mail = EmailMessage()
                mail["From"] = f"Alice <alice@{OUTSIDE}>"
                mail["To"] = "bob@example.com"
                mail["Subject"] = "Agenda"
                mail["Message-ID"] = f"<agenda@{OUTSIDE}>"
                mail.set_content("Here is the agenda.")
                data = mail.as_bytes(policy=policy.SMTP)
                signature = dkim.sign(data, b"test", OUTSIDE.encode(), key,
                                      include_headers=[b"from", b"to", b"subject"])  # fmt: skip
                await asyncio.to_thread(
                    _sendmail_raw, cell.smtp_port, f"alice@{OUTSIDE}", ["bob@example.com"],
                    signature + data,
                )  # fmt: skip
                inbox = await cell.mailbox.execute(Op.LIST_THREADS, {"user": 2})
                (thread,) = inbox["threads"]
                assert thread["thread_id"] == chat["thread_id"]
                assert thread["participants"] == [1, 2]

                (folder / "service.key").write_text(KEY + "\n")
                out = await asyncio.to_thread(
                    _cli, "send", "--server", f"127.0.0.1:{cell.port}", "--user", "2",
                    "--to", "1", "--subject", "Re: Agenda", "Thanks, looks good.", data=folder,
                )  # fmt: skip
                assert out.startswith("sent ") and chat["thread_id"] in out
                (answer,) = await asyncio.to_thread(postfix.wait_for, "alice", 1)
                assert answer["In-Reply-To"] == f"<agenda@{OUTSIDE}>"
                assert answer.get_content().strip() == "Thanks, looks good."
                bob = await cell.thread(2, chat["thread_id"])
                texts = [m["text"].strip() for m in bob["messages"]]
                assert texts == ["see you at lunch", "Here is the agenda.", "Thanks, looks good."]
            finally:
                postfix.stop()

    support.run(scenario, timeout=90)


def test_a_session_the_relay_closed_meanwhile_is_replaced_at_once(tmp_path: Path) -> None:
    """The relay restarts between two mails: the kept session is dead, and the second mail
    goes out on a new one without waiting for a retry."""
    first_relay = Relay()

    async def scenario() -> None:
        nonlocal first_relay
        async with OutCell(tmp_path / "cell", first_relay.port) as cell:
            await cell.send(2, ["ida@outside.example"], "one")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            port = first_relay.port
            first_relay.stop()
            first_relay = Relay(port=port)  # back on the same port
            sent = await cell.send(2, ["ida@outside.example"], "two")
            await asyncio.wait_for(cell.outbox.idle(), 10)
            (message,) = [m for m in (await cell.thread(2, sent["thread_id"]))["messages"]
                          if m["message_id"] == sent["message_id"]]  # fmt: skip
            assert message["delivery"]["ida@outside.example"]["state"] == "sent"
            assert cell.outbox.counters["retries"] == 0
            assert [m.get_content().strip() for m in first_relay.mails()] == ["two"]

    try:
        support.run(scenario, timeout=60)
    finally:
        first_relay.stop()
