"""
Query strings as SparkPost's API reads them: times ``YYYY-MM-DDTHH:MM`` in UTC, comma lists.

A mistake is a ``QueryError`` naming the parameter, answered 400 in
SparkPost's error shape; an unknown parameter is a mistake too, because a
misspelt filter that is silently ignored answers a question nobody asked.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Collection

from twisted.web.iweb import IRequest

from appliance.admin.responses import error

_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})")
TIME_FORMAT = "%Y-%m-%dT%H:%M"


class QueryError(ValueError):
    def __init__(self, param: str, description: str) -> None:
        super().__init__(description)
        self.param = param
        self.description = description

    def answer(self, request: IRequest) -> bytes:
        return error(request, 400, "invalid parameter", description=self.description, param=self.param)


def arguments(request: IRequest, allowed: Collection[str]) -> dict[str, str]:
    """The query's parameters, each once; unknown, repeated or undecodable ones are a ``QueryError``."""
    out: dict[str, str] = {}
    for raw, values in (request.args or {}).items():
        try:
            name = raw.decode("utf-8")
            decoded = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise QueryError(raw.decode("utf-8", "replace"), "not UTF-8") from None
        if name not in allowed:
            raise QueryError(name, f"unknown parameter {name!r}; known: {', '.join(sorted(allowed))}")
        if len(decoded) != 1:
            raise QueryError(name, f"{name} given {len(decoded)} times; give it once, as a comma list")
        out[name] = decoded[0]
    return out


def parse_time(name: str, value: str) -> int:
    """``YYYY-MM-DDTHH:MM`` (UTC) as epoch seconds."""
    m = _TIME.fullmatch(value)
    if m is None:
        raise QueryError(name, f"{name} must be a time like 2026-12-02T14:30 (UTC), got {value!r}")
    try:
        parsed = time.strptime(value, TIME_FORMAT)
    except ValueError:
        raise QueryError(name, f"{name} is not a real time: {value!r}") from None
    return calendar.timegm(parsed)


def format_time(ts: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(ts))


def comma_list(name: str, value: str, known: Collection[str] | None = None) -> list[str]:
    """A comma list without empty items; with ``known``, each must be one of them."""
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise QueryError(name, f"{name} has an empty item: {value!r}")
    if known is not None:
        unknown = [item for item in items if item not in known]
        if unknown:
            raise QueryError(name, f"unknown {name}: {', '.join(unknown)}; known: {', '.join(known)}")
    return items


def window(args: dict[str, str], now: float, default_span: int | None = None) -> tuple[int, int]:
    """``from`` and ``to`` (default now); ``from`` is required unless ``default_span`` is given."""
    until = parse_time("to", args["to"]) if "to" in args else int(now)
    if "from" in args:
        since = parse_time("from", args["from"])
    elif default_span is None:
        raise QueryError("from", "from is required (a time like 2026-12-02T14:30, UTC)")
    else:
        since = until - default_span
    if since >= until:
        raise QueryError("from", "from must be before to")
    return since, until


def timezone(args: dict[str, str]) -> None:
    """Times are UTC; a ``timezone`` other than UTC would be misread, so it is refused."""
    if args.get("timezone", "UTC") not in ("UTC", "Etc/UTC", "GMT"):
        raise QueryError("timezone", "only UTC is supported")
