"""The IMAP gateway against Dovecot: the same mail in both, the same commands, equivalent answers.

The corpus is CPython's test_email messages (MIME of every shape, some
malformed) and a mail with attachments. They reach the gateway as mail does,
over SMTP to the cell's MTA proxy (kept byte for byte), and Dovecot by APPEND,
in the same order, so message N has UID N in both. Both answer through
imapclient's parser; what may differ is normalised first: \\Recent (the
gateway has none), the order of SEARCH results (a set), what the RFCs leave to
case, and Dovecot's own MISSING_DOMAIN.

Every FETCH item is compared on the well-formed messages (those Python's email
parser reads without a defect). Broken MIME has no single right structure
(each server has its own heuristics): for those, the bytes, sizes and SEARCH
must match, and every FETCH item must be answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import smtplib
import sysconfig
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import compat32
from pathlib import Path
from typing import Any

import imapclient
import pytest

from bench.dovecot import Dovecot
from tests.support import cli, serve_cell

DOMAIN = "pyserver.localhost"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


def well_formed(message: bytes) -> bool:
    """Whether Python's email parser finds no defect in any part of the message, and no
    part uses RFC 2231 parameters (Dovecot 2.3 shows them undecoded: `boundary*`)."""
    parsed = message_from_bytes(message, policy=compat32)
    if any(part.defects for part in parsed.walk()):
        return False
    return not any("*=" in str(part.get("Content-Type", "")) for part in parsed.walk())


def _corpus() -> list[bytes]:
    """test_email's messages (CRLF line ends, one per Message-ID) and one with files."""
    assert CORPUS.is_dir(), f"CPython's test_email data is missing at {CORPUS}"
    found: list[bytes] = []
    seen: set[str] = set()
    for path in sorted(CORPUS.glob("msg_*.txt")):
        # as SMTP carries mail: CRLF line ends (no bare CR), ending with one
        text = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = text.rstrip(b"\n").replace(b"\n", b"\r\n") + b"\r\n"
        message_id = str(message_from_bytes(data).get("Message-ID") or path.name)
        if message_id in seen:  # the MTA takes a Message-ID once (idempotent retries)
            continue
        seen.add(message_id)
        found.append(data)
    mail = EmailMessage()
    mail["From"] = "Carol <carol@example.org>"
    mail["To"] = f"u2@{DOMAIN}"
    mail["Subject"] = "files"
    mail["Message-ID"] = "<files@example.org>"
    mail.set_content("two files")
    mail.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf",
                        filename="report.pdf")  # fmt: skip
    mail.add_attachment("caf\u00e9\n", subtype="plain", filename="notes.txt")
    found.append(mail.as_bytes().replace(b"\n", b"\r\n"))
    return found


class _Loop:
    """An event loop in a thread, for the Dovecot bridge beside synchronous clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def both(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The corpus in a cell (user 2's Other folder) and in Dovecot (INBOX)."""
    corpus = _corpus()
    data = tmp_path / "cell"
    proc, ready = serve_cell(data)
    loop = _Loop()
    try:
        taken = []
        with smtplib.SMTP(ready["smtp"]["host"], ready["smtp"]["port"], timeout=30) as smtp:
            for message in corpus:
                try:
                    smtp.sendmail("sender@example.org", [f"u2@{DOMAIN}"], message)
                except smtplib.SMTPException:
                    continue  # refused by the MTA: left out of Dovecot's copy too
                taken.append(message)
        assert len(taken) >= len(corpus) - 3, "the MTA refused much of the corpus"
        dovecot = Dovecot()
        loop.run(dovecot.load(taken))
        bridge = dovecot.serve()
        dovecot_port = loop.run(bridge.__aenter__())
        token = cli("admin", "token", "--data", str(data), "--user", "2").strip()
        yield {
            "ready": ready, "token": token, "dovecot": dovecot_port, "count": len(taken),
            "well_formed": [n for n, m in enumerate(taken, 1) if well_formed(m)],
        }  # fmt: skip
        loop.run(bridge.__aexit__(None, None, None))
        dovecot.close()
    finally:
        loop.close()
        proc.terminate()
        proc.wait(timeout=30)


def _clients(both: dict[str, Any]) -> tuple[imapclient.IMAPClient, imapclient.IMAPClient]:
    address = both["ready"]["imap"]
    ours = imapclient.IMAPClient(address["host"], address["port"], ssl=False, timeout=30)
    ours.login(f"u2@{DOMAIN}", both["token"])
    ours.select_folder("Other")
    theirs = imapclient.IMAPClient("127.0.0.1", both["dovecot"], ssl=False, timeout=30)
    theirs.select_folder("INBOX")
    return ours, theirs


def _normal(response: dict[int, dict[bytes, Any]]) -> dict[int, dict[bytes, Any]]:
    out = {}
    for number, values in response.items():
        values = {key: _case(value) for key, value in values.items()}
        values.pop(b"SEQ", None)
        if b"FLAGS" in values:
            values[b"FLAGS"] = tuple(sorted(f for f in values[b"FLAGS"] if f != b"\\Recent"))
        out[number] = values
    return out


def _case(value: Any) -> Any:
    """Values compared without what is Dovecot's alone or left open by the RFCs: its
    MISSING_DOMAIN and MISSING_MAILBOX for an address without them (RFC 3501 gives
    NIL), the case of MIME tokens (types, subtypes, encodings), and folding white space
    kept as a tab or made a space."""
    if isinstance(value, bytes):
        if value.upper() in (b"MISSING_DOMAIN", b"MISSING_MAILBOX"):
            return None
        value = value.replace(b"\t", b" ")
        return value.lower() if re.fullmatch(rb"[A-Za-z0-9._-]+", value) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _case(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_case(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_case(item) for item in value)
    return value


FETCHES = [
    ["ENVELOPE"],
    ["BODYSTRUCTURE"],
    ["BODY"],
    ["RFC822.SIZE"],
    ["FLAGS"],
    ["BODY.PEEK[]"],
    ["BODY.PEEK[]<0.100>"],
    ["BODY.PEEK[]<200.50>"],
    ["BODY.PEEK[HEADER]"],
    ["BODY.PEEK[TEXT]"],
    ["BODY.PEEK[HEADER.FIELDS (SUBJECT FROM TO)]"],
    # echoed as asked: in order, upper-cased, quoted names quoted, duplicates kept
    ['BODY.PEEK[HEADER.FIELDS (to Subject "From" subject)]'],
    ["BODY.PEEK[1]"],
]

SEARCHES = [
    ["ALL"],
    ["SUBJECT", "test"],
    ["FROM", "example"],
    ["TO", "python"],
    ["LARGER", "2000"],
    ["SMALLER", "500"],
    ["NOT", "SUBJECT", "test"],
    ["OR", "LARGER", "5000", "SMALLER", "300"],
    ["HEADER", "Content-Type", "multipart"],
    ["UNSEEN"],
    ["1:5", "LARGER", "100"],
]


def test_fetch_and_search_answer_as_dovecot_does(both: dict[str, Any]) -> None:
    ours, theirs = _clients(both)
    try:
        count = both["count"]
        assert len(ours.search("ALL")) == len(theirs.search("ALL")) == count
        every = list(range(1, count + 1))
        compared = both["well_formed"]
        assert len(compared) >= 30, "the corpus should be mostly well-formed mail"
        mismatches = []
        for items in FETCHES:
            whole = items[0] in ("BODY.PEEK[]", "RFC822.SIZE", "FLAGS", "BODY.PEEK[]<0.100>")
            uids = every if whole else compared
            mine, reference = _normal(ours.fetch(uids, items)), _normal(theirs.fetch(uids, items))
            for uid in uids:
                if mine.get(uid) != reference.get(uid):
                    mismatches.append((items, uid, mine.get(uid), reference.get(uid)))
            # broken MIME: answered, whatever its structure
            assert set(ours.fetch(every, items)) == set(every), items
        for criteria in SEARCHES:
            if sorted(ours.search(criteria)) != sorted(theirs.search(criteria)):
                mismatches.append((criteria, sorted(ours.search(criteria)),
                                   sorted(theirs.search(criteria))))  # fmt: skip
        assert not mismatches, "\n".join(repr(m)[:600] for m in mismatches[:20])
    finally:
        ours.logout()
        theirs.logout()


def _seq_uids(client: imapclient.IMAPClient, sequence_set: str) -> list[tuple[int, int]]:
    """FETCH sequence_set (UID) as (sequence number, UID) pairs, as sent over the wire."""
    typ, data = client._imap.fetch(sequence_set, "(UID)")  # imapclient takes no ranges
    assert typ == "OK", data
    pairs = [re.match(rb"(\d+) \(UID (\d+)\)", line) for line in data if line]
    return sorted((int(m[1]), int(m[2])) for m in pairs if m)


def test_sequence_sets_store_and_expunge_answer_as_dovecot_does(both: dict[str, Any]) -> None:
    ours, theirs = _clients(both)
    try:
        for edge in ("3:1", "2,4,6", "*", "5:*", "1:3,2:4", "*:4"):
            assert _seq_uids(ours, edge) == _seq_uids(theirs, edge), edge
        for client in (ours, theirs):
            client.add_flags([2, 3], [imapclient.SEEN])
            client.add_flags([4], [imapclient.DELETED])
            client.expunge()
        assert sorted(ours.search("SEEN")) == sorted(theirs.search("SEEN")) == [2, 3]
        assert ours.search("ALL") == theirs.search("ALL")
        assert 4 not in ours.search("ALL")
        every = ours.search("ALL")
        assert _normal(ours.fetch(every, ["FLAGS"])) == _normal(theirs.fetch(every, ["FLAGS"]))
        assert _seq_uids(ours, "3:5") == _seq_uids(theirs, "3:5")  # renumbered alike
    finally:
        ours.logout()
        theirs.logout()
