"""APPEND through the IMAP gateway: imaplib, imapclient and isync's mbsync against `pyserver run`.

APPEND to Sent files a mail the client sent (users among its recipients get
their copy, nothing goes out by SMTP); APPEND to another folder keeps the mail
there; each is served back byte for byte. The cell and its corpus are
tests/test_imap.py's (`cell`).
"""

from __future__ import annotations

import imaplib
import re
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import imapclient
import pytest

from pyserver.client import Client
from tests.support import run
from tests.test_imap import DOMAIN, _imap, _token, cell, mbsync_of_user_1

__all__ = ["cell"]  # the fixture, imported for pytest


def _mail(sender: str, to: str, subject: str, message_id: str, **more: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    for name, value in more.items():
        mail[name.replace("_", "-").title()] = value
    mail["Subject"] = subject
    mail["Message-ID"] = message_id
    mail["Date"] = "Fri, 04 Dec 2026 10:00:00 +0000"
    mail.set_content(f"{subject}\n\nsent from a mail client\n")
    return mail.as_bytes().replace(b"\n", b"\r\n")


def _threads(cell: dict[str, Any], user: int, folder: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
            reply = await client.list_threads(user, folder, limit=50)
            return reply["threads"]

    return run(read)


def _thread(cell: dict[str, Any], user: int, thread_id: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
            return await client.get_thread(user, thread_id)

    return run(read)


def _appended_uid(answer: list[bytes]) -> int:
    found = re.search(rb"\[APPENDUID (\d+) (\d+)\]", answer[0])
    assert found, answer
    assert found.group(1) == b"1"  # UIDVALIDITY
    return int(found.group(2))


def test_append_to_sent_files_the_mail_and_users_among_its_recipients_get_it(
    cell: dict[str, Any],
) -> None:
    raw = _mail(f"Me <u1@{DOMAIN}>", f"u3@{DOMAIN}", "minutes of the meeting",
                "<minutes-1@client.example>", cc="Carol <carol@example.org>",
                bcc=f"u2@{DOMAIN}")  # fmt: skip
    imap = _imap(cell, 1)
    try:
        typ, answer = imap.append("Sent", "(\\Seen)", None, raw)
        assert typ == "OK", answer
        uid = _appended_uid(answer)
        imap.select("Sent")
        typ, data = imap.uid("FETCH", str(uid), "(FLAGS BODY.PEEK[])")
        assert data[0][1] == raw  # byte for byte
        assert b"\\Seen" in data[0][0]
        # the same mail again (a client retrying): the same message, nothing new
        typ, again = imap.append("Sent", "(\\Seen)", None, raw)
        assert typ == "OK" and _appended_uid(again) == uid
        assert imap.uid("SEARCH", "ALL")[1][0].split().count(str(uid).encode()) == 1
    finally:
        imap.logout()
    # users among To, Cc and Bcc got it as from any send; carol is in the conversation
    [mine] = [t for t in _threads(cell, 1, "sent") if t["subject"] == "minutes of the meeting"]
    assert mine["participants"] == [1, 2, 3]
    for user in (2, 3):
        thread = _thread(cell, user, mine["thread_id"])
        [message] = thread["messages"]
        assert message["sender"] == 1 and "sent from a mail client" in message["text"]
        assert thread["addresses"] == ["carol@example.org"]
    sent = _thread(cell, 1, mine["thread_id"])["messages"][0]

    async def full() -> dict[str, Any]:
        async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
            return await client.get_message(1, sent["message_id"])

    extra = run(full)["extra"]
    assert "outbound" not in extra  # nothing queued to go out by SMTP: it was sent
    # user 3 reads it in a mail client too
    theirs = _imap(cell, 3)
    try:
        folder = next(name for name in ("INBOX", "Other")
                      if theirs.select(name)[0] == "OK"
                      and theirs.search(None, "SUBJECT", "minutes")[1][0])  # fmt: skip
        assert folder
    finally:
        theirs.logout()


def test_append_to_other_folders_keeps_the_mail_there_and_refuses_bad_messages(
    cell: dict[str, Any],
) -> None:
    address = cell["ready"]["imap"]
    with imapclient.IMAPClient(address["host"], address["port"], ssl=False, timeout=10) as imap:
        imap.login(f"u2@{DOMAIN}", _token(cell))
        old = _mail("Dave <dave@example.org>", f"u2@{DOMAIN}", "an old letter",
                    "<old-1@example.org>")  # fmt: skip
        answer = imap.append("Archive", old, flags=[imapclient.SEEN])
        uid = int(re.search(rb"APPENDUID 1 (\d+)", answer).group(1))
        imap.select_folder("Archive")
        fetched = imap.fetch([uid], ["BODY.PEEK[]", "FLAGS"])[uid]
        assert fetched[b"BODY[]"] == old and imapclient.SEEN in fetched[b"FLAGS"]
        junk = _mail("spam@example.net", f"u2@{DOMAIN}", "you won", "<won@example.net>")
        answer = imap.append("Spam", junk)
        uid = int(re.search(rb"APPENDUID 1 (\d+)", answer).group(1))
        imap.select_folder("Spam")
        fetched = imap.fetch([uid], ["BODY.PEEK[]", "FLAGS"])[uid]
        assert fetched[b"BODY[]"] == junk and imapclient.SEEN not in fetched[b"FLAGS"]
        # a mail of a conversation that lives in Other joins it there: no UID in Archive
        reply = _mail("Carol Outside <carol@example.org>", f"u2@{DOMAIN}",
                      "Re: the quarterly figures", "<figures-2@example.org>")  # fmt: skip
        answer = imap.append("Archive", reply)
        assert b"APPENDUID" not in answer
        imap.select_folder("Other")
        found = imap.search(["SUBJECT", "Re: the quarterly"])
        assert len(found) == 1
        assert imap.fetch(found, ["BODY.PEEK[]"])[found[0]][b"BODY[]"] == reply
        # bad messages: NO with the reason, and the session goes on
        bad = {
            b"": b"cancelled",  # an empty literal cancels an APPEND (RFC 4469)
            b"\r\n\r\nonly a body\r\n": b"header field",
            b"just some words\r\n": b"header field",
            b"Subject: x\r\n\r\nnul \x00 byte\r\n": b"NUL",
        }
        for data, why in bad.items():
            with pytest.raises(imaplib.IMAP4.error, match=why.decode()):
                imap.append("INBOX", data)
        nobody = _mail(f"u2@{DOMAIN}", f"u2@{DOMAIN}", "to myself", "<self@x.example>")
        with pytest.raises(imaplib.IMAP4.error, match="recipient"):
            imap.append("Sent", nobody)
        assert imap.noop()[0].startswith(b"NOOP")
        assert imap.select_folder("INBOX")[b"EXISTS"] >= 0


def test_mbsync_pushes_a_new_maildir_message_to_the_server(
    cell: dict[str, Any], tmp_path: Path
) -> None:
    maildir, sync = mbsync_of_user_1(cell, tmp_path)
    sync()
    raw = _mail(f"u1@{DOMAIN}", f"u4@{DOMAIN}", "written offline", "<offline-1@client.example>")
    new = maildir / "Sent" / "new" / f"{int(time.time())}.1.local:2,S"
    new.write_bytes(raw.replace(b"\r\n", b"\n"))
    sync()
    imap = _imap(cell, 1)
    try:
        imap.select("Sent", readonly=True)
        [uid] = imap.uid("SEARCH", "SUBJECT", '"written offline"')[1][0].split()
        _, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        stored = data[0][1]
        # mbsync sends CRLF lines and may add its X-TUID header to find its copy
        lines = [line for line in stored.split(b"\r\n") if not line.startswith(b"X-TUID: ")]
        assert b"\r\n".join(lines) == raw
    finally:
        imap.logout()
    [thread] = [t for t in _threads(cell, 4, "other") + _threads(cell, 4, "inbox")
                if t["subject"] == "written offline"]  # fmt: skip
    assert thread["participants"] == [1, 4]
    # and the next sync leaves both sides as they are (the Maildir copy is known)
    sync()
    assert (
        len(list((maildir / "Sent" / "cur").iterdir()))
        + len(list((maildir / "Sent" / "new").iterdir()))
        == 1
    )
