"""The IMAP gateway through real sockets: Python's imaplib and imapclient, and isync's mbsync.

A real `pyserver run` (binary protocol, MTA proxy, IMAP gateway) holds a small
corpus: chat between users 1 and 2, a text delivered over SMS, mail from
outside over SMTP with an attachment. Each test reads and changes it as a mail
client would and checks what the mailbox says through the binary protocol.
"""

from __future__ import annotations

import contextlib
import email
import imaplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver.client import Client
from pyserver.errors import NotFound
from pyserver.servicekey import read_service_key
from tests.support import cli, run, serve_cell

DOMAIN = "pyserver.localhost"


def _mail_with_attachment() -> bytes:
    mail = EmailMessage()
    mail["From"] = "Carol Outside <carol@example.org>"
    mail["To"] = f"u2@{DOMAIN}"
    mail["Subject"] = "the quarterly figures"
    mail["Message-ID"] = "<figures-1@example.org>"
    mail.set_content("Figures attached.\nCarol\n")
    mail.add_attachment(bytes(range(256)) * 8, maintype="application", subtype="octet-stream",
                        filename="figures.bin")  # fmt: skip
    return mail.as_bytes().replace(b"\n", b"\r\n")


MAIL = _mail_with_attachment()


@pytest.fixture
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cell of its own with its IMAP gateway, and the corpus of the module docstring."""
    data = tmp_path_factory.mktemp("imap-cell")
    proc, ready = serve_cell(data)
    try:
        key = read_service_key(data)
        server = (ready["server"]["host"], ready["server"]["port"])

        async def seed() -> None:
            async with await Client.connect(*server, service_key=key) as client:
                for text in ("lunch on friday?", "or saturday", "friday works"):
                    sender, to = (1, 2) if text != "or saturday" else (2, 1)
                    await client.send(sender, [to], text)
                await client.deliver(2, 0, "running late, 10 min", channel="sms",
                                     key="sms-1", from_="+15550001111")  # fmt: skip

        run(seed)
        smtp = ready["smtp"]
        with smtplib.SMTP(smtp["host"], smtp["port"], timeout=10) as relay:
            relay.sendmail("carol@example.org", [f"u2@{DOMAIN}"], MAIL)
        yield {"data": data, "ready": ready, "key": key, "server": server}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _token(cell: dict[str, Any], user: int = 2) -> str:
    return cli("admin", "token", "--data", str(cell["data"]), "--user", str(user)).strip()


def _imap(cell: dict[str, Any], user: int = 2) -> imaplib.IMAP4:
    address = cell["ready"]["imap"]
    connection = imaplib.IMAP4(address["host"], address["port"], timeout=10)
    connection.login(f"u{user}@{DOMAIN}", _token(cell, user))
    return connection


def _message(cell: dict[str, Any], user: int, message_id: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
            return await client.get_message(user, message_id)

    return run(read)


def test_every_channel_reads_as_mail_in_one_conversation(cell: dict[str, Any]) -> None:
    imap = _imap(cell)
    try:
        typ, listing = imap.list()
        assert typ == "OK"
        names = {line.decode().rsplit(" ", 1)[1]: line.decode() for line in listing}
        assert set(names) == {"INBOX", "Other", "Archive", "Sent", "Spam"}
        assert "\\Sent" in names["Sent"] and "\\Archive" in names["Archive"]
        assert "\\Junk" in names["Spam"]
        typ, count = imap.select("Other")
        assert typ == "OK" and int(count[0]) == 5  # the chat (both ways), the text, the mail
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[])")
        messages = [part for part in data if isinstance(part, tuple)]
        assert len(messages) == 5
        parsed = [email.message_from_bytes(body) for _, body in messages]
        # the chat and the text: rendered, threaded by their conversation
        chat = [m for m in parsed if m["X-Pyserver-Channel"] == "chat"]
        assert [m.get_payload(decode=True).decode().strip() for m in chat] == [
            "lunch on friday?", "or saturday", "friday works",
        ]  # fmt: skip
        assert chat[0]["From"] == f"u1@{DOMAIN}" and chat[0]["To"] == f"u2@{DOMAIN}"
        assert chat[1]["From"] == f"u2@{DOMAIN}" and chat[1]["To"] == f"u1@{DOMAIN}"
        assert chat[0]["References"] == chat[2]["References"] == chat[1]["In-Reply-To"]
        text = next(m for m in parsed if m["X-Pyserver-Channel"] == "sms")
        assert "+15550001111" in text["From"] and "running late" in text.get_payload()
        # the mail: byte for byte as it came in over SMTP
        raw = next(body for _, body in messages if b"figures-1@example.org" in body)
        assert raw == MAIL
        size = next(meta for meta, body in messages if body == raw).decode()
        assert f"RFC822.SIZE {len(MAIL)}" in size and '"the quarterly figures"' in size
        # its structure and a part of it, as a client fetches them
        uid = imap.uid("SEARCH", "SUBJECT", "quarterly")[1][0].decode()
        assert uid and " " not in uid
        typ, structure = imap.uid("FETCH", uid, "(BODYSTRUCTURE)")
        assert b'("attachment" ("filename" "figures.bin"))' in structure[0]
        assert b'"MIXED"' in structure[0].upper()
        typ, partial = imap.uid("FETCH", uid, "(BODY.PEEK[]<0.20>)")
        assert partial[0][1] == MAIL[:20]
        assert imap.uid("SEARCH", "FROM", "carol@example.org")[1][0].decode() == uid
        # unread: what others sent (the user's own message is read)
        assert len(imap.uid("SEARCH", "UNSEEN")[1][0].split()) == 4
    finally:
        imap.logout()


def _requests(cell: dict[str, Any], op: str) -> float:
    """How many `op` requests the cell's app server answered, from its /metrics."""
    http = cell["ready"]["http"]
    with urllib.request.urlopen(f"http://{http['host']}:{http['port']}/metrics") as answer:  # nosec B310
        text = answer.read().decode()
    pattern = rf'^pyserver_requests_total{{[^}}]*op="{op}"[^}}]*}} (\S+)$'
    return sum(float(found) for found in re.findall(pattern, text, re.MULTILINE))


def test_a_new_session_selects_a_folder_unchanged_since_without_listing_it_again(
    cell: dict[str, Any],
) -> None:
    """A user's folders outlive its session a while (mail clients sign in for every sync):
    the next session's SELECT reads no listing when nothing changed, and one when
    something did."""
    first = _imap(cell)
    try:
        assert first.select("Other")[0] == "OK"
        # the user's SUBSCRIBE is live (it marks the folders changed once, when it starts)
        deadline = time.monotonic() + 30
        while _requests(cell, "SUBSCRIBE") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.noop()
        exists = int(first.select("Other")[1][0])
    finally:
        first.logout()
    listed = _requests(cell, "FOLDER_MESSAGES")
    second = _imap(cell)
    try:
        assert int(second.select("Other")[1][0]) == exists
        typ, data = second.uid("FETCH", "1:*", "(FLAGS)")
        assert typ == "OK" and len(data) == exists
    finally:
        second.logout()
    assert _requests(cell, "FOLDER_MESSAGES") == listed

    # a change made elsewhere while no session is open reaches the next one
    async def text() -> None:
        async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
            await client.send(1, [2], "one more thing")

    run(text)
    deadline = time.monotonic() + 30
    while True:
        third = _imap(cell)
        try:
            now = int(third.select("Other")[1][0])
        finally:
            third.logout()
        if now == exists + 1:
            break
        assert now == exists and time.monotonic() < deadline, (now, exists)
        time.sleep(0.1)
    assert _requests(cell, "FOLDER_MESSAGES") > listed


def test_flags_moves_and_expunge_change_the_mailbox_and_uids_hold(cell: dict[str, Any]) -> None:
    address = cell["ready"]["imap"]
    with imapclient.IMAPClient(address["host"], address["port"], ssl=False, timeout=10) as imap:
        imap.login(f"u2@{DOMAIN}", _token(cell))
        selected = imap.select_folder("Other")
        validity = selected[b"UIDVALIDITY"]
        fetched = imap.fetch(imap.search("ALL"), ["ENVELOPE", "FLAGS", "EMAILID"])
        by_subject = {data[b"ENVELOPE"].subject.decode(): uid for uid, data in fetched.items()}
        chat_uid = by_subject["lunch on friday?"]
        chat_id = fetched[chat_uid][b"EMAILID"][0].decode()
        # \Seen is the message's read state
        imap.add_flags([chat_uid], [imapclient.SEEN])
        assert _message(cell, 2, chat_id)["unread"] is False
        imap.remove_flags([chat_uid], [imapclient.SEEN])
        assert _message(cell, 2, chat_id)["unread"] is True
        # a new connection sees the same UIDs and UIDVALIDITY
        with imapclient.IMAPClient(address["host"], address["port"], ssl=False) as other:
            other.login(f"u2@{DOMAIN}", _token(cell))
            assert other.select_folder("Other", readonly=True)[b"UIDVALIDITY"] == validity
            assert sorted(other.search("ALL")) == sorted(fetched)
        # \Deleted, then EXPUNGE, deletes the message
        text_uid = by_subject["running late, 10 min"]
        text_id = fetched[text_uid][b"EMAILID"][0].decode()
        imap.add_flags([text_uid], [imapclient.DELETED])
        imap.expunge()
        with pytest.raises(NotFound):
            _message(cell, 2, text_id)
        assert text_uid not in imap.search("ALL")
        # MOVE takes the conversation to the archive, with new UIDs there
        imap.move([chat_uid], "Archive")
        remaining = imap.search("ALL")
        assert remaining == [by_subject["the quarterly figures"]]
        imap.select_folder("Archive")
        archived = imap.fetch(imap.search("ALL"), ["ENVELOPE"])
        subjects = sorted(d[b"ENVELOPE"].subject.decode() for d in archived.values())
        assert subjects == ["friday works", "lunch on friday?", "or saturday"]
        assert all(uid >= 1 for uid in archived)
        # and back (COPY files the conversation too: a message is in one folder)
        imap.copy(list(archived), "Other")
        assert imap.search("ALL") == []
        imap.select_folder("Other")
        assert len(imap.search("ALL")) == 4


def test_changes_made_elsewhere_reach_a_client_in_idle(cell: dict[str, Any]) -> None:
    address = cell["ready"]["imap"]
    with imapclient.IMAPClient(address["host"], address["port"], ssl=False, timeout=10) as imap:
        imap.login(f"u1@{DOMAIN}", _token(cell, 1))
        imap.select_folder("INBOX")
        before = len(imap.search("ALL"))
        imap.idle()
        started = time.monotonic()

        async def send() -> None:
            async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
                await client.send(2, [1], "sent while you idled")

        run(send)
        responses = imap.idle_check(timeout=10)
        imap.idle_done()
        assert any(r[1:] == (b"EXISTS",) and r[0] == before + 1 for r in responses), responses
        assert time.monotonic() - started < 10


def test_a_change_between_select_and_idle_is_reported_as_idle_starts(
    cell: dict[str, Any],
) -> None:
    """A change the gateway heard of while the client was not idling (nothing asked for
    the folder since) is reported as IDLE starts, not at the next change. Spoken over a
    bare socket: imapclient's idle_check polls the socket and misses an answer that came
    in with IDLE's continuation."""
    address = cell["ready"]["imap"]
    with socket.create_connection((address["host"], address["port"]), timeout=10) as sock:
        lines = sock.makefile("rb")

        def command(text: str) -> list[bytes]:
            tag = text.split()[0].encode()
            sock.sendall(text.encode() + b"\r\n")
            said = []
            while not (line := lines.readline()).startswith(tag + b" "):
                said.append(line)
            assert line.startswith(tag + b" OK"), line
            return said

        lines.readline()  # the greeting
        command(f'a LOGIN "u1@{DOMAIN}" "{_token(cell, 1)}"')
        [exists] = [line for line in command("b SELECT INBOX") if line.endswith(b" EXISTS\r\n")]
        before = int(exists.split()[1])

        async def send() -> None:
            async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
                await client.send(2, [1], "sent before you idled")

        run(send)
        time.sleep(1)  # the gateway hears of it now, with no command to report it to
        sock.sendall(b"c IDLE\r\n")
        assert lines.readline().startswith(b"+ ")
        sock.settimeout(5)  # the report comes now, or the read times out
        while not (line := lines.readline()).endswith(b" EXISTS\r\n"):
            assert line, "the gateway closed the connection"
        assert line == b"* %d EXISTS\r\n" % (before + 1)
        sock.sendall(b"DONE\r\n")
        while not lines.readline().startswith(b"c OK"):
            pass


def test_sign_in_needs_the_users_own_valid_token(cell: dict[str, Any]) -> None:
    address = cell["ready"]["imap"]
    attempts = {
        "another user's token": (f"u2@{DOMAIN}", _token(cell, 1)),
        "not a token": (f"u2@{DOMAIN}", "hunter2"),
        "nobody's address": ("nobody@example.org", _token(cell, 2)),
    }
    for why, (user, password) in attempts.items():
        imap = imaplib.IMAP4(address["host"], address["port"], timeout=10)
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(user, password)
        assert time.monotonic() - started >= 0.9, f"{why}: refused without the delay"
        imap.logout()
    # the bare id works as the user name, and AUTHENTICATE PLAIN as LOGIN does
    imap = imaplib.IMAP4(address["host"], address["port"], timeout=10)
    token = _token(cell, 2)
    typ, _ = imap.authenticate("PLAIN", lambda _: f"\0002\000{token}".encode())
    assert typ == "OK"
    imap.logout()


@pytest.fixture(scope="module")
def tls_cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("imap-tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = data / "cert.pem", data / "key.pem", data / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    settings = {"PYSERVER_TLS": "1", "PYSERVER_TLS_CERT_FILE": str(cert),
                "PYSERVER_TLS_KEY_FILE": str(key), "PYSERVER_TLS_CA_FILE": str(ca_file),
                "PYSERVER_IMAPS_PORT": "0"}  # fmt: skip
    proc, ready = serve_cell(data, settings)
    try:
        yield {"data": data, "ready": ready, "ca": str(ca_file)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_starttls_and_implicit_tls(tls_cell: dict[str, Any]) -> None:
    context = ssl.create_default_context(cafile=tls_cell["ca"])
    token = _token(tls_cell, 2)
    plain, implicit = tls_cell["ready"]["imap"], tls_cell["ready"]["imaps"]
    imap = imaplib.IMAP4(plain["host"], plain["port"], timeout=10)
    assert "STARTTLS" in imap.capabilities
    imap.starttls(ssl_context=context)
    assert imap.login(f"u2@{DOMAIN}", token)[0] == "OK"
    imap.logout()
    secured = imaplib.IMAP4_SSL(implicit["host"], implicit["port"], ssl_context=context)
    assert secured.login(f"u2@{DOMAIN}", token)[0] == "OK"
    assert secured.select("INBOX")[0] == "OK"
    secured.logout()


def _as_stored(message: bytes) -> bytes:
    """A message as mbsync keeps it in a Maildir: LF line ends, without the X-TUID header
    it adds to find its own copies."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    return b"\n".join(line for line in lines if not line.startswith(b"X-TUID: "))


def mbsync_of_user_1(cell: dict[str, Any], tmp_path: Path) -> tuple[Path, Callable[[], None]]:
    """isync's mbsync set up to sync user 1's whole mailbox (every folder, flags and
    deletions both ways) with a Maildir in `tmp_path`: the Maildir and a call that runs
    one sync and checks it succeeded."""
    mbsync = shutil.which("mbsync")
    assert mbsync, "isync is installed by scripts/debian-packages"
    address = cell["ready"]["imap"]
    maildir = tmp_path / "mail"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount pyserver\nHost {address['host']}\nPort {address['port']}\n"
        f"User u1@{DOMAIN}\nPass {_token(cell, 1)}\nSSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore remote\nAccount pyserver\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\nSubFolders Verbatim\n\n"
        "Channel everything\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\n"
        "Sync All\nExpunge Both\nSyncState *\n"
    )

    def sync() -> None:
        done = subprocess.run([mbsync, "-c", str(config), "-a"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    return maildir, sync


def test_mbsync_syncs_the_mailbox_to_a_maildir_and_changes_both_ways(
    cell: dict[str, Any], tmp_path: Path
) -> None:
    maildir, sync = mbsync_of_user_1(cell, tmp_path)

    def files(folder: str) -> list[Path]:
        return sorted((maildir / folder / "cur").iterdir()) + sorted(
            (maildir / folder / "new").iterdir()
        )

    sync()
    imap = _imap(cell, 1)
    try:
        for folder in ("INBOX", "Other", "Sent"):
            _, count = imap.select(folder, readonly=True)
            on_server = int(count[0])
            local = files(folder)
            assert len(local) == on_server, folder
            if on_server:
                _, data = imap.fetch("1:*", "(BODY.PEEK[])")
                bodies = sorted(_as_stored(part[1]) for part in data if isinstance(part, tuple))
                assert sorted(_as_stored(path.read_bytes()) for path in local) == bodies, folder
        # a flag set here reaches the server; a deletion there reaches the Maildir
        imap.select("INBOX")
        seen_before = len(imap.search(None, "SEEN")[1][0].split())
        inbox = files("INBOX")
        unread = next(path for path in inbox if "S" not in path.name.rpartition(":2,")[2])
        unread.rename(unread.parent.parent / "cur" / (unread.name.split(":2,")[0] + ":2,S"))
        sync()
        assert len(imap.search(None, "SEEN")[1][0].split()) == seen_before + 1
        imap.store("1", "+FLAGS", "\\Deleted")
        imap.expunge()
        sync()
        assert len(files("INBOX")) == len(inbox) - 1
    finally:
        imap.logout()


def _raw(cell: dict[str, Any], login: bool = True) -> socket.socket:
    address = cell["ready"]["imap"]
    sock = socket.create_connection((address["host"], address["port"]), timeout=10)
    sock.recv(1000)  # the greeting
    if login:
        sock.sendall(f'a LOGIN "u2@{DOMAIN}" "{_token(cell)}"\r\nb SELECT INBOX\r\n'.encode())
        _until(sock, b"b OK")
    return sock


def _until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def _closed_or(sock: socket.socket, *answers: bytes) -> bytes:
    """What the gateway said until it closed the connection or gave one of `answers`."""
    sock.settimeout(10)
    data = b""
    try:
        while not any(answer in data for answer in answers):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_hostile_input_gets_bad_or_a_closed_connection_and_others_are_served(
    cell: dict[str, Any],
) -> None:
    hostile = {
        "a literal that lies about its size": b"x LOGIN {999999999+}\r\nabc",
        "a literal asked for, never sent": b"x LOGIN {999999999}\r\n",
        "an endless line": b"x NOOP " + b"a" * 200_000,
        "deep parentheses": b"x FETCH 1 " + b"(" * 5_000 + b"FLAGS" + b")" * 5_000 + b"\r\n",
        "a bad modified UTF-7 name": b'x SELECT "&Jjo-!&-&"\r\n',
        "millions of sequence numbers": b"x FETCH 1:4294967295 (FLAGS)\r\n",
        "a long sequence set": b"x FETCH " + b",".join(b"%d" % n for n in range(1, 60_000))
        + b" (FLAGS)\r\n",
        "garbage": b"\x00\xff\x01 \r\n" * 10,
    }  # fmt: skip
    for why, data in hostile.items():
        sock = _raw(cell)
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # may be closed while still sending: refused
        answer = _closed_or(sock, b"x BAD", b"x NO", b"x OK")
        sock.close()
        assert time.monotonic() - started < 10, why
        assert b"x OK" not in answer or why.startswith(("millions", "a long")), (why, answer[-200:])
        # and the gateway serves the next client as before
        imap = _imap(cell)
        assert imap.select("INBOX")[0] == "OK", why
        imap.logout()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(line=st.binary(max_size=300))
def test_any_bytes_after_sign_in_never_take_the_gateway_down(
    cell: dict[str, Any], line: bytes
) -> None:
    sock = _raw(cell)
    try:
        sock.sendall(b"z " + line.replace(b"\n", b" ") + b"\r\nq NOOP\r\n")
        _closed_or(sock, b"q OK", b"q BAD", b"q NO")
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    probe = _raw(cell, login=False)
    probe.sendall(b"p NOOP\r\n")
    assert b"p OK" in _closed_or(probe, b"p OK")
    probe.close()
