"""ENABLE and CONDSTORE through the IMAP gateway, beside Dovecot: MODSEQ from the user's log.

The same script runs against the gateway (`pyserver run`, tests/test_imap.py's
corpus: user 2's Other folder holds five messages) and a private Dovecot with
five messages; the answers are compared once MODSEQ numbers are normalised
(each server counts its own: they are compared by their order, not value).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from bench.dovecot import Dovecot
from pyserver.client import Client
from pyserver.wire.ops import Op
from tests.support import run
from tests.test_imap import DOMAIN, _token, cell

__all__ = ["cell"]  # the fixture, imported for pytest


class Conversation:
    """One IMAP connection spoken to line by line: `say` sends a tagged command and
    returns every line up to and including its tagged answer."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=15)
        self._buffer = b""
        self._line()  # the greeting
        self._tags = 0

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(self._buffer)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def say(self, command: str) -> list[bytes]:
        self._tags += 1
        tag = b"t%d" % self._tags
        self.sock.sendall(tag + b" " + command.encode() + b"\r\n")
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a server ends its session on LOGOUT
            self.say("LOGOUT")
        self.sock.close()


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].split(b" ", 1)[1]


def _modseqs(lines: list[bytes]) -> dict[int, int]:
    """{UID: MODSEQ} of FETCH answers."""
    found = {}
    for line in lines:
        uid = re.search(rb"UID (\d+)", line)
        modseq = re.search(rb"MODSEQ \((\d+)\)", line)
        if uid and modseq:
            found[int(uid[1])] = int(modseq[1])
    return found


def _highest(lines: list[bytes]) -> int:
    for line in lines:
        found = re.search(rb"HIGHESTMODSEQ (\d+)", line)
        if found:
            return int(found[1])
    raise AssertionError(lines)


def _script(talk: Conversation, folder: str) -> dict[str, Any]:
    """The CONDSTORE script run against either server; what each step answered."""
    out: dict[str, Any] = {}
    out["enable"] = talk.say("ENABLE CONDSTORE")
    out["select"] = talk.say(f"SELECT {folder}")
    first = _highest(out["select"])
    out["fetch"] = talk.say("UID FETCH 1:* (FLAGS MODSEQ)")
    before = _modseqs(out["fetch"])
    # the second message is one not read yet (the gateway's user read their own)
    unread = [int(re.search(rb"UID (\d+)", line)[1]) for line in out["fetch"]
              if line.startswith(b"* ") and b"\\Seen" not in line]  # fmt: skip
    uids = [min(before), unread[-1]] + [u for u in sorted(before)[1:] if u != unread[-1]]
    # mark the second message read: its MODSEQ, and the folder's, move on
    out["store"] = talk.say(f"UID STORE {uids[1]} +FLAGS (\\Seen)")
    out["changed"] = talk.say(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {max(before.values())})")
    out["status"] = talk.say(f"STATUS {folder} (MESSAGES HIGHESTMODSEQ)")
    after = _highest(out["status"])
    out["search"] = talk.say(f"UID SEARCH MODSEQ {max(before.values()) + 1}")
    out["search_none"] = talk.say(f"UID SEARCH MODSEQ {after + 1}")
    # a STORE conditional on an old MODSEQ leaves the changed message alone
    stale = before[uids[1]]
    out["conditional"] = talk.say(
        f"UID STORE {uids[0]},{uids[1]} (UNCHANGEDSINCE {stale}) -FLAGS (\\Seen)"
    )
    out["after"] = talk.say(f"UID FETCH {uids[0]},{uids[1]} (FLAGS MODSEQ)")
    out["values"] = {"first": first, "after": after, "before": before, "uids": uids}
    return out


def _check(out: dict[str, Any], name: str) -> None:
    """What RFC 7162 asks of the answers, whichever server gave them."""
    values = out["values"]
    uids, before = values["uids"], values["before"]
    assert out["enable"][0] == b"* ENABLED CONDSTORE", (name, out["enable"])
    assert _tagged(out["enable"]).startswith(b"OK"), name
    assert len(before) == len(set(uids)) == 5, (name, out["fetch"])
    assert values["after"] > values["first"] >= max(before.values()), (name, values)
    changed = [line for line in out["changed"] if line.startswith(b"* ")]
    assert len(changed) == 1 and b"UID %d" % uids[1] in changed[0], (name, out["changed"])
    assert b"\\Seen" in changed[0] and b"MODSEQ (" in changed[0], (name, changed)
    new = _modseqs(out["changed"])[uids[1]]
    assert new > before[uids[1]], name
    assert any(b"HIGHESTMODSEQ" in line for line in out["status"]), name
    assert out["search"][0] == b"* SEARCH %d (MODSEQ %d)" % (uids[1], new), (name, out["search"])
    assert out["search_none"][0] == b"* SEARCH", (name, out["search_none"])
    conditional = _tagged(out["conditional"])
    assert conditional.startswith(b"OK [MODIFIED %d]" % uids[1]), (name, conditional)
    after = _modseqs(out["after"])
    assert b"\\Seen" in next(line for line in out["after"] if b"UID %d" % uids[1] in line)
    assert after[uids[1]] == new and after[uids[0]] >= before[uids[0]], (name, out["after"])


@pytest.fixture
def dovecot() -> Iterator[tuple[str, int]]:
    """A private Dovecot with five messages in INBOX, served on a loopback port."""
    server = Dovecot()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop = loop.create_future()

    async def serve() -> None:
        mails = []
        for n in range(5):
            mail = EmailMessage()
            mail["From"] = "carol@example.org"
            mail["Subject"] = f"message {n}"
            mail.set_content("hello")
            mails.append(mail.as_bytes().replace(b"\n", b"\r\n"))
        await server.load(mails)
        async with server.serve() as bound:
            port.append(bound)
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "Dovecot did not start"
        yield "127.0.0.1", port[0]
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(30)
        loop.run_until_complete(_bridges_ended())
        loop.close()
        server.close()


async def _bridges_ended() -> None:
    """The bridges of closed connections end their Dovecot processes (given 2 s)."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=2)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def test_condstore_answers_as_dovecot_does(cell: dict[str, Any], dovecot: tuple[str, int]) -> None:
    address = cell["ready"]["imap"]
    ours = Conversation(address["host"], address["port"])
    theirs = Conversation(*dovecot)
    try:
        assert _tagged(ours.say(f'LOGIN "u2@{DOMAIN}" "{_token(cell)}"')).startswith(b"OK")
        capabilities = b" ".join(ours.say("CAPABILITY")).split()
        assert b"CONDSTORE" in capabilities and b"ENABLE" in capabilities
        _check(_script(ours, "Other"), "gateway")
        _check(_script(theirs, "INBOX"), "dovecot")
    finally:
        ours.close()
        theirs.close()


def test_a_change_made_elsewhere_reaches_a_condstore_client_with_its_modseq(
    cell: dict[str, Any],
) -> None:
    address = cell["ready"]["imap"]
    talk = Conversation(address["host"], address["port"])
    try:
        talk.say(f'LOGIN "u2@{DOMAIN}" "{_token(cell)}"')
        # not enabled: FLAGS without MODSEQ
        talk.say("SELECT Other")
        assert not _modseqs(talk.say("UID FETCH 1:* (FLAGS)"))
        selected = talk.say("SELECT Other (CONDSTORE)")
        highest = _highest(selected)
        listing = talk.say("UID FETCH 1:* (FLAGS)")  # CONDSTORE on: MODSEQ with FLAGS
        before = _modseqs(listing)
        assert len(before) == 5 and max(before.values()) <= highest
        unread = [line for line in listing if b"\\Seen" not in line and b"FETCH" in line]
        uid = int(re.search(rb"UID (\d+)", unread[0])[1])

        async def mark() -> None:
            async with await Client.connect(*cell["server"], service_key=cell["key"]) as client:
                page = await client.folder_messages(2, "other")
                message = next(m for m in page["messages"] if m["uid"] == uid)
                await client.request(
                    Op.MARK_READ, {"user": 2, "thread_id": message["thread_id"],
                         "message_id": message["message_id"]},
                )  # fmt: skip

        run(mark)
        for _ in range(100):  # the gateway hears of it from the mailbox's events
            time.sleep(0.1)
            lines = talk.say("NOOP")
            news = [line for line in lines if line.startswith(b"* ") and b"FETCH" in line]
            if news:
                break
        assert news and b"\\Seen" in news[0], lines
        modseq = int(re.search(rb"MODSEQ \((\d+)\)", news[0])[1])
        assert modseq > highest
        assert _tagged(talk.say("ENABLE CONDSTORE QRESYNC")).startswith(b"OK")
        # bad input: BAD, and the connection goes on
        assert _tagged(talk.say("FETCH 1 (MODSEQ) (CHANGEDSINCE x)")).startswith(b"BAD")
        assert _tagged(talk.say("STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)")).startswith(b"BAD")
        assert _tagged(talk.say("SEARCH MODSEQ")).startswith(b"BAD")
        assert _tagged(talk.say("ENABLE")).startswith(b"BAD")
        assert _tagged(talk.say("NOOP")).startswith(b"OK")
    finally:
        talk.close()


def _uidvalidity(lines: list[bytes]) -> int:
    return int(next(re.search(rb"UIDVALIDITY (\d+)", line)[1] for line in lines
                    if b"UIDVALIDITY" in line))  # fmt: skip


def _vanished(lines: list[bytes], earlier: bool) -> set[int]:
    """The UIDs of VANISHED answers (EARLIER or not)."""
    found: set[int] = set()
    prefix = b"* VANISHED (EARLIER) " if earlier else b"* VANISHED "
    for line in lines:
        if line.startswith(prefix) and (earlier or b"(EARLIER)" not in line):
            for part in line[len(prefix) :].split(b","):
                low, _, high = part.partition(b":")
                found |= set(range(int(low), int(high or low) + 1))
    return found


def _qresync_script(first: Conversation, second: Conversation, folder: str) -> None:
    """RFC 7162 3.2 against either server: what each step must answer."""
    assert _tagged(first.say("ENABLE QRESYNC")).startswith(b"OK")
    selected = first.say(f"SELECT {folder}")
    validity, highest = _uidvalidity(selected), _highest(selected)
    listing = first.say("UID FETCH 1:* (FLAGS MODSEQ)")
    uids = sorted(_modseqs(listing))
    unread = [int(re.search(rb"UID (\d+)", line)[1]) for line in listing
              if line.startswith(b"* ") and b"\\Seen" not in line]  # fmt: skip
    read, gone = unread[-1], uids[0]
    # another connection reads one message and expunges another
    assert _tagged(second.say("ENABLE QRESYNC")).startswith(b"OK")
    second.say(f"SELECT {folder}")
    second.say(f"UID STORE {read} +FLAGS.SILENT (\\Seen)")
    second.say(f"UID STORE {gone} +FLAGS.SILENT (\\Deleted)")
    expunged = second.say("EXPUNGE")
    assert _vanished(expunged, earlier=False) == {gone}, expunged
    assert not any(line.endswith(b" EXPUNGE") for line in expunged), expunged
    # the first resynchronises in one SELECT, after selecting another folder
    first.say("EXAMINE INBOX")
    again = first.say(f"SELECT {folder} (QRESYNC ({validity} {highest} 1:{uids[-1]}))")
    assert again[0].startswith(b"* OK [CLOSED]"), again
    assert gone in _vanished(again, earlier=True) and read not in _vanished(again, True)
    changed = [line for line in again if line.startswith(b"* ") and b" FETCH " in line]
    assert any(b"UID %d" % read in line and b"\\Seen" in line and b"MODSEQ" in line
               for line in changed), again  # fmt: skip
    fetched = first.say(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest} VANISHED)")
    assert gone in _vanished(fetched, earlier=True), fetched
    assert set(_modseqs(fetched)) == {read}, fetched
    # a bad QRESYNC parameter is BAD, and the connection goes on
    assert _tagged(first.say(f"SELECT {folder} (QRESYNC (x))")).startswith(b"BAD")
    assert _tagged(first.say("NOOP")).startswith(b"OK")


def test_qresync_answers_as_dovecot_does(cell: dict[str, Any], dovecot: tuple[str, int]) -> None:
    address = cell["ready"]["imap"]
    talks = [Conversation(address["host"], address["port"]) for _ in range(2)]
    try:
        for talk in talks:
            assert _tagged(talk.say(f'LOGIN "u2@{DOMAIN}" "{_token(cell)}"')).startswith(b"OK")
        assert b"QRESYNC" in b" ".join(talks[0].say("CAPABILITY")).split()
        _qresync_script(*talks, "Other")
    finally:
        for talk in talks:
            talk.close()
    theirs = [Conversation(*dovecot) for _ in range(2)]
    try:
        _qresync_script(*theirs, "INBOX")
    finally:
        for talk in theirs:
            talk.close()
