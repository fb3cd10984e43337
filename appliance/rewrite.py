"""
The tracking rewriter: one message in, one copy per recipient out.

The work that does not depend on the recipient is done once, by ``prepare``:
find the first ``text/html`` and ``text/plain`` parts, decode them, find
their links, ``data-msys-*`` attributes, ``[[...]]`` suffixes, brace macros
and pixel positions, and compile each part into a list of byte strings in
which only the recipient's tracked URLs and pixels are left open. A copy is
then made by ``Prepared.render``: fill those in, join, re-encode the part,
splice it into the message. Rendering never parses anything.

Fidelity is by construction: the HTML is never re-serialised. The scanner
only finds positions in the decoded text (HTML5 tokenizer rules for tags,
attributes, comments and raw text), and the copy is the original text with
exactly the recorded changes applied.

Bad input never costs a message: a part that cannot be decoded, a charset
that does not fit, HTML that ends inside a tag, or MIME that is not well
formed leaves the part (or, for MIME, the message) exactly as it came, and
``Prepared.skipped`` says why.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import functools
import html
import json
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from email.message import Message
from html.entities import html5 as _HTML5_ENTITIES
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dkim import Signer
from appliance.links import (
    MAX_URL_LENGTH,
    TAG_BYTES,
    LinkCodec,
    LinkData,
    click_suffix,
    click_url,
    is_trackable_target,
    open_url,
)
from appliance.settings import Tracking

log = Logger()

MAX_DEPTH = 20  # multipart nesting
MAX_PART_BYTES = 8 * 1024 * 1024  # larger parts are delivered as they are
MAX_LINE = 998
MAX_LINK_NAME_BYTES = 63
DEFAULT_LINK_NAME = "Raw URL"


class MimeError(ValueError):
    """The message's MIME structure cannot be trusted enough to change anything in it."""


class PartSkipped(ValueError):
    """One part cannot be rewritten faithfully; it is delivered as it came."""


# -- HTML scanning --------------------------------------------------------------------------

# A start or end tag under HTML5 tokenizer rules. Every quantifier is possessive, so a
# tag that never ends costs linear time; a match failure means end of input inside the tag.
_ATTRIBUTES = (
    r"""(?:[\t\n\f\r /]*+[^\t\n\f\r />][^\t\n\f\r /=>]*+"""
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?:"[^"]*+(?:"|\Z)|'[^']*+(?:'|\Z)|[^\t\n\f\r >]*+))?+)*+"""
)
_TAG = re.compile(rf"""</?([A-Za-z][^\t\n\f\r />]*+)({_ATTRIBUTES})[\t\n\f\r /]*+>""")
# Everything the scanner has nothing to do with, in one C-speed run: text, and whole
# start and end tags other than the few it looks at. Same tag grammar as _TAG.
_SPECIAL = r"(?i:a|area|body|script|style|xmp|iframe|noembed|noframes|title|textarea|plaintext)"
_BORING = re.compile(
    rf"""(?:[^<]++"""
    rf"""|<(?!{_SPECIAL}[\t\n\f\r />])[A-Za-z][^\t\n\f\r />]*+{_ATTRIBUTES}[\t\n\f\r /]*+>"""
    rf"""|</(?!(?i:body)[\t\n\f\r />])[A-Za-z][^\t\n\f\r />]*+{_ATTRIBUTES}[\t\n\f\r /]*+>"""
    rf"""|<(?![!?/A-Za-z]))*+"""
)
_ATTR = re.compile(
    r"""[\t\n\f\r /]*+(?P<name>[^\t\n\f\r />][^\t\n\f\r /=>]*+)"""
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?P<value>"[^"]*+"|'[^']*+'|[^\t\n\f\r >]*+))?+"""
)
_COMMENT_END = re.compile(r"--!?>")
_RAW_TEXT = ("script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea")
_RAW_TEXT_END = {name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE) for name in _RAW_TEXT}
_HTML_SPACE = "\t\n\f\r "


@dataclass
class Attribute:
    name: str  # lower-cased
    value: str  # raw, entity references not decoded
    value_start: int  # span of the value inside its quotes
    value_end: int
    quote: str  # '"', "'" or ""
    start: int  # the attribute itself: name to end of value
    end: int
    removal_start: int  # where its removal starts (the white space before it, if any)


@dataclass
class LinkTag:
    name: str
    attributes: list[Attribute]


@dataclass
class HtmlScan:
    links: list[LinkTag] = field(default_factory=list)
    body_open_end: int | None = None  # just after the first <body ...>
    body_close: int | None = None  # at the last </body>


def _attributes(text: str, start: int, end: int) -> list[Attribute]:
    """The attributes of a link tag that tracking looks at: ``href`` and ``data-msys-*``."""
    out = []
    for m in _ATTR.finditer(text, start, end):
        name = m.group("name").lower()
        if name != "href" and not name.startswith("data-msys-"):
            continue
        value, vstart, vend, quote = "", m.end(), m.end(), ""
        if m.group("value") is not None:
            vstart, vend = m.span("value")
            value = m.group("value")
            if value[:1] in ("'", '"'):
                quote, value, vstart, vend = value[0], value[1:-1], vstart + 1, vend - 1
        following = text[m.end()] if m.end() < len(text) else ">"
        glued = following not in _HTML_SPACE and following not in "/>"
        out.append(Attribute(name, value, vstart, vend, quote, m.start("name"), m.end(),
                             m.start("name") if glued else m.start()))
    return out


def scan_html(text: str) -> HtmlScan:
    """
    The ``<a>``/``<area>`` tags and ``<body>`` positions of an HTML text.

    Follows the HTML5 tokenizer where it decides what is markup: comments
    (``<!-- -->``, ``--!>``, abrupt ``<!-->``), bogus comments and doctypes,
    raw-text and RCDATA elements, attribute quoting. Raises ``PartSkipped``
    when the text ends inside a tag, a comment or a raw-text element, because
    then nothing could be appended to it safely.
    """
    scan = HtmlScan()
    n = len(text)
    pos = 0
    find = text.find
    boring = _BORING.match
    while True:
        lt = boring(text, pos).end()  # type: ignore[union-attr]  # it always matches
        if lt >= n:
            return scan
        c = text[lt + 1] if lt + 1 < n else ""
        if c == "!" or c == "?" or c == "/" and not (lt + 2 < n and _ascii_alpha(text[lt + 2])):
            if text.startswith("<!--", lt):
                m = _COMMENT_END.search(text, lt + 2)
                if m is None:
                    raise PartSkipped("the HTML ends inside a comment")
                pos = m.end()
                continue
            if text.startswith("</>", lt):
                pos = lt + 3
                continue
            gt = find(">", lt + 2)
            if gt < 0:
                raise PartSkipped("the HTML ends inside a markup declaration")
            pos = gt + 1
            continue
        m = _TAG.match(text, lt)
        if m is None:
            raise PartSkipped("the HTML ends inside a tag")
        pos = m.end()
        name = m.group(1).lower()
        if c == "/":
            if name == "body":
                scan.body_close = lt
            continue
        if name == "a" or name == "area":
            scan.links.append(LinkTag(name, _attributes(text, m.start(2), m.end(2))))
        elif name == "body":
            if scan.body_open_end is None:
                scan.body_open_end = pos
        elif name in _RAW_TEXT_END:
            e = _RAW_TEXT_END[name].search(text, pos)
            if e is None:
                raise PartSkipped(f"the HTML ends inside <{name}>")
            pos = e.start()
        elif name == "plaintext":
            raise PartSkipped("the HTML has a <plaintext> element")


def _ascii_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
# No entity name is longer than this (``CounterClockwiseContourIntegral;``), so the
# search for the longest one that prefixes a run of letters never looks further.
_MAX_ENTITY = max(map(len, _HTML5_ENTITIES))
# A numeric reference's value past this many significant digits is beyond U+10FFFF in
# any base; ``int`` is not asked to convert such a number (it is slow, and refuses past
# 4300 decimal digits).
_MAX_NUMERIC_DIGITS = 8


def _numeric_reference(ref: str) -> str:
    """``&#...`` decoded as ``html.unescape`` does, for any number of digits."""
    hexadecimal = ref[1:2] in ("x", "X")
    digits = ref[2 if hexadecimal else 1:].rstrip(";").lstrip("0") or "0"
    if len(digits) > _MAX_NUMERIC_DIGITS:
        digits = "110000" if hexadecimal else "1114112"  # out of range: U+FFFD, as browsers do
    return html.unescape(f"&#{'x' if hexadecimal else ''}{digits};")


def unescape_attribute(value: str) -> str:
    """
    An attribute value with its character references decoded as a browser does.

    Unlike ``html.unescape``, a named reference without ``;`` followed by
    ``=`` or a letter or digit stays literal in an attribute (HTML5 §13.2.5.73),
    so ``?a=1&copy=2`` keeps its ``&copy``. Linear in the length of the value,
    however long its runs of letters after ``&``.
    """
    if "&" not in value:
        return value

    def decode(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref[0] == "#":
            return _numeric_reference(ref)
        for i in range(min(len(ref), _MAX_ENTITY), 0, -1):
            name = ref[:i]
            if name in _HTML5_ENTITIES:
                if not name.endswith(";"):
                    after = ref[i:i + 1] or value[m.end():m.end() + 1]
                    if after == "=" or after.isascii() and after.isalnum():
                        return m.group(0)
                return _HTML5_ENTITIES[name] + ref[i:]
        return m.group(0)

    return _CHARREF.sub(decode, value)


# -- brace macros and text-part URLs -----------------------------------------------------------

_MACRO = re.compile(r"\{\{\s*(opening|closing)_(single|double|triple)_curly\(\)\s*\}\}")
_BRACES = {("opening", "single"): "{", ("opening", "double"): "{{", ("opening", "triple"): "{{{",
           ("closing", "single"): "}", ("closing", "double"): "}}", ("closing", "triple"): "}}}"}


def expand_macros(text: str) -> str:
    if "{{" not in text:
        return text
    return _MACRO.sub(lambda m: _BRACES[m.group(1), m.group(2)], text)


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


# -- the compiled form ------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One tracked link of the message: what its clicks say."""

    target: str
    name: str = DEFAULT_LINK_NAME
    sublink: str = ""
    unsubscribe: bool = False
    index: int = field(default=-1, compare=False)  # its place in its part's list of links
    suffix: bytes = field(default=b"", compare=False)  # its half of every click token's body


# Kinds of open slots in a compiled part.
_LINK, _OPEN, _INITIAL = 0, 1, 2


@dataclass
class _Edit:
    start: int
    end: int
    replacement: str = ""  # static edits, and a link's text when it is not tracked
    slot: int = -1  # _LINK, _OPEN, _INITIAL, or -1 for a static edit
    link: Link | None = None
    quote: str | None = '"'  # how an HTML attribute value is quoted; None in plain text


@dataclass
class Change:
    """One difference between a copy's decoded part text and the original (for audits and tests)."""

    part: str  # "html" or "text"
    start: int  # in the copy's decoded text
    end: int
    original: str


OPEN_PIXEL = '<img border="0" width="1" height="1" alt="" src="{}">'
INITIAL_PIXEL = ('<div style="display:none !important;max-height:0;overflow:hidden;mso-hide:all">'
                 '<img border="0" width="1" height="1" alt="" src="{}"></div>')


@dataclass
class PreparedPart:
    """A part compiled into byte strings; ``dynamic`` lists the ones each recipient fills in."""

    kind: str  # "html" or "text"
    start: int  # span of the whole part (headers and body) in the message
    body_start: int
    end: int
    header: bytes
    qp_header: bytes  # the header block to use when the body becomes quoted-printable
    cte: str
    charset: str
    template: list[bytes]
    dynamic: list[tuple[int, _Edit]]
    links: list[Link]  # distinct links, each with its index; rendered once per copy
    originals: dict[int, str]  # template index -> original text, for every edited piece
    too_long: int  # links left untracked because their target is over MAX_URL_LENGTH
    static_changes: bool
    has_links: bool
    has_open_pixel: bool
    body_ends_with_crlf: bool
    bare_newlines: bool  # the decoded text has CR or LF outside CRLF (only base64 can carry them)
    has_crlf: bool

    def changes(self, tracking: Tracking) -> bool:
        return (self.static_changes or (tracking.click_tracking and self.has_links)
                or (tracking.open_tracking and self.has_open_pixel))


def _compile_text(text: str, charset: str, edits: list[_Edit]) -> tuple[
        list[bytes], list[tuple[int, _Edit]], dict[int, str], bool]:
    """Literal pieces pre-encoded in the part's charset, edits as their own pieces."""
    template: list[bytes] = []
    dynamic: list[tuple[int, _Edit]] = []
    originals: dict[int, str] = {}
    static_changes = False
    pos = 0
    for e in edits:
        if e.start > pos:
            template.append(text[pos:e.start].encode(charset))
        original = text[e.start:e.end]
        originals[len(template)] = original
        if e.slot >= 0:
            dynamic.append((len(template), e))
            template.append(b"" if e.slot != _LINK else e.replacement.encode(charset))
        else:
            static_changes = static_changes or e.replacement != original
            template.append(e.replacement.encode(charset))
        pos = e.end
    template.append(text[pos:].encode(charset))
    # Unchanged, the pieces must give back the text exactly, or the charset cannot be trusted.
    check = list(template)
    for index, original in originals.items():
        check[index] = original.encode(charset)
    if b"".join(check).decode(charset) != text:
        raise PartSkipped(f"text in {charset} does not survive re-encoding")
    return template, dynamic, originals, static_changes


def _without_overlaps(edits: list[_Edit], macros: list[_Edit]) -> list[_Edit]:
    """All edits in order; a macro that overlaps a structural edit stays as it is."""
    edits.sort(key=lambda e: (e.start, e.end))
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
    kept.sort(key=lambda e: (e.start, e.end))
    return kept


def _macro_edits(text: str) -> list[_Edit]:
    if "{{" not in text:
        return []
    return [_Edit(m.start(), m.end(), _BRACES[m.group(1), m.group(2)]) for m in _MACRO.finditer(text)]


def _link_name(value: str) -> str:
    name = expand_macros(unescape_attribute(value))
    return name.encode()[:MAX_LINK_NAME_BYTES].decode("utf-8", "ignore") or DEFAULT_LINK_NAME


def html_edits(text: str) -> tuple[list[_Edit], int]:
    """Every change tracking may make to an HTML text, in order; and how many links are too long."""
    scan = scan_html(text)
    edits: list[_Edit] = []
    too_long = 0
    for tag in scan.links:
        first: dict[str, Attribute] = {}
        for a in tag.attributes:
            first.setdefault(a.name, a)
            if a.name.startswith("data-msys-"):
                edits.append(_Edit(a.removal_start, a.end))
        href = first.get("href")
        if href is None:
            continue
        track = first.get("data-msys-clicktrack")
        untracked = track is not None and unescape_attribute(track.value).strip() == "0"
        if len(href.value) > MAX_URL_LENGTH:  # could never be tracked: not even decoded
            too_long += not untracked and href.value.lstrip(_HTML_SPACE)[:8].lower().startswith(
                ("http://", "https://"))
            continue
        raw = expand_macros(href.value)
        target = unescape_attribute(raw).strip(_HTML_SPACE)
        if untracked or not is_trackable_target(target):
            if raw != href.value:
                edits.append(_Edit(href.value_start, href.value_end, raw))
            continue
        name = first.get("data-msys-linkname")
        sublink = first.get("data-msys-sublink")
        unsubscribe = first.get("data-msys-unsubscribe")
        link = Link(target,
                    _link_name(name.value) if name else DEFAULT_LINK_NAME,
                    expand_macros(unescape_attribute(sublink.value)).strip() if sublink else "",
                    bool(unsubscribe) and unescape_attribute(unsubscribe.value).strip() == "1")
        edits.append(_Edit(href.value_start, href.value_end, raw, _LINK, link, href.quote))
    if scan.body_open_end is not None:
        edits.append(_Edit(scan.body_open_end, scan.body_open_end, slot=_INITIAL))
    close = scan.body_close if scan.body_close is not None else len(text)
    edits.append(_Edit(close, close, slot=_OPEN))
    return _without_overlaps(edits, _macro_edits(text)), too_long


def text_edits(text: str) -> tuple[list[_Edit], int]:
    """Every change tracking may make to a plain text (URLs, ``[[...]]`` suffixes); and how many
    URLs are too long to track."""
    edits: list[_Edit] = []
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
            edits.append(_Edit(suffix_start, end))
        if len(url) > MAX_URL_LENGTH:  # could never be tracked; its text stays as it is
            too_long += attrs.get("clicktrack") != "0"
            continue
        if end == suffix_start:
            url = _trim_url(url)
        start = m.start()
        raw = expand_macros(url)
        if attrs.get("clicktrack") == "0" or not is_trackable_target(raw):
            if raw != url:
                edits.append(_Edit(start, start + len(url), raw))
            continue
        link = Link(raw, DEFAULT_LINK_NAME, attrs.get("sublink", "").strip(),
                    attrs.get("unsubscribe") == "1")
        edits.append(_Edit(start, start + len(url), raw, _LINK, link, quote=None))
    return _without_overlaps(edits, _macro_edits(text)), too_long


# -- MIME ---------------------------------------------------------------------------------------


@dataclass
class HeaderField:
    name: str  # lower-cased
    value: str  # unfolded, bytes as latin-1
    start: int
    end: int  # after its CRLF


def parse_header_block(data: bytes, start: int, end: int,
                       partial: list[HeaderField] | None = None) -> tuple[list[HeaderField], int]:
    """
    The fields of the header block at ``start``, and where the body starts.

    Raises ``MimeError`` at a line that is not a field; ``partial``, if
    given, then holds the fields before it.
    """
    fields: list[HeaderField] = [] if partial is None else partial
    folded: list[tuple[HeaderField, int]] = []  # fields with continuation lines, value start
    value_start = pos = start
    try:
        while pos < end:
            eol = data.find(b"\r\n", pos, end)
            line_end = eol + 2 if eol >= 0 else end
            line = data[pos:eol if eol >= 0 else end]
            if not line:
                return fields, line_end
            if line[:1] in (b" ", b"\t"):
                if not fields:
                    raise MimeError("a header block starts with a continuation line")
                f = fields[-1]
                if not folded or folded[-1][0] is not f:
                    folded.append((f, value_start))
                f.end = line_end
            else:
                colon = line.find(b":")
                if colon <= 0 or not re.fullmatch(rb"[!-9;-~]+", line[:colon].rstrip(b" \t")):
                    raise MimeError(f"not a header field: {line[:40]!r}")
                value_start = pos + colon + 1
                fields.append(HeaderField(line[:colon].rstrip(b" \t").decode("ascii").lower(),
                                          line[colon + 1:].decode("latin-1"), pos, line_end))
            pos = line_end
        return fields, end
    finally:
        # Unfolded once at the end: appending line by line costs quadratic time.
        for f, value_start in folded:
            f.value = data[value_start:f.end].replace(b"\r\n", b"").decode("latin-1")


@dataclass
class _Candidate:
    kind: str
    start: int
    body_start: int
    end: int
    fields: list[HeaderField]
    info: Message


def _content_info(fields: list[HeaderField], default_type: str) -> Message:
    info = Message()
    info.set_default_type(default_type)
    for f in fields:
        if f.name in ("content-type", "content-disposition", "content-transfer-encoding"):
            info[f.name] = " ".join(f.value.split())
    return info


def _delimiters(data: bytes, start: int, end: int, boundary: bytes) -> list[re.Match[bytes]]:
    pattern = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    return list(pattern.finditer(data, start, end))


def find_parts(data: bytes, start: int = 0) -> tuple[list[_Candidate], list[str]]:
    """The first text/html and text/plain parts that are not attachments, in message order."""
    found: dict[str, _Candidate] = {}
    notes: list[str] = []
    _walk(data, start, len(data), 0, "text/plain", found, notes)
    return sorted(found.values(), key=lambda c: c.start), notes


def _walk(data: bytes, start: int, end: int, depth: int, default_type: str,
          found: dict[str, _Candidate], notes: list[str]) -> None:
    if len(found) == 2:
        return
    fields, body_start = parse_header_block(data, start, end)
    info = _content_info(fields, default_type)
    ctype = info.get_content_type()
    maintype, subtype = ctype.split("/", 1)
    if maintype == "multipart":
        if subtype in ("signed", "encrypted"):
            notes.append(f"a {ctype} entity is never changed (it would break the signature)")
            return
        if depth >= MAX_DEPTH:
            raise MimeError(f"multipart nested more than {MAX_DEPTH} levels deep")
        boundary = info.get_boundary()
        if not boundary:
            raise MimeError(f"{ctype} without a boundary")
        try:
            b = boundary.encode("ascii")
        except UnicodeError:
            raise MimeError(f"{ctype} with a non-ASCII boundary") from None
        delimiters = _delimiters(data, body_start, end, b)
        if not delimiters:
            raise MimeError(f"{ctype} boundary {boundary!r} never appears")
        closing = next((i for i, m in enumerate(delimiters) if m.group(1)), None)
        if closing is None:
            raise MimeError(f"{ctype} boundary {boundary!r} is never closed")
        child_default = "message/rfc822" if subtype == "digest" else "text/plain"
        for m, following in zip(delimiters[:closing], delimiters[1:closing + 1], strict=True):
            part_start = min(m.end() + 1, end)
            part_end = max(part_start, following.start() - 2)
            _walk(data, part_start, part_end, depth + 1, child_default, found, notes)
        return
    if maintype != "text" or subtype not in ("html", "plain"):
        return  # message/rfc822 and every other type are not looked into
    if info.get_content_disposition() == "attachment":
        return
    kind = "html" if subtype == "html" else "text"
    if kind not in found:
        found[kind] = _Candidate(kind, start, body_start, end, fields, info)


_CTE_FIELD = b"Content-Transfer-Encoding: quoted-printable\r\n"


def _qp_header(data: bytes, c: _Candidate, top_level: bool) -> bytes:
    """The part's header block, saying quoted-printable (and MIME, if it did not)."""
    out = []
    for f in c.fields:
        if f.name == "content-transfer-encoding":
            continue
        out.append(data[f.start:f.end])
    names = {f.name for f in c.fields}
    if "content-type" not in names:
        out.append(b"Content-Type: text/plain; charset=us-ascii\r\n")
    if top_level and "mime-version" not in names:
        out.append(b"MIME-Version: 1.0\r\n")
    out.append(_CTE_FIELD)
    out.append(data[c.fields[-1].end if c.fields else c.start:c.body_start])
    return b"".join(out)


def _decode_body(body: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary"):
        return body
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        try:
            return binascii.a2b_base64(re.sub(rb"[\t\r\n ]+", b"", body), strict_mode=True)
        except binascii.Error as e:
            raise PartSkipped(f"its base64 does not decode ({e})") from None
    raise PartSkipped(f"unknown Content-Transfer-Encoding {cte!r}")


def _charset(info: Message) -> str:
    charset = info.get_content_charset() or "us-ascii"
    try:
        codec = codecs.lookup(charset)
    except LookupError:
        raise PartSkipped(f"unknown charset {charset!r}") from None
    probe = '<a href="https://x/?a=1&b=2#c">{}</a>[]\r\n'
    try:
        if probe.encode(codec.name) != probe.encode("ascii"):
            raise PartSkipped(f"charset {charset!r} is not ASCII-compatible")
    except UnicodeError:
        raise PartSkipped(f"charset {charset!r} is not ASCII-compatible") from None
    return codec.name


def prepare_part(data: bytes, c: _Candidate, top_level: bool) -> PreparedPart:
    cte = (c.info.get("content-transfer-encoding") or "7bit").strip().lower()
    body = data[c.body_start:c.end]
    if len(body) > MAX_PART_BYTES:
        raise PartSkipped(f"it is larger than {MAX_PART_BYTES} bytes")
    raw = _decode_body(body, cte)
    charset = _charset(c.info)
    try:
        text = raw.decode(charset)
    except UnicodeDecodeError:
        raise PartSkipped(f"it is not valid {c.info.get_content_charset() or 'us-ascii'}") from None
    if "\x00" in text:
        raise PartSkipped("it contains NUL characters")
    edits, too_long = html_edits(text) if c.kind == "html" else text_edits(text)
    template, dynamic, originals, static_changes = _compile_text(text, charset, edits)
    links: dict[Link, Link] = {}
    for _, e in dynamic:
        if e.link is not None:
            known = links.get(e.link)
            if known is None:
                link = e.link
                known = links[link] = Link(link.target, link.name, link.sublink, link.unsubscribe,
                                           len(links), click_suffix(link.name, link.target,
                                                                    link.unsubscribe))
            e.link = known
    crlf = raw.count(b"\r\n")
    return PreparedPart(
        kind=c.kind, start=c.start, body_start=c.body_start, end=c.end,
        header=data[c.start:c.body_start], qp_header=_qp_header(data, c, top_level),
        cte=cte, charset=charset, template=template, dynamic=dynamic, links=list(links.values()),
        originals=originals,
        too_long=too_long,
        static_changes=static_changes,
        has_links=any(e.slot == _LINK for _, e in dynamic),
        has_open_pixel=any(e.slot == _OPEN for _, e in dynamic),
        body_ends_with_crlf=body.endswith(b"\r\n"),
        bare_newlines=raw.count(b"\r") != crlf or raw.count(b"\n") != crlf,
        has_crlf=crlf > 0,
    )


# -- re-encoding ------------------------------------------------------------------------------


def encode_qp(raw: bytes, bare_newlines: bool | None = None, has_crlf: bool | None = None) -> bytes:
    """
    Quoted-printable with CRLF line ends only; bare CR and LF in the text become =0D/=0A.

    A caller that knows whether ``raw`` has bare newlines or any CRLF says so,
    which saves scanning it.
    """
    if bare_newlines is None or has_crlf is None:
        crlf = raw.count(b"\r\n")
        bare_newlines = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        has_crlf = crlf > 0
    if not bare_newlines:
        out = binascii.b2a_qp(raw, quotetabs=False, istext=True)
        if not has_crlf:
            out = out.replace(b"\n", b"\r\n")  # only soft line breaks here, written as LF
        return out
    lines = []
    for line in raw.split(b"\r\n"):
        enc = binascii.b2a_qp(line, quotetabs=False, istext=False)
        lines.append(enc.replace(b"=\r\n", b"=\n").replace(b"=\n", b"=\r\n"))
    return b"\r\n".join(lines)


def encode_base64(raw: bytes) -> bytes:
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


def _fits_7bit(raw: bytes) -> bool:
    return raw.isascii() and max(map(len, raw.split(b"\r\n"))) <= MAX_LINE


# -- the prepared message ------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Whose copy: the fields every token of the copy carries."""

    message_id: str
    transmission_id: str
    rcpt_to: str


@dataclass
class Prepared:
    """A message compiled for per-recipient rendering."""

    data: bytes  # the message without its X-MSYS-API header
    parts: list[PreparedPart]
    skipped: list[str]
    dkim_signed: bool = False
    dkim_signs_msys_api: bool = False
    had_msys_api: bool = False

    @functools.cached_property
    def size(self) -> int:
        """About how many bytes of memory this holds (for the copy cache's bound)."""
        return footprint(self)

    def changes_body(self, tracking: Tracking) -> bool:
        return tracking.enabled and any(p.changes(tracking) for p in self.parts)

    def dkim_broken(self, tracking: Tracking) -> bool:
        """
        Whether this copy no longer matches a DKIM signature it arrived with.

        The copy may still carry a valid signature: the appliance's own
        (``CopyMaker.resigns``), which the caller weighs.
        """
        if not self.dkim_signed:
            return False
        return self.changes_body(tracking) or (self.had_msys_api and self.dkim_signs_msys_api)

    def tracking_notes(self, codec: LinkCodec, identity: Identity, tracking: Tracking) -> list[str]:
        """
        Why one recipient's copy is tracked less than its settings ask, if it is.

        The message's skipped parts, and the links and pixels whose URLs would
        be over 4096 characters with this recipient's campaign, tags and
        metadata (SPEC §6: such a link is never produced).
        """
        if not tracking.enabled:
            return []
        notes = list(self.skipped)
        if not self.changes_body(tracking) and not any(p.too_long for p in self.parts):
            return notes
        links = _LinkRenderer(codec, identity, tracking)
        if tracking.click_tracking:
            untracked = sum(part.too_long for part in self.parts) + sum(
                links.click_too_long(link) for part in self.parts for link in part.links)
            if untracked:
                notes.append(f"{untracked} link{'s' if untracked > 1 else ''} left untracked: "
                             f"the tracked URL would be over {MAX_URL_LENGTH} characters")
        if tracking.open_tracking:
            slots = {e.slot for part in self.parts for _, e in part.dynamic
                     if e.slot == _OPEN or e.slot == _INITIAL and tracking.initial_open}
            left_out = [slot for slot in sorted(slots) if links.open_too_long(slot)]
            if left_out:
                names = " and ".join("open" if slot == _OPEN else "initial_open" for slot in left_out)
                notes.append(f"{names} pixel left out: its URL would be over "
                             f"{MAX_URL_LENGTH} characters")
        return notes

    def render(self, codec: LinkCodec, identity: Identity, tracking: Tracking,
               changes: list[Change] | None = None) -> bytes:
        """One recipient's copy; ``changes`` (if given) receives every difference made."""
        if not self.changes_body(tracking):
            return self.data
        links = _LinkRenderer(codec, identity, tracking)
        out: list[bytes] = []
        pos = 0
        for part in self.parts:
            out.append(self.data[pos:part.start])
            if part.changes(tracking):
                out.append(self._render_part(part, links, tracking, changes))
            else:
                out.append(self.data[part.start:part.end])
            pos = part.end
        out.append(self.data[pos:])
        return b"".join(out)

    @staticmethod
    def _render_part(part: PreparedPart, links: _LinkRenderer, tracking: Tracking,
                     changes: list[Change] | None) -> bytes:
        pieces = list(part.template)
        urls: list[str | None] = [None] * len(part.links)
        done = [False] * len(part.links)
        for index, edit in part.dynamic:
            link = edit.link
            if link is not None:
                if tracking.click_tracking:
                    if not done[link.index]:
                        urls[link.index], done[link.index] = links.click(link), True
                    url = urls[link.index]
                    if url is not None:
                        pieces[index] = (_attribute_safe(url) if edit.quote is not None else url).encode()
            elif tracking.open_tracking and (edit.slot == _OPEN or tracking.initial_open):
                url = links.open(edit.slot)
                if url is not None:  # else left out: tracking_notes says so
                    pixel = OPEN_PIXEL if edit.slot == _OPEN else INITIAL_PIXEL
                    pieces[index] = pixel.format(url).encode()
        raw = b"".join(pieces)
        if changes is not None:
            _record(part, pieces, changes)
        header = part.header
        if part.cte == "base64":
            body = encode_base64(raw)
            if not part.body_ends_with_crlf:
                body = body[:-2]
        elif part.cte == "quoted-printable":
            body = encode_qp(raw, part.bare_newlines, part.has_crlf)
        elif _fits_7bit(raw):
            body = raw
        else:
            body, header = encode_qp(raw, part.bare_newlines, part.has_crlf), part.qp_header
        return header + body


# What the objects of a prepared message cost, beyond the text they hold: CPython's
# object headers, an instance's attribute values, a pointer in its list. Measured
# against tracemalloc in the tests; a link costs several hundred bytes in all.
_POINTER = 8
_INT = sys.getsizeof(1 << 20)
_INSTANCE = sys.getsizeof(Link("")) + 16  # + the values array's header; its slots are counted apiece
_EDIT = _INSTANCE + len(dataclass_fields(_Edit)) * _POINTER + 2 * _INT  # with its start and end
_LINK = _INSTANCE + len(dataclass_fields(Link)) * _POINTER + _INT  # with its index
_TUPLE = sys.getsizeof((0, None))
_DICT_ENTRY = 3 * _POINTER * 3 // 2 + _POINTER  # hash, key, value, at two-thirds load; the index


def footprint(prepared: Prepared) -> int:
    """
    An estimate of the memory a prepared message holds, from what it is made of.

    Its text is the least of it for a message full of links: every link keeps
    its pieces of the template, its edit, its original text and its target.
    """
    size = sys.getsizeof(prepared.data)
    getsizeof = sys.getsizeof
    for part in prepared.parts:
        size += getsizeof(part.header) + getsizeof(part.qp_header)
        size += getsizeof(part.template) + sum(map(getsizeof, part.template))
        size += getsizeof(part.dynamic) + len(part.dynamic) * (_TUPLE + _INT + _EDIT)
        size += sum(getsizeof(e.replacement) for _, e in part.dynamic if e.link is not None)
        size += len(part.originals) * (_DICT_ENTRY + _INT) + sum(map(getsizeof, part.originals.values()))
        size += getsizeof(part.links) + sum(_LINK + getsizeof(link.target) + getsizeof(link.suffix)
                                            for link in part.links)
    return size


def _attribute_safe(url: str) -> str:
    if "&" in url or '"' in url or "'" in url:
        url = url.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&#39;")
    return url


def _record(part: PreparedPart, pieces: list[bytes], changes: list[Change]) -> None:
    pos = 0
    for index, piece in enumerate(pieces):
        text = piece.decode(part.charset)
        original = part.originals.get(index)
        if original is not None and text != original:
            changes.append(Change(part.kind, pos, pos + len(text), original))
        pos += len(text)


class _LinkRenderer:
    """Tokens and URLs for one copy; each distinct link is encoded once."""

    def __init__(self, codec: LinkCodec, identity: Identity, tracking: Tracking) -> None:
        self.codec = codec
        self.identity = identity
        self.tracking = tracking
        common = LinkData("click", tracking.expiry, identity.message_id, identity.transmission_id,
                          identity.rcpt_to, tracking.campaign_id, tracking.tags,
                          tracking.metadata if tracking.include_metadata else None)
        self._common = common
        self._shared_length: int | None = None
        self._encode = codec.click_encoder(common)
        self._scheme, self._domain = tracking.click_tracking_scheme, tracking.tracking_domain

    def click(self, link: Link) -> str | None:
        """The link's tracked URL, or ``None`` if it would be too long to track."""
        url = click_url(self._scheme, self._domain, self._encode(link.suffix), link.sublink)
        return url if len(url) <= MAX_URL_LENGTH else None

    def open(self, slot: int) -> str | None:
        """The pixel's URL, or ``None`` if it would be too long (the pixel is then left out)."""
        t = self.tracking
        url = open_url(t.open_tracking_scheme, t.tracking_domain, self.codec.encode(self._open_data(slot)))
        return url if len(url) <= MAX_URL_LENGTH else None

    def _open_data(self, slot: int) -> LinkData:
        t, i = self.tracking, self.identity
        return LinkData("open" if slot == _OPEN else "initial_open", t.expiry, i.message_id,
                        i.transmission_id, i.rcpt_to, t.campaign_id, t.tags, t.metadata)

    # Whether a URL would be too long, cheaply: a token is the unpadded base64 of a
    # version and key id byte, its body and a 16-byte tag, and its body is the compact
    # JSON of its fields, deflated only where that is shorter. So a URL whose
    # undeflated length fits needs no encoding to know; only the others are encoded.

    def click_too_long(self, link: Link) -> bool:
        if self._shared_length is None:
            self._shared_length = _json_length(self._common.to_array()[:8])
        bound = (len(click_url(self._scheme, self._domain, "", link.sublink))
                 + _token_length(self._shared_length + len(link.suffix)))
        return bound > MAX_URL_LENGTH and self.click(link) is None

    def open_too_long(self, slot: int) -> bool:
        t = self.tracking
        bound = (len(open_url(t.open_tracking_scheme, t.tracking_domain, ""))
                 + _token_length(_json_length(self._open_data(slot).to_array())))
        return bound > MAX_URL_LENGTH and self.open(slot) is None


def _json_length(fields: list[Any]) -> int:
    return len(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())


def _token_length(body: int) -> int:
    """The longest token a body of this many bytes gives (undeflated)."""
    return -(-(2 + body + TAG_BYTES) * 4 // 3)


# -- preparing a message --------------------------------------------------------------------------

_DKIM_H = re.compile(r"(?:^|;)\s*h\s*=\s*([^;]*)")


def strip_header(data: bytes, fields: list[HeaderField], name: str) -> bytes:
    spans = [(f.start, f.end) for f in fields if f.name == name]
    if not spans:
        return data
    out, pos = [], 0
    for start, end in spans:
        out.append(data[pos:start])
        pos = end
    out.append(data[pos:])
    return b"".join(out)


def prepare(message: bytes) -> Prepared:
    """Compile a message (the spooled text) for rendering; never raises for bad input."""
    top: list[HeaderField] = []
    try:
        parse_header_block(message, 0, len(message), top)
    except MimeError as e:
        # What a mail reader would take for the header still loses its X-MSYS-API field.
        data = strip_header(message, top, "x-msys-api")
        return Prepared(data, [], [f"malformed MIME: {e}"], had_msys_api=len(data) != len(message))
    data = strip_header(message, top, "x-msys-api")
    prepared = Prepared(data, [], [], had_msys_api=len(data) != len(message))
    for f in top:
        if f.name == "dkim-signature":
            prepared.dkim_signed = True
            m = _DKIM_H.search(" ".join(f.value.split()))
            if m and "x-msys-api" in {h.strip().lower() for h in m.group(1).split(":")}:
                prepared.dkim_signs_msys_api = True
    try:
        candidates, notes = find_parts(data)
    except MimeError as e:
        prepared.skipped.append(f"malformed MIME: {e}")
        return prepared
    prepared.skipped.extend(notes)
    for c in candidates:
        try:
            prepared.parts.append(prepare_part(data, c, top_level=c.start == 0))
        except PartSkipped as e:
            prepared.skipped.append(f"text/{'html' if c.kind == 'html' else 'plain'} part: {e}")
    return prepared


# What the copy cache holds of a message: its prepared form, which every copy can be made
# from, or, while no recipient of it has needed more, its text without X-MSYS-API.
_PREPARED, _UNTRACKED = "prepared", "untracked"


class _Pending:
    """Work under way in the worker for one cache entry, and the copies waiting for it."""

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []
        self.keep = True  # False once its message is forgotten: the result is not cached

    def wait(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        return d


class CopyMaker:
    """
    The delivery side's renderer: ``render(queued, index)`` gives the copy, or a Deferred of it.

    A copy whose recipient has tracking off is the message without its
    X-MSYS-API header (and DKIM-signed, if configured): nothing is parsed for
    it. A tracked copy is rendered from the message's prepared form. Both are
    kept in memory (least recently used first out, bounded by what they
    really take), so N copies of one message cost one read and at most one
    parse. Whatever reads or parses runs where ``run`` says, a worker thread
    in the appliance: a copy that needs that work comes as a Deferred, and
    one made from what is cached comes at once. ``forget`` drops a message
    when its last copy is final.
    """

    def __init__(self, read: Callable[[Any], bytes], codec: LinkCodec,
                 max_bytes: int = 64 * 1024 * 1024, signer: Signer | None = None,
                 run: Callable[..., defer.Deferred] = threads.deferToThread) -> None:
        self.read = read
        self.codec = codec
        self.max_bytes = max_bytes
        self.signer = signer  # DKIM: each copy is signed after its rewrite
        self.run = run  # where messages are read and parsed: a worker thread
        self._cache: OrderedDict[tuple[str, str], Prepared | bytes] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._bytes = 0

    def __contains__(self, transmission_id: str) -> bool:
        """Whether anything of this message is cached."""
        return (transmission_id, _PREPARED) in self._cache or (transmission_id, _UNTRACKED) in self._cache

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __call__(self, queued: Any, index: int) -> bytes | defer.Deferred:
        tid = queued.envelope.transmission_id
        recipient = queued.envelope.recipients[index]
        tracking = recipient.tracking
        if not tracking.enabled:
            data = self._untracked(tid)
            if data is not None:
                return self._sign(data)
            later = self._later((tid, _UNTRACKED), lambda: _without_msys_api(self.read(queued)))
            return later.addCallback(self._sign)
        prepared = self._hit((tid, _PREPARED))
        if prepared is not None:
            return self._copy(prepared, tid, recipient, tracking)
        return self.prepare_later(queued).addCallback(self._copy, tid, recipient, tracking)

    def prepare_later(self, queued: Any) -> defer.Deferred:
        """
        The message's prepared form, read and parsed in the worker unless cached.

        At injection, for the ``injection`` event; at delivery, for a tracked
        copy after a restart or an eviction. A large message would otherwise
        hold up every connection for as long as it takes to parse.
        """
        tid = queued.envelope.transmission_id
        hit = self._hit((tid, _PREPARED))
        if hit is not None:
            return defer.succeed(hit)
        return self._later((tid, _PREPARED), lambda: self._prepare(tid, self.read(queued)))

    def forget(self, transmission_id: str) -> None:
        """Drop what is held of a message: its last copy is final."""
        for kind in (_PREPARED, _UNTRACKED):
            key = (transmission_id, kind)
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= _cost(old)
            pending = self._pending.get(key)
            if pending is not None:
                pending.keep = False

    def tracking_notes(self, prepared: Prepared, transmission_id: str, recipient: Any) -> list[str]:
        """``Prepared.tracking_notes`` for one recipient of the spool's envelope."""
        return prepared.tracking_notes(self.codec, _identity(transmission_id, recipient),
                                       recipient.tracking)

    def resigns(self, prepared: Prepared) -> bool:
        """Whether the copies of this message get the appliance's own DKIM signature."""
        return self.signer is not None and self.signer.signs(prepared.data)

    # -- making one copy -------------------------------------------------------------------

    def _untracked(self, tid: str) -> bytes | None:
        """The untracked copy from the cache: the prepared form's text serves as well."""
        prepared = self._hit((tid, _PREPARED))
        if prepared is not None:
            assert isinstance(prepared, Prepared)
            return prepared.data
        data = self._hit((tid, _UNTRACKED))
        assert data is None or isinstance(data, bytes)
        return data

    def _copy(self, prepared: Prepared, tid: str, recipient: Any,
              tracking: Tracking) -> bytes | defer.Deferred:
        try:
            copy = prepared.render(self.codec, _identity(tid, recipient), tracking)
        except Exception:
            log.failure("could not render the copy {mid}; delivering it untracked",
                        mid=recipient.message_id)
            copy = prepared.data
        return self._sign(copy)

    def _sign(self, copy: bytes) -> bytes | defer.Deferred:
        # Signing is last: nothing may change the copy after it. A failure here is not
        # caught: the copy is deferred rather than sent without the signature it should have.
        # It runs in the worker: an RSA signature and the body hash cost about as much as
        # the render, and OpenSSL and hashlib let go of the GIL while they work.
        if self.signer is None:
            return copy
        return defer.maybeDeferred(self.run, self.signer.sign, copy)

    @staticmethod
    def _prepare(key: str, message: bytes) -> Prepared:
        try:
            prepared = prepare(message)
        except Exception as e:  # a bug must not cost a message: deliver it as it came
            log.failure("could not prepare message {tid} for tracking", tid=key)
            data = _without_msys_api(message)
            prepared = Prepared(data, [], [f"internal error: {type(e).__name__}"],
                                had_msys_api=len(data) != len(message))
        prepared.size  # noqa: B018 - measured here, in the worker, and kept
        return prepared

    # -- the cache ----------------------------------------------------------------------------

    def _hit(self, key: tuple[str, str]) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def _later(self, key: tuple[str, str], work: Callable[[], Any]) -> defer.Deferred:
        """``work`` in the worker, once for however many copies wait for it; its result cached."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending.wait()
        pending = self._pending[key] = _Pending()
        waiter = pending.wait()  # before the work starts: it may be done at once
        defer.maybeDeferred(self.run, work).addBoth(self._done, key, pending)
        return waiter

    def _done(self, result: Any, key: tuple[str, str], pending: _Pending) -> None:
        del self._pending[key]
        if not isinstance(result, Failure) and pending.keep:
            self._keep(key, result)
        for d in pending.waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _keep(self, key: tuple[str, str], value: Prepared | bytes) -> None:
        if key[1] == _PREPARED:  # its text is in there: the untracked form is not needed any more
            untracked = self._cache.pop((key[0], _UNTRACKED), None)
            if untracked is not None:
                self._bytes -= _cost(untracked)
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= _cost(old)
        self._cache[key] = value
        self._bytes += _cost(value)
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= _cost(evicted)


def _cost(value: Prepared | bytes) -> int:
    return value.size if isinstance(value, Prepared) else sys.getsizeof(value)


def _identity(transmission_id: str, recipient: Any) -> Identity:
    return Identity(recipient.message_id, transmission_id,
                    recipient.event_fields.get("rcpt_to", recipient.address.lower()))


def _without_msys_api(message: bytes) -> bytes:
    """The message without its X-MSYS-API header, as far as its header can be read at all."""
    fields: list[HeaderField] = []
    try:
        parse_header_block(message, 0, len(message), fields)
    except MimeError:
        pass  # the fields before the line that is not one
    except Exception:
        log.failure("could not read the header of a message to remove X-MSYS-API")
    return strip_header(message, fields, "x-msys-api")
