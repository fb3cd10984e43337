"""
SparkPost's webhook envelope: how an event of the log becomes an element of a batch.

An event is queued as the JSON line it will be in the batch,
``{"msys": {"message_event": {...}}}``, so the line of the queue file is the
batch element and a batch's body is its lines joined into one JSON array.
"""

from __future__ import annotations

from appliance.events import Event, encode_event
from appliance.eventtypes import event_class


def envelope_line(event: Event) -> bytes:
    """The event as one batch element, ``{"msys": {"<class>": event}}``, LF-terminated."""
    return encode_event({"msys": {event_class(event["type"]): event}})


def batch_body(lines: bytes) -> tuple[bytes, int]:
    """The POST body for a batch file's lines, and its number of events."""
    items = lines.rstrip(b"\n").split(b"\n") if lines.strip() else []
    return b"[" + b",".join(items) + b"]", len(items)
