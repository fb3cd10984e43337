"""
The tracker's HTTP connection: a pixel or click hit answered without twisted.web's request machinery.

Nearly every request the tracker gets is a ``GET`` or ``HEAD`` of
``/q/<token>`` or ``/f/<sublink>/<token>``: HTTP/1.1, no body, its head
arriving whole in one read. Building a twisted.web ``Request`` for it (header
objects, resource traversal, the deferred finish) cost more than verifying
the token and writing the event together, so such a hit is parsed and
answered here, with the same ``Tracker`` decisions and, byte for byte, the
answer the resources in ``appliance.tracker`` give (the tests compare them).

Everything else goes to twisted.web unchanged: a head split across reads,
any body or ``Expect``, HTTP/1.0, a ``Connection`` other than ``keep-alive``
or ``close``, a ``%``-escape or query, any other path, any line twisted.web
would refuse. From then on twisted.web's ``HTTPChannel`` serves the
connection, and as its parser has seen nothing before, nothing here depends
on its inner state. The limits of ``GuardedChannel`` hold on both paths.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.web.http import datetimeToString

from appliance.tracker.limits import GuardedChannel

if TYPE_CHECKING:
    from appliance.tracker import Tracker

log = Logger()

# The smallest transparent GIF: 1x1, one palette entry, marked transparent.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
         b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NOT_FOUND = b"Not Found\n"

MAX_HEAD = 8192  # a longer head goes to twisted.web, which has its own limits
MAX_FIELDS = 100

# The whole head of a request answered here, checked in one match: the method,
# a target of printable ASCII without "%" or "?", HTTP/1.1, and header lines as
# twisted.web accepts them (a token, a colon, no NUL or bare CR/LF in the
# value). A folded line or any other oddity fails to match.
_HEAD = re.compile(
    rb"(GET|HEAD) (/[qf]/[!-$&->@-~]*) HTTP/1\.1"
    rb"((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00\r\n]*)*)"
)
_USER_AGENT, _ACCEPT_LANGUAGE, _FORWARDED, _CONNECTION, _ELSEWHERE = range(5)
_FIELDS = {
    b"user-agent": _USER_AGENT,
    b"accept-language": _ACCEPT_LANGUAGE,
    b"x-forwarded-for": _FORWARDED,
    b"connection": _CONNECTION,
    # A body, or a request to change protocols: twisted.web's to handle.
    b"content-length": _ELSEWHERE,
    b"transfer-encoding": _ELSEWHERE,
    b"expect": _ELSEWHERE,
    b"upgrade": _ELSEWHERE,
}
_OPEN = ord("q")  # the kind of hit a target names: /q/ (else /f/)
_CLOSE = b"Connection: close\r\n"


class _Date:
    """The ``Date`` value, made once a second rather than once a hit."""

    second = -1
    value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, datetimeToString(now)
        return self.value


_date = _Date()


def _server_error(head_only: bool) -> bytes:
    return (b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nDate: " + _date()
            + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 22\r\n\r\n"
            + (b"" if head_only else b"Internal Server Error\n"))


def _not_found(close: bytes, head_only: bool) -> bytes:
    return (b"HTTP/1.1 404 Not Found\r\n" + close + b"Date: " + _date()
            + b"\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n"
            b"Content-Length: 10\r\n\r\n" + (b"" if head_only else NOT_FOUND))


class TrackerChannel(GuardedChannel):
    """A ``GuardedChannel`` that answers the common hit itself while its requests allow it."""

    _direct = False  # whether hits are still answered here (a site with a tracker, until handed over)
    _ended = False  # a "Connection: close" answer was written; what follows is ignored
    _peer = ""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._direct = getattr(self.site, "tracker", None) is not None
        self._peer = getattr(self.transport.getPeer(), "host", "")

    def dataReceived(self, data: bytes) -> None:
        if not self._direct:
            super().dataReceived(data)
            return
        if self._ended:
            return
        self.resetTimeout()
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\r\n\r\n", start, start + MAX_HEAD)
            if end < 0 or not self._answer(data, start, end):
                self._direct = False
                super().dataReceived(data[start:] if start else data)
                return
            if self._ended:
                return
            start = end + 4

    def _answer(self, data: bytes, start: int, end: int) -> bool:
        """Answer the request whose head is ``data[start:end]``; ``False``, doing nothing, if not ours."""
        m = _HEAD.fullmatch(data, start, end)
        if m is None:
            return False
        user_agent = accept_language = None
        forwarded: list[bytes] = []
        close = b""
        connection = False
        fields = m.group(3)
        if fields:
            lines = fields.split(b"\r\n")
            if len(lines) > MAX_FIELDS + 1:
                return False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                which = _FIELDS.get(name.lower())
                if which is None:
                    continue
                value = value.strip(b" \t")
                if which == _USER_AGENT:
                    user_agent = value
                elif which == _ACCEPT_LANGUAGE:
                    accept_language = value
                elif which == _FORWARDED:
                    forwarded.append(value)
                elif which == _CONNECTION and not connection:
                    connection = True
                    token = value.lower()
                    if token == b"close":
                        close = _CLOSE
                    elif token != b"keep-alive":
                        return False
                else:  # a body, an upgrade, or a second Connection
                    return False
        # From here on the request is ours: it is answered, or the connection closed. Nothing
        # runs between this and the answer, so the deadline is only moved once it is written.
        self._served += 1
        if self._served >= self.limits.max_requests_per_connection:
            close = _CLOSE
        site = self.site
        began = site.reactor.seconds()
        get = m.group(1) == b"GET"
        try:
            answer = self._hit(site.tracker, get, m.group(2), user_agent, accept_language, forwarded, close)
        except Exception:
            log.failure("the tracker could not answer {target!r}", target=m.group(2)[:64])
            answer, close = _server_error(not get), _CLOSE
        self.transport.write(answer)
        if close:
            self._ended = True
            self.persistent = False
            # As twisted.web closes: no idle timer, and the deadline (not evictable, see
            # GuardedChannel._arm) cuts off a peer that never lets the close finish.
            self.setTimeout(None)
            self._arm(evictable=False)
            self.loseConnection()  # HTTPChannel's: stops being the transport's producer, or the close waits
        else:
            self._rearm()
        answered = site.on_answered
        if answered is not None:
            answered(site.reactor.seconds() - began)
        return True

    def _hit(self, tracker: Tracker, get: bool, target: bytes, user_agent: bytes | None,
             accept_language: bytes | None, forwarded: list[bytes], close: bytes) -> bytes:
        """The whole answer to a ``GET`` (or, if not ``get``, a ``HEAD``) of ``target``."""
        postpath = target[3:].split(b"/")
        if target[1] == _OPEN:
            link = tracker.pixel(postpath)
            if link is None:
                return _not_found(close, not get)
            if get:
                client = tracker.client_of(self._peer, forwarded, user_agent, accept_language)
                tracker.record(link, client, postpath[0])
            return (b"HTTP/1.1 200 OK\r\n" + close + b"Date: " + _date()
                    + b"\r\nContent-Type: image/gif\r\nCache-Control: no-store\r\nContent-Length: 43\r\n\r\n"
                    + (PIXEL if get else b""))
        found = tracker.click(postpath)
        if found is None:
            return _not_found(close, not get)
        link, location = found
        client = tracker.client_of(self._peer, forwarded, user_agent, accept_language)
        if get:
            tracker.record(link, client, postpath[1])
        else:  # a HEAD: a scanner checking the link before it fetches it
            tracker.head(client, postpath[1])
        return (b"HTTP/1.1 302 Found\r\n" + close + b"Date: " + _date() + b"\r\nLocation: " + location
                + b"\r\nCache-Control: no-store\r\nX-Robots-Tag: noindex\r\nContent-Length: 0\r\n\r\n")
