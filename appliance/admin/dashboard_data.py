"""
The dashboard's figures, from the statistics store, the event log and the live queue.

``StoreData`` answers ``appliance.admin.dashboard.DashboardData``. Its
store and log reads block and run in the file pool; the queue is the
delivery service's own state, read on the reactor thread (``on_reactor``
marks the methods the runner must call there).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet import defer

from appliance import eventsearch
from appliance.admin.dashboard import (
    CampaignDetail,
    CampaignSummary,
    DestinationQueue,
    HourCounts,
    LinkClicks,
    RecentEvent,
    Runner,
)
from appliance.stats.store import StoreError, connect, query_links, query_metrics

# The store's metric behind each figure of a campaign's summary.
_SUMMARY = {"injected": "count_injected", "delivered": "count_delivered", "bounces": "count_bounce",
            "opens": "count_rendered", "unique_opens": "count_unique_confirmed_opened",
            "clicks": "count_clicked", "unique_clicks": "count_unique_clicked"}
_TAIL_CHUNK = 64 * 1024


def on_reactor(f: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``f`` as reading the reactor thread's state: ``runner`` calls it there."""
    f.on_reactor = True  # type: ignore[attr-defined]
    return f


def runner(run_blocking: Runner) -> Runner:
    """Run blocking reads through ``run_blocking``, and methods marked ``on_reactor`` in place."""
    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if getattr(f, "on_reactor", False):
            return defer.maybeDeferred(f, *args)
        return run_blocking(f, *args)
    return run


def _epoch(when: datetime) -> int:
    return int(when.timestamp())


class StoreData:
    """``DashboardData`` over ``database`` (the statistics store), ``log_path`` and ``queue``."""

    def __init__(self, database: str, log_path: str,
                 queue: Callable[[], Sequence[DestinationQueue]]) -> None:
        self.database = database
        self.log_path = log_path
        self._queue = queue

    def _connect(self) -> sqlite3.Connection:
        if not os.path.exists(self.database):
            raise StoreError(f"{self.database}: the statistics store is not there yet")
        return connect(self.database, read_only=True)

    def campaigns(self, start: datetime, end: datetime) -> Sequence[CampaignSummary]:
        db = self._connect()
        try:
            rows = query_metrics(db, list(_SUMMARY.values()), _epoch(start), _epoch(end),
                                 by_campaign=True)
            rows += [{"campaign_id": "", **row} for row in
                     query_metrics(db, list(_SUMMARY.values()), _epoch(start), _epoch(end),
                                   campaigns=[""])]
        finally:
            db.close()
        return [self._summary(row["campaign_id"], row) for row in rows if any(
            row[m] for m in _SUMMARY.values())]

    @staticmethod
    def _summary(name: str, row: dict[str, Any]) -> CampaignSummary:
        return CampaignSummary(name, **{field: int(row[metric] or 0) for field, metric in _SUMMARY.items()})

    def campaign(self, name: str, start: datetime, end: datetime) -> CampaignDetail | None:
        since, until = _epoch(start), _epoch(end)
        db = self._connect()
        try:
            row = query_metrics(db, list(_SUMMARY.values()), since, until, campaigns=[name])[0]
            links = query_links(db, since, until, campaigns=[name])
            hours = db.execute(
                "SELECT hour, delivered, rendered, clicked FROM hourly "
                "WHERE campaign = ? AND hour >= ? AND hour < ? ORDER BY hour",
                (name, since - since % 3600, until)).fetchall()
        finally:
            db.close()
        if not any(row[m] for m in _SUMMARY.values()) and not hours:
            return None
        return CampaignDetail(
            self._summary(name, row),
            [LinkClicks(link["target_link_name"], link["target_link_url"], link["target_link_anchor"],
                        int(link["count_clicked"]), int(link["count_unique_clicked"]))
             for link in links],
            [HourCounts(datetime.fromtimestamp(hour, UTC), delivered, opens, clicks)
             for hour, delivered, opens, clicks in hours])

    @on_reactor
    def queue_by_destination(self) -> Sequence[DestinationQueue]:
        return self._queue()

    def recent_events(self, limit: int) -> Sequence[RecentEvent]:
        events = [eventsearch.parse(line) for line in last_lines(self.log_path, limit)]
        return [_recent(event) for event in reversed(events) if event is not None]


class QueuedCopy(Protocol):
    """What the dashboard reads of a copy in the delivery queue's listing."""

    domain: str
    received_at: float
    next_attempt: float | None
    last_error: str
    held: bool


def queue_by_domain(copies: Iterable[QueuedCopy]) -> list[DestinationQueue]:
    """Copies by recipient domain: how many, the oldest, how many held, the next attempt, the last error."""
    by_domain: dict[str, list[QueuedCopy]] = {}
    for copy in copies:
        by_domain.setdefault(copy.domain, []).append(copy)
    out = []
    for domain, group in sorted(by_domain.items()):
        oldest = min(group, key=lambda c: c.received_at)
        waits = [c.next_attempt for c in group if c.next_attempt is not None]
        errors = [c for c in group if c.last_error]
        out.append(DestinationQueue(
            domain, len(group), datetime.fromtimestamp(oldest.received_at, UTC),
            held=sum(c.held for c in group),
            next_attempt=datetime.fromtimestamp(min(waits), UTC) if waits else None,
            # The error of the copy that has waited longest says most about the destination.
            last_error=min(errors, key=lambda c: c.received_at).last_error if errors else ""))
    out.sort(key=lambda q: -q.copies)
    return out


def _recent(event: dict[str, Any]) -> RecentEvent:
    detail = (event.get("target_link_url") or event.get("raw_reason") or event.get("reason")
              or event.get("error_code") or "")
    return RecentEvent(datetime.fromtimestamp(eventsearch.event_time(event), UTC), str(event.get("type", "")),
                       str(event.get("campaign_id", "")), str(event.get("rcpt_to", "")),
                       str(event.get("message_id", "")), str(detail))


def last_lines(path: str, count: int) -> list[bytes]:
    """The last ``count`` whole lines of the file at ``path`` (fewer if it has fewer), read from its end."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= count:
            step = min(_TAIL_CHUNK, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
    if not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]  # a line being written is left
    lines = data.splitlines(keepends=True)
    if position > 0:
        lines = lines[1:]  # the first may be cut
    return lines[-count:] if count else []
