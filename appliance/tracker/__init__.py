"""
The HTTP tracker: serves open pixels (``/q/…``), click redirects (``/f/…``) and
one-click unsubscribes (``/u/…``, in ``appliance.tracker.unsubscribe``).

The tracker keeps no state: a hit is answered from the token alone (encrypted
and authenticated), so any node holding the link keys serves any link. A token that does not
verify is a plain 404, never a redirect, so the tracker cannot be used as an
open redirect. Each genuine ``GET`` writes its events to the event log before
the response is finished; ``HEAD`` (link scanners, prefetchers) is answered
the same way and counts nothing, and so does a link past its expiry. Open and
click events say who made them (``appliance.engagement``): the parsed user
agent, whether a proxy, a prefetch or a scanner made the hit, and where the
address is; a ``HEAD`` of a click link marks the next ``GET`` of it from the
same address as a scanner's.

A plain ``twisted.web`` resource tree; everything else is 404, and
``/robots.txt`` asks crawlers to stay away. The ``Site`` writes no access log:
each hit is recorded in the event log, and a per-request log line would cost
time and leak tokens and addresses into the operational log. The limits that
keep it answering under abuse are in ``appliance.tracker.limits``.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource, server

from appliance.engagement import Engagement
from appliance.events import Event, EventLog
from appliance.eventtypes import (
    CLICK,
    INITIAL_OPEN,
    OPEN,
    cap_text,
    click_events,
    list_unsubscribe_event,
    open_event,
)
from appliance.links import InvalidToken, LinkCodec, LinkData, location_header
from appliance.tracker.channel import NOT_FOUND, PIXEL, TrackerChannel
from appliance.tracker.limits import (
    DEFAULT_LIMITS,
    MAX_BODY_BYTES,
    OTHER_CAP,
    USER_AGENT_CAP,
    ConnectionCount,
    HitLimiter,
    Limits,
)
from appliance.tracker.unsubscribe import Unsubscribe

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ROBOTS_TXT = b"User-agent: *\nDisallow: /\n"
ALLOWED_METHODS = (b"GET", b"HEAD")
OPEN_KINDS = (OPEN, INITIAL_OPEN)
CLICK_KINDS = (CLICK,)
SUMMARY_INTERVAL = 60.0  # seconds between the log lines that count what the limits refused


# -- who is asking ----------------------------------------------------------------


def parse_address(text: str) -> Address | None:
    """An IP address, IPv4-mapped IPv6 taken as the IPv4 address it maps; else ``None``."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_HOP_WITH_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::\d+)?|(\d+\.\d+\.\d+\.\d+):\d+")


def parse_hop(hop: str) -> Address | None:
    """One ``X-Forwarded-For`` entry: an address, or ``[v6]:port`` / ``v4:port`` as some proxies write."""
    hop = hop.strip()
    m = _HOP_WITH_PORT.fullmatch(hop)
    if m:
        hop = m.group(1) or m.group(2)
    return parse_address(hop)


def client_address(peer: str, forwarded_for: Sequence[bytes], trusted: Sequence[Network]) -> str:
    """
    The address of the client behind ``peer``.

    Only a trusted proxy's ``X-Forwarded-For`` is believed, and only the hops
    that trusted proxies appended: walking from the right, the first hop that
    is not a trusted proxy is the client. Whatever stands left of it was
    written by the client itself and could say anything. A hop that is not an
    address ends the walk at the last address known.
    """
    if not (forwarded_for and trusted):
        return _peer_text(peer)
    here = parse_address(peer)
    if here is None:
        return peer
    if not _trusted(here, trusted):
        return str(here)
    hops = [h for value in forwarded_for for h in value.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        ip = parse_hop(hop)
        if ip is None:
            break
        here = ip
        if not _trusted(ip, trusted):
            break
    return str(here)


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: str) -> str:
    """The peer's address as events write it; cached, as the same clients come back."""
    ip = parse_address(peer)
    return str(ip) if ip is not None else peer


def _trusted(ip: Address, trusted: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


@dataclass(frozen=True)
class Client:
    """
    What a hit tells about the client; header values decoded for the event log.

    ``truncated`` names the fields that were cut to their cap; each gets a
    ``<field>_truncated: true`` in the events that carry it.
    """

    ip_address: str
    user_agent: str = ""
    accept_language: str = ""
    truncated: tuple[str, ...] = ()

    @classmethod
    def capped(cls, ip_address: str, user_agent: str, accept_language: str) -> Client:
        """The client with each value cut to its cap (User-Agent 512 bytes, the rest 256)."""
        ip_address, ip_cut = cap_text(ip_address, OTHER_CAP)
        user_agent, ua_cut = cap_text(user_agent, USER_AGENT_CAP)
        accept_language, al_cut = cap_text(accept_language, OTHER_CAP)
        cut = tuple(name for name, was_cut in (("ip_address", ip_cut), ("user_agent", ua_cut),
                                               ("accept_language", al_cut)) if was_cut)
        return cls(ip_address, user_agent, accept_language, cut)


# -- what a hit means -------------------------------------------------------------


class Tracker:
    """
    Turns a verified link and a client into events; knows nothing of HTTP.

    ``events`` is anything with the event log's ``make`` and ``write``.
    ``now`` decides expiry and how soon after sending a click came, so tests
    can move time. ``engagement`` parses and classifies the client.
    """

    def __init__(self, codec: LinkCodec, events: EventLog, trusted_proxies: Sequence[Network] = (),
                 now: Callable[[], float] = time.time, limiter: HitLimiter | None = None,
                 engagement: Engagement | None = None) -> None:
        self.codec = codec
        self.events = events
        self.trusted_proxies = tuple(trusted_proxies)
        self._now = now
        self.limiter = limiter
        self.engagement = engagement if engagement is not None else Engagement()

    def link(self, token: bytes, kinds: tuple[str, ...]) -> LinkData | None:
        """The link a token describes if it is authentic and of one of ``kinds``."""
        try:
            data = self.codec.decode(token)
        except InvalidToken:
            return None
        return data if data.kind in kinds else None

    def live(self, link: LinkData) -> bool:
        """Whether ``link`` has not expired yet."""
        return not link.expired(self._now())

    def pixel(self, postpath: Sequence[bytes]) -> LinkData | None:
        """The open link ``/q/<token>`` names (``postpath`` is what follows ``/q/``), if any."""
        return self.link(postpath[0], OPEN_KINDS) if len(postpath) == 1 else None

    def click(self, postpath: Sequence[bytes]) -> tuple[LinkData, bytes] | None:
        """The click link ``/f/<sublink>/<token>`` names and its ``Location``, if it is one to follow."""
        link = self.link(postpath[1], CLICK_KINDS) if len(postpath) == 2 and postpath[0] else None
        location = location_header(link.target) if link is not None else None
        return (link, location) if link is not None and location is not None else None

    def client(self, request: server.Request) -> Client:
        return self.client_of(getattr(request.getClientAddress(), "host", ""),
                              request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
                              request.getHeader(b"user-agent"), request.getHeader(b"accept-language"))

    def client_of(self, peer: str, forwarded: Sequence[bytes], user_agent: bytes | None,
                  accept_language: bytes | None) -> Client:
        """The client behind ``peer``, from the raw values of its request's headers."""
        return Client.capped(
            ip_address=client_address(peer, forwarded, self.trusted_proxies),
            user_agent=user_agent.decode("utf-8", "replace") if user_agent else "",
            accept_language=accept_language.decode("utf-8", "replace") if accept_language else "",
        )

    def events_for(self, link: LinkData, client: Client, token: bytes = b"") -> list[Event]:
        """The events one hit on ``link`` (by ``token``) writes: none once the link has expired."""
        now = self._now()
        if link.expired(now):
            return []
        engagement = self.engagement
        if link.kind in OPEN_KINDS:
            who = engagement.open_fields(client.user_agent, client.ip_address)
            drafts = [open_event(link, client.ip_address, client.user_agent, who)]
        elif link.kind == "unsubscribe":
            drafts = [list_unsubscribe_event(link, client.ip_address, client.user_agent)]
        else:
            who = engagement.click_fields(client.user_agent, client.ip_address, token,
                                          issued=link.issued, trap=link.trap, now=now)
            drafts = click_events(link, client.ip_address, client.user_agent, client.accept_language,
                                  who)
        for _, fields in drafts:
            for name in client.truncated:
                if name in fields:
                    fields[f"{name}_truncated"] = True
        return [self.events.make(kind, **fields) for kind, fields in drafts]

    def head(self, client: Client, token: bytes) -> None:
        """A ``HEAD`` for a click link counts nothing, but marks the next ``GET`` of it from there."""
        self.engagement.head(client.ip_address, token, self._now())

    def record(self, link: LinkData, client: Client, token: bytes = b"") -> None:
        """
        Write the hit's events; a failure is logged and never stops the response.

        Past the limiter's allowance for this address and ``token``, the hit
        is only counted.
        """
        events = self.events_for(link, client, token)
        if events:
            self.write(events, client.ip_address, token)

    def write(self, events: list[Event], address: str, token: bytes) -> None:
        """
        Write one hit's ``events`` unless the limiter holds back ``address`` and ``token``.

        Also where the events a tracker process made arrive (``appliance.tracker.processes``),
        so the one limiter counts every process's hits.
        """
        if self.limiter is not None and not self.limiter.allow(address, token):
            return
        for event in events:
            try:
                self.events.write(event)
            except Exception:
                log.failure("could not write the {type} event of message {message_id}",
                            type=event["type"], message_id=event["message_id"])


# -- HTTP ---------------------------------------------------------------------------


def not_found(request: server.Request) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return NOT_FOUND


class _Leaf(resource.Resource):
    """
    Answers ``GET`` and ``HEAD`` alike (``HEAD`` without the body), 405 otherwise.

    ``HEAD`` is handled here rather than left to twisted.web, which would log a
    line for every such request.
    """

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.method not in ALLOWED_METHODS:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(ALLOWED_METHODS))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            body = b"Method Not Allowed\n"
        else:
            body = self.answer(request)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def answer(self, request: server.Request) -> bytes:
        raise NotImplementedError


class Robots(_Leaf):
    def answer(self, request: server.Request) -> bytes:
        if request.postpath:
            return not_found(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ROBOTS_TXT


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return not_found(request)


class OpenPixel(_Leaf):
    """``/q/<token>``: the pixel, and an ``open`` or ``initial_open`` event."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def answer(self, request: server.Request) -> bytes:
        path = request.postpath
        link = self.tracker.pixel(path)
        if link is None:
            return not_found(request)
        if request.method == b"GET":
            self.tracker.record(link, self.tracker.client(request), path[0])
        request.setHeader(b"content-type", b"image/gif")
        request.setHeader(b"cache-control", b"no-store")
        return PIXEL


class ClickRedirect(_Leaf):
    """``/f/<sublink>/<token>``: a 302 to the target the token carries, and a ``click`` event."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def answer(self, request: server.Request) -> bytes:
        path = request.postpath
        found = self.tracker.click(path)
        if found is None:
            return not_found(request)
        link, location = found
        if request.method == b"GET":
            self.tracker.record(link, self.tracker.client(request), path[1])
        else:  # a HEAD: a scanner checking the link before it fetches it
            self.tracker.head(self.tracker.client(request), path[1])
        request.setResponseCode(302)
        request.setHeader(b"location", location)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-robots-tag", b"noindex")
        request.defaultContentType = None  # an empty body has no type
        return b""


class Root(resource.Resource):
    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.putChild(b"robots.txt", Robots())
        self.putChild(b"q", OpenPixel(tracker))
        self.putChild(b"f", ClickRedirect(tracker))
        self.putChild(b"u", Unsubscribe(tracker))

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return not_found(request)


class TrackerRequest(server.Request):
    """
    A request whose answer carries no ``Server`` header: the version helps only an attacker.

    The time from the whole request to the whole answer goes to the site's ``on_answered``.
    Its body is kept in memory up to ``MAX_BODY_BYTES``; beyond that it is
    dropped as it arrives and ``body_too_large`` is set (``/u/`` answers 413).
    """

    _began: float | None = None
    body_too_large = False

    def process(self) -> None:
        self._began = self.channel.site.reactor.seconds()
        super().process()

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > MAX_BODY_BYTES:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large or self.content.tell() + len(data) > MAX_BODY_BYTES:
            self.body_too_large = True
            return
        self.content.write(data)

    def render(self, resrc: resource.IResource) -> None:
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)

    def finish(self) -> None:
        super().finish()
        answered = getattr(self.site, "on_answered", None)
        if answered is not None and self._began is not None:
            answered(self.site.reactor.seconds() - self._began)


class Refused(Protocol):
    """
    A connection over a limit, behind TLS: aborted as soon as it is made, unanswered.

    Plain TCP takes ``None`` from ``buildProtocol`` as "close it", the
    cheapest refusal. TLS (``TLSMemoryBIOFactory``) wraps the ``None`` and
    fails on it, logging a traceback for every refused connection.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class TrackerSite(server.Site):
    """
    A ``Site`` without the per-request access log, with the tracker's limits.

    A connection over a connection limit is closed at once, unanswered: an
    answer would cost what the limit is there to save (but see
    ``ConnectionCount`` for the total). What the limits refused is logged
    once per ``SUMMARY_INTERVAL``, when there is any.
    """

    noisy = False
    requestFactory = TrackerRequest
    protocol = TrackerChannel
    on_answered: Callable[[float], None] | None = None  # seconds from request to answer (metrics)
    tracker: Tracker | None = None  # what its resources answer with (set by ``make_site``)
    behind_tls = False  # its listener wraps each connection in TLS (an ssl: endpoint)

    def __init__(self, root: resource.IResource, *, reactor: IReactorTime | None = None,
                 limits: Limits = DEFAULT_LIMITS, connections: ConnectionCount | None = None,
                 limiter: HitLimiter | None = None) -> None:
        super().__init__(root, reactor=reactor)
        self.limits = limits
        self.timeOut = limits.keepalive_timeout
        self.connections = connections if connections is not None else ConnectionCount(limits)
        self.limiter = limiter
        self._summary = LoopingCall(self.summarize)
        self._summary.clock = self.reactor
        self._reported = (0, 0, 0)

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> TrackerChannel | Refused | None:
        host = self.connections.acquire(addr)
        if host is None:
            return Refused() if self.behind_tls else None
        channel: TrackerChannel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.connections = self.connections
        channel.release = functools.partial(self.connections.release, host)
        return channel

    def startFactory(self) -> None:
        super().startFactory()
        if not self._summary.running:
            self._summary.start(SUMMARY_INTERVAL, now=False)

    def stopFactory(self) -> None:
        if self._summary.running:
            self._summary.stop()
        super().stopFactory()

    def summarize(self) -> None:
        """One log line with what the limits refused since the last one, if anything."""
        suppressed = self.limiter.suppressed if self.limiter is not None else 0
        now = (self.connections.refused, self.connections.evicted, suppressed)
        refused, evicted, written = (a - b for a, b in zip(now, self._reported, strict=True))
        self._reported = now
        if refused or evicted or written:
            log.info("tracker limits in the last {interval:.0f}s: {refused} connection(s) refused, "
                     "{evicted} waiting connection(s) closed to make room, "
                     "{suppressed} repeated hit(s) answered without events",
                     interval=SUMMARY_INTERVAL, refused=refused, evicted=evicted, suppressed=written)


def make_site(codec: LinkCodec, events: EventLog, trusted_proxies: Sequence[Network] = (),
              now: Callable[[], float] = time.time, *, reactor: IReactorTime,
              limits: Limits = DEFAULT_LIMITS, engagement: Engagement | None = None,
              tracker_type: type[Tracker] = Tracker, limit_hits: bool = True,
              behind_tls: bool = False) -> TrackerSite:
    """
    ``reactor`` times out connections and windows the event limit.

    Trusted proxies count only towards the total connection limit, as each
    carries many clients. A tracker process (``appliance.tracker.child``) gives
    its own ``tracker_type`` and no hit limiter: the appliance's counts its hits.
    """
    limiter = None
    if limit_hits:
        limiter = HitLimiter(limits.event_rate_limit, limits.event_rate_window,
                             limits.event_rate_entries, now=reactor.seconds)
    tracker = tracker_type(codec, events, trusted_proxies, now, limiter, engagement)
    site = TrackerSite(Root(tracker), reactor=reactor, limits=limits,
                       connections=ConnectionCount(limits, trusted_proxies), limiter=limiter)
    site.displayTracebacks = False
    site.tracker = tracker
    site.behind_tls = behind_tls
    return site
