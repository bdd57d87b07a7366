"""Concatenated short messages: the headers that tie parts together, and reassembly.

Owns the two ways SMPP marks a part of a long text:

- a User Data Header at the start of the body (`esm_class` bit 0x40, UDHI):
  information element 0x00 (8-bit reference) or 0x08 (16-bit reference), each
  with the parts' total and this part's number (1-based);
- the `sar_msg_ref_num`, `sar_total_segments` and `sar_segment_seqnum` TLVs.

`udh_for` builds the 8-bit header the gateway sends; `read_part` reads either form
off a received body. `Reassembler` collects parts by (sender, recipient,
reference, total): in any order, a duplicate dropped, the whole text once the last
part arrives; a set still incomplete after `timeout_s` is given up as what
arrived, marked incomplete. Bounded: at most `max_sets` sets wait at once (the
oldest is given up first). Sans I/O: the caller says what time it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Part", "Reassembled", "Reassembler", "read_part", "udh_for"]

UDHI = 0x40  # esm_class: the body starts with a User Data Header
_IE_CONCAT_8 = 0x00
_IE_CONCAT_16 = 0x08


def udh_for(reference: int, total: int, number: int) -> bytes:
    """The 8-bit-reference concatenation header of part `number` (1-based) of `total`."""
    return bytes([5, _IE_CONCAT_8, 3, reference & 0xFF, total, number])


@dataclass(frozen=True, slots=True)
class Part:
    """What a received body is: its payload, and (for a part of a long text) the
    reference, total and number that tie it to the others."""

    body: bytes
    reference: int | None = None
    total: int = 1
    number: int = 1


def read_part(body: bytes, esm_class: int, sar: tuple[int, int, int] | None = None) -> Part:
    """The part a body carries. `sar`: (reference, total, number) from the sar_* TLVs. A
    header that is malformed or names no concatenation leaves the body whole."""
    if esm_class & UDHI and body:
        length = body[0]
        if 1 + length <= len(body):
            header, payload = body[1 : 1 + length], body[1 + length :]
            found = _concatenation(header)
            if found is not None:
                return Part(payload, *found)
            return Part(payload)
    if sar is not None and sar[1] > 1 and 1 <= sar[2] <= sar[1]:
        return Part(body, sar[0], sar[1], sar[2])
    return Part(body)


def _concatenation(header: bytes) -> tuple[int, int, int] | None:
    at = 0
    while at + 2 <= len(header):
        element, size = header[at], header[at + 1]
        value = header[at + 2 : at + 2 + size]
        if len(value) < size:
            return None
        if element == _IE_CONCAT_8 and size == 3:
            reference, total, number = value
        elif element == _IE_CONCAT_16 and size == 4:
            reference, total, number = (value[0] << 8) | value[1], value[2], value[3]
        else:
            at += 2 + size
            continue
        if total >= 1 and 1 <= number <= total:
            return reference, total, number
        return None
    return None


@dataclass(slots=True)
class Reassembled:
    """A whole text (or what arrived of it): its parts' bodies in order."""

    key: tuple[object, ...]
    bodies: list[bytes]
    complete: bool
    missing: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Set:
    total: int
    first_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Parts of long texts gathered until whole (see the module docstring)."""

    def __init__(self, timeout_s: float = 300.0, max_sets: int = 10_000) -> None:
        self.timeout_s = timeout_s
        self.max_sets = max_sets
        self._sets: dict[tuple[object, ...], _Set] = {}
        # sets completed lately (key -> when), so a late duplicate part starts nothing
        self._done: dict[tuple[object, ...], float] = {}
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._sets)

    def add(self, origin: tuple[object, ...], part: Part, now: float) -> Reassembled | None:
        """The whole text once `part` completes it (None while parts are missing, or for a
        duplicate). `origin` says whose parts these are (sender, recipient)."""
        if part.reference is None or part.total == 1:
            return Reassembled((*origin, None), [part.body], True)
        key = (*origin, part.reference, part.total)
        if key in self._done:
            self.duplicates += 1
            return None
        waiting = self._sets.get(key)
        if waiting is None:
            waiting = self._sets[key] = _Set(part.total, now)
        if part.number in waiting.parts:
            self.duplicates += 1
            return None
        waiting.parts[part.number] = part.body
        if len(waiting.parts) < waiting.total:
            return None
        del self._sets[key]
        self._done[key] = now
        return Reassembled(key, [waiting.parts[n] for n in range(1, waiting.total + 1)], True)

    def expired(self, now: float) -> list[Reassembled]:
        """Sets given up: older than `timeout_s`, and the oldest beyond `max_sets`."""
        out = []
        for key in [k for k, done in self._done.items() if now - done >= self.timeout_s]:
            del self._done[key]
        while len(self._done) > self.max_sets:
            del self._done[next(iter(self._done))]
        overflow = max(0, len(self._sets) - self.max_sets)
        for key in list(self._sets):
            waiting = self._sets[key]
            if now - waiting.first_seen >= self.timeout_s or overflow > 0:
                overflow -= 1
                del self._sets[key]
                numbers = sorted(waiting.parts)
                missing = [n for n in range(1, waiting.total + 1) if n not in waiting.parts]
                out.append(Reassembled(key, [waiting.parts[n] for n in numbers], False, missing))
        return out
