"""The fast FETCH path (pyserver.imap.fastfetch) answers as pymap's general path does.

The same cell is served twice, first with the fast path off
(`PYSERVER_IMAP_FAST_FETCH=0`: every FETCH through pymap), then on; the same
commands on a raw socket must give the same bytes, for mail kept byte for byte
(Other) and for rendered chat and SMS (INBOX). With the fast path on, a change
made elsewhere (a message marked read through the app server, a new mail over
SMTP) is in the next FETCH's answer. `eligible` is checked on the forms the
Dovecot differential (tests/test_imap_dovecot.py) and the benchmark send, so
those go through the fast path.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pymap.parsing import Params
from pymap.parsing.command.select import FetchCommand

from bench.imap import corpus
from pyserver.client import Client
from pyserver.imap import condstore, fastfetch, gateway
from pyserver.servicekey import read_service_key
from tests.support import cli, run, serve_cell

DOMAIN = "pyserver.localhost"
assert gateway  # its import applies condstore and the fast path to pymap (MODSEQ parses)


def _command(text: str, *, uid: bool = True) -> Any:
    """A parsed FETCH: `text` is what follows FETCH."""
    cmd, _ = FetchCommand.parse(memoryview(b" " + text.encode() + b"\r\n"), Params(uid=uid))
    return cmd


def _state(*, readonly: bool = False, condstore_on: bool = False) -> Any:
    state = SimpleNamespace(selected=SimpleNamespace(readonly=readonly))
    if condstore_on:
        condstore.enable(state)  # type: ignore[arg-type]
    return state


@pytest.mark.parametrize(
    "items",
    [
        "(FLAGS ENVELOPE RFC822.SIZE)",  # the benchmark's, a client opening a folder
        "(BODY.PEEK[])",
        "(ENVELOPE)",
        "(RFC822.SIZE)",
        "(FLAGS)",
        "(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])",
    ],
)
def test_the_hot_forms_take_the_fast_path(items: str) -> None:
    assert fastfetch.eligible(_state(), _command(f"1:* {items}"))


@pytest.mark.parametrize(
    "items",
    [
        "(BODYSTRUCTURE)",
        "(BODY)",
        "(BODY.PEEK[]<0.100>)",
        "(BODY.PEEK[HEADER])",
        "(BODY.PEEK[1])",
        "(FLAGS BINARY.PEEK[])",
        "(BODY[])",  # sets \\Seen
        "(RFC822)",
        "(FLAGS MODSEQ)",
        "(FLAGS) (CHANGEDSINCE 4)",
    ],
)
def test_other_forms_go_to_pymap(items: str) -> None:
    assert not fastfetch.eligible(_state(), _command(f"1:* {items}"))


def test_setting_seen_is_fast_when_read_only_and_condstore_goes_to_pymap() -> None:
    assert fastfetch.eligible(_state(readonly=True), _command("1:* (BODY[] RFC822)"))
    assert not fastfetch.eligible(_state(condstore_on=True), _command("1:* (FLAGS)"))


class _Raw:
    """A raw IMAP session: each command's answer as the bytes that came."""

    def __init__(self, address: dict[str, Any], token: str) -> None:
        self._socket = socket.create_connection((address["host"], address["port"]), timeout=30)
        self._file = self._socket.makefile("rb")
        self._tag = 0
        self._file.readline()
        self.command(f'LOGIN "u2@{DOMAIN}" "{token}"')

    def command(self, text: str) -> bytes:
        self._tag += 1
        tag = b"t%d " % self._tag
        self._socket.sendall(tag + text.encode() + b"\r\n")
        received = bytearray()
        while True:
            line = self._file.readline()
            assert line, f"the session ended during {text!r}"
            received += line
            if line.startswith(tag):
                assert line.startswith(tag + b"OK"), (text, line)
                return bytes(received)
            literal = re.search(rb"\{(\d+)\}\r\n$", line)
            if literal:
                received += self._file.read(int(literal[1]))

    def close(self) -> None:
        self._file.close()
        self._socket.close()


COMMANDS = {
    "Other": [
        "UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)",
        "FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])",
        "UID FETCH 3,1,2 (RFC822.SIZE ENVELOPE UID)",
        "FETCH 2:* (ENVELOPE)",
        "UID FETCH 9999 (FLAGS)",
    ],
    "INBOX": [
        "UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)",
        "FETCH 1:* (BODY.PEEK[] INTERNALDATE)",
    ],
}


def _answers(address: dict[str, Any], token: str) -> list[bytes]:
    session = _Raw(address, token)
    try:
        found = []
        for folder, commands in COMMANDS.items():
            session.command(f"SELECT {folder}")
            found += [session.command(command) for command in commands]
        session.command("EXAMINE Other")  # read-only: BODY[] and RFC822 set no flag
        found.append(session.command("FETCH 1:* (BODY[] RFC822)"))
        return found
    finally:
        session.close()


def _seed(ready: dict[str, Any], data: Path) -> None:
    key = read_service_key(data)

    async def chat() -> None:
        async with await Client.connect(*_server(ready), service_key=key) as client:
            await client.send(1, [2], "lunch on friday?")
            await client.send(2, [1], "or saturday")
            await client.deliver(2, 0, "running late", channel="sms", key="sms-1",
                                 from_="+15550001111")  # fmt: skip

    run(chat)
    with smtplib.SMTP(ready["smtp"]["host"], ready["smtp"]["port"], timeout=30) as smtp:
        for mail in corpus(12):
            smtp.sendmail("sender@example.org", [f"u2@{DOMAIN}"], mail)


def _server(ready: dict[str, Any]) -> tuple[str, int]:
    return ready["server"]["host"], ready["server"]["port"]


def test_fast_fetch_answers_as_pymap_does_and_hears_changes(tmp_path: Path) -> None:
    data = tmp_path / "cell"
    proc, ready = serve_cell(data, {"PYSERVER_IMAP_FAST_FETCH": "0"})
    try:
        _seed(ready, data)
        token = cli("admin", "token", "--data", str(data), "--user", "2").strip()
        general = _answers(ready["imap"], token)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert general[0].count(b" FETCH (") >= 12  # the mails, and the chat from a stranger
    proc, ready = serve_cell(data)
    try:
        fast = _answers(ready["imap"], token)
        for mine, reference in zip(fast, general, strict=True):
            for line, expected in zip(mine.split(b"\r\n"), reference.split(b"\r\n"), strict=True):
                assert line == expected
        _changes_reach_the_next_fetch(ready, data, token)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _changes_reach_the_next_fetch(ready: dict[str, Any], data: Path, token: str) -> None:
    session = _Raw(ready["imap"], token)
    try:
        session.command("SELECT Other")
        before = session.command("UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
        count = before.count(b" FETCH (")
        assert count >= 12 and b"* 1 FETCH (FLAGS () " in before
        ids = session.command("UID FETCH 1 (EMAILID THREADID)")
        email_id, thread_id = re.search(rb"EMAILID \((\S+)\) THREADID \((\S+)\)", ids).groups()  # type: ignore[union-attr]

        async def mark_read() -> None:
            key = read_service_key(data)
            async with await Client.connect(*_server(ready), service_key=key) as client:
                await client.mark_read(2, thread_id.decode(), email_id.decode())

        run(mark_read)
        extra = corpus(13)[12]
        with smtplib.SMTP(ready["smtp"]["host"], ready["smtp"]["port"], timeout=30) as smtp:
            smtp.sendmail("sender@example.org", [f"u2@{DOMAIN}"], extra)
        after = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the gateway hears of changes as events: poll
            after = session.command("UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
            if b"report 12:" in after and b"* 1 FETCH (FLAGS (\\Seen)" in after:
                break
            time.sleep(0.1)
        first = re.search(rb"\* 1 FETCH \(FLAGS \(([^)]*)\)", after)
        assert first and first[1] == b"\\Seen", after[:300]
        assert b"report 12:" in after and after.count(b" FETCH (") == count + 1
        assert b"RFC822.SIZE %d" % len(extra) in after
    finally:
        session.close()
