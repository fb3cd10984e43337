"""
Where the links are in an HTML text, by the HTML5 tokenizer's rules.

The scanner only finds positions in the decoded text: tags, attributes,
comments and raw text as a browser would tokenize them, so the rewriter can
change exactly what it means to and never re-serialises the HTML.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.entities import html5 as _HTML5_ENTITIES

from appliance.rewrite.errors import PartSkipped

# How far past ``<a ...>`` its content is read: a link's text is near its start, and
# an <a> never closed must not cost a scan to the end of the text for every link.
ANCHOR_SCAN = 4096
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
_ATTR = re.compile(  # group 1 the name, group 2 the value with its quotes
    r"""[\t\n\f\r /]*+([^\t\n\f\r />][^\t\n\f\r /=>]*+)"""
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+("[^"]*+"|'[^']*+'|[^\t\n\f\r >]*+))?+"""
)
# The usual link tag, <a href="...">, whose tokenizing the general path would only confirm:
# group 1 the white space before href, group 2 the value inside its quotes. Same grammar
# as _TAG and _ATTR for this one form; anything else takes the general path.
def _a_href(value: str) -> str:
    """``<a href="...">`` with ``value`` as the pattern of its value (group 2)."""
    return rf"""<[aA]([\t\n\f\r ]++)[hH][rR][eE][fF][\t\n\f\r ]*+=[\t\n\f\r ]*+"({value})"[\t\n\f\r /]*+>"""


_SIMPLE_LINK = re.compile(_a_href(r"""[^"]*+"""))
# The scanner's step: _BORING, then, where it stops at the commonest link of all, that link:
# an <a href="..."> (the _SIMPLE_LINK form) whose href is its own target (an absolute http(s)
# URL with nothing to decode, expand or strip: group 2) and, where its content is plain text
# up to "</a>" within what ``anchor_text`` reads, that text (group 3). One call finds both
# the stretch to skip and the link, which is most of what a newsletter is made of.
_PLAIN_HREF = r"""(?=[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f"&{])[^\x00-\x20\x7f"&{]++"""


def _compile_scan(plain_links: bool = True) -> re.Pattern[str]:
    """The scanner's step; without ``plain_links`` its link groups never match (for tests)."""
    never = "" if plain_links else "(?!)"
    text = rf"""(?:(?=([^<]{{0,{ANCHOR_SCAN - 4}}}+)</[aA]>))?"""  # group 3
    return re.compile(rf"""{_BORING.pattern}(?:{never}{_a_href(_PLAIN_HREF)}{text})?""")


_COMMENT_END = re.compile(r"--!?>")
_RAW_TEXT = ("script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea")
_RAW_TEXT_END = {name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE) for name in _RAW_TEXT}
HTML_SPACE = "\t\n\f\r "


@dataclass(slots=True)
class Attribute:
    name: str  # lower-cased
    value: str  # raw, entity references not decoded
    value_start: int  # span of the value inside its quotes
    value_end: int
    quote: str  # '"', "'" or ""
    start: int  # the attribute itself: name to end of value
    end: int
    removal_start: int  # where its removal starts (the white space before it, if any)


@dataclass(slots=True)
class LinkTag:
    name: str
    attributes: list[Attribute]
    content_start: int = -1  # an <a>'s: just after its start tag, where its anchor text begins
    # Its only attribute is an href that is its own target: absolute http(s), nothing in it to
    # decode (no "&"), expand ("{") or strip (no white space), quoted with '"'.
    plain: bool = False
    # Where ``plain``: its content up to "</a>", when that is text alone within ANCHOR_SCAN.
    text: str | None = None


@dataclass
class HtmlScan:
    links: list[LinkTag] = field(default_factory=list)
    body_open_end: int | None = None  # just after the first <body ...>
    body_close: int | None = None  # at the last </body>


_SCAN = _compile_scan()


def _attributes(text: str, start: int, end: int, alt: bool = False) -> list[Attribute]:
    """The attributes of a link tag that tracking looks at: ``href``, ``data-msys-*``, and
    ``alt`` if asked (an ``<area>``'s anchor text)."""
    out = []
    n = len(text)
    for m in _ATTR.finditer(text, start, end):
        name = m[1].lower()
        if name != "href" and not name.startswith("data-msys-") and not (alt and name == "alt"):
            continue
        after = m.end()
        value = m[2]
        if value is None:
            value, vstart, vend, quote = "", after, after, ""
        else:
            vstart, vend = m.span(2)
            quote = value[:1]
            if quote == '"' or quote == "'":
                value, vstart, vend = value[1:-1], vstart + 1, vend - 1
            else:
                quote = ""
        following = text[after] if after < n else ">"
        name_start = m.start(1)
        glued = following not in HTML_SPACE and following not in "/>"
        out.append(Attribute(name, value, vstart, vend, quote, name_start, after,
                             name_start if glued else m.start()))
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
    step = _SCAN.match
    simple_link = _SIMPLE_LINK.match
    while True:
        m: re.Match[str] = step(text, pos)  # type: ignore[assignment]  # it always matches
        href = m[2]
        if href is not None:  # a boring stretch, then a plain link
            value_start, value_end = m.span(2)
            pos = m.end()
            scan.links.append(LinkTag("a", [Attribute("href", href, value_start, value_end, '"', m.end(1),
                                                      value_end + 1, m.start(1))], pos, True, m[3]))
            continue
        lt = m.end()
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
        if c == "a" or c == "A":
            simple = simple_link(text, lt)
            if simple is not None:
                pos = simple.end()
                value_start, value_end = simple.span(2)
                name_start = simple.end(1)
                scan.links.append(LinkTag("a", [Attribute("href", simple[2], value_start, value_end, '"',
                                                          name_start, value_end + 1, lt + 2)], pos))
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
        if name == "a":
            scan.links.append(LinkTag(name, _attributes(text, m.start(2), m.end(2)), pos))
        elif name == "area":
            scan.links.append(LinkTag(name, _attributes(text, m.start(2), m.end(2), alt=True)))
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


# -- anchor text -------------------------------------------------------------------------------

ANCHOR_TEXT_MAX = 100  # characters of anchor text a click carries
# Where an <a>'s content ends, as an HTML parser ends it: its end tag, the next <a>
# (which closes it) or </body>.
_PLAIN_END = ("</a>", "</A>")  # an end tag that needs no search for _ANCHOR_END after plain text
_ANCHOR_END = re.compile(r"</?a[\t\n\f\r />]|</body[\t\n\f\r />]", re.IGNORECASE)
# Markup that shows no text: comments (Outlook's conditional ones among them), script
# and style elements, and any tag; each to the end of the text read if it does not end.
_INVISIBLE = re.compile(
    r"<!--.*?(?:--!?>|\Z)|<(script|style)[\t\n\f\r />].*?(?:</\1[^>]*>|\Z)"
    r"|<[/!?]?[A-Za-z][^>]*(?:>|\Z)|<[!?/][^>]*(?:>|\Z)",
    re.IGNORECASE | re.DOTALL)
# Tags that break a line or a box: their text stays apart (``Shop<br>now`` reads "Shop now").
_BREAKING = re.compile(r"<(?:br|p|div|li|td|th|tr|h[1-6]|table|img)(?=[\t\n\f\r />])[^>]*+>?",
                       re.IGNORECASE)
_IMG = re.compile(r"<img(?=[\t\n\f\r />])([^>]*+)", re.IGNORECASE)  # group 1 its attributes


def anchor_text(text: str, start: int) -> str:
    """
    What a reader sees of the link whose content begins at ``start``.

    Its text content (tags and comments dropped, character references
    decoded, white space collapsed), or the first ``alt`` text of its
    images when it has no text; at most ``ANCHOR_TEXT_MAX`` characters. Read from
    the first ``ANCHOR_SCAN`` characters of its content.
    """
    limit = min(len(text), start + ANCHOR_SCAN)
    lt = text.find("<", start, limit)
    # The usual: text, then its end tag, wholly within what is read.
    if 0 <= lt <= limit - len("</a>") and text.startswith(_PLAIN_END, lt):
        return plain_anchor(text[start:lt])
    m = _ANCHOR_END.search(text, start, limit)
    content = text[start:m.start() if m is not None else limit]
    if "<" not in content:
        return plain_anchor(content)
    shown = _INVISIBLE.sub("", _BREAKING.sub(" ", content))
    visible = collapse_text(html.unescape(shown) if "&" in shown else shown)
    if visible:
        return visible
    for img in _IMG.finditer(content):
        for attribute in _attributes(content, img.start(1), img.end(1), alt=True):
            if attribute.name == "alt":
                alt = collapse_text(unescape_attribute(attribute.value))
                if alt:
                    return alt
                break
    return ""


def plain_anchor(content: str) -> str:
    """What a reader sees of a link's content that is text alone (no markup)."""
    return collapse_text(html.unescape(content) if "&" in content else content)


def collapse_text(value: str) -> str:
    """``value`` with its runs of white space made one space, trimmed, cut to ``ANCHOR_TEXT_MAX``."""
    return " ".join(value.split())[:ANCHOR_TEXT_MAX].rstrip()


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
        if ref[-1] == ";":  # the usual &amp;: the whole name, as the longest-prefix search finds it
            entity = _HTML5_ENTITIES.get(ref)
            if entity is not None:
                return entity
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

