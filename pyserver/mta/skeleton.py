"""A big message's skeleton: its large base64 bodies set aside before the `email` parser runs.

The standard library's parser handles every line in Python, so a 1 MB
attachment costs it tens of milliseconds. A well-formed base64 body is lines of
the base64 alphabet, which can be neither a header nor a MIME boundary (those
start with `--`), so replacing such a run of lines with a one-line token cannot
change how the parser reads the message's structure. The parser then reads a
small skeleton; a part whose body is a token is decoded straight from the
original bytes (`decode`), in pieces, and any other text the token landed in
is put back exactly as it was (`restore`).

A message that is one big text part (no MIME structure below its headers: a
text/* type or none, in 7bit, 8bit, binary or quoted-printable) has its whole
body set aside the same way: the parser reads the headers alone, and `decode`
gives the body's bytes as the `email` package would (quoted-printable through
the same `binascii.a2b_qp`). Should the parser read the headers differently
(a line that is no header ends them early), the token is inside other text
and is put back, so the result is the parser's own.

Only runs of nothing but the alphabet and line ends, with `=` only at the end,
are set aside; `decode` (pybase64, SIMD) refuses a run whose length is not a
whole number of base64 quads, and the caller then puts the run back and lets
the `email` package decode it, so the bytes are always exactly those the
`email` package would give.
"""

from __future__ import annotations

import binascii
import re
import secrets
from dataclasses import dataclass, field

import pybase64

__all__ = ["Skeleton", "skeleton_of"]

# Runs shorter than this are not worth setting aside.
MIN_RUN = 32 << 10
# Bytes checked at a time when looking for base64 runs.
_SCAN_STEP = 1 << 20
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_LINE_ENDS = b"\r\n"
# A line starting with "--", and the dashes `_dash_lines` looks at one by one before it
# leaves the rest to the regex.
_DASH_LINE = re.compile(rb"\n--")
_DASHES_LOOKED_AT = 64
# CR and LF bytes `decode(trimmed=True)` takes off at most, at each end of a body.
_TRIM_MAX = 64
# A one-part message's headers that say how to read its body (folded lines included).
_BODY_HEADER = re.compile(
    rb"^(content-type|content-transfer-encoding)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M
)
# Transfer encodings of a body set aside whole (base64 bodies are base64 runs).
_PLAIN_ENCODINGS = (b"", b"7bit", b"8bit", b"binary", b"quoted-printable")


@dataclass(slots=True)
class Skeleton:
    """The bytes to parse, and where each token's original run lies in the raw message."""

    raw: bytes
    data: bytes
    nonce: str = ""
    runs: dict[str, tuple[int, int]] = field(default_factory=dict)
    # the token of a one-part message's whole body, and its transfer encoding
    plain: dict[str, bytes] = field(default_factory=dict)

    def token_of(self, payload: str) -> str | None:
        """The token a body consists of (bar surrounding line ends), if it is one."""
        if not self.nonce or self.nonce not in payload:
            return None
        token = payload.strip("\r\n")
        return token if token in self.runs else None

    def restore(self, text: str) -> str:
        """`text` with every token in it replaced by the original run."""
        if not self.nonce or self.nonce not in text:
            return text
        for token, (start, end) in self.runs.items():
            if token in text:
                # as the parser reads bytes: ASCII, other bytes as surrogates
                run = self.raw[start:end].decode("ascii", "surrogateescape")
                text = text.replace(token, run)
        return text

    def decode(self, token: str, trimmed: bool = False) -> bytes:
        """The decoded bytes of a set-aside body; ValueError if a base64 one is not whole
        quads. `trimmed`: a plain body may come without some of the CR and LF bytes at its
        ends (for a caller that strips them anyway: no copy to take them off)."""
        start, end = self.runs[token]
        encoding = self.plain.get(token)
        if encoding is None:
            return pybase64.b64decode(memoryview(self.raw)[start:end])
        if encoding == b"quoted-printable":
            return binascii.a2b_qp(memoryview(self.raw)[start:end])
        if trimmed:
            start, end = _trim_line_ends(self.raw, start, end)
        return self.raw[start:end]


def skeleton_of(raw: bytes) -> Skeleton:
    """The message with its large, well-formed base64 bodies replaced by tokens."""
    if len(raw) < MIN_RUN:
        return Skeleton(raw, raw)
    plain = _plain_body(raw)
    if plain is not None:
        return _set_aside(raw, [plain[:2]], plain[2])
    runs: list[tuple[int, int]] = []
    # Each body follows a boundary line (a line starting with "--") or the message start.
    starts = _dash_lines(raw)
    ends = [*starts[1:], len(raw)]
    for start, end in zip(starts, ends, strict=True):
        if end - start >= MIN_RUN:
            run = _base64_run(raw, start, end)
            if run is not None:
                runs.append(run)
    return _set_aside(raw, runs)


def _dash_lines(raw: bytes) -> list[int]:
    """0 and where each line starting with "--" begins. "-" never occurs in base64, so
    memchr skips a big body at once; where dashes are many (text), one regex pass beats
    a look at each."""
    starts = [0]
    at = raw.find(b"-")
    misses = 0
    while at != -1 and misses < _DASHES_LOOKED_AT:
        if raw[at + 1 : at + 2] == b"-" and raw[at - 1 : at] == b"\n":
            starts.append(at)
            at += 2
        else:
            misses += 1
            at += 1
        at = raw.find(b"-", at)
    if at != -1:  # the rest by regex, from the first dash not looked at
        starts += [found.start() + 1 for found in _DASH_LINE.finditer(raw, at - 1)]
    return starts


def _set_aside(raw: bytes, runs: list[tuple[int, int]], encoding: bytes | None = None) -> Skeleton:
    """The skeleton with these runs set aside (`encoding`: one plain body's)."""
    if not runs:
        return Skeleton(raw, raw)
    bounds = [0, *(at for run in runs for at in run), len(raw)]
    outside = [raw[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]
    # A token must be no text the parser reads: the nonce is drawn anew while it is in
    # what lies outside the runs. The runs need no search (1 MiB): a base64 run cannot
    # hold a token (no "-" in its alphabet), and a lone run is put back by `restore`
    # whose one token is then looked for no more.
    nonce = secrets.token_hex(8)
    while any(nonce.encode() in piece for piece in outside):
        nonce = secrets.token_hex(8)
    skeleton = Skeleton(raw, b"", nonce)
    pieces = [outside[0]]
    for n, (run, after) in enumerate(zip(runs, outside[1:], strict=True)):
        token = f"PYSRV-{nonce}-{n}"
        skeleton.runs[token] = run
        if encoding is not None:
            skeleton.plain[token] = encoding
        pieces += [token.encode(), after]
    skeleton.data = b"".join(pieces)
    return skeleton


def _trim_line_ends(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """(start, end) moved past the CR and LF bytes at the ends of raw[start:end], up to
    _TRIM_MAX of them at each end (a caller that strips strips the rest)."""
    stop = min(end, start + _TRIM_MAX)
    while start < stop and raw[start] in _LINE_ENDS:
        start += 1
    stop = max(start, end - _TRIM_MAX)
    while end > stop and raw[end - 1] in _LINE_ENDS:
        end -= 1
    return start, end


def _plain_body(raw: bytes) -> tuple[int, int, bytes] | None:
    """(start, end, transfer encoding) of the body of a message that is one big text part."""
    first_line_end = raw.find(b"\n")
    if first_line_end <= 0:
        return None
    crlf = raw[first_line_end - 1] == 0x0D
    blank = raw.find(b"\r\n\r\n" if crlf else b"\n\n")
    if blank == -1:
        return None
    body = blank + (4 if crlf else 2)
    if len(raw) - body < MIN_RUN:
        return None
    found: dict[bytes, bytes] = {}
    for header in _BODY_HEADER.finditer(raw, 0, blank + 1):
        name = header.group(1).lower()
        if name in found:
            return None  # said twice: left to the parser
        found[name] = b" ".join(header.group(2).split()).lower()
    if not found.get(b"content-type", b"text/plain").startswith(b"text/"):
        return None
    encoding = found.get(b"content-transfer-encoding", b"")
    if encoding not in _PLAIN_ENCODINGS:
        return None
    return body, len(raw), encoding


def _base64_run(raw: bytes, start: int, end: int) -> tuple[int, int] | None:
    """The body of the segment raw[start:end], without its last line end, if it is plain base64."""
    first_line_end = raw.find(b"\n", start, end)
    if first_line_end <= start:
        return None
    crlf = raw[first_line_end - 1] == 0x0D
    blank = raw.find(b"\n\r\n" if crlf else b"\n\n", start, end)
    if blank == -1:
        return None
    body = blank + (3 if crlf else 2)
    stop = end
    if raw[stop - 1 : stop] == b"\n":
        stop -= 1
        if raw[stop - 1 : stop] == b"\r":
            stop -= 1
    if stop - body < MIN_RUN or raw[body] in _LINE_ENDS:
        return None
    for low in range(body, stop, _SCAN_STEP):
        if raw[low : min(stop, low + _SCAN_STEP)].translate(None, _ALPHABET + _LINE_ENDS):
            return None  # something other than base64 and line ends
    pad = raw.find(b"=", body, stop)
    if pad != -1 and raw[pad:stop].translate(None, b"=\r\n"):
        return None  # padding in the middle: leave it to the parser
    return body, stop
