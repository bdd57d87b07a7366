"""Each IMAP command of a connection, timed into the gateway's `Metrics` (its `/metrics`).

pymap reads a connection's commands and writes their answers itself, so the
gateway times them from the outside: the clock starts when a command line is
read (`command_read`) and stops when the answer tagged with that command's tag
goes out (`sent`). The operation is "IMAP <COMMAND>" ("IMAP UID FETCH" for UID
forms); an answer of NO or BAD counts as the error `IMAP_NO` or `IMAP_BAD`.
A connection runs one command at a time, except IDLE, which is timed until its
DONE is answered like any other command.
"""

from __future__ import annotations

import time

from pyserver.metrics import Metrics

__all__ = ["CommandClock"]


class CommandClock:
    """The clock of one connection (module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._tag = b""
        self._name = ""
        self._started = 0.0

    def command_read(self, line: bytes) -> None:
        """A line pymap read: starts the clock when it is a new command's first line."""
        if self._tag:  # a literal's or DONE's line within the command being timed
            return
        words = line.split(None, 3)
        if len(words) < 2 or not words[0] or words[0] == b"*":
            return
        name = words[1].upper()
        if name == b"UID" and len(words) > 2:
            name += b" " + words[2].split(b"(", 1)[0].upper()
        self._tag = words[0]
        self._name = "IMAP " + name.decode("ascii", "replace")
        self._started = time.perf_counter()

    def sent(self, data: bytes) -> None:
        """Bytes sent to the client: stops the clock at the tagged answer. pymap drains
        its writer after every response, so a tagged answer is the last line of what is
        sent: only that line is looked at, however many bytes came before it."""
        if not self._tag:
            return
        end_of_previous = data.rfind(b"\r\n", 0, len(data) - 2)
        last_line = data[end_of_previous + 2 :] if end_of_previous >= 0 else data
        marker = self._tag + b" "
        if not last_line.startswith(marker):
            return
        word = last_line[len(marker) :].split(None, 1)[:1] or [b"?"]
        status = word[0].upper().decode("ascii", "replace")
        code = None if status == "OK" else f"IMAP_{status}"
        self._metrics.observe(self._name, time.perf_counter() - self._started, code)
        self._tag = b""
