"""
``/api/v1/suppression-list``: SparkPost's Suppression List API over the appliance's list.

- ``GET /api/v1/suppression-list``: search (``types``, ``sources``,
  ``description``, ``domain``, ``from``, ``to``, ``per_page``, ``page``);
- ``GET /api/v1/suppression-list/{recipient}``: the recipient's entries, or 404;
- ``PUT /api/v1/suppression-list/{recipient}``: insert or update one entry
  (``{"type": ..., "description": ...}``, or the deprecated booleans);
- ``DELETE /api/v1/suppression-list/{recipient}``: 204, or 404; a ``type``
  (in the body or the query) deletes that scope only.

A change made here reaches injection at once: the service updates its
in-memory scopes with the database. Mounted by the admin listener under
``/api/v1/``; every database call runs in the file pool.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from appliance.admin.responses import error, results
from appliance.suppression.store import (
    MANUALLY_ADDED,
    MAX_DESCRIPTION,
    SOURCES,
    TYPES,
    Change,
    SuppressionError,
    check_type,
    normalize,
)

log = Logger()

PATH = "/api/v1/suppression-list"
MAX_PER_PAGE = 10_000
DEFAULT_PER_PAGE = 1000
NOT_FOUND = "Recipient could not be found"


class Suppressions(Protocol):
    """What the resource works with (``appliance.suppression.SuppressionService``)."""

    def put(self, changes: list[Change]) -> defer.Deferred: ...

    def remove(self, recipient: str, kind: str | None = None) -> defer.Deferred: ...

    def get(self, recipient: str) -> defer.Deferred: ...

    def search(self, **criteria: Any) -> defer.Deferred: ...


class BadRequest(ValueError):
    """A request SparkPost answers 400, with its message."""


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _list_arg(request: IRequest, name: str) -> list[str]:
    value = _arg(request, name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _date(request: IRequest, name: str) -> float | None:
    value = _arg(request, name)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise BadRequest(f"{name} must be a valid date") from None


def _int(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    value = _arg(request, name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return int(value)


def _body(request: IRequest) -> dict[str, Any]:
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def search_criteria(request: IRequest) -> tuple[dict[str, Any], int, int]:
    """The search's criteria for the store, and its page and page size; ``BadRequest`` if wrong."""
    types = _list_arg(request, "types")
    for kind in types:
        if kind not in TYPES:
            raise BadRequest("types must be one of: 'transactional', 'non_transactional'")
    sources = _list_arg(request, "sources")
    for source in sources:
        if source not in SOURCES:
            raise BadRequest(f"sources must be among: {', '.join(SOURCES)}")
    per_page = _int(request, "per_page", 0, 1, MAX_PER_PAGE) or _int(
        request, "limit", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    page = _int(request, "page", 1, 1, 1_000_000)
    since, until = _date(request, "from"), _date(request, "to")
    if since is not None and until is not None and since > until:
        raise BadRequest("from must be before to")
    criteria = {"types": types, "sources": sources, "description": _arg(request, "description") or "",
                "domain": _arg(request, "domain") or "", "since": since, "until": until,
                "limit": per_page, "offset": (page - 1) * per_page}
    return criteria, page, per_page


def put_changes(recipient: str, body: dict[str, Any]) -> list[Change]:
    """The entries a PUT body asks for: ``type``, or the deprecated booleans; ``BadRequest`` if none."""
    description = body.get("description", "")
    if not isinstance(description, str):
        raise BadRequest("description must be a string")
    description = description[:MAX_DESCRIPTION]
    if "type" in body:
        kind = body["type"]
        if not isinstance(kind, str):
            raise BadRequest("Type must be one of: 'transactional', 'non_transactional'")
        kinds = [check_type(kind)]
    else:
        kinds = [k for k in TYPES if body.get(k) is True]
        if not kinds:
            raise BadRequest("Must supply a suppression type")
    return [Change(recipient, kind, MANUALLY_ADDED, description) for kind in kinds]


class SuppressionList(resource.Resource):
    """The collection and its members: mount it as ``suppression-list`` under ``/api/v1``."""

    isLeaf = True

    def __init__(self, suppressions: Suppressions) -> None:
        super().__init__()
        self.suppressions = suppressions

    def render(self, request: server.Request) -> Any:
        path = [p for p in request.postpath if p]
        method = request.method
        try:
            if not path:
                if method != b"GET":
                    return self._not_allowed(request, b"GET")
                criteria, page, per_page = search_criteria(request)
                d = self.suppressions.search(**criteria)
                d.addCallback(self._found, request, page, per_page)
            elif len(path) == 1:
                recipient = normalize(unquote(path[0].decode("utf-8", "replace")))
                if method == b"GET":
                    d = self.suppressions.get(recipient).addCallback(
                        self._entries, request, _arg(request, "type"))
                elif method == b"PUT":
                    d = self.suppressions.put(put_changes(recipient, _body(request))).addCallback(
                        lambda _: results(request, {"message": "Suppression list successfully updated"}))
                elif method == b"DELETE":
                    kind = _body(request).get("type") or _arg(request, "type")
                    if kind is not None:
                        kind = check_type(kind) if isinstance(kind, str) else check_type("")
                    d = self.suppressions.remove(recipient, kind).addCallback(self._removed, request)
                else:
                    return self._not_allowed(request, b"GET, PUT, DELETE")
            else:
                return error(request, 404, "Not found")
        except (BadRequest, SuppressionError) as e:
            return error(request, 400, str(e))
        d.addErrback(self._failed, request, method)
        d.addCallback(self._write, request)
        return server.NOT_DONE_YET

    @staticmethod
    def _not_allowed(request: IRequest, allow: bytes) -> bytes:
        request.setHeader(b"Allow", allow)
        return error(request, 405, "Method not allowed")

    @staticmethod
    def _found(found: tuple[list[Any], int], request: IRequest, page: int, per_page: int) -> bytes:
        entries, total = found
        links = []
        query = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()
                 if k not in (b"page", b"per_page", b"limit")}

        def link(rel: str, number: int) -> dict[str, str]:
            return {"href": f"{PATH}?{urlencode({**query, 'page': number, 'per_page': per_page})}",
                    "rel": rel}

        last = max(1, -(-total // per_page))
        if total:
            links.append(link("first", 1))
        if page > 1:
            links.append(link("previous", min(page - 1, last)))
        if page < last:
            links.append(link("next", page + 1))
        if total:
            links.append(link("last", last))
        return results(request, [e.to_json() for e in entries], links=links, total_count=total)

    @staticmethod
    def _entries(entries: list[Any], request: IRequest, kind: str | None) -> bytes:
        if kind is not None:
            entries = [e for e in entries if e.type == kind]
        if not entries:
            return error(request, 404, NOT_FOUND)
        return results(request, [e.to_json() for e in entries], links=[], total_count=len(entries))

    @staticmethod
    def _removed(count: int, request: IRequest) -> bytes:
        if not count:
            return error(request, 404, NOT_FOUND)
        request.setResponseCode(204)
        return b""

    @staticmethod
    def _failed(failure: Failure, request: IRequest, method: bytes) -> bytes:
        log.failure("suppression list API: {method} failed", failure, method=method.decode())
        if method == b"GET":
            return error(request, 500, "Unable to perform search")
        return error(request, 500, "Unable to update suppression list")

    @staticmethod
    def _write(body: bytes, request: server.Request) -> None:
        if request.finished or request.channel is None:
            return
        request.write(body)
        request.finish()
