"""
A plain in-memory ``DashboardData`` with the figures of a small sender's week, for the page tests.

``NOW`` is the tests' clock. The figures are realistic in shape (a campaign
sent in a burst, opens and clicks trailing off over the following hours, a
destination deferring with a greylisting reply) and awkward where it
matters: a campaign name with markup in it, one with none, a long URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from appliance.admin.dashboard import (
    CampaignDetail,
    CampaignSummary,
    DestinationQueue,
    HourCounts,
    LinkClicks,
    RecentEvent,
)

NOW = datetime(2026, 12, 2, 15, 30, tzinfo=UTC)
SENT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)  # when spring-sale went out
LONG_URL = ("https://shop.example/collections/spring/outdoor-furniture-and-garden-lighting?"
            "utm_source=newsletter&utm_medium=email&utm_campaign=spring-sale&utm_content=hero-banner")


def _hours() -> list[HourCounts]:
    """Deliveries in two hours, then opens and clicks falling off over a day."""
    out = [HourCounts(SENT, delivered=700, opens=150, clicks=30),
           HourCounts(SENT + timedelta(hours=1), delivered=480, opens=120, clicks=28)]
    opens, clicks = 60, 14
    for h in range(2, 26, 2):
        out.append(HourCounts(SENT + timedelta(hours=h), opens=opens, clicks=clicks))
        opens, clicks = opens * 2 // 3, clicks * 2 // 3
    return out


@dataclass
class MemoryDashboardData:
    campaign_rows: dict[str, CampaignDetail] = field(default_factory=dict)
    queue: list[DestinationQueue] = field(default_factory=list)
    events: list[RecentEvent] = field(default_factory=list)
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def campaigns(self, start: datetime, end: datetime) -> Sequence[CampaignSummary]:
        self.calls.append(("campaigns", start, end))
        return [d.summary for d in self.campaign_rows.values()]

    def campaign(self, name: str, start: datetime, end: datetime) -> CampaignDetail | None:
        self.calls.append(("campaign", name, start, end))
        return self.campaign_rows.get(name)

    def queue_by_destination(self) -> Sequence[DestinationQueue]:
        self.calls.append(("queue",))
        return self.queue

    def recent_events(self, limit: int) -> Sequence[RecentEvent]:
        self.calls.append(("events", limit))
        return self.events[:limit]


def sample_data() -> MemoryDashboardData:
    spring = CampaignDetail(
        CampaignSummary("spring-sale", injected=1200, delivered=1180, bounces=20, opens=438,
                        unique_opens=310, clicks=94, unique_clicks=72),
        links=[LinkClicks("hero", LONG_URL, "Shop the spring range", 61, 48),
               LinkClicks("Raw URL", "https://shop.example/", "[image: Shop logo]", 22, 17),
               LinkClicks("unsubscribe", "https://shop.example/unsub?u=1", "Unsubscribe", 12, 12)],
        hours=_hours())
    newsletter = CampaignDetail(
        CampaignSummary("newsletter-48", injected=5400, delivered=5310, bounces=90, opens=2204,
                        unique_opens=1790, clicks=388, unique_clicks=301))
    odd = CampaignDetail(CampaignSummary("<b>launch</b> & co", injected=3, delivered=0, bounces=3))
    none = CampaignDetail(CampaignSummary("", injected=42, delivered=41, bounces=1, opens=5,
                                          unique_opens=5))
    queue = [
        DestinationQueue("mail.example-isp.net", 37, NOW - timedelta(hours=2, minutes=14), held=0,
                         next_attempt=NOW + timedelta(minutes=6),
                         last_error="421 4.7.0 Try again later, closing connection. (greylisted)"),
        DestinationQueue("gmail.com", 3, NOW - timedelta(minutes=4), next_attempt=NOW + timedelta(minutes=1),
                         last_error="451 4.3.0 Mail server temporarily rejected message."),
        DestinationQueue("corp.example", 5, NOW - timedelta(days=1, hours=3), held=5),
    ]
    events = [
        RecentEvent(NOW - timedelta(seconds=12), "click", "spring-sale", "ann@example.org",
                    "0a1b00018c2f3e4d5a6b7", "hero → " + LONG_URL),
        RecentEvent(NOW - timedelta(seconds=40), "open", "spring-sale", "ann@example.org",
                    "0a1b00018c2f3e4d5a6b7", "Apple Mail"),
        RecentEvent(NOW - timedelta(minutes=3), "delay", "newsletter-48", "bob@mail.example-isp.net",
                    "0a1b00018c2f3e4d5a6c0", "421 4.7.0 Try again later"),
        RecentEvent(NOW - timedelta(minutes=5), "bounce", "<b>launch</b> & co", "nobody@corp.example",
                    "0a1b00018c2f3e4d5a6c1", "550 5.1.1 <nobody@corp.example>: user unknown (class 10)"),
        RecentEvent(NOW - timedelta(minutes=9), "delivery", "newsletter-48", "carol@example.net",
                    "0a1b00018c2f3e4d5a6c2", "250 2.0.0 OK"),
    ]
    return MemoryDashboardData({c.summary.name: c for c in (spring, newsletter, odd, none)}, queue, events)
