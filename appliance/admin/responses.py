"""
JSON answers in the shapes SparkPost's API uses, so its clients read ours.

Success is ``{"results": ...}`` (with the caller's extra keys, such as
``links`` for a cursor); failure is ``{"errors": [{"message": ...}]}`` with
the HTTP status that says whose fault it was.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

_JSON = b"application/json"


def _send(request: IRequest, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def results(request: IRequest, value: Any, status: int = 200, **extra: Any) -> bytes:
    """A successful answer: ``{"results": value, **extra}``."""
    return _send(request, status, {"results": value, **extra})


def error(request: IRequest, status: int, message: str, **detail: str) -> bytes:
    """A failed answer; ``detail`` (such as ``param``) goes beside the message."""
    return _send(request, status, {"errors": [{"message": message, **detail}]})
