"""Where pymap's answers differ from RFC 3501 (and Dovecot), corrected on import.

ENVELOPE's addresses: a display name given as an RFC 822 comment
(`bbb@ddd.com (John Doe)`) is the name, as mail readers and Dovecot read it
(pymap drops it), and an absent name or domain is NIL, not "" (pymap sends "").

ENVELOPE's date: RFC 3501's env-date is the Date header's own text; pymap sends
it reformatted as an INTERNALDATE. The envelopes `structure` builds carry the
header's text (`raw_date`), which is sent instead.

BODYSTRUCTURE's body-fld-dsp: RFC 3501 gives a part's disposition as
`("attachment" ("filename" "a.pdf"))`, or NIL; pymap 0.36 sends the header's
whole text as one string (`"attachment; filename=\\"a.pdf\\""`), which mail
clients cannot read (they lose attachment names). Each body structure class's
`extended` value is taken as pymap builds it and its disposition item (third
from the end: disposition, language, location) replaced.

Found comparing BODYSTRUCTURE answers with Dovecot's (tests/test_imap_dovecot.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import getaddresses
from typing import Any

from pymap.parsing.primitives import List, Nil, String
from pymap.parsing.response import fetch

__all__ = ["apply"]

_DISPOSITION = -3  # disposition, language, location end every `extended` list


def _disposition(header: Any) -> Any:
    """A Content-Disposition header as RFC 3501's body-fld-dsp."""
    if header is None:
        return Nil()
    kind = str(getattr(header, "content_disposition", "") or "").strip()
    if not kind:
        return Nil()
    params = dict(getattr(header, "params", {}) or {})
    pairs = [
        item
        for key, value in params.items()
        for item in (String.build(key), String.build(str(value)))
    ]
    return List([String.build(kind), List(pairs) if pairs else Nil()])


def _corrected(extended: Callable[[Any], List]) -> property:
    def value(self: Any) -> List:
        items = list(extended(self).value)
        items[_DISPOSITION] = _disposition(self.content_disposition)
        return List(items)

    return property(value)


def _addresses(self: Any) -> Any:
    """An address list of ENVELOPE from the headers' own text (`_AddressList._value`)."""
    headers = getattr(self, "headers", None) or []
    entries = []
    for header in headers:
        text = str(header)
        group = _GROUP.match(text)
        if group is not None:  # RFC 3501: a group's start (its name), members, its end
            entries.append(List([Nil(), Nil(), _string(group[1].strip()), Nil()]))
            entries += [_address(name, at) for name, at in getaddresses([group[2]]) if at]
            entries.append(List([Nil(), Nil(), Nil(), Nil()]))
            continue
        entries += [_address(name, at) for name, at in getaddresses([text])]
    return List(entries) if entries else Nil()


# `name: member, member;` (RFC 5322 group syntax), the whole header
_GROUP = re.compile(r'^\s*([^:<>"@,]+):(.*);\s*$', re.S)


def _address(name: str, address: str) -> Any:
    mailbox, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
    return List([_string(name), Nil(), _string(mailbox), _string(domain)])


def _string(text: str) -> Any:
    return String.build(text) if text else Nil()


def _dated(value: Callable[[Any], List]) -> property:
    def corrected(self: Any) -> List:
        items = list(value(self).value)
        raw_date = getattr(self, "raw_date", None)
        if raw_date:
            items[0] = String.build(raw_date)
        return List(items)

    return property(corrected)


_APPLIED = False


def apply() -> None:
    """Correct pymap's classes (once per process)."""
    global _APPLIED
    if _APPLIED:
        return
    for name in ("MultipartBodyStructure", "ContentBodyStructure", "TextBodyStructure",
                 "MessageBodyStructure"):  # fmt: skip
        cls = getattr(fetch, name)
        cls.extended = _corrected(cls.extended.fget)
    fetch._AddressList._value = property(_addresses)
    fetch.EnvelopeStructure._value = _dated(fetch.EnvelopeStructure._value.fget)
    _APPLIED = True
