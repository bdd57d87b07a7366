"""HTML to plain text, for mail that has no text/plain body.

What a reader would see: the text of the document with block elements on
lines of their own, list items marked, links followed by their address when it
differs from their text, and nothing of scripts, styles or the head.
Entities are decoded. Never raises on bad HTML: the parser is lenient.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

_HIDDEN = frozenset({"script", "style", "head", "title", "template", "noscript"})
_BLOCK = frozenset(
    {"address", "article", "aside", "blockquote", "div", "dl", "dt", "dd", "fieldset",
     "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li",
     "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul"}
)  # fmt: skip
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._pre = 0
        self._link: tuple[str, int] | None = None  # (href, index of the link's first part)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self._hidden += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")
            elif tag == "pre":
                self._pre += 1
        elif tag in ("td", "th"):
            self.parts.append("\t")
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            self._link = (href, len(self.parts))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(f"[{alt}]")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HIDDEN:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
        elif tag == "a" and self._link is not None:
            href, start = self._link
            self._link = None
            shown = "".join(self.parts[start:]).strip()
            if href.startswith(("http:", "https:")) and href != shown:
                self.parts.append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        self.parts.append(data if self._pre else _SPACES.sub(" ", data.replace("\n", " ")))


def html_to_text(html: str) -> str:
    """The readable text of an HTML document or fragment."""
    collector = _TextCollector()
    try:
        collector.feed(html)
        collector.close()
    # html.parser is lenient: keep the text read so far, whatever broke it
    except Exception:  # nosec B110
        pass
    lines = (line.strip(" ") for line in "".join(collector.parts).split("\n"))
    text = "\n".join(lines)
    return _BLANK_LINES.sub("\n\n", text).strip()
