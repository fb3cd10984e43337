"""
``engage-appliance preview``: what tracking would do to a message, without sending it.

The preview takes the path a real message takes, with the same code: the
``X-MSYS-API`` header is read by ``appliance.settings``, the policy hook's
answer (asked by the command) and the listener's configuration are resolved
by ``settings.resolve``, and the copy is made by ``appliance.rewrite`` from
the prepared form, so what it shows is what the recipient would get. The
rewriter's audit says what it decided about each link; a tree parser
(``anchors``) adds what a reader sees of it.

Only the links are not real: they are signed with a key made for the preview
alone, so they have the length and shape of real ones but the tracker answers
``404`` to them, and trying them counts nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses
from typing import Any

from appliance.config import Config, ListenerConfig
from appliance.events import IdGenerator
from appliance.headers import as_message, read_header
from appliance.links import MAX_URL_LENGTH, LinkCodec, new_keyring
from appliance.policy import Verdict
from appliance.preview.anchors import html_anchors, text_context
from appliance.preview.sources import SettingRow, setting_rows
from appliance.rewrite import (
    CLICKTRACK_OFF,
    NOT_TRACKABLE,
    OVER_CAP,
    TOO_LONG,
    Audit,
    Identity,
    LinkAudit,
    PartAudit,
    prepare,
    strip_header,
    unescape_attribute,
)
from appliance.rewrite.edits import INITIAL_SLOT, OPEN_SLOT
from appliance.rewrite.html_scan import HTML_SPACE
from appliance.rewrite.render import LinkRenderer
from appliance.settings import MsysApi, MsysApiError, Tracking, header_values, parse_msys_api, resolve

__all__ = ["LinkRow", "PixelRow", "Preview", "PreviewError", "SettingRow", "make_preview", "read_message",
           "recipient_of", "with_msys_api"]

PART_NAMES = {"html": "text/html", "text": "text/plain"}


class PreviewError(Exception):
    """Why there is no preview: ``str()`` is the message for the operator."""


@dataclass(frozen=True)
class LinkRow:
    """One link found in the message, and what tracking does with it for this recipient."""

    part: str  # "text/html" or "text/plain"
    line: int  # in the part's decoded text
    anchor_text: str
    context: str
    written: str  # as the sender wrote it
    target: str  # where a click lands
    link_name: str
    tracked: bool
    why: str  # why it is tracked or left alone
    tracked_url: str = ""


@dataclass(frozen=True)
class PixelRow:
    kind: str  # "open" or "initial_open"
    placed: bool
    where: str
    url: str = ""


@dataclass
class Preview:
    rcpt: str
    listener: str
    tracking: Tracking
    settings: list[SettingRow]
    links: list[LinkRow]
    pixels: list[PixelRow]
    notes: list[str]  # what the copy says less than its settings ask, and why
    copy: bytes
    parts: list[str] = field(default_factory=list)  # e.g. "text/html: tracked (quoted-printable)"

    def to_json(self) -> dict[str, Any]:
        return {
            "rcpt": self.rcpt,
            "listener": self.listener,
            "tracking": self.tracking.to_json(),
            "settings": [{"name": s.name, "value": s.value, "source": s.source} for s in self.settings],
            "parts": self.parts,
            "links": [row.__dict__ for row in self.links],
            "pixels": [row.__dict__ for row in self.pixels],
            "notes": self.notes,
        }


# -- reading the input ------------------------------------------------------------------------


def read_message(path: str) -> tuple[bytes, list[str]]:
    """The message as an SMTP client would send it (CRLF line ends), and what was changed to get there."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PreviewError(f"cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise PreviewError(f"{path} is empty")
    notes = []
    crlf = re.sub(rb"\r?\n", b"\r\n", data)
    if crlf != data:
        notes.append("line ends read as CRLF, as an SMTP client sends them")
    if not crlf.endswith(b"\r\n"):
        crlf += b"\r\n"
    return crlf, notes


def with_msys_api(message: bytes, value: str) -> bytes:
    """
    The message with ``value`` as its only ``X-MSYS-API`` field (the ``--x-msys-api`` option).

    ``value`` must be JSON; it is written compactly on one line. The header's
    own rules (types, sizes) are checked later, as the appliance checks them.
    """
    try:
        data = json.loads(value)
    except ValueError as e:
        raise PreviewError(f"--x-msys-api is not valid JSON: {e}") from None
    line = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    top = read_header(message)
    return b"X-MSYS-API: " + line.encode("utf-8") + b"\r\n" + strip_header(message, top.fields, "x-msys-api")


def headers_of(message: bytes) -> Message:
    """The header fields as the injection server hands them to the policy hook."""
    return as_message(read_header(message).fields)


def recipient_of(headers: Message) -> str | None:
    """The first address of the ``To`` field: the recipient when none is given."""
    for _, address in getaddresses([str(v) for v in headers.get_all("To") or ()]):
        if "@" in address:
            return address
    return None


def msys_api_of(headers: Message, config: Config) -> MsysApi:
    try:
        return parse_msys_api(header_values(headers), config.engagement_tracker.max_metadata_len)
    except MsysApiError as e:
        raise PreviewError(f"the appliance would refuse this message: 550 5.6.0 {e}") from None


# -- why a link is left alone -----------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def not_trackable(target: str) -> str:
    """Why a link that is not an absolute http(s) URL is left as it is, in a reader's words."""
    t = target.strip(HTML_SPACE)
    lower = t.lower()
    if not t:
        return "an empty link"
    if t.startswith("#"):
        return "a link within the page (#...)"
    if "{{" in t or "{%" in t or "[[" in t:
        return "a template placeholder, not a URL"
    if lower.startswith(("http://", "https://")):
        return "the URL has white space or control characters in it"
    m = _SCHEME.match(t)
    if m:
        return f"not http(s): a {m.group(1).lower()}: link"
    if t.startswith("//"):
        return "a scheme-relative link (no http: or https:)"
    return "a relative link (no http:// or https://)"


def _untracked_why(audit: LinkAudit, kind: str, max_links: int) -> str:
    if audit.reason == CLICKTRACK_OFF:
        return ('data-msys-clicktrack="0"' if kind == "html" else '[[data-msys-clicktrack="0"]]')
    if audit.reason == TOO_LONG:
        return f"over {MAX_URL_LENGTH} characters as written"
    if audit.reason == OVER_CAP:
        return f"past smtpapi.max_tracked_links: a part has at most {max_links} tracked links"
    if audit.reason == NOT_TRACKABLE:
        return not_trackable(audit.target or unescape_attribute(audit.written))
    return audit.reason


def _match_anchors(part: PartAudit) -> list[tuple[str, str]]:
    """(anchor text, context) for each link of the part, in order; empty where none is found."""
    if part.kind != "html":
        return [("", text_context(part.text, a.start, a.end)) for a in part.links]
    anchors = html_anchors(part.text)
    out: list[tuple[str, str]] = []
    next_anchor = 0
    for link in part.links:
        written = unescape_attribute(link.written).strip(HTML_SPACE)
        found = None
        # The parser and the scanner see the same links in the same order but for markup
        # they read differently; a few anchors ahead is enough to find the same one again.
        for i in range(next_anchor, min(next_anchor + 5, len(anchors))):
            if anchors[i].href.strip(HTML_SPACE) in (written, link.target):
                found = i
                break
        if found is None:
            out.append(("", ""))
            continue
        out.append((anchors[found].text, anchors[found].context))
        next_anchor = found + 1
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# -- the preview ------------------------------------------------------------------------------


def make_preview(message: bytes, config: Config, toml: Mapping[str, Any], listener: ListenerConfig,
                 rcpt: str, verdict: Verdict, now: float | None = None,
                 codec: LinkCodec | None = None) -> Preview:
    """
    What tracking does to ``message`` for ``rcpt``, injected on ``listener``.

    ``verdict`` is the policy hook's answer for this recipient (``ACCEPT``
    without a hook); ``toml`` the parsed configuration file, which says
    where each configured setting was written. Raises ``PreviewError`` when
    the appliance would refuse the message or the message has no HTML part.
    """
    now = time.time() if now is None else now
    headers = headers_of(message)
    api = msys_api_of(headers, config)
    if not verdict.accepted:
        raise PreviewError(f"the policy hook refuses {rcpt}: {verdict.code} {verdict.text}")
    tracking = resolve(listener.smtpapi, config.engagement_tracker, api, verdict.context, now)
    settings = setting_rows(toml, listener, config, api, verdict.context, tracking)

    audit = Audit()
    max_links = config.smtpapi.max_tracked_links
    prepared = prepare(message, max_links, audit)
    if not any(p.kind == "html" for p in audit.parts) and not any(
            n.startswith("malformed MIME") for n in prepared.skipped):
        raise PreviewError("the message has no text/html part (that is not an attachment): open "
                           "tracking never adds one, so no pixel would be placed; only the URLs of "
                           "its text/plain part could be tracked")

    ids = IdGenerator(config.node.name, lambda: now)
    identity = Identity(ids.message_id(), ids.transmission_id(), rcpt)
    codec = codec or LinkCodec(new_keyring())
    max_size = config.smtp.max_message_size
    notes = prepared.tracking_notes(codec, identity, tracking, max_size)
    too_large = tracking.enabled and prepared.over_size(codec, identity, tracking, max_size)
    copy = prepared.data if too_large else prepared.render(codec, identity, tracking)
    renderer = LinkRenderer(codec, identity, tracking)
    click_source = next(s.source for s in settings if s.name == "click_tracking")

    links: list[LinkRow] = []
    parts: list[str] = []
    pixels: list[PixelRow] = []
    for part in audit.parts:
        name = PART_NAMES[part.kind]
        if part.skipped:
            parts.append(f"{name}: delivered as it came: {part.skipped}")
            continue
        parts.append(f"{name}: {len(part.links)} link(s) found")
        for audit_link, (anchor, context) in zip(part.links, _match_anchors(part), strict=True):
            link = audit_link.link
            url = ""
            if link is None or audit_link.reason:
                tracked, why = False, _untracked_why(audit_link, part.kind, max_links)
            elif not tracking.click_tracking:
                tracked, why = False, f"click tracking is off ({click_source})"
            elif too_large:
                tracked, why = False, "the whole copy goes untracked (see the notes)"
            else:
                url = renderer.click(link) or ""
                tracked = bool(url)
                why = ("an http(s) link, and click tracking is on" if tracked
                       else f"the tracked URL would be over {MAX_URL_LENGTH} characters")
            links.append(LinkRow(name, _line(part.text, audit_link.start), anchor, context,
                                 audit_link.written, audit_link.target,
                                 link.name if link is not None else "", tracked, why, url))
        if part.kind == "html":
            pixels.extend(_pixels(part, tracking, renderer, settings, too_large))
    if not audit.parts:
        parts.extend(f"delivered as it came: {n}" for n in prepared.skipped)
    return Preview(rcpt, listener.name, tracking, settings, links, pixels, notes, copy, parts)


def _pixels(part: PartAudit, tracking: Tracking, renderer: LinkRenderer, settings: list[SettingRow],
            too_large: bool) -> list[PixelRow]:
    source = next(s.source for s in settings if s.name == "open_tracking")
    out = []
    at = part.open_pixel if part.open_pixel is not None else len(part.text)
    before_body = part.text[at:at + 7].lower() == "</body>"
    where = (f"just before </body> (line {_line(part.text, at)})" if before_body
             else "at the end of the HTML (it has no </body>)")
    out.append(_pixel("open", OPEN_SLOT, where, tracking, renderer, source, too_large, True))
    if part.initial_pixel is None:
        out.append(PixelRow("initial_open", False, "nowhere: the HTML has no <body> to put it after"))
    else:
        where = f"in a hidden <div> just after <body> (line {_line(part.text, part.initial_pixel)})"
        initial_source = next(s.source for s in settings if s.name == "initial_open")
        out.append(_pixel("initial_open", INITIAL_SLOT, where, tracking, renderer,
                          source if not tracking.initial_open or not tracking.open_tracking
                          else initial_source, too_large, tracking.initial_open))
    return out


def _pixel(kind: str, slot: int, where: str, tracking: Tracking, renderer: LinkRenderer, source: str,
           too_large: bool, wanted: bool) -> PixelRow:
    if not tracking.open_tracking:
        return PixelRow(kind, False, f"none: open tracking is off ({source}); it would go {where}")
    if not wanted:
        return PixelRow(kind, False, f"none: initial_open is off ({source}); it would go {where}")
    if too_large:
        return PixelRow(kind, False, f"none: the whole copy goes untracked; it would go {where}")
    url = renderer.open(slot)
    if url is None:
        return PixelRow(kind, False, f"none: its URL would be over {MAX_URL_LENGTH} characters")
    return PixelRow(kind, True, where, url)
