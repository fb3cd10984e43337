"""
``/api/v1/queue``: the delivery queue for operators, and what they may do to it.

    GET  /api/v1/queue[?domain=D]   every queued copy (of one recipient domain), oldest first
    GET  /api/v1/queue/ID           the copies ID names: a transmission id (every copy of
                                    that message) or a copy's message_id
    POST /api/v1/queue/flush        try now         {"ids": [...]} | {"domain": D} | {"all": true}
    POST /api/v1/queue/hold         stop trying     {"ids": [...]} | {"domain": D}
    POST /api/v1/queue/release      try again       {"ids": [...]} | {"domain": D} | {"all": true}
    POST /api/v1/queue/delete       bounce (class 25) and remove   {"ids": [...]} | {"domain": D}

An action answers ``{"results": {"action": ..., "count": N, "copies": [...]}}``
once what it changed is journalled; an id that names nothing is 404 and
nothing is done. The actions run in the appliance, which owns the spool:
nothing else may edit it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from appliance.admin.responses import error, results

log = Logger()

MAX_BODY = 1024 * 1024  # bytes of an action's JSON body
MAX_IDS = 100_000


class CopyView(Protocol):
    def to_json(self, now: float) -> dict[str, Any]: ...


class Queue(Protocol):
    """What the resource needs of the delivery queue (``appliance.delivery.DeliveryService``)."""

    def listing(self, ids: Sequence[str] = (), domain: str | None = None) -> Sequence[CopyView]: ...

    def flush(self, ids: Sequence[str] = (), domain: str | None = None) -> Sequence[CopyView]: ...

    def hold(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred: ...

    def release(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred: ...

    def delete(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred: ...


# Which selections each action takes: "all" is refused where a slip would cost mail.
ACTIONS: dict[str, frozenset[str]] = {
    "flush": frozenset({"ids", "domain", "all"}),
    "hold": frozenset({"ids", "domain"}),
    "release": frozenset({"ids", "domain", "all"}),
    "delete": frozenset({"ids", "domain"}),
}


class BadRequest(ValueError):
    """A request the API cannot act on; its message says why (answered 400)."""


def selection(body: bytes, allowed: frozenset[str]) -> tuple[list[str], str | None]:
    """The (ids, domain) an action's JSON body names; all copies is ``([], None)``."""
    try:
        raw = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadRequest('expected a JSON object such as {"ids": ["..."]}')
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; this action takes "
                         f"{' or '.join(sorted(allowed))}")
    given = [k for k in ("ids", "domain", "all") if k in raw]
    if len(given) != 1:
        raise BadRequest(f"give exactly one of {', '.join(sorted(allowed))}")
    if "all" in raw:
        if raw["all"] is not True:
            raise BadRequest('"all" must be true')
        return [], None
    if "domain" in raw:
        domain = raw["domain"]
        if not isinstance(domain, str) or not domain.strip():
            raise BadRequest('"domain" must be a domain name')
        return [], domain
    ids = raw["ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise BadRequest('"ids" must be a non-empty list of transmission or message ids')
    if len(ids) > MAX_IDS:
        raise BadRequest(f'at most {MAX_IDS} "ids" at once')
    return ids, None


class _JsonResource(resource.Resource):
    """Answers every method it has no ``render_X`` for with a JSON 405."""

    def render(self, request: IRequest) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            allowed = sorted(m[len("render_"):] for m in dir(self) if m.startswith("render_")
                             and m[len("render_"):].isupper())
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            return error(request, 405, f"{method} is not allowed here; use {' or '.join(allowed)}")
        return handler(request)

    def render_HEAD(self, request: IRequest) -> bytes | int:
        return self.render_GET(request)  # type: ignore[attr-defined]


def _query(request: IRequest, allowed: frozenset[str]) -> dict[str, str]:
    args = {k.decode("utf-8", "replace"): v for k, v in (request.args or {}).items()}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}")
    out = {}
    for key, values in args.items():
        if len(values) != 1:
            raise BadRequest(f"query parameter {key} given {len(values)} times")
        out[key] = values[0].decode("utf-8", "replace")
    return out


class QueueResource(_JsonResource):
    """``/api/v1/queue``: mount it there; its children are the copies and the actions."""

    def __init__(self, queue: Queue, clock: IReactorTime) -> None:
        super().__init__()
        self.queue = queue
        self.clock = clock

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        name = path.decode("utf-8", "replace")
        if name in ACTIONS:
            return ActionResource(self, name)
        if not name:
            return self
        return CopiesResource(self, name)

    def render_GET(self, request: IRequest) -> bytes:
        try:
            domain = _query(request, frozenset({"domain"})).get("domain")
        except BadRequest as e:
            return error(request, 400, str(e))
        return self.answer(request, self.queue.listing(domain=domain))

    def answer(self, request: IRequest, copies: Sequence[CopyView], action: str | None = None) -> bytes:
        now = self.clock.seconds()
        listed = [c.to_json(now) for c in copies]
        if action is None:
            return results(request, listed)
        return results(request, {"action": action, "count": len(listed), "copies": listed})


class CopiesResource(_JsonResource):
    """``/api/v1/queue/ID``: the copies a transmission id or message_id names."""

    isLeaf = True

    def __init__(self, parent: QueueResource, ident: str) -> None:
        super().__init__()
        self.parent = parent
        self.ident = ident

    def render_GET(self, request: IRequest) -> bytes:
        if request.postpath and request.postpath != [b""]:
            return error(request, 404, "no such resource")
        try:
            _query(request, frozenset())
            copies = self.parent.queue.listing(ids=[self.ident])
        except BadRequest as e:
            return error(request, 400, str(e))
        except LookupError as e:
            return error(request, 404, str(e))
        return self.parent.answer(request, copies)


class ActionResource(_JsonResource):
    """``POST /api/v1/queue/ACTION`` with the copies to act on."""

    isLeaf = True

    def __init__(self, parent: QueueResource, action: str) -> None:
        super().__init__()
        self.parent = parent
        self.action = action

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"POST")
        return error(request, 405, f"{self.action} is an action: POST it")

    def render_POST(self, request: IRequest) -> bytes | int:
        if request.postpath and request.postpath != [b""]:
            return error(request, 404, "no such resource")
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(body) > MAX_BODY:
            return error(request, 413, f"the body is over {MAX_BODY} bytes")
        try:
            _query(request, frozenset())
            ids, domain = selection(body, ACTIONS[self.action])
            done = getattr(self.parent.queue, self.action)(ids=ids, domain=domain)
        except BadRequest as e:
            return error(request, 400, str(e))
        except LookupError as e:
            return error(request, 404, str(e))
        if not isinstance(done, defer.Deferred):
            return self.parent.answer(request, done, self.action)
        gone = request.notifyFinish()
        gone.addErrback(lambda _: None)
        done.addCallbacks(lambda copies: self.parent.answer(request, copies, self.action),
                          self._failed, errbackArgs=(request,))
        done.addCallback(self._write, request)
        return server.NOT_DONE_YET

    def _failed(self, failure: Failure, request: IRequest) -> bytes:
        log.failure("queue {action} failed", failure, action=self.action)
        return error(request, 500, f"the {self.action} could not be completed "
                                   f"({failure.getErrorMessage()}); see the appliance's log")

    @staticmethod
    def _write(body: bytes, request: IRequest) -> None:
        if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
            return
        request.write(body)
        request.finish()
