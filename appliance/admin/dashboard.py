"""
The dashboard: server-rendered pages of campaigns, the queue and the last events.

The pages read their figures through ``DashboardData``, a small protocol of
plain methods returning the plain records below, so whatever keeps the
figures (the statistics store, the queue) can stand behind it. Those reads
may block (SQLite, the spool's journals): every one goes through ``run``,
which returns a Deferred (``deferToThread`` in the appliance, a synchronous
runner in tests), and the page is written when it fires.

Pages are jinja2 templates shipped in the package, escaped automatically;
there is no script. They read well from a phone's 375 px up: tables turn
into one card per row on narrow screens, and the chart is an SVG drawn on
the server (``chart``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from appliance.admin.chart import NARROW, WIDE, Series, hourly_chart, hours_between

log = Logger()

# -- what the pages show ----------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignSummary:
    """One campaign's counts over a period; ``name`` is "" for mail sent without a campaign_id."""

    name: str
    injected: int = 0
    delivered: int = 0
    bounces: int = 0
    opens: int = 0
    unique_opens: int = 0
    clicks: int = 0
    unique_clicks: int = 0

    @property
    def open_rate(self) -> float | None:
        """Unique opens per delivered copy; ``None`` when nothing was delivered."""
        return self.unique_opens / self.delivered if self.delivered else None

    @property
    def click_rate(self) -> float | None:
        """Unique clicks per delivered copy; ``None`` when nothing was delivered."""
        return self.unique_clicks / self.delivered if self.delivered else None


@dataclass(frozen=True)
class LinkClicks:
    """The clicks on one link of a campaign."""

    link_name: str  # target_link_name
    url: str  # target_link_url
    anchor_text: str = ""
    clicks: int = 0
    unique_clicks: int = 0


@dataclass(frozen=True)
class HourCounts:
    hour: datetime  # the start of a UTC hour
    delivered: int = 0
    opens: int = 0
    clicks: int = 0


@dataclass(frozen=True)
class CampaignDetail:
    summary: CampaignSummary
    links: Sequence[LinkClicks] = ()
    hours: Sequence[HourCounts] = ()  # only hours with something in them are needed


@dataclass(frozen=True)
class DestinationQueue:
    """The copies waiting for one destination domain."""

    domain: str
    copies: int
    oldest: datetime | None = None  # when its oldest copy was received
    held: int = 0
    next_attempt: datetime | None = None
    last_error: str = ""


@dataclass(frozen=True)
class RecentEvent:
    timestamp: datetime
    type: str
    campaign_id: str = ""
    rcpt_to: str = ""
    message_id: str = ""
    detail: str = ""  # what an operator reads first: a reply, a link, a reason


class DashboardData(Protocol):
    """What the pages read; each method may block, and is called through ``run``."""

    def campaigns(self, start: datetime, end: datetime) -> Sequence[CampaignSummary]: ...

    def campaign(self, name: str, start: datetime, end: datetime) -> CampaignDetail | None: ...

    def queue_by_destination(self) -> Sequence[DestinationQueue]: ...

    def recent_events(self, limit: int) -> Sequence[RecentEvent]: ...


Runner = Callable[..., defer.Deferred]  # run(f, *args) fires with f(*args)

# -- the period a page covers -----------------------------------------------------------------

PERIODS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30),
           "90d": timedelta(days=90)}
DEFAULT_PERIOD = "7d"
MAX_SPAN = timedelta(days=366)
TIME_FORMAT = "%Y-%m-%dT%H:%M"  # SparkPost's, and what a datetime-local field sends
EVENT_LIMITS = (50, 100, 500)


class BadRequest(ValueError):
    """A query the pages cannot answer; ``str()`` says what to change."""


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime
    name: str  # a key of PERIODS, or "" for from/to

    def query(self) -> dict[str, str]:
        if self.name:
            return {"period": self.name}
        return {"from": self.start.strftime(TIME_FORMAT), "to": self.end.strftime(TIME_FORMAT)}

    def label(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"


def _arg(args: dict[bytes, list[bytes]], name: str) -> str | None:
    values = args.get(name.encode())
    if not values:
        return None
    try:
        return values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8") from None


def parse_time(name: str, value: str) -> datetime:
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise BadRequest(f"{name} must be a UTC time written YYYY-MM-DDTHH:MM, not {value!r}") from None


def parse_period(args: dict[bytes, list[bytes]], now: datetime) -> Period:
    """``period=24h|7d|30d|90d``, or ``from`` (and ``to``, default now); default the last 7 days."""
    name = _arg(args, "period")
    start_text, end_text = _arg(args, "from"), _arg(args, "to")
    if start_text or end_text:
        if name:
            raise BadRequest("give either period or from/to, not both")
        if not start_text:
            raise BadRequest("to needs from")
        start = parse_time("from", start_text)
        end = parse_time("to", end_text) if end_text else now
        if start >= end:
            raise BadRequest("from must be before to")
        if end - start > MAX_SPAN:
            raise BadRequest("a period is at most 366 days")
        return Period(start, end, "")
    name = name or DEFAULT_PERIOD
    if name not in PERIODS:
        raise BadRequest(f"period must be one of {', '.join(PERIODS)}, not {name!r}")
    return Period(now - PERIODS[name], now, name)


# -- rendering --------------------------------------------------------------------------------


def percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


def number(n: int) -> str:
    return f"{n:,}"


def when(t: datetime | None, now: datetime) -> str:
    """A time and how long ago it was, as an operator reads a queue."""
    if t is None:
        return "–"
    ago = int((now - t).total_seconds())
    if ago < 0:
        ahead = -ago
        rel = f"in {ahead // 3600}h{ahead % 3600 // 60:02d}m" if ahead >= 3600 else f"in {ahead // 60}m"
    elif ago >= 86400:
        rel = f"{ago // 86400}d{ago % 86400 // 3600}h ago"
    elif ago >= 3600:
        rel = f"{ago // 3600}h{ago % 3600 // 60:02d}m ago"
    else:
        rel = f"{ago // 60}m{ago % 60:02d}s ago"
    return f"{t:%Y-%m-%d %H:%M:%S} ({rel})"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("appliance.admin", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(percent=percent, number=number)
    return env


class Pages:
    """The templates and what every page shares (where the dashboard is mounted, the clock)."""

    def __init__(self, base: str, now: Callable[[], float]) -> None:
        self.env = _environment()
        self.base = base if base.endswith("/") else base + "/"
        self.now = now

    def url(self, path: str, **query: str) -> str:
        q = urlencode(query)
        return self.base + path + (f"?{q}" if q else "")

    def render(self, template: str, **values: Any) -> bytes:
        now = datetime.fromtimestamp(self.now(), UTC)
        page = self.env.get_template(template).render(
            url=self.url, now=now, when=lambda t: when(t, now), periods=PERIODS, **values)
        return page.encode("utf-8")


# -- the resources ----------------------------------------------------------------------------


# No script, no frames but the dashboard's own, styles only inline, forms only to itself.
CONTENT_SECURITY_POLICY = (b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                           b"form-action 'self'; frame-ancestors 'self'; base-uri 'none'")


class _Page(resource.Resource):
    """A page whose figures are read through ``run`` and written when they come."""

    isLeaf = True
    nav = ""

    def __init__(self, data: DashboardData, run: Runner, pages: Pages) -> None:
        super().__init__()
        self.data = data
        self.run = run
        self.pages = pages

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.pages.now(), UTC)

    def render_GET(self, request: IRequest) -> Any:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.postpath not in ([], [b""]):
            return self.error(request, 404, "No such page.")
        try:
            d = self.read(request)
        except BadRequest as e:
            return self.error(request, 400, str(e))
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d.addCallback(self._write, request, gone)
        d.addErrback(self._failed, request, gone)
        return server.NOT_DONE_YET

    def read(self, request: IRequest) -> defer.Deferred:
        """Ask ``run`` for the figures; fires with the page's bytes. Raises ``BadRequest``."""
        raise NotImplementedError

    def error(self, request: IRequest, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        return self.pages.render("error.html", status=status, message=message, nav=self.nav)

    def _write(self, body: bytes, request: IRequest, gone: list[bool]) -> None:
        if gone:
            return
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: IRequest, gone: list[bool]) -> None:
        if not failure.check(NotFound):
            log.failure("dashboard page {uri} failed", failure, uri=request.uri)
        if gone:
            return
        if failure.check(NotFound):
            body = self.error(request, 404, str(failure.value))
        else:
            body = self.error(request, 500, "The figures could not be read; the operational log says why.")
        request.write(body)
        request.finish()


class NotFound(LookupError):
    """Raised inside a page's read for a thing that does not exist."""


class CampaignsPage(_Page):
    nav = "campaigns"

    def read(self, request: IRequest) -> defer.Deferred:
        period = parse_period(request.args, self.now())
        d = self.run(self.data.campaigns, period.start, period.end)
        return d.addCallback(self._page, period)

    def _page(self, campaigns: Sequence[CampaignSummary], period: Period) -> bytes:
        rows = sorted(campaigns, key=lambda c: (-c.injected, c.name))
        total = CampaignSummary(
            "all campaigns", *(sum(getattr(c, f) for c in rows) for f in
                               ("injected", "delivered", "bounces", "opens", "unique_opens", "clicks",
                                "unique_clicks")))
        return self.pages.render("campaigns.html", nav=self.nav, period=period, campaigns=rows,
                                 total=total)


class CampaignPage(_Page):
    nav = "campaigns"

    def read(self, request: IRequest) -> defer.Deferred:
        period = parse_period(request.args, self.now())
        name = _arg(request.args, "name")
        if name is None:
            raise BadRequest("which campaign? give name=")
        d = self.run(self.data.campaign, name, period.start, period.end)
        return d.addCallback(self._page, name, period)

    def _page(self, detail: CampaignDetail | None, name: str, period: Period) -> bytes:
        if detail is None:
            raise NotFound(f"No campaign {name!r} in {period.label()}.")
        hours = hours_between(period.start, period.end)
        counts = {h.hour: h for h in detail.hours}
        empty = HourCounts(hours[0])
        series = [Series(label, css, [getattr(counts.get(h, empty), attr) for h in hours])
                  for label, css, attr in (("Deliveries", "delivered", "delivered"),
                                           ("Opens", "opens", "opens"), ("Clicks", "clicks", "clicks"))]
        title = f"Deliveries, opens and clicks per hour, {period.label()}"
        charts = {"wide": hourly_chart(hours, series, title, WIDE),
                  "narrow": hourly_chart(hours, series, title, NARROW)}
        links = sorted(detail.links, key=lambda link: (-link.clicks, link.link_name, link.url))
        return self.pages.render("campaign.html", nav=self.nav, period=period, campaign=detail.summary,
                                 links=links, charts=charts, series=series, name=name)


class QueuePage(_Page):
    nav = "queue"

    def read(self, request: IRequest) -> defer.Deferred:
        return self.run(self.data.queue_by_destination).addCallback(self._page)

    def _page(self, destinations: Sequence[DestinationQueue]) -> bytes:
        oldest_first = sorted(destinations, key=lambda q: (q.oldest is None,
                                                           q.oldest.timestamp() if q.oldest else 0, q.domain))
        return self.pages.render("queue.html", nav=self.nav, destinations=oldest_first,
                                 copies=sum(q.copies for q in destinations),
                                 held=sum(q.held for q in destinations))


class EventsPage(_Page):
    nav = "events"

    def read(self, request: IRequest) -> defer.Deferred:
        text = _arg(request.args, "limit") or str(EVENT_LIMITS[1])
        if not text.isdigit() or int(text) not in EVENT_LIMITS:
            raise BadRequest(f"limit must be one of {', '.join(map(str, EVENT_LIMITS))}")
        limit = int(text)
        return self.run(self.data.recent_events, limit).addCallback(self._page, limit)

    def _page(self, events: Sequence[RecentEvent], limit: int) -> bytes:
        newest_first = sorted(events, key=lambda e: e.timestamp, reverse=True)[:limit]
        return self.pages.render("events.html", nav=self.nav, events=newest_first, limit=limit,
                                 limits=EVENT_LIMITS)


@dataclass
class Dashboard:
    """
    Builds the dashboard's resource tree: ``/``, ``/campaign``, ``/queue``, ``/events``.

    ``root`` is a plain ``Resource``: the admin listener adds its own
    children (``/healthz``, ``/metrics``, ``/api/...``) beside the pages.
    ``base`` is the path it is mounted at, for the links between pages.
    """

    data: DashboardData
    run: Runner
    base: str = "/"
    now: Callable[[], float] = time.time
    root: resource.Resource = field(init=False)

    def __post_init__(self) -> None:
        pages = Pages(self.base, self.now)
        self.root = resource.Resource()
        self.root.putChild(b"", CampaignsPage(self.data, self.run, pages))
        self.root.putChild(b"campaign", CampaignPage(self.data, self.run, pages))
        self.root.putChild(b"queue", QueuePage(self.data, self.run, pages))
        self.root.putChild(b"events", EventsPage(self.data, self.run, pages))
