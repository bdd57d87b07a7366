"""Text as SMS carries it: the GSM 03.38 default alphabet (with its extension table) and
UCS-2, and long texts split into concatenated parts.

Owns the encodings of a short message's body as SMPP sends it (`data_coding` 0:
GSM 03.38, one septet per byte, unpacked, as SMPP has it; 8: UCS-2, big-endian
UTF-16, so characters beyond the BMP travel as surrogate pairs and count as two):

- `encode_gsm` / `decode_gsm`: the default alphabet; an extension character
  (`€ [ ] { } \\ ~ ^ |` and form feed) is the escape 0x1B and its code, and counts
  as two septets. `decode_gsm` is total: a byte over 0x7F, or an escape before a
  code the extension table does not have, decodes as what the standard says
  receivers show (the base character, or a space).
- `split_text`: GSM when every character has a code, else UCS-2; one part of at most
  160 septets (70 UCS-2 units), or parts of 153 septets (67 units) beside the
  concatenation header, never cutting an escape pair or a surrogate pair apart.

Calls nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DATA_CODING_GSM",
    "DATA_CODING_UCS2",
    "Encoded",
    "decode_body",
    "decode_gsm",
    "encode_gsm",
    "split_text",
]

DATA_CODING_GSM = 0x00
DATA_CODING_UCS2 = 0x08
DATA_CODING_LATIN1 = 0x03

# The default alphabet, code 0x00..0x7F (0x1B is the escape to the extension table).
_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
assert len(_BASIC) == 128
_EXTENSION = {
    0x0A: "\f",
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}
_ESCAPE = 0x1B
_ENCODE: dict[str, bytes] = {ch: bytes([code]) for code, ch in enumerate(_BASIC) if code != _ESCAPE}
_ENCODE.update({ch: bytes([_ESCAPE, code]) for code, ch in _EXTENSION.items()})

GSM_SINGLE = 160  # septets in a message of one part
GSM_PART = 153  # septets in each part of a concatenated message
UCS2_SINGLE = 70  # UTF-16 code units
UCS2_PART = 67
MAX_PARTS = 255


def encode_gsm(text: str) -> bytes | None:
    """The text in the GSM default alphabet (a byte per septet), or None if a character
    has no code in it."""
    out = bytearray()
    for ch in text:
        code = _ENCODE.get(ch)
        if code is None:
            return None
        out += code
    return bytes(out)


def decode_gsm(data: bytes) -> str:
    """GSM default-alphabet septets (a byte each) as text; never raises."""
    out = []
    escaped = False
    for byte in data:
        code = byte & 0x7F  # a set high bit is not a septet: read the low seven
        if escaped:
            escaped = False
            # an unknown extension code shows as its basic character (03.38, 6.2.1.1)
            out.append(_EXTENSION.get(code) or (" " if code == _ESCAPE else _BASIC[code]))
        elif code == _ESCAPE:
            escaped = True
        else:
            out.append(_BASIC[code])
    if escaped:  # an escape at the very end stands for a space
        out.append(" ")
    return "".join(out)


def decode_body(data: bytes, data_coding: int) -> str:
    """A body of data coding 0 (GSM) or 8 (UCS-2) as text; never raises for those
    (`pyserver.sms.codings` reads every other data coding)."""
    if data_coding == DATA_CODING_GSM:
        return decode_gsm(data)
    if data_coding == DATA_CODING_UCS2:
        return data[: len(data) & ~1].decode("utf-16-be", errors="replace")
    raise ValueError(f"data_coding {data_coding}: neither GSM (0) nor UCS-2 (8)")


@dataclass(frozen=True, slots=True)
class Encoded:
    """A text as it is sent: its data coding and the bodies of its parts (no headers)."""

    data_coding: int
    parts: list[bytes]


def split_text(text: str) -> Encoded:
    """The text encoded and cut into parts (see the module docstring); ValueError past
    255 parts."""
    gsm = encode_gsm(text)
    if gsm is not None:
        parts = _cut(gsm, GSM_SINGLE, GSM_PART, _gsm_boundary)
        coding = DATA_CODING_GSM
    else:
        ucs2 = text.encode("utf-16-be")
        parts = _cut(ucs2, UCS2_SINGLE * 2, UCS2_PART * 2, _ucs2_boundary)
        coding = DATA_CODING_UCS2
    if len(parts) > MAX_PARTS:
        raise ValueError(f"text too long for SMS: {len(parts)} parts, over {MAX_PARTS}")
    return Encoded(coding, parts)


def _cut(data: bytes, single: int, part: int, boundary: object) -> list[bytes]:
    if len(data) <= single:
        return [data]
    parts = []
    start = 0
    while start < len(data):
        end = min(start + part, len(data))
        end = boundary(data, start, end)  # type: ignore[operator]
        parts.append(data[start:end])
        start = end
    return parts


def _gsm_boundary(data: bytes, start: int, end: int) -> int:
    """`end`, moved back one if it would split an escape from its code."""
    if end < len(data):
        # count the escapes just before `end`: an odd run means the last one is cut off
        run = 0
        while end - run - 1 >= start and data[end - run - 1] == _ESCAPE:
            run += 1
        if run % 2 == 1:
            return end - 1
    return end


def _ucs2_boundary(data: bytes, start: int, end: int) -> int:
    """`end`, moved back one unit if it would split a surrogate pair."""
    if end < len(data) and 0xD8 <= data[end - 2] <= 0xDB:
        return end - 2
    return end
