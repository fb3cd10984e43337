"""
The HTTP tracker: serves open pixels (``/q/…``) and click redirects (``/f/…``).

A plain ``twisted.web`` resource tree; everything else is 404, and
``/robots.txt`` asks crawlers to stay away. The ``Site`` writes no access log:
each hit is recorded in the event log, and a per-request log line would cost
time and leak tokens and addresses into the operational log.
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

ROBOTS_TXT = b"User-agent: *\nDisallow: /\n"


class Robots(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ROBOTS_TXT


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not Found\n"


class Root(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.putChild(b"robots.txt", Robots())

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return NotFound().render(request)


class TrackerSite(server.Site):
    """A ``Site`` without the per-request access log."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def make_site() -> TrackerSite:
    site = TrackerSite(Root())
    site.displayTracebacks = False
    return site
