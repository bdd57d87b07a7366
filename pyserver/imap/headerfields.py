"""FETCH BODY[HEADER.FIELDS (...)]: the field names echoed as the client asked, corrected on import.

pymap 0.36 keeps a HEADER.FIELDS list as a set and echoes it sorted
(`BODY[HEADER.FIELDS (FROM SUBJECT)]` for `(Subject From)`), and keeps a
quoted name with its quotes (`"From"` matched no header at all). Dovecot, the
reference, echoes the names in the order asked, upper-cased, each as it was
written: an atom as an atom, a quoted string or a literal as a quoted string,
duplicates kept (`(Subject "From" subject)` -> `(SUBJECT "FROM" SUBJECT)`). A
client that looks its answer up by the text it sent (as imaplib users and
some mail clients do) finds it only so.

`apply()` replaces the parsing of a section's field list (the names matched are
the names' values, upper-cased; the names echoed are kept with the section) and
the echo of a FETCH item with such a section. Compared with Dovecot in
tests/test_imap_dovecot.py.

May import: pymap's parsing primitives only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymap.parsing import Params
from pymap.parsing.exceptions import NotParseable
from pymap.parsing.primitives import List, QuotedString
from pymap.parsing.specials.astring import AString
from pymap.parsing.specials.fetchattr import FetchAttribute

__all__ = ["AskedSection", "apply", "echoed"]

_FIELD_LISTS = (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT")


class AskedSection(FetchAttribute.Section):
    """A HEADER.FIELDS section that remembers the field names as they were asked."""

    def __init__(
        self, parts: Sequence[int], specifier: bytes, headers: frozenset[bytes], asked: bytes
    ) -> None:
        super().__init__(parts, specifier, headers)
        self.asked = asked  # the list as echoed: b"(SUBJECT \"FROM\")"

    def __hash__(self) -> int:
        return hash((tuple(self.parts), self.specifier, self.asked))


def echoed(names: Sequence[AString]) -> bytes:
    """A field list as Dovecot echoes it (the module docstring)."""
    out = []
    for name in names:
        value = name.value.upper()
        written = bytes(name).lstrip()
        if written[:1] in (b'"', b"{", b"~"):  # a quoted string or a literal
            out.append(bytes(QuotedString(value)))
        else:
            out.append(value)
    return b"(" + b" ".join(out) + b")"


def apply() -> None:
    """Correct pymap's FetchAttribute (idempotent)."""
    if getattr(FetchAttribute, "pyserver_asked_fields", False):
        return
    parse_section = FetchAttribute._parse_section.__func__  # type: ignore[attr-defined]
    raw = FetchAttribute.raw

    def parse_asked(cls: Any, buf: memoryview, params: Params) -> tuple[Any, memoryview]:
        section, after = parse_section(cls, buf, params)
        if section.specifier not in _FIELD_LISTS:
            return section, after
        # parsed again from the field list on: pymap keeps the names as a set
        rest = bytes(buf)
        start = rest.upper().index(section.specifier) + len(section.specifier)
        listed, tail = List.parse(buf[start:], params.copy(expected=[AString]))
        names = [name for name in listed.value if isinstance(name, AString)]
        if not names or len(names) != len(listed.value):
            raise NotParseable(buf[start:])
        headers = frozenset(name.value.upper() for name in names)
        return AskedSection(section.parts, section.specifier, headers, echoed(names)), tail

    def raw_as_asked(self: FetchAttribute) -> bytes:
        section = self.section
        if self._raw is None and isinstance(section, AskedSection):
            as_sorted = raw.fget(self)  # type: ignore[attr-defined]
            listed = b" " + bytes(List(section.headers, sort=True)) + b"]"
            self._raw = as_sorted.replace(listed, b" " + section.asked + b"]", 1)
        return raw.fget(self)  # type: ignore[attr-defined]

    FetchAttribute._parse_section = classmethod(parse_asked)  # type: ignore[method-assign,assignment]
    FetchAttribute.raw = property(raw_as_asked)  # type: ignore[method-assign,assignment]
    FetchAttribute.pyserver_asked_fields = True  # type: ignore[attr-defined]
