"""The IMAP gateway's command clock: what it times and how it names the outcome."""

from __future__ import annotations

from pyserver.imap.commandclock import CommandClock
from pyserver.metrics import Metrics


def _counts(metrics: Metrics) -> dict[tuple[str, str], int]:
    return dict(metrics._requests.counts)


def test_a_command_is_timed_until_its_tagged_answer() -> None:
    metrics = Metrics()
    clock = CommandClock(metrics)
    clock.command_read(b"a1 UID FETCH 1:* (FLAGS)\r\n")
    clock.sent(b"* 1 FETCH (UID 1 FLAGS ())\r\n")
    assert _counts(metrics) == {}, "untagged lines do not stop the clock"
    clock.sent(b"* 2 FETCH (UID 2 FLAGS ())\r\na1 OK UID FETCH completed.\r\n")
    assert _counts(metrics) == {("IMAP UID FETCH", "OK"): 1}


def test_no_and_bad_answers_count_as_errors() -> None:
    metrics = Metrics()
    clock = CommandClock(metrics)
    clock.command_read(b"x SELECT Nowhere\r\n")
    clock.sent(b"x NO [NONEXISTENT] Mailbox does not exist.\r\n")
    clock.command_read(b"y xyzzy\r\n")
    clock.sent(b"y BAD Unrecognized command.\r\n")
    assert _counts(metrics) == {("IMAP SELECT", "IMAP_NO"): 1, ("IMAP XYZZY", "IMAP_BAD"): 1}


def test_a_literal_or_done_within_a_command_starts_nothing_new() -> None:
    metrics = Metrics()
    clock = CommandClock(metrics)
    clock.command_read(b"t1 APPEND Sent {5}\r\n")
    clock.sent(b"+ Literal string\r\n")
    clock.command_read(b"hello world\r\n")  # the literal's line, not a command
    clock.sent(b"t1 OK [APPENDUID 1 7] APPEND completed.\r\n")
    clock.command_read(b"t2 IDLE\r\n")
    clock.sent(b"+ Idling.\r\n")
    clock.command_read(b"DONE\r\n")
    clock.sent(b"t2 OK IDLE completed.\r\n")
    assert _counts(metrics) == {("IMAP APPEND", "OK"): 1, ("IMAP IDLE", "OK"): 1}


def test_lines_that_are_no_command_are_ignored() -> None:
    metrics = Metrics()
    clock = CommandClock(metrics)
    clock.command_read(b"\r\n")
    clock.command_read(b"* bogus\r\n")
    clock.sent(b"* OK hello\r\n")
    assert _counts(metrics) == {}
