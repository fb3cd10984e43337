"""
SparkPost's Metrics API over the statistics store.

``GET /api/v1/metrics/deliverability`` answers ``{"results": [{metric: n, ...}]}``
for the window; ``.../deliverability/campaign`` one object per campaign with
its ``campaign_id``. Parameters: ``from`` and ``metrics`` required, ``to``
(default now), ``campaigns``, ``timezone`` (UTC only), and ``limit`` for the
campaign report. The store keeps hourly counts, so a window is widened to
whole hours. The query runs in a thread, on a read-only
connection of its own: the service's writer never waits for a report.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from appliance.admin.query import QueryError, arguments, comma_list, timezone, window
from appliance.admin.responses import error, results
from appliance.reactors import Runner
from appliance.stats import METRICS, connect
from appliance.stats.store import query_metrics

log = Logger()

PARAMETERS = ("from", "to", "metrics", "campaigns", "timezone", "limit")


def read_query(args: dict[str, str], now: float, by_campaign: bool) -> dict[str, Any]:
    """The query's window, metrics, campaigns and limit, or a ``QueryError``."""
    timezone(args)
    since, until = window(args, now)
    if "metrics" not in args:
        raise QueryError("metrics", "metrics is required (a comma list such as count_injected,"
                                    "count_delivered)")
    limit = 1000
    if "limit" in args:
        if not by_campaign:
            raise QueryError("limit", "limit applies to the campaign report only")
        if not args["limit"].isdigit() or not 1 <= int(args["limit"]) <= 10000:
            raise QueryError("limit", f"limit must be a number from 1 to 10000, got {args['limit']!r}")
        limit = int(args["limit"])
    return {
        "names": comma_list("metrics", args["metrics"], list(METRICS)),
        "since": since, "until": until,
        "campaigns": comma_list("campaigns", args["campaigns"]) if "campaigns" in args else [],
        "by_campaign": by_campaign, "limit": limit,
    }


def run_query(database: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    """Blocking: the rows of the report."""
    db = connect(database, read_only=True)
    try:
        limit = query.pop("limit")
        return query_metrics(db, **query)[:limit]
    finally:
        db.close()


class DeliverabilityResource(Resource):
    """``/api/v1/metrics/deliverability`` and, below it, ``campaign``."""

    isLeaf = True

    def __init__(self, database: str, run: Runner, clock: IReactorTime) -> None:
        super().__init__()
        self.database = database
        self._run = run
        self._clock = clock

    def render_GET(self, request: IRequest) -> bytes | int:
        rest = [part for part in request.postpath if part]
        if rest not in ([], [b"campaign"]):
            return error(request, 404, "no such resource")
        try:
            query = read_query(arguments(request, PARAMETERS), self._clock.seconds(), bool(rest))
        except QueryError as e:
            return e.answer(request)
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)

        def answer(rows: list[dict[str, Any]]) -> None:
            if not finished:
                request.write(results(request, rows))
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(sqlite3.OperationalError):
                body = error(request, 503, "the statistics store is not ready",
                             description=str(failure.value))
            else:
                log.failure("metrics query failed", failure)
                body = error(request, 500, "the metrics query failed")
            if not finished:
                request.write(body)
                request.finish()

        self._run(run_query, self.database, query).addCallbacks(answer, failed)
        return NOT_DONE_YET
