"""Where pymap's answers differ from RFC 3501 (and Dovecot), corrected on import.

BODYSTRUCTURE's body-fld-dsp: RFC 3501 gives a part's disposition as
`("attachment" ("filename" "a.pdf"))`, or NIL; pymap 0.36 sends the header's
whole text as one string (`"attachment; filename=\\"a.pdf\\""`), which mail
clients cannot read (they lose attachment names). Each body structure class's
`extended` value is taken as pymap builds it and its disposition item (third
from the end: disposition, language, location) replaced.

Found comparing BODYSTRUCTURE answers with Dovecot's (tests/test_imap_dovecot.py).
"""

from __future__ import annotations

from collections.abc import Callable
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
    _APPLIED = True
