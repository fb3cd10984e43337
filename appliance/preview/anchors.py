"""
The words around each link, read with a tree parser (beautifulsoup4 over lxml).

Only the preview uses this: the delivery path never builds a tree. The
rewriter's own scanner decides what is a link; this module only finds, for
each link it reports, what a reader sees of it (its anchor text) and where
(the text of the block it sits in).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, Tag

CONTEXT_CHARS = 100
_BLOCKS = frozenset({"p", "li", "td", "th", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                     "dd", "dt", "figcaption", "caption", "pre", "section", "article", "header",
                     "footer"})


@dataclass(frozen=True)
class Anchor:
    href: str  # decoded by the parser
    text: str  # what a reader sees: its text, else its image's alt text
    context: str  # the text of the block around it, shortened


def _squash(text: str) -> str:
    return " ".join(text.split())


def _shorten(text: str, around: str, limit: int = CONTEXT_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, keeping ``around`` in view."""
    if len(text) <= limit:
        return text
    at = text.find(around) if around else 0
    start = max(0, min(at - (limit - len(around)) // 2, len(text) - limit))
    cut = text[start:start + limit]
    return ("…" if start else "") + cut + ("…" if start + limit < len(text) else "")


def _visible_text(tag: Tag) -> str:
    text = _squash(tag.get_text(" "))
    if text:
        return text
    alt = tag.get("alt") if tag.name == "area" else None
    if not alt:
        image = tag.find("img", alt=True)
        alt = image.get("alt") if isinstance(image, Tag) else None
    if isinstance(alt, str) and alt.strip():
        return f"[image: {_squash(alt)}]"
    return "[image]" if tag.find("img") is not None else ""


def html_anchors(html: str) -> list[Anchor]:
    """Every ``<a>`` and ``<area>`` with an ``href``, in document order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        soup = BeautifulSoup(html, "lxml")
    out = []
    for tag in soup.find_all(["a", "area"]):
        href = tag.get("href")
        if not isinstance(href, str):
            continue
        text = _visible_text(tag)
        block = next((p for p in tag.parents if p.name in _BLOCKS), None)
        context = _shorten(_squash(block.get_text(" ")), text) if block is not None else text
        out.append(Anchor(href, text, context))
    return out


def text_context(text: str, start: int, end: int) -> str:
    """The line a URL of a text part sits on, shortened around the URL."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line = _squash(text[line_start:line_end if line_end >= 0 else len(text)])
    return _shorten(line, _squash(text[start:end]))
