"""The MTA port's own SMTP protocol (pyserver.mta.smtpd) on a raw socket: pipelined commands
answered in order, protocol errors answered and survived, the idle timeout, a connection cut
in the middle of DATA; and `DataReader` by property (any packet boundaries, dot-stuffing,
the size limit). The proxy is the real one in front of a real app server (tests.test_mta's
`MailCell`); the client writes bytes itself so pipelining and bad input are exact.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver.mta.smtp import MtaProxy
from pyserver.mta.smtpd import DataReader
from tests.test_mta import MailCell, mail, run, wire


class Wire:
    """A raw SMTP client: write bytes, read reply lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Wire:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def reply(self) -> str:
        """One whole reply (its continuation lines joined), e.g. '250 ...'."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            assert line, "connection closed before a reply"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def say(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


def _stuffed(message: bytes) -> bytes:
    """DATA on the wire: a "." before every line that starts with one, then the "." line."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return (b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n"


def test_a_whole_pipelined_session_is_answered_in_order(tmp_path: Path) -> None:
    first = wire(mail(subject="one", message_id="<p1@example.org>", text=".dot\nline\n"))
    second = wire(mail(subject="two", message_id="<p2@example.org>", to="carol@example.com"))

    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            client = await Wire.open(cell.smtp_port)
            assert (await client.reply()).startswith("220 ")
            # everything at once: two transactions, an unknown recipient among them
            await client.say(
                b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                b"RCPT TO:<bob@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n"
                + _stuffed(first)
                + b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME\r\n"
                b"RCPT TO:<carol@example.com>\r\nDATA\r\n" + _stuffed(second) + b"QUIT\r\n"
            )
            ehlo = await client.reply()
            assert "PIPELINING" in ehlo and "SIZE" in ehlo and ehlo.startswith("250-")
            replies = [(await client.reply())[:3] for _ in range(9)]
            assert replies == ["250", "250", "550", "354", "250", "250", "250", "354", "250"]
            assert (await client.reply()).startswith("221")
            assert await client.reader.read() == b""
            (one,) = await cell.messages(2)
            assert one["subject"] == "one" and one["text"].startswith(".dot\nline")
            (two,) = await cell.messages(3)
            assert two["subject"] == "two"

    run(scenario)


def test_protocol_errors_are_answered_and_the_session_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path, max_mail_bytes=10_000) as cell:
            client = await Wire.open(cell.smtp_port)
            await client.reply()
            exchanges = [
                (b"MAIL FROM:<a@example.org>\r\n", "503"),  # no HELO yet
                (b"HELO client.test\r\n", "250"),
                (b"RCPT TO:<bob@example.com>\r\n", "503"),  # no MAIL yet
                (b"DATA\r\n", "503"),  # no RCPT yet
                (b"FROB\r\n", "500"),
                (b"MAIL FROM:<a@example.org> SIZE=20000\r\n", "552"),  # over the limit
                (b"MAIL FROM:<a@example.org> SHOE=9\r\n", "555"),
                (b"MAIL FROM:a@example.org\r\n", "501"),  # no angle brackets
                (b"MAIL FROM:<a@example.org>\r\n", "250"),
                (b"MAIL FROM:<b@example.org>\r\n", "503"),  # nested
                (b"RCPT TO:<bob@example.com>\r\n", "250"),
                (b"X" * 5000 + b"\r\n", "500"),  # too long a line
                (b"MAIL \xff\xfe\r\n", "500"),  # not UTF-8
                (b"NOOP\r\n", "250"),
                (b"VRFY bob\r\n", "252"),
                (b"STARTTLS\r\n", "502"),  # no TLS on this listener
                (b"RSET\r\n", "250"),
                (b"DATA\r\n", "503"),  # RSET forgot the recipient
            ]
            for sent, code in exchanges:
                await client.say(sent)
                assert (await client.reply())[:3] == code, sent[:40]
            # a message over the limit is read to its end, refused, and the session goes on
            await client.say(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
            assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
            await client.say(b"Subject: big\r\n\r\n" + b"y" * 20_000 + b"\r\n.\r\n")
            assert (await client.reply())[:3] == "552"
            message = wire(mail(message_id="<after@example.org>"))
            await client.say(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
            assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
            await client.say(_stuffed(message))
            assert (await client.reply())[:3] == "250"
            await client.close()
            assert len(await cell.messages(2)) == 1

    run(scenario)


def test_an_idle_connection_is_closed_with_421(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            proxy = MtaProxy(cell.intake, hostname="mx.test", timeout_s=0.2)
            _, port = await proxy.start("127.0.0.1", 0)
            try:
                client = await Wire.open(port)
                await client.reply()
                assert (await client.reply()).startswith("421")
                assert await client.reader.read() == b""
            finally:
                await proxy.stop(0.5)

    run(scenario)


def test_a_connection_cut_during_data_delivers_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with MailCell(tmp_path) as cell:
            client = await Wire.open(cell.smtp_port)
            await client.reply()
            await client.say(
                b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                b"Subject: cut\r\n\r\nhalf a mess"
            )
            for _ in range(4):
                await client.reply()
            client.writer.transport.abort()
            # the proxy still serves, and nothing of the cut message was delivered
            await cell.send(wire(mail(message_id="<whole@example.org>")), ["bob@example.com"])
            (only,) = await cell.messages(2)
            assert only["subject"] == "Hello"

    run(scenario)


# ---- DataReader ----


def _read(data: bytes, splits: list[int], limit: int) -> tuple[bytes | None, bytes]:
    """DATA fed to a DataReader in the pieces `splits` cut, then a next command: (the
    message, what the reader handed back after the terminating line)."""
    data += b"NEXT COMMAND\r\n"
    reader = DataReader(limit)
    positions = [*sorted({min(s, len(data)) for s in splits}), len(data)]
    start = 0
    for end in positions:
        rest = reader.feed(data[start:end])
        start = end
        if rest is not None:
            return reader.content(), rest + data[end:]
    raise AssertionError("the terminating line was not found")


_LINE = st.text(alphabet=st.sampled_from(".ab \t-\r"), max_size=12)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_LINE, max_size=30), splits=st.lists(st.integers(0, 400), max_size=8))
def test_the_data_reader_undoes_dot_stuffing_whatever_the_packet_boundaries(lines, splits):
    message = "".join(line + "\r\n" for line in lines).encode()
    content, rest = _read(_stuffed(message), splits, 1 << 20)
    assert content == message
    assert rest == b"NEXT COMMAND\r\n"  # nothing read past the end


def test_the_data_reader_reads_an_oversized_message_to_its_end() -> None:
    message = b"x" * 5000 + b"\r\n"
    assert _read(message + b".\r\n", [100, 3000], 1000) == (None, b"NEXT COMMAND\r\n")
    assert _read(message + b".\r\n", [1, 2, 5003], 6000) == (message, b"NEXT COMMAND\r\n")
    assert _read(b".\r\n", [], 10) == (b"", b"NEXT COMMAND\r\n")  # an empty message


@pytest.mark.parametrize("splits", [[], [7], [500, 501, 502, 2000], list(range(0, 4000, 61))])
def test_the_data_reader_finds_dot_lines_among_many_dots(splits: list[int]) -> None:
    # dots inside lines (more than are looked at one by one: the ninth starts a line), then
    # lines starting with one
    message = b"1.2.3.4.5.6.7.8\r\n.first\r\n" + b"a.b.c.d.e.f.g.h.i.j.k.l\r\n" * 40
    message += b".second\r\n" + b"x.y\r\n.\r\n.." * 30 + b"\r\n"
    content, rest = _read(_stuffed(message), splits, 1 << 20)
    assert content == message
    assert rest == b"NEXT COMMAND\r\n"
    # over the limit after a line starting with ".": still read to its end
    assert _read(_stuffed(message), splits, 100) == (None, b"NEXT COMMAND\r\n")
