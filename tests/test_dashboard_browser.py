"""
The dashboard in a real browser: every page from a loopback ``Site``, read by headless Chromium.

Each page's DOM, as Chromium built it, must hold the figures of the test
data; each page is photographed at 1280 and 375 px wide, the screenshots
kept in ``dashboard-screenshots/`` of trial's working directory
(``_trial_temp/``, or ``_trial_temp/N/`` under ``-j``); and a test-only page
frames every page at both widths and reports whether anything is wider than
the frame, which would make a phone scroll sideways.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from bs4 import BeautifulSoup
from twisted.internet import defer, reactor, utils
from twisted.trial import unittest
from twisted.web import resource, server

from appliance.admin.dashboard import Dashboard
from tests.dashboard_data import LONG_URL, NOW, sample_data
from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS

PAGES = {
    "campaigns": "/?period=7d",
    "campaign": "/campaign?name=spring-sale&period=7d",
    "queue": "/queue",
    "events": "/events",
}
WIDTHS = {1280: 1000, 375: 1600}  # width: height of the window photographed
SCREENSHOTS = "dashboard-screenshots"

# Frames each page at each width; once all have loaded, writes what it measured into the page.
PROBE = """<!doctype html><html><body><pre id="measured"></pre>
{frames}
<script>
addEventListener("load", () => {{
  const out = [];
  for (const frame of document.querySelectorAll("iframe")) {{
    const doc = frame.contentDocument, root = doc.documentElement;
    const narrow = doc.querySelector(".chart-narrow"), wide = doc.querySelector(".chart-wide");
    out.push({{page: frame.dataset.page, width: Number(frame.width), scrollWidth: root.scrollWidth,
               clientWidth: root.clientWidth,
               narrowChart: narrow ? getComputedStyle(narrow).display : null,
               wideChart: wide ? getComputedStyle(wide).display : null}});
  }}
  document.getElementById("measured").textContent = JSON.stringify(out);
}});
</script></body></html>"""


class Probe(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        frames = "\n".join(f'<iframe data-page="{name}" width="{width}" height="600" src="{path}"></iframe>'
                           for name, path in PAGES.items() for width in WIDTHS)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PROBE.format(frames=frames).encode()


def synchronous(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


class DashboardBrowserTests(unittest.TestCase):
    if CHROMIUM is None:
        skip = "chromium is not installed (Debian: apt-get install chromium; .ci/run does this)"

    def setUp(self) -> None:
        dashboard = Dashboard(sample_data(), synchronous, now=NOW.timestamp)
        dashboard.root.putChild(b"probe", Probe())  # beside the pages, as the admin listener's own are
        site = server.Site(dashboard.root)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def chromium(self, *args: str) -> defer.Deferred:
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        return utils.getProcessOutputAndValue(
            "timeout", ("60", CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args),
            env=dict(os.environ))

    @defer.inlineCallbacks
    def dom(self, path: str) -> Any:
        out, err, code = yield self.chromium("--virtual-time-budget=5000", "--dump-dom", self.base + path)
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-2000:])
        return BeautifulSoup(out, "lxml")

    def cells(self, row: Any) -> dict[str, str]:
        return {td["data-label"]: " ".join(td.get_text().split()) for td in row.find_all("td")}

    @defer.inlineCallbacks
    def test_campaigns_page(self) -> Any:
        soup = yield self.dom(PAGES["campaigns"])
        self.assertEqual(soup.title.get_text(), "Campaigns · engage-appliance")
        totals = [" ".join(card.get_text(" ").split()) for card in soup.select("#totals .card")]
        self.assertEqual(totals, ["6,645 injected", "6,531 delivered", "114 bounces", "32.2% open rate",
                                  "5.7% click rate"])
        rows = [self.cells(row) for row in soup.select("#campaigns tbody tr")]
        self.assertEqual([r["Campaign"] for r in rows],
                         ["newsletter-48", "spring-sale", "(no campaign)", "<b>launch</b> & co"])
        self.assertEqual(rows[1], {"Campaign": "spring-sale", "Injected": "1,200", "Delivered": "1,180",
                                   "Bounces": "20", "Opens": "438", "Unique opens": "310", "Clicks": "94",
                                   "Unique clicks": "72", "Open rate": "26.3%", "Click rate": "6.1%"})
        self.assertEqual((rows[3]["Delivered"], rows[3]["Open rate"], rows[3]["Click rate"]),
                         ("0", "–", "–"))
        self.assertEqual(soup.select_one("#period").get_text(), "2026-11-25 15:30 to 2026-12-02 15:30 UTC")

    @defer.inlineCallbacks
    def test_campaign_page(self) -> Any:
        soup = yield self.dom(PAGES["campaign"])
        self.assertEqual(soup.select_one("#campaign-name").get_text(), "spring-sale")
        links = [self.cells(row) for row in soup.select("#links tbody tr")]
        self.assertEqual(links[0], {"Link name": "hero", "Anchor text": "Shop the spring range",
                                    "URL": LONG_URL, "Clicks": "61", "Unique clicks": "48"})
        self.assertEqual([(r["Link name"], r["Clicks"]) for r in links],
                         [("hero", "61"), ("Raw URL", "22"), ("unsubscribe", "12")])
        self.assertEqual([" ".join(li.get_text().split()) for li in soup.select(".legend li")],
                         ["Deliveries: 1,180", "Opens: 438", "Clicks: 94"])
        chart = soup.select_one(".chart-wide svg")
        self.assertEqual([t.get_text() for t in chart.select("text.axis-title")], ["day (UTC)", "per hour"])
        self.assertEqual([t.get_text() for t in chart.select("text.x-label")],
                         ["26 Nov", "27 Nov", "28 Nov", "29 Nov", "30 Nov", "01 Dec", "02 Dec"])
        self.assertEqual([t.get_text() for t in chart.select("text.y-label")],
                         ["0", "200", "400", "600", "800"])
        self.assertEqual(len(chart.select("polyline")), 3)

    @defer.inlineCallbacks
    def test_queue_page(self) -> Any:
        soup = yield self.dom(PAGES["queue"])
        self.assertEqual(soup.select_one("#queue-total").get_text(),
                         "45 copies waiting for 3 destinations, 5 held.")
        rows = [self.cells(row) for row in soup.select("#queue tbody tr")]
        self.assertEqual(rows[1], {"Destination": "mail.example-isp.net", "Copies": "37", "Held": "0",
                                   "Oldest copy": "2026-12-02 13:16:00 (2h14m ago)",
                                   "Next attempt": "2026-12-02 15:36:00 (in 6m)",
                                   "Last error": "421 4.7.0 Try again later, closing connection. "
                                                 "(greylisted)"})
        self.assertEqual([r["Destination"] for r in rows],
                         ["corp.example", "mail.example-isp.net", "gmail.com"])

    @defer.inlineCallbacks
    def test_events_page(self) -> Any:
        soup = yield self.dom(PAGES["events"])
        rows = [self.cells(row) for row in soup.select("#events tbody tr")]
        self.assertEqual(len(rows), 5)
        self.assertEqual(rows[3], {"Time": "2026-12-02 15:25:00", "Type": "bounce",
                                   "Campaign": "<b>launch</b> & co",
                                   "Recipient": "nobody@corp.example", "Message": "0a1b00018c2f3e4d5a6c1",
                                   "Detail": "550 5.1.1 <nobody@corp.example>: user unknown (class 10)"})

    @defer.inlineCallbacks
    def test_every_page_fits_a_phone_and_a_desktop(self) -> Any:
        soup = yield self.dom("/probe")
        measured = json.loads(soup.select_one("#measured").get_text())
        self.assertEqual(len(measured), len(PAGES) * len(WIDTHS))
        for m in measured:
            self.assertLessEqual(m["scrollWidth"], m["clientWidth"], m)  # no sideways scrolling
        charts = {m["width"]: (m["wideChart"], m["narrowChart"]) for m in measured if m["page"] == "campaign"}
        self.assertEqual(charts, {1280: ("block", "none"), 375: ("none", "block")})

    @defer.inlineCallbacks
    def test_screenshots(self) -> Any:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        for name, path in PAGES.items():
            for width, height in WIDTHS.items():
                shot = os.path.abspath(os.path.join(SCREENSHOTS, f"{name}-{width}.png"))
                _, err, code = yield self.chromium("--hide-scrollbars", f"--window-size={width},{height}",
                                                   f"--screenshot={shot}", self.base + path)
                self.assertEqual(code, 0, err.decode("utf-8", "replace")[-2000:])
                self.assertEqual(png_size(shot), (width, height))
                self.assertGreater(os.path.getsize(shot), 10_000)  # a page, not a blank
