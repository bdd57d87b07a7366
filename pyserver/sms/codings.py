"""What a text's `data_coding` says its bytes are, and the text the gateway files for them.

Owns the reading of every SMPP 3.4 data coding (5.2.19) a deliver_sm may carry;
the GSM 03.38 default alphabet and UCS-2 themselves are `pyserver.sms.gsm`'s.

- 0 the SMSC's default alphabet (GSM 03.38 here), 8 UCS-2: `gsm.decode_body`.
- 1 IA5 / ASCII (7-bit): a byte over 0x7F is not ASCII and reads as U+FFFD.
- 3 Latin-1 (ISO-8859-1): every byte is a character.
- 6 Cyrillic (ISO-8859-5): every byte is a character.
- 7 Latin/Hebrew (ISO-8859-8): bytes the standard leaves unassigned read as U+FFFD;
  the text is in logical order, as the part's bytes have it.
- 2 and 4 (octets, unspecified: binary data, such as ringtones, WAP push or SIM
  data) are no text: the bytes are `kept` whole, and the text says what they are.
- Values 0xC0..0xFF and 0x10..0x7F are the GSM 03.38 data coding scheme itself:
  its character set bits pick the default alphabet, 8-bit data (kept as binary) or
  UCS-2; a compressed text (which no SMSC in practice sends) is kept as binary.
- Everything else (5 JIS, 9 pictograms, 10 ISO-2022-JP, 13 JIS X 0212, 14 KS C 5601,
  reserved values) is not decoded: kept like binary, the text says so.

Nothing is lost either way and nothing raises: undecoded bytes travel in `kept`,
and the gateway stores them with the message (its `extra`, base64).

Calls only `pyserver.sms.gsm` and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyserver.sms import gsm

__all__ = ["Body", "read_body"]

# data_coding -> (Python codec, name shown) for the single-byte character sets
_CHARSETS = {
    0x01: ("ascii", "IA5/ASCII"),
    0x03: ("latin-1", "Latin-1"),
    0x06: ("iso8859_5", "Cyrillic ISO-8859-5"),
    0x07: ("iso8859_8", "Latin/Hebrew ISO-8859-8"),
}
_BINARY = {0x02: "binary (octets, unspecified)", 0x04: "binary (octets, unspecified)"}
_NOT_DECODED = {
    0x05: "JIS X 0208",
    0x09: "pictograms",
    0x0A: "ISO-2022-JP (music codes)",
    0x0D: "extended kanji JIS X 0212",
    0x0E: "KS C 5601",
}


@dataclass(frozen=True, slots=True)
class Body:
    """A text's body as the gateway files it: `text`, and the bytes themselves when they
    are not text (`kept`, else None)."""

    text: str
    kept: bytes | None = None


def read_body(data: bytes, data_coding: int) -> Body:
    """The body of a (reassembled) text by its `data_coding` (module docstring)."""
    coding = data_coding & 0xFF
    if coding in (gsm.DATA_CODING_GSM, gsm.DATA_CODING_UCS2):
        return Body(gsm.decode_body(data, coding))
    if coding in _CHARSETS:
        codec, _ = _CHARSETS[coding]
        return Body(data.decode(codec, errors="replace"))
    if coding in _BINARY:
        return _kept(data, coding, _BINARY[coding])
    if coding in _NOT_DECODED:
        return _kept(data, coding, f"{_NOT_DECODED[coding]}, which this gateway does not decode")
    alphabet = _gsm_scheme_alphabet(coding)
    if alphabet in (gsm.DATA_CODING_GSM, gsm.DATA_CODING_UCS2):
        return Body(gsm.decode_body(data, alphabet))
    if alphabet == 0x04:
        return _kept(data, coding, "binary (GSM 8-bit data)")
    return _kept(data, coding, "a data coding this gateway does not decode")


def _gsm_scheme_alphabet(coding: int) -> int | None:
    """0 (default alphabet), 4 (8-bit data) or 8 (UCS-2) as the GSM 03.38 data coding
    scheme `coding` says; None when it is compressed, reserved or not such a scheme."""
    group = coding >> 4
    if 0x1 <= group <= 0x7:  # general data coding (00xx) and marked for deletion (01xx)
        if coding & 0x20:  # compressed
            return None
        return {0: 0x00, 1: 0x04, 2: 0x08}.get((coding >> 2) & 0x3)
    if group in (0xC, 0xD):  # message waiting indication: default alphabet
        return 0x00
    if group == 0xE:  # message waiting indication: UCS-2
        return 0x08
    if group == 0xF:  # data coding / message class: bit 2 picks 8-bit data
        return 0x04 if coding & 0x04 else 0x00
    return None  # 0x80..0xBF: reserved


def _kept(data: bytes, coding: int, what: str) -> Body:
    return Body(f"[{what}: data_coding 0x{coding:02X}, {len(data)} bytes, kept]", kept=data)
