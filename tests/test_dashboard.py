"""The dashboard's resources without a browser: periods, runs, errors, escaping, the chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bs4 import BeautifulSoup
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from appliance.admin.chart import (
    NARROW,
    WIDE,
    Series,
    _ticks,
    hourly_chart,
    hours_between,
    nice_ceiling,
    scale,
)
from appliance.admin.dashboard import BadRequest, Dashboard, parse_period, percent, when
from tests.dashboard_data import NOW, MemoryDashboardData, sample_data


def synchronous(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


class Later:
    """A runner whose reads finish when the test says: as a thread pool's would, later."""

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred, Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def finish(self) -> None:
        for d, f, args in self.pending:
            d.callback(f(*args))
        self.pending = []


def get(dashboard: Dashboard, path: bytes, **args: str) -> DummyRequest:
    """A GET of ``path`` (one segment) with query ``args``, rendered as twisted.web would."""
    request = DummyRequest([path] if path else [b""])
    request.args = {k.encode(): [v.encode()] for k, v in args.items()}
    child = getChildForRequest(dashboard.root, request)
    body = child.render(request)
    if body is not server.NOT_DONE_YET:
        request.write(body)
        request.finish()
    return request


def page(request: DummyRequest) -> BeautifulSoup:
    return BeautifulSoup(b"".join(request.written), "lxml")


class PageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = sample_data()
        self.dashboard = Dashboard(self.data, synchronous, now=NOW.timestamp)

    def test_campaigns_asks_for_the_period_and_shows_rates(self) -> None:
        request = get(self.dashboard, b"", period="30d")
        self.assertEqual(request.finished, 1)
        self.assertIsNone(request.responseCode)  # 200
        self.assertEqual(self.data.calls, [("campaigns", NOW - timedelta(days=30), NOW)])
        rows = page(request).select("#campaigns tbody tr")
        first = {td["data-label"]: td.get_text(strip=True) for td in rows[0].find_all("td")}
        self.assertEqual(first, {"Campaign": "newsletter-48", "Injected": "5,400", "Delivered": "5,310",
                                 "Bounces": "90", "Opens": "2,204", "Unique opens": "1,790",
                                 "Clicks": "388", "Unique clicks": "301", "Open rate": "33.7%",
                                 "Click rate": "5.7%"})
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])

    def test_names_are_text_never_markup(self) -> None:
        soup = page(get(self.dashboard, b""))
        self.assertIsNone(soup.select_one("#campaigns b"))
        names = [a.get_text() for a in soup.select("#campaigns td[data-label=Campaign] a")]
        self.assertIn("<b>launch</b> & co", names)
        link = soup.find("a", string="<b>launch</b> & co")
        self.assertEqual(link["href"], "/campaign?name=%3Cb%3Elaunch%3C%2Fb%3E+%26+co&period=7d")

    def test_campaign_page_reads_later_and_writes_when_the_figures_come(self) -> None:
        later = Later()
        dashboard = Dashboard(self.data, later, now=NOW.timestamp)
        request = get(dashboard, b"campaign", name="spring-sale", **{"from": "2026-12-01T00:00",
                                                                    "to": "2026-12-02T00:00"})
        self.assertEqual((request.finished, request.written), (0, []))
        later.finish()
        self.assertEqual(request.finished, 1)
        soup = page(request)
        self.assertEqual(self.data.calls, [("campaign", "spring-sale", datetime(2026, 12, 1, tzinfo=UTC),
                                            datetime(2026, 12, 2, tzinfo=UTC))])
        self.assertEqual([td.get_text() for td in soup.select("#links td[data-label='Link name']")],
                         ["hero", "Raw URL", "unsubscribe"])
        self.assertEqual(len(soup.select(".chart-wide svg polyline")), 3)
        self.assertEqual(len(soup.select(".chart-narrow svg polyline")), 3)
        # One point per hour of the period: 24.
        points = soup.select_one(".chart-wide polyline.delivered")["points"].split()
        self.assertEqual(len(points), 24)

    def test_a_client_that_leaves_before_the_figures_come(self) -> None:
        later = Later()
        request = get(Dashboard(self.data, later, now=NOW.timestamp), b"queue")
        request.processingFailed(Failure(ConnectionError("gone")))  # fires notifyFinish's errback
        later.finish()
        self.assertEqual(request.written, [])

    def test_bad_periods_are_400_with_what_to_change(self) -> None:
        for args, message in [
            ({"period": "1y"}, "period must be one of 24h, 7d, 30d, 90d, not '1y'"),
            ({"from": "yesterday"}, "from must be a UTC time written YYYY-MM-DDTHH:MM, not 'yesterday'"),
            ({"from": "2026-12-02T00:00", "to": "2026-12-01T00:00"}, "from must be before to"),
            ({"from": "2024-01-01T00:00"}, "a period is at most 366 days"),
            ({"to": "2026-12-01T00:00"}, "to needs from"),
            ({"period": "7d", "from": "2026-12-01T00:00"}, "give either period or from/to, not both"),
        ]:
            request = get(self.dashboard, b"", **args)
            self.assertEqual(request.responseCode, 400, args)
            self.assertEqual(page(request).select_one("#error").get_text(), message)
        self.assertEqual(self.data.calls, [])

    def test_unknown_campaign_and_page(self) -> None:
        request = get(self.dashboard, b"campaign", name="nope", period="24h")
        self.assertEqual(request.responseCode, 404)
        self.assertIn("No campaign 'nope' in 2026-12-01 15:30 to 2026-12-02 15:30 UTC.",
                      page(request).select_one("#error").get_text())
        self.assertEqual(get(self.dashboard, b"campaign").responseCode, 400)
        request = DummyRequest([b"queue", b"extra"])
        getChildForRequest(self.dashboard.root, request).render(request)
        self.assertEqual(request.responseCode, 404)

    def test_a_failed_read_is_500_and_logged(self) -> None:
        def broken(*args: Any) -> defer.Deferred:
            return defer.fail(OSError("database is locked"))

        request = get(Dashboard(self.data, broken, now=NOW.timestamp), b"events")
        self.assertEqual(request.responseCode, 500)
        self.assertIn("could not be read", page(request).select_one("#error").get_text())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_queue_oldest_first_and_events_newest_first(self) -> None:
        soup = page(get(self.dashboard, b"queue"))
        self.assertEqual([td.get_text() for td in soup.select("#queue td[data-label=Destination]")],
                         ["corp.example", "mail.example-isp.net", "gmail.com"])
        self.assertEqual(soup.select_one("#queue-total").get_text(),
                         "45 copies waiting for 3 destinations, 5 held.")
        soup = page(get(self.dashboard, b"events", limit="50"))
        self.assertEqual([td.get_text() for td in soup.select("#events td[data-label=Type]")],
                         ["click", "open", "delay", "bounce", "delivery"])
        self.assertEqual(get(self.dashboard, b"events", limit="7").responseCode, 400)

    def test_empty_pages(self) -> None:
        empty = Dashboard(MemoryDashboardData(), synchronous, now=NOW.timestamp)
        self.assertEqual(page(get(empty, b"")).select_one(".empty").get_text(), "No mail in this period.")
        self.assertIn("The queue is empty", page(get(empty, b"queue")).select_one(".empty").get_text())
        self.assertEqual(page(get(empty, b"events")).select_one(".empty").get_text(), "No events yet.")

    def test_links_follow_where_it_is_mounted(self) -> None:
        mounted = Dashboard(self.data, synchronous, base="/admin", now=NOW.timestamp)
        soup = page(get(mounted, b""))
        self.assertEqual([a["href"] for a in soup.select("header nav a")],
                         ["/admin/", "/admin/queue", "/admin/events"])

    def test_the_page_forbids_scripts(self) -> None:
        request = get(self.dashboard, b"")
        [policy] = request.responseHeaders.getRawHeaders(b"content-security-policy")
        self.assertIn(b"default-src 'none'", policy)
        self.assertIsNone(page(request).find("script"))


class PeriodTests(SynchronousTestCase):
    def test_default_is_the_last_seven_days(self) -> None:
        period = parse_period({}, NOW)
        self.assertEqual((period.start, period.end, period.query()), (NOW - timedelta(days=7), NOW,
                                                                      {"period": "7d"}))

    def test_from_alone_runs_to_now(self) -> None:
        period = parse_period({b"from": [b"2026-12-01T10:00"]}, NOW)
        self.assertEqual((period.start, period.end), (datetime(2026, 12, 1, 10, tzinfo=UTC), NOW))
        self.assertEqual(period.query(), {"from": "2026-12-01T10:00", "to": "2026-12-02T15:30"})

    def test_not_utf8(self) -> None:
        self.assertRaises(BadRequest, parse_period, {b"period": [b"\xff"]}, NOW)


class FormatTests(SynchronousTestCase):
    def test_rates_and_times(self) -> None:
        self.assertEqual([percent(None), percent(0.0), percent(0.33710)], ["–", "0.0%", "33.7%"])
        self.assertEqual(when(NOW - timedelta(hours=26, minutes=5), NOW), "2026-12-01 13:25:00 (1d2h ago)")
        self.assertEqual(when(NOW + timedelta(minutes=6), NOW), "2026-12-02 15:36:00 (in 6m)")
        self.assertEqual(when(None, NOW), "–")


class ChartTests(SynchronousTestCase):
    def test_hours_of_a_period(self) -> None:
        hours = hours_between(datetime(2026, 12, 1, 9, 30, tzinfo=UTC), datetime(2026, 12, 1, 12, tzinfo=UTC))
        self.assertEqual([h.hour for h in hours], [9, 10, 11])

    def test_scale_and_ticks(self) -> None:
        self.assertEqual([nice_ceiling(v) for v in (0, 1, 3, 7, 10, 11, 700, 2001)],
                         [1, 1, 5, 10, 10, 20, 1000, 5000])
        self.assertEqual([scale(v) for v in (0, 1, 3, 9, 700, 1180)],
                         [(1, 1), (1, 1), (3, 1), (10, 5), (800, 200), (1500, 500)])
        week = hours_between(NOW - timedelta(days=7), NOW)
        ticks, step = _ticks(week, WIDE.max_labels)
        self.assertEqual(step, 24)
        self.assertTrue(all(week[i].hour == 0 for i in ticks))
        self.assertLessEqual(len(_ticks(week, NARROW.max_labels)[0]), NARROW.max_labels)

    def test_axes_are_labelled_and_text_is_escaped(self) -> None:
        hours = hours_between(NOW - timedelta(hours=6), NOW)
        svg = BeautifulSoup(str(hourly_chart(hours, [Series("<Opens>", "opens", [0, 3, 9, 4, 1, 0, 0])],
                                             "a <title>")), "lxml")
        self.assertEqual(svg.find("title").get_text(), "a <title>")
        self.assertEqual([t.get_text() for t in svg.select("text.y-label")], ["0", "5", "10"])
        self.assertEqual([t.get_text() for t in svg.select("text.x-label")],
                         ["09:00", "10:00", "11:00", "12:00", "13:00", "14:00", "15:00"])
        self.assertEqual([t.get_text() for t in svg.select("text.axis-title")], ["hour (UTC)", "per hour"])
        self.assertEqual(svg.select_one("polyline title").get_text(), "<Opens>")

    def test_one_hour_is_a_point(self) -> None:
        svg = str(hourly_chart([NOW], [Series("Opens", "opens", [5])], "one"))
        self.assertIn("<circle", svg)
