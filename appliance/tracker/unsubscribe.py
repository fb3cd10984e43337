"""
``/u/<token>``: RFC 8058 one-click unsubscribe, and the page a person sees.

A mail client's one-click ``POST`` carries ``List-Unsubscribe=One-Click``
(``application/x-www-form-urlencoded`` or ``multipart/form-data``) and gets
``200`` with no redirect, as RFC 8058 §3.2 asks; it writes a
``list_unsubscribe`` event, which the suppression list's follower reads.
A ``GET`` (a person who followed the link, or a link scanner) only shows a
page whose button makes that ``POST``: fetching the URL never unsubscribes
anyone. A token that does not verify, is not an unsubscribe token or has
expired gets a 404 page and no event. The tracker's limits apply as to
every request, with a bound on the body (``MAX_BODY_BYTES``).
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import jinja2
from twisted.web import resource, server

from appliance.tracker.limits import MAX_BODY_BYTES

if TYPE_CHECKING:
    from appliance.tracker import Tracker

KIND = "unsubscribe"
ONE_CLICK = "List-Unsubscribe=One-Click"
METHODS = (b"GET", b"HEAD", b"POST")
TITLES = {"confirm": "Unsubscribe", "done": "You are unsubscribed", "bad_request": "Bad request",
          "invalid": "Link not valid"}
# The page loads nothing, runs no script, may be framed by nobody and posts only to itself;
# the token in its URL goes to no other site.
SECURITY_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-robots-tag", b"noindex"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
)


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("appliance.tracker", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("unsubscribe.html")


def page(state: str) -> bytes:
    """The HTML page for ``state``: confirm, done, bad_request or invalid."""
    return _template().render(state=state, title=TITLES[state], one_click=ONE_CLICK).encode("utf-8")


def is_one_click(content_type: bytes, body: bytes) -> bool:
    """Whether a POST body says ``List-Unsubscribe=One-Click`` (RFC 8058 §3.1), in either form encoding."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind == b"application/x-www-form-urlencoded":
        try:
            values = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=False,
                              max_num_fields=16).get("List-Unsubscribe", [])
        except (UnicodeDecodeError, ValueError):
            return False
        return values == ["One-Click"]
    if kind == b"multipart/form-data":
        head = b"MIME-Version: 1.0\r\nContent-Type: " + content_type + b"\r\n\r\n"
        try:
            message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
        except Exception:
            return False
        if not message.is_multipart():
            return False
        values = []
        for part in message.get_payload():
            if part.get_param("name", header="content-disposition") == "List-Unsubscribe":
                values.append(part.get_payload(decode=True))
        return values == [b"One-Click"]
    return False


class Unsubscribe(resource.Resource):
    """``/u/<token>``: the page on GET and HEAD, the one-click unsubscribe on POST."""

    isLeaf = True

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def render(self, request: server.Request) -> bytes:
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        if request.method not in METHODS:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(METHODS))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method Not Allowed\n"
        body = self._answer(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _answer(self, request: server.Request) -> bytes:
        tracker = self.tracker
        path = request.postpath
        token = path[0] if len(path) == 1 else b""
        link = tracker.link(token, (KIND,)) if token else None
        if link is None or not tracker.live(link):
            request.setResponseCode(404)
            return page("invalid")
        if request.method != b"POST":
            return page("confirm")
        if getattr(request, "body_too_large", False):
            request.setResponseCode(413)
            return page("bad_request")
        request.content.seek(0)
        content_type = request.getHeader(b"content-type") or b""
        if not is_one_click(content_type, request.content.read(MAX_BODY_BYTES)):
            request.setResponseCode(400)
            return page("bad_request")
        tracker.record(link, tracker.client(request), token)
        return page("done")
