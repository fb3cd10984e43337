"""
One recipient's copy from the prepared form: tokens, URLs and pixels filled in.

Rendering never parses anything: it fills the open slots of each compiled
part with this recipient's tracked URLs and pixels, joins the pieces and
re-encodes the part in its transfer encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from appliance.links import (
    MAX_URL_LENGTH,
    SHARED_FIELDS,
    TAG_BYTES,
    LinkCodec,
    LinkData,
    click_url,
    open_url,
)
from appliance.rewrite.edits import INITIAL_SLOT, OPEN_SLOT, Link
from appliance.rewrite.mime import encode_base64, encode_qp, fits_7bit
from appliance.settings import Tracking

if TYPE_CHECKING:
    from appliance.rewrite.prepared import PreparedPart


@dataclass(frozen=True)
class Identity:
    """
    Whose copy, and when it is made (Unix seconds): the fields every token of the copy carries.

    ``trap_link``: the HTML parts whose links are tracked get a hidden link first
    (``engagement_tracker.bot_trap_link``), which only a machine follows.
    """

    message_id: str
    transmission_id: str
    rcpt_to: str
    issued: int = 0
    trap_link: bool = False


@dataclass
class Change:
    """One difference between a copy's decoded part text and the original (for audits and tests)."""

    part: str  # "html" or "text"
    start: int  # in the copy's decoded text
    end: int
    original: str


OPEN_PIXEL = '<img border="0" width="1" height="1" alt="" src="{}">'
# Hidden from readers and screen readers alike (mso-hide for Outlook, which ignores
# display:none); a scanner that follows every href follows it. Its hit is a machine's click.
TRAP_LINK = ('<div style="display:none !important;max-height:0;overflow:hidden;mso-hide:all" '
             'aria-hidden="true"><a href="{}" tabindex="-1"></a></div>')
TRAP_LINK_NAME = "trap"
INITIAL_PIXEL = ('<div style="display:none !important;max-height:0;overflow:hidden;mso-hide:all">'
                 '<img border="0" width="1" height="1" alt="" src="{}"></div>')


def attribute_safe(url: str) -> str:
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


class LinkRenderer:
    """Tokens and URLs for one copy; each distinct link is encoded once."""

    def __init__(self, codec: LinkCodec, identity: Identity, tracking: Tracking) -> None:
        self.codec = codec
        self.identity = identity
        self.tracking = tracking
        common = LinkData("click", tracking.expiry, identity.message_id, identity.transmission_id,
                          identity.rcpt_to, tracking.campaign_id, tracking.tags,
                          tracking.metadata if tracking.include_metadata else None,
                          issued=identity.issued)
        self._common = common
        self._shared_length: int | None = None
        # Made at the first click: a renderer that only checks lengths (``tracking_notes``,
        # at injection) never needs the recipient's signing state.
        self._encode: Callable[[bytes], bytes] | None = None
        self._scheme, self._domain = tracking.click_tracking_scheme, tracking.tracking_domain
        self._heads: dict[str, str] = {}  # sublink -> the URL before the token, built once
        # (sublink, quoted) -> that head as the copy's bytes, and its length unquoted
        self._pieces: dict[tuple[str, bool], tuple[bytes, int]] = {}

    def _head(self, sublink: str) -> str:
        """The tracked URL of a link with this sublink, up to its token."""
        head = self._heads.get(sublink)
        if head is None:
            head = self._heads[sublink] = click_url(self._scheme, self._domain, "", sublink)
        return head

    def click(self, link: Link) -> str | None:
        """The link's tracked URL, or ``None`` if it would be too long to track."""
        piece = self.click_piece(link, False)
        return piece.decode() if piece is not None else None

    def click_piece(self, link: Link, quoted: bool) -> bytes | None:
        """
        The link's tracked URL as it goes into the copy, or ``None`` if it would be too long.

        ``quoted``: as an HTML attribute's value. Only the head can hold what
        needs escaping there; a token is URL-safe base64.
        """
        head = self._pieces.get((link.sublink, quoted))
        if head is None:
            text = self._head(link.sublink)
            head = self._pieces[link.sublink, quoted] = (
                (attribute_safe(text) if quoted else text).encode(), len(text))
        encode = self._encode
        if encode is None:
            encode = self._encode = self.codec.click_encoder(self._common)
        token = encode(link.suffix)
        return head[0] + token if head[1] + len(token) <= MAX_URL_LENGTH else None

    def trap(self, decoy: Link) -> str | None:
        """The hidden link's URL, leading where ``decoy`` (a link of the part) leads; ``None`` if too long."""
        data = self._common._replace(link_name=TRAP_LINK_NAME, target=decoy.target, trap=True)
        url = click_url(self._scheme, self._domain, self.codec.encode(data))
        return url if len(url) <= MAX_URL_LENGTH else None

    def open(self, slot: int) -> str | None:
        """The pixel's URL, or ``None`` if it would be too long (the pixel is then left out)."""
        t = self.tracking
        url = open_url(t.open_tracking_scheme, t.tracking_domain, self.codec.encode(self._open_data(slot)))
        return url if len(url) <= MAX_URL_LENGTH else None

    def _open_data(self, slot: int) -> LinkData:
        t, i = self.tracking, self.identity
        return LinkData("open" if slot == OPEN_SLOT else "initial_open", t.expiry, i.message_id,
                        i.transmission_id, i.rcpt_to, t.campaign_id, t.tags,
                        t.metadata if t.metadata_in_links else None, issued=i.issued)

    # Whether a URL would be too long, cheaply: a token is the unpadded base64 of a
    # version and key id byte, a 16-byte tag and its encrypted body, as long as the
    # body, which is the compact JSON of its fields, deflated only where that is
    # shorter. So a URL whose undeflated length fits needs no encoding to know; only
    # the others are encoded.

    def click_too_long(self, link: Link) -> bool:
        if self._shared_length is None:
            self._shared_length = _json_length(_longest_issued(self._common).to_array()[:SHARED_FIELDS])
        bound = len(self._head(link.sublink)) + _token_length(
            self._shared_length + len(link.suffix))
        return bound > MAX_URL_LENGTH and self.click(link) is None

    def clicks_too_long(self, links: list[Link]) -> int:
        """
        How many of ``links`` would be too long to track: ``click_too_long`` of each.

        Asked only of each link when the longest head with the longest suffix
        could be too long; mostly none is, and the lengths of all answer at once.
        """
        if not links:
            return 0
        if self._shared_length is None:
            self._shared_length = _json_length(_longest_issued(self._common).to_array()[:SHARED_FIELDS])
        head = max(len(self._head(sublink)) for sublink in set(map(_sublink, links)))
        if head + _token_length(self._shared_length + max(map(len, map(_suffix, links)))) <= MAX_URL_LENGTH:
            return 0
        return sum(map(self.click_too_long, links))

    def click_length_bound(self, link: Link, quoted: bool) -> int:
        """
        The most characters the link's tracked URL can have, or -1 if it is too long to track.

        Only a URL that could be too long is encoded; the others are bounded
        by their undeflated length, so a bound for every link costs no HMAC.
        """
        if self._shared_length is None:
            self._shared_length = _json_length(_longest_issued(self._common).to_array()[:SHARED_FIELDS])
        head = self._head(link.sublink)
        token = _token_length(self._shared_length + len(link.suffix))
        if len(head) + token > MAX_URL_LENGTH:
            url = self.click(link)
            if url is None:
                return -1
            return len(attribute_safe(url) if quoted else url)
        return len(attribute_safe(head) if quoted else head) + token

    def open_too_long(self, slot: int) -> bool:
        t = self.tracking
        bound = (len(open_url(t.open_tracking_scheme, t.tracking_domain, ""))
                 + _token_length(_json_length(_longest_issued(self._open_data(slot)).to_array())))
        return bound > MAX_URL_LENGTH and self.open(slot) is None


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # as the tokens' JSON
_sublink, _suffix = attrgetter("sublink"), attrgetter("suffix")


def _longest_issued(data: LinkData) -> LinkData:
    """``data`` with a send time as long as any until 2286: a length checked at injection holds."""
    return data._replace(issued=max(data.issued, 9_999_999_999))


def _json_length(fields: list[Any]) -> int:
    return len(_ENCODER.encode(fields).encode())


def _token_length(body: int) -> int:
    """The longest token a body of this many bytes gives (undeflated)."""
    return -(-(2 + body + TAG_BYTES) * 4 // 3)


def slot_markup(slot: int, part_links: list[Link], links: LinkRenderer, tracking: Tracking) -> str:
    """
    What a pixel slot of one copy holds: its pixel, and at the top the trap link
    where the copy has one and the part tracked links. A pixel or link whose URL
    would be too long is left out (``tracking_notes`` says so of pixels).
    """
    markup = ""
    if (slot == INITIAL_SLOT and links.identity.trap_link and tracking.click_tracking
            and part_links):
        url = links.trap(part_links[0])
        if url is not None:
            markup = TRAP_LINK.format(attribute_safe(url))
    if tracking.open_tracking and (slot == OPEN_SLOT or tracking.initial_open):
        url = links.open(slot)
        if url is not None:
            markup += (OPEN_PIXEL if slot == OPEN_SLOT else INITIAL_PIXEL).format(url)
    return markup


def render_part(part: PreparedPart, links: LinkRenderer, tracking: Tracking,
                changes: list[Change] | None) -> bytes:
    """One part of one recipient's copy: the template filled in, joined and re-encoded."""
    pieces = list(part.template)
    # Each distinct link once. Every link of a part is written alike: in HTML as an
    # attribute value, in plain text as it is.
    urls: list[bytes | None] = [None] * len(part.links)
    done = [False] * len(part.links)
    for index, edit in part.dynamic:
        link = edit.link
        if link is not None:
            if tracking.click_tracking:
                if not done[link.index]:
                    urls[link.index], done[link.index] = links.click_piece(link, edit.quote is not None), True
                url = urls[link.index]
                if url is not None:
                    pieces[index] = url
        else:
            pieces[index] = slot_markup(edit.slot, part.links, links, tracking).encode()
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
    elif fits_7bit(raw):
        body = raw
    else:
        body, header = encode_qp(raw, part.bare_newlines, part.has_crlf), part.qp_header
    return header + body
