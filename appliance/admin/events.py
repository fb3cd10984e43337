"""
SparkPost's Events API search over the event log: ``GET /api/v1/events/message``.

Parameters as SparkPost names them: ``events``, ``recipients``, ``campaigns``,
``message_ids``, ``transmissions`` (comma lists), ``from`` (default 24 hours
before ``to``), ``to`` (default now), ``per_page`` (1 to 10,000, default
1,000) and ``cursor``. The answer is ``{"results": [...], "total_count": n,
"links": {"next": ...}}``, newest first, each event as the log holds it. The
cursor carries the window's end and the last event given, so the next page
continues where this one stopped even as the log grows. The search is
``appliance.eventsearch``, the same as ``engage-appliance events``, run in a thread.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from appliance import eventsearch
from appliance.admin.query import QueryError, arguments, comma_list, window
from appliance.admin.responses import error, results
from appliance.eventtypes import EVENT_TYPES
from appliance.reactors import Runner

log = Logger()

PATH = "/api/v1/events/message"
PARAMETERS = ("events", "recipients", "campaigns", "message_ids", "transmissions", "from", "to",
              "per_page", "cursor")
DAY = 86400


def encode_cursor(until: int, after: str) -> str:
    raw = json.dumps([until, after], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[int, str]:
    try:
        until, after = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, TypeError):
        raise QueryError("cursor", "not a cursor this server gave") from None
    if type(until) is not int or not isinstance(after, str):
        raise QueryError("cursor", "not a cursor this server gave")
    return until, after


def read_query(args: dict[str, str], now: float) -> dict[str, Any]:
    """The search's filters, page size and position, or a ``QueryError``."""
    after = None
    if args.get("cursor", "initial") != "initial":
        until, after = decode_cursor(args["cursor"])
        now = until  # the first page's window end, so the pages do not shift
        args = {k: v for k, v in args.items() if k != "to"}
    since, until = window(args, now, default_span=DAY)
    per_page = args.get("per_page", "1000")
    if not per_page.isdigit() or not 1 <= int(per_page) <= 10000:
        raise QueryError("per_page", f"per_page must be a number from 1 to 10000, got {per_page!r}")

    def listed(name: str, known: list[str] | None = None) -> list[str]:
        return comma_list(name, args[name], known) if name in args else []

    filters = eventsearch.Filters.of(
        types=listed("events", list(EVENT_TYPES)), campaigns=listed("campaigns"),
        recipients=listed("recipients"), message_ids=listed("message_ids"),
        transmission_ids=listed("transmissions"), since=since, until=until)
    return {"filters": filters, "per_page": int(per_page), "after": after, "until": until}


def next_link(args: dict[str, str], until: int, after: str) -> str:
    kept = {k: v for k, v in args.items() if k not in ("cursor", "to")}
    return f"{PATH}?{urlencode({**kept, 'cursor': encode_cursor(until, after)})}"


class EventSearchResource(Resource):
    """Searches the event log at ``log_path`` and its rotated files."""

    isLeaf = True

    def __init__(self, log_path: str, run: Runner, clock: IReactorTime) -> None:
        super().__init__()
        self.log_path = log_path
        self._run = run
        self._clock = clock

    def render_GET(self, request: IRequest) -> bytes | int:
        if [part for part in request.postpath if part]:
            return error(request, 404, "no such resource")
        try:
            args = arguments(request, PARAMETERS)
            query = read_query(args, self._clock.seconds())
        except QueryError as e:
            return e.answer(request)
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)

        def answer(found: tuple[list[dict[str, Any]], int, str | None]) -> None:
            events, total, last = found
            links = {"next": next_link(args, query["until"], last)} if last is not None else {}
            if not finished:
                request.write(results(request, events, total_count=total, links=links))
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(KeyError):
                body = QueryError("cursor", "the cursor's event is no longer in the log").answer(request)
            else:
                log.failure("event search failed", failure)
                body = error(request, 500, "the event search failed")
            if not finished:
                request.write(body)
                request.finish()

        d = self._run(eventsearch.page, self.log_path, query["filters"], query["per_page"],
                      query["after"])
        d.addCallbacks(answer, failed)
        return NOT_DONE_YET
