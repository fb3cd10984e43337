"""
What tracking may change in a decoded part, found once per message.

``html_edits`` and ``text_edits`` list every change a copy may carry, in
order: a tracked link (its URL filled in per recipient), an open pixel's
place, a ``data-msys-*`` attribute or ``[[...]]`` suffix to remove, a brace
macro to expand. The prepared form compiles a part around them.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from operator import attrgetter

from appliance.links import MAX_URL_LENGTH, click_suffix, is_trackable_target
from appliance.rewrite.html_scan import (
    HTML_SPACE,
    Attribute,
    anchor_text,
    collapse_text,
    plain_anchor,
    scan_html,
    unescape_attribute,
)

MAX_LINK_NAME_BYTES = 63
DEFAULT_LINK_NAME = "Raw URL"


@dataclass(slots=True, unsafe_hash=True)
class Link:
    """
    One tracked link of the message: what its clicks say.

    Shared by every edit and copy that uses it, and never changed once made:
    hashed by its fields as a frozen one would be. Not ``frozen``: a frozen
    dataclass's ``__init__`` costs a microsecond more, for each distinct link
    of every message.
    """

    target: str
    name: str = DEFAULT_LINK_NAME
    sublink: str = ""
    unsubscribe: bool = False
    anchor: str = ""  # its anchor text, for click events; empty in text parts
    index: int = field(default=-1, compare=False)  # its place in its part's list of links
    suffix: bytes = field(default=b"", compare=False)  # its half of every click token's body


# Why a link found in a part is left as it came, whatever the settings; recorded only
# when the caller asks (``untracked``): the preview's audit, never the delivery path.
CLICKTRACK_OFF = "clicktrack_off"  # data-msys-clicktrack="0", or its [[...]] suffix in text
NOT_TRACKABLE = "not_trackable"  # not an absolute http(s) URL (mailto:, #top, relative, ...)
TOO_LONG = "too_long"  # longer than MAX_URL_LENGTH as written: never even decoded


@dataclass(frozen=True)
class Untracked:
    """A link the rewriter leaves alone: where its target is written, and why."""

    start: int  # span of the href value (or the URL) in the decoded text
    end: int
    written: str  # as written, character references and macros included
    target: str  # decoded as a browser would ("" when too long to decode)
    reason: str


# Kinds of open slots in a compiled part: what each recipient's copy fills in.
LINK_SLOT, OPEN_SLOT, INITIAL_SLOT = 0, 1, 2


@dataclass(slots=True)
class Edit:
    """One change to a span of the decoded text: fixed, or a slot each recipient fills in."""

    start: int
    end: int
    replacement: str = ""  # static edits, and a link's text when it is not tracked
    slot: int = -1  # LINK_SLOT, OPEN_SLOT, INITIAL_SLOT, or -1 for a static edit
    link: Link | None = None
    quote: str | None = '"'  # how an HTML attribute value is quoted; None in plain text


# -- brace macros --------------------------------------------------------------------------------

_MACRO = re.compile(r"\{\{\s*(opening|closing)_(single|double|triple)_curly\(\)\s*\}\}")
_BRACES = {("opening", "single"): "{", ("opening", "double"): "{{", ("opening", "triple"): "{{{",
           ("closing", "single"): "}", ("closing", "double"): "}}", ("closing", "triple"): "}}}"}


def expand_macros(text: str) -> str:
    if "{{" not in text:
        return text
    return _MACRO.sub(lambda m: _BRACES[m.group(1), m.group(2)], text)


_span = attrgetter("start", "end")


def _without_overlaps(edits: list[Edit], macros: list[Edit]) -> list[Edit]:
    """All edits in order; a macro that overlaps a structural edit stays as it is."""
    edits.sort(key=_span)
    if not macros:
        return edits
    starts = [e.start for e in edits]
    kept = list(edits)
    for m in macros:
        j = bisect.bisect_left(starts, m.end) - 1
        while j >= 0 and edits[j].end >= m.start:
            e = edits[j]
            if (e.start < m.end and m.start < e.end) or (e.start == e.end and m.start < e.start < m.end):
                break
            j -= 1
        else:
            kept.append(m)
    kept.sort(key=_span)
    return kept


def _macro_edits(text: str) -> list[Edit]:
    if "{{" not in text:
        return []
    return [Edit(m.start(), m.end(), _BRACES[m.group(1), m.group(2)]) for m in _MACRO.finditer(text)]


class _Links:
    """
    The distinct links of one part, each made once with its index and click suffix.

    Equal links (``Link``'s equality: target, name, sublink, unsubscribe,
    anchor) are one object, so each copy encodes it once; the key is a tuple
    of those fields, which hashes without a call into Python.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str, str, bool, str], Link] = {}

    def get(self, target: str, name: str, sublink: str, unsubscribe: bool, anchor: str = "") -> Link:
        key = (target, name, sublink, unsubscribe, anchor)
        link = self._known.get(key)
        if link is None:
            link = self._known[key] = Link(target, name, sublink, unsubscribe, anchor, len(self._known),
                                           click_suffix(name, target, unsubscribe, anchor))
        return link


# -- links in HTML -------------------------------------------------------------------------------


def _link_name(value: str) -> str:
    name = expand_macros(unescape_attribute(value))
    return name.encode()[:MAX_LINK_NAME_BYTES].decode("utf-8", "ignore") or DEFAULT_LINK_NAME


_NOTHING_ELSE: dict[str, Attribute] = {}  # a link tag's attributes other than href: none (never filled)


def html_edits(text: str, untracked: list[Untracked] | None = None) -> tuple[list[Edit], int]:
    """
    Every change tracking may make to an HTML text, in order; and how many links are too long.

    Given a list, ``untracked`` receives every link left alone and why (the
    preview's audit); the delivery path passes none and pays nothing for it.
    """
    scan = scan_html(text)
    edits: list[Edit] = []
    links = _Links()
    too_long = 0
    for tag in scan.links:
        attributes = tag.attributes
        if tag.plain and len(attributes[0].value) <= MAX_URL_LENGTH:  # what the general path finds, sooner
            href = attributes[0]
            value, content = href.value, tag.text
            anchor = plain_anchor(content) if content is not None else anchor_text(text, tag.content_start)
            link = links.get(value, DEFAULT_LINK_NAME, "", False,
                             expand_macros(anchor) if "{{" in anchor else anchor)
            edits.append(Edit(href.value_start, href.value_end, value, LINK_SLOT, link, href.quote))
            continue
        if len(attributes) == 1 and attributes[0].name == "href":  # the usual link
            first, href = _NOTHING_ELSE, attributes[0]
        else:
            first = {}
            for a in attributes:
                first.setdefault(a.name, a)
                if a.name.startswith("data-msys-"):
                    edits.append(Edit(a.removal_start, a.end))
            href = first.get("href")
            if href is None:
                continue
        track = first.get("data-msys-clicktrack")
        off = track is not None and unescape_attribute(track.value).strip() == "0"
        if len(href.value) > MAX_URL_LENGTH:  # could never be tracked: not even decoded
            http = href.value.lstrip(HTML_SPACE)[:8].lower().startswith(("http://", "https://"))
            too_long += not off and http
            if untracked is not None:
                untracked.append(Untracked(href.value_start, href.value_end, href.value, "",
                                           CLICKTRACK_OFF if off else TOO_LONG if http else NOT_TRACKABLE))
            continue
        raw = expand_macros(href.value)
        target = unescape_attribute(raw).strip(HTML_SPACE)
        if off or not is_trackable_target(target):
            if raw != href.value:
                edits.append(Edit(href.value_start, href.value_end, raw))
            if untracked is not None:
                untracked.append(Untracked(href.value_start, href.value_end, href.value, target,
                                           CLICKTRACK_OFF if off else NOT_TRACKABLE))
            continue
        name = first.get("data-msys-linkname")
        sublink = first.get("data-msys-sublink")
        unsubscribe = first.get("data-msys-unsubscribe")
        if tag.content_start >= 0:
            anchor = anchor_text(text, tag.content_start)
        else:  # an <area>: its alt text
            alt = first.get("alt") if first is not _NOTHING_ELSE else None
            anchor = collapse_text(unescape_attribute(alt.value)) if alt is not None else ""
        anchor = expand_macros(anchor)
        link = links.get(target,
                         _link_name(name.value) if name else DEFAULT_LINK_NAME,
                         expand_macros(unescape_attribute(sublink.value)).strip() if sublink else "",
                         bool(unsubscribe) and unescape_attribute(unsubscribe.value).strip() == "1",
                         anchor)
        edits.append(Edit(href.value_start, href.value_end, raw, LINK_SLOT, link, href.quote))
    if scan.body_open_end is not None:
        edits.append(Edit(scan.body_open_end, scan.body_open_end, slot=INITIAL_SLOT))
    close = scan.body_close if scan.body_close is not None else len(text)
    edits.append(Edit(close, close, slot=OPEN_SLOT))
    return _without_overlaps(edits, _macro_edits(text)), too_long


# -- text-part URLs -------------------------------------------------------------------------------

_TEXT_URL = re.compile(r"""(?i:https?)://(?:(?!\[\[data-msys-)[^\s<>"])+""")
_SUFFIX = re.compile(r"""\[\[data-msys-([a-z]+)="([^"\r\n]*)"\]\]""")
_TRAILING = ".,;:!?'*"
_CLOSERS = {")": "(", "]": "[", "}": "{"}


def _trim_url(url: str) -> str:
    """
    Drop sentence punctuation after a URL in running text, and unbalanced closers.

    One pass from the end: a closer is dropped while the URL has more of it
    than of its opener, counted once and updated as closers go.
    """
    excess = {closer: url.count(closer) - url.count(opener) for closer, opener in _CLOSERS.items()}
    end = len(url)
    while end:
        last = url[end - 1]
        if last in _TRAILING:
            end -= 1
        elif last in excess and excess[last] > 0:
            excess[last] -= 1
            end -= 1
        else:
            break
    return url[:end]


def text_edits(text: str, untracked: list[Untracked] | None = None) -> tuple[list[Edit], int]:
    """Every change tracking may make to a plain text (URLs, ``[[...]]`` suffixes); and how many
    URLs are too long to track. ``untracked``: as for ``html_edits``."""
    edits: list[Edit] = []
    links = _Links()
    too_long = 0
    for m in _TEXT_URL.finditer(text):
        url, end = m.group(), m.end()
        attrs: dict[str, str] = {}
        s = _SUFFIX.match(text, end)
        suffix_start = end
        while s is not None:
            attrs.setdefault(s.group(1), s.group(2))
            end = s.end()
            s = _SUFFIX.match(text, end)
        if end != suffix_start:
            edits.append(Edit(suffix_start, end))
        off = attrs.get("clicktrack") == "0"
        if len(url) > MAX_URL_LENGTH:  # could never be tracked; its text stays as it is
            too_long += not off
            if untracked is not None:
                untracked.append(Untracked(m.start(), m.start() + len(url), url, "",
                                           CLICKTRACK_OFF if off else TOO_LONG))
            continue
        if end == suffix_start:
            url = _trim_url(url)
        start = m.start()
        raw = expand_macros(url)
        if off or not is_trackable_target(raw):
            if raw != url:
                edits.append(Edit(start, start + len(url), raw))
            if untracked is not None:
                untracked.append(Untracked(start, start + len(url), url, raw,
                                           CLICKTRACK_OFF if off else NOT_TRACKABLE))
            continue
        link = links.get(raw, DEFAULT_LINK_NAME, attrs.get("sublink", "").strip(),
                         attrs.get("unsubscribe") == "1")
        edits.append(Edit(start, start + len(url), raw, LINK_SLOT, link, quote=None))
    return _without_overlaps(edits, _macro_edits(text)), too_long
