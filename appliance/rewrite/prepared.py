"""
The prepared form of a message: its parts compiled once, rendered for each recipient.

``prepare`` does the work that does not depend on the recipient: find the
parts, decode them, find their links and pixel positions, and compile each
into byte pieces in which only the recipient's tracked URLs and pixels are
left open. ``Prepared.render`` fills those in for one copy.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

from appliance.headers import Field, read_header
from appliance.links import MAX_URL_LENGTH, LinkCodec
from appliance.rewrite.audit import Audit
from appliance.rewrite.edits import (
    INITIAL_SLOT,
    LINK_SLOT,
    OPEN_SLOT,
    Edit,
    Link,
    Untracked,
    html_edits,
    text_edits,
)
from appliance.rewrite.errors import MimeError, PartSkipped
from appliance.rewrite.mime import (
    MAX_PART_BYTES,
    Candidate,
    charset_of,
    decode_body,
    find_parts,
    qp_header,
)
from appliance.rewrite.render import (
    INITIAL_PIXEL,
    OPEN_PIXEL,
    TRAP_LINK,
    Change,
    Identity,
    LinkRenderer,
    render_part,
    slot_markup,
)
from appliance.settings import Tracking


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
    dynamic: list[tuple[int, Edit]]
    links: list[Link]  # distinct links, each with its index; rendered once per copy
    originals: dict[int, str]  # template index -> original text, for every edited piece
    too_long: int  # links left untracked because their target is over MAX_URL_LENGTH
    static_changes: bool
    has_links: bool
    has_open_pixel: bool
    body_ends_with_crlf: bool
    bare_newlines: bool  # the decoded text has CR or LF outside CRLF (only base64 can carry them)
    has_crlf: bool
    over_cap: int = 0  # link occurrences left as they are: past the part's cap on tracked links
    char_bytes: int = 1  # what a character of its text costs at most in memory: 1 if all ASCII, else 4

    def changes(self, tracking: Tracking) -> bool:
        return (self.static_changes or (tracking.click_tracking and self.has_links)
                or (tracking.open_tracking and self.has_open_pixel))


# Codecs that encode each character on its own and decode what they encode back to it, so
# the pieces of a text decoded with one of them always join to the text re-encoded; a
# stateful or many-to-one codec (UTF-16's byte order mark, ISO-2022, CP932) needs the check.
_STATELESS = frozenset({"utf-8", "ascii", "iso8859-1"})


def _compile_text(text: str, charset: str, edits: list[Edit]) -> tuple[
        list[bytes], list[tuple[int, Edit]], dict[int, str], bool]:
    """Literal pieces pre-encoded in the part's charset, edits as their own pieces."""
    template: list[bytes] = []
    dynamic: list[tuple[int, Edit]] = []
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
            template.append(b"" if e.slot != LINK_SLOT else e.replacement.encode(charset))
        else:
            static_changes = static_changes or e.replacement != original
            template.append(e.replacement.encode(charset))
        pos = e.end
    template.append(text[pos:].encode(charset))
    if charset in _STATELESS:
        return template, dynamic, originals, static_changes
    # Unchanged, the pieces must give back the text exactly, or the charset cannot be trusted.
    check = list(template)
    for index, original in originals.items():
        check[index] = original.encode(charset)
    if b"".join(check).decode(charset) != text:
        raise PartSkipped(f"text in {charset} does not survive re-encoding")
    return template, dynamic, originals, static_changes


# How many tracked links one part may have (``smtpapi.max_tracked_links``): each costs
# a token per copy, so a part of a million links would cost a million signatures a copy.
MAX_TRACKED_LINKS = 1000


def _cap_links(edits: list[Edit], max_links: int) -> tuple[list[Edit], int]:
    """
    The edits with every tracked link past the first ``max_links`` left as it came.

    Such a link keeps what an untracked link gets (its macros expanded); the
    distinct links before the cap keep their indexes, numbered by first use.
    """
    seen = 0
    over = 0
    out = edits
    for i, e in enumerate(edits):
        if e.slot != LINK_SLOT:
            continue
        seen += 1
        if seen > max_links:
            if out is edits:
                out = list(edits)
            out[i] = Edit(e.start, e.end, e.replacement)
            over += 1
    return out, over


def prepare_part(data: bytes, c: Candidate, top_level: bool,
                 max_links: int = MAX_TRACKED_LINKS, audit: Audit | None = None) -> PreparedPart:
    """
    One part decoded, its edits found and compiled; ``PartSkipped`` when it must stay as it came.

    ``audit``, if given, receives the part's links and what was decided about each.
    """
    cte = (c.info.get("content-transfer-encoding") or "7bit").strip().lower()
    body = data[c.body_start:c.end]
    if len(body) > MAX_PART_BYTES:
        raise PartSkipped(f"it is larger than {MAX_PART_BYTES} bytes")
    raw = decode_body(body, cte)
    charset = charset_of(c.info)
    try:
        text = raw.decode(charset)
    except UnicodeDecodeError:
        raise PartSkipped(f"it is not valid {c.info.get_content_charset() or 'us-ascii'}") from None
    if "\x00" in text:
        raise PartSkipped("it contains NUL characters")
    untracked: list[Untracked] | None = [] if audit is not None else None
    found, too_long = html_edits(text, untracked) if c.kind == "html" else text_edits(text, untracked)
    edits, over_cap = _cap_links(found, max_links)
    template, dynamic, originals, static_changes = _compile_text(text, charset, edits)
    if audit is not None and untracked is not None:
        audit.add(c.kind, text, found, edits, untracked)
    # The edits share one Link object per distinct link, numbered in order of first use.
    links: list[Link] = []
    has_links = has_open_pixel = False
    for _, e in dynamic:
        link = e.link
        if link is not None and link.index == len(links):
            links.append(link)
        has_links = has_links or e.slot == LINK_SLOT
        has_open_pixel = has_open_pixel or e.slot == OPEN_SLOT
    crlf = raw.count(b"\r\n")
    return PreparedPart(
        kind=c.kind, start=c.start, body_start=c.body_start, end=c.end,
        header=data[c.start:c.body_start], qp_header=qp_header(data, c, top_level),
        cte=cte, charset=charset, template=template, dynamic=dynamic, links=links,
        originals=originals,
        too_long=too_long,
        static_changes=static_changes,
        has_links=has_links,
        has_open_pixel=has_open_pixel,
        body_ends_with_crlf=body.endswith(b"\r\n"),
        bare_newlines=raw.count(b"\r") != crlf or raw.count(b"\n") != crlf,
        has_crlf=crlf > 0,
        over_cap=over_cap,
        char_bytes=1 if text.isascii() else 4,
    )


# More than any pixel's markup around its URL, or the quotes added around a link's.
# (The top slot may hold the trap link as well: its URL is the second one counted.)
_SLOT_MARKUP = max(len(OPEN_PIXEL), len(INITIAL_PIXEL) + len(TRAP_LINK))


@dataclass
class Prepared:
    """A message compiled for per-recipient rendering."""

    data: bytes  # the message without its X-MSYS-API header
    parts: list[PreparedPart]
    skipped: list[str]
    dkim_signed: bool = False
    dkim_signs_msys_api: bool = False
    # A sender's signature covers List-Unsubscribe fields the message lacks: adding ours breaks it.
    dkim_signs_list_unsubscribe: bool = False
    had_msys_api: bool = False
    max_links: int = MAX_TRACKED_LINKS  # the cap each part was prepared with

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
        return (self.changes_body(tracking) or (self.had_msys_api and self.dkim_signs_msys_api)
                or (tracking.list_unsubscribe and self.dkim_signs_list_unsubscribe))

    @functools.cached_property
    def pixel_slots(self) -> list[int]:
        """The pixel slots (``OPEN_SLOT``, ``INITIAL_SLOT``) of the message's parts, in order."""
        return sorted({e.slot for part in self.parts for _, e in part.dynamic
                       if e.slot == OPEN_SLOT or e.slot == INITIAL_SLOT})

    @functools.cached_property
    def coarse_size_bound(self) -> int:
        """
        A bound on every recipient's tracked copy that needs no recipient and signs nothing.

        Each slot (a link or a pixel) is counted at its original text plus two
        of the longest URLs ever written (``MAX_URL_LENGTH``) and a pixel's
        markup, every part as if rewritten and re-encoded. Most messages are
        far below the size limit by this bound, so the exact ``size_bound``,
        which prices each link per recipient, runs only for those near it.
        """
        size = len(self.data)
        for part in self.parts:
            n = sum(map(len, part.template))
            n += len(part.dynamic) * (2 * MAX_URL_LENGTH + _SLOT_MARKUP)
            if part.cte == "base64":
                body = -(-n // 3) * 4
                body += -(-body // 76) * 2
            else:
                body = 3 * n + 3 * (n // 75 + 1)
            size += max(part.end - part.start, max(len(part.header), len(part.qp_header)) + body)
        return size

    def over_size(self, codec: LinkCodec, identity: Identity, tracking: Tracking, max_size: int) -> bool:
        """Whether this recipient's tracked copy could be over ``max_size`` (see ``size_bound``)."""
        return self.coarse_size_bound > max_size and self.size_bound(codec, identity, tracking) > max_size

    def size_bound(self, codec: LinkCodec, identity: Identity, tracking: Tracking) -> int:
        """
        The most bytes one recipient's copy can have, without rendering it.

        Every piece is counted; each link's URL by its longest (undeflated)
        token, so no link is signed for it but one that could be too long to
        track; and the part's encoding is bounded (base64 exactly,
        quoted-printable at three bytes a byte with its soft line breaks).
        Injection and delivery both decide with it whether a copy is too
        large to track, so the injection event says what delivery does.
        """
        if not self.changes_body(tracking):
            return len(self.data)
        links = LinkRenderer(codec, identity, tracking)
        size = len(self.data)
        for part in self.parts:
            if not part.changes(tracking):
                continue
            size -= part.end - part.start
            n = sum(map(len, part.template))
            urls: dict[int, int] = {}
            for index, edit in part.dynamic:
                link = edit.link
                if link is not None:
                    if tracking.click_tracking:
                        key = link.index if edit.quote is None else ~link.index
                        length = urls.get(key)
                        if length is None:
                            length = urls[key] = links.click_length_bound(link, edit.quote is not None)
                        if length >= 0:
                            n += length - len(part.template[index])
                else:
                    n += len(slot_markup(edit.slot, part.links, links, tracking).encode())
            if part.cte == "base64":
                body = -(-n // 3) * 4
                body += -(-body // 76) * 2
            else:
                body = 3 * n + 3 * (n // 75 + 1)
            size += max(len(part.header), len(part.qp_header)) + body
        return size

    def tracking_notes(self, codec: LinkCodec, identity: Identity, tracking: Tracking,
                       max_size: int | None = None) -> list[str]:
        """
        Why one recipient's copy is tracked less than its settings ask, if it is.

        The message's skipped parts, and the links and pixels whose URLs would
        be over 4096 characters with this recipient's campaign, tags and
        metadata (SPEC §6: such a link is never produced). Given ``max_size``,
        a copy that could be larger tracked is sent untracked, and says so.
        """
        if not tracking.enabled:
            return []
        if max_size is not None and self.over_size(codec, identity, tracking, max_size):
            return [f"copy not tracked: tracked, it could be over the {max_size}-byte "
                    "message size limit"]
        notes = list(self.skipped)
        over_cap = sum(p.over_cap for p in self.parts) if tracking.click_tracking else 0
        if over_cap:
            notes.append(f"{over_cap} link{'s' if over_cap > 1 else ''} left untracked: "
                         f"a part may have at most {self.max_links} tracked links")
        if not self.changes_body(tracking) and not any(p.too_long for p in self.parts):
            return notes
        links = LinkRenderer(codec, identity, tracking)
        if tracking.click_tracking:
            untracked = sum(part.too_long + links.clicks_too_long(part.links) for part in self.parts)
            if untracked:
                notes.append(f"{untracked} link{'s' if untracked > 1 else ''} left untracked: "
                             f"the tracked URL would be over {MAX_URL_LENGTH} characters")
        if tracking.open_tracking:
            slots = [slot for slot in self.pixel_slots if slot == OPEN_SLOT or tracking.initial_open]
            left_out = [slot for slot in slots if links.open_too_long(slot)]
            if left_out:
                names = " and ".join("open" if slot == OPEN_SLOT else "initial_open" for slot in left_out)
                notes.append(f"{names} pixel left out: its URL would be over "
                             f"{MAX_URL_LENGTH} characters")
        return notes

    def render(self, codec: LinkCodec, identity: Identity, tracking: Tracking,
               changes: list[Change] | None = None) -> bytes:
        """One recipient's copy; ``changes`` (if given) receives every difference made."""
        if not self.changes_body(tracking):
            return self.data
        links = LinkRenderer(codec, identity, tracking)
        out: list[bytes] = []
        pos = 0
        for part in self.parts:
            out.append(self.data[pos:part.start])
            if part.changes(tracking):
                out.append(render_part(part, links, tracking, changes))
            else:
                out.append(self.data[part.start:part.end])
            pos = part.end
        out.append(self.data[pos:])
        return b"".join(out)


# What the objects of a prepared message cost, beyond the text they hold: CPython's
# object headers, an instance's attribute values, a pointer in its list. Measured
# against tracemalloc in the tests; a link costs several hundred bytes in all.
_POINTER = 8
_INT = sys.getsizeof(1 << 20)
_EDIT_COST = sys.getsizeof(Edit(0, 0)) + 2 * _INT  # slotted: its size counts its fields; + start, end
_LINK_COST = sys.getsizeof(Link("")) + _INT  # slotted, as an edit; + its index
_TUPLE = sys.getsizeof((0, None))
_DICT_ENTRY = 3 * _POINTER * 3 // 2 + _POINTER  # hash, key, value, at two-thirds load; the index
# A bytes object takes this and its length; an ASCII str likewise. A part whose text is
# not all ASCII has its pieces counted at four bytes a character: a bound, not a guess.
_BYTES = sys.getsizeof(b"")
_STR = sys.getsizeof("")


def footprint(prepared: Prepared) -> int:
    """
    An estimate of the memory a prepared message holds, from what it is made of.

    Its text is the least of it for a message full of links: every link keeps
    its pieces of the template, its edit, its original text and its target.
    Lengths, not ``sys.getsizeof``, for the many small pieces: this runs for
    every message, and a call per piece cost a tenth of preparing one.
    """
    getsizeof = sys.getsizeof
    size = getsizeof(prepared.data)
    for part in prepared.parts:
        size += getsizeof(part.header) + getsizeof(part.qp_header)
        size += getsizeof(part.template) + len(part.template) * _BYTES + sum(map(len, part.template))
        size += getsizeof(part.dynamic) + len(part.dynamic) * (_TUPLE + _INT + _EDIT_COST)
        # A link's replacement is its target's own string unless decoding changed the text.
        replaced = [e.replacement for _, e in part.dynamic
                    if e.link is not None and e.replacement is not e.link.target]
        wide = part.char_bytes
        size += len(replaced) * _STR + sum(map(len, replaced)) * wide
        size += (len(part.originals) * (_DICT_ENTRY + _INT + _STR)
                 + sum(map(len, part.originals.values())) * wide)
        size += getsizeof(part.links) + len(part.links) * (_LINK_COST + 2 * _STR + _BYTES) + sum(
            (len(link.target) + len(link.anchor)) * wide + len(link.suffix) for link in part.links)
    return size


# -- preparing a message --------------------------------------------------------------------------

_UNSUBSCRIBE_FIELDS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
_DKIM_H = re.compile(r"(?:^|;)\s*h\s*=\s*([^;]*)")


def strip_header(data: bytes, fields: list[Field], name: str) -> bytes:
    """``data`` without the fields of one (lower-case) name, every other byte kept."""
    spans = [(f.start, f.end) for f in fields if f.name == name]
    if not spans:
        return data
    out, pos = [], 0
    for start, end in spans:
        out.append(data[pos:start])
        pos = end
    out.append(data[pos:])
    return b"".join(out)


def without_msys_api(message: bytes) -> bytes:
    """The message without its X-MSYS-API header, as far as its header can be read at all."""
    return strip_header(message, read_header(message).fields, "x-msys-api")


def prepare(message: bytes, max_links: int = MAX_TRACKED_LINKS, audit: Audit | None = None) -> Prepared:
    """
    Compile a message (the spooled text) for rendering; never raises for bad input.

    ``max_links``: how many tracked links each part may have; the rest stay as they came.
    ``audit``: filled with every part and link and what was decided (the preview's).
    """
    top = read_header(message)
    # Even when a line of it is not a field, what a mail reader would take for the header
    # (the fields before that line) loses its X-MSYS-API field.
    data = strip_header(message, top.fields, "x-msys-api")
    if top.error:
        return Prepared(data, [], [f"malformed MIME: {top.error}"], had_msys_api=len(data) != len(message))
    prepared = Prepared(data, [], [], had_msys_api=len(data) != len(message), max_links=max_links)
    own_unsubscribe = any(f.name in _UNSUBSCRIBE_FIELDS for f in top.fields)
    for f in top.fields:
        if f.name == "dkim-signature":
            prepared.dkim_signed = True
            m = _DKIM_H.search(" ".join(f.value.decode("latin-1").split()))
            signed = {h.strip().lower() for h in m.group(1).split(":")} if m else set()
            if "x-msys-api" in signed:
                prepared.dkim_signs_msys_api = True
            if signed & _UNSUBSCRIBE_FIELDS and not own_unsubscribe:
                prepared.dkim_signs_list_unsubscribe = True
    try:
        candidates, notes = find_parts(data)
    except MimeError as e:
        prepared.skipped.append(f"malformed MIME: {e}")
        return prepared
    prepared.skipped.extend(notes)
    for c in candidates:
        try:
            prepared.parts.append(prepare_part(data, c, top_level=c.start == 0, max_links=max_links,
                                               audit=audit))
        except PartSkipped as e:
            prepared.skipped.append(f"text/{'html' if c.kind == 'html' else 'plain'} part: {e}")
            if audit is not None:
                audit.skip(c.kind, str(e))
    return prepared
