"""
The event contract: every event type the appliance writes, the fields each carries, and how each is built.

Consumers written for SparkPost and Momentum read the event log and the
webhooks, so the names and values here are theirs (SPEC §8), and this is the
one place that decides them: injection, delivery and the tracker call the
builders below instead of assembling events themselves. A builder returns a
``Draft``, the type and the fields particular to it; ``EventLog.make`` adds
what every event carries (``COMMON_FIELDS``).

``FIELDS`` lists what each type always carries and ``OPTIONAL_FIELDS`` what
it may; ``tests/test_eventtypes.py`` holds each builder to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from appliance.bounces import bounce_class, canonical_reason

if TYPE_CHECKING:
    from appliance.links import LinkData
    from appliance.settings import Tracking
    from appliance.spool import Envelope, Recipient

INJECTION = "injection"
POLICY_REJECTION = "policy_rejection"
DELIVERY = "delivery"
DELAY = "delay"
BOUNCE = "bounce"
OPEN = "open"
INITIAL_OPEN = "initial_open"
CLICK = "click"
LINK_UNSUBSCRIBE = "link_unsubscribe"

# Every type the appliance writes, in the order of a message's life. A webhook's
# ``events`` may name only these, so a misspelt type is a configuration error.
EVENT_TYPES = (INJECTION, POLICY_REJECTION, DELIVERY, DELAY, BOUNCE, OPEN, INITIAL_OPEN, CLICK,
               LINK_UNSUBSCRIBE)

# What EventLog.make puts first in every event.
COMMON_FIELDS = ("type", "event_id", "timestamp", "node_name", "customer_id")

# Who the event is about: one recipient's copy. Injection stores them with the
# recipient in the spool (``Recipient.event_fields``); a tracked link carries them.
RECIPIENT_FIELDS = ("message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to",
                    "rcpt_meta", "rcpt_tags")

_FAILURE = ("error_code", "reason", "raw_reason", "bounce_class")
_OUTCOME = ("msg_from", "routing_domain", "ip_address", "queue_time", "num_retries", "delv_method",
            "outbound_tls")
_TRACK = ("message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to", "rcpt_tags",
          "ip_address", "user_agent")
_CLICK = (*_TRACK, "target_link_url", "target_link_name", "accept_language")

FIELDS: Mapping[str, tuple[str, ...]] = {
    INJECTION: (*COMMON_FIELDS, *RECIPIENT_FIELDS, "routing_domain", "msg_from", "friendly_from",
                "subject", "msg_size", "recv_method", "injection_time", "auth_user", "open_tracking",
                "click_tracking"),
    POLICY_REJECTION: (*COMMON_FIELDS, *RECIPIENT_FIELDS, "routing_domain", "msg_from", "friendly_from",
                       "subject", "remote_addr", "recv_method", *_FAILURE, "injection_time"),
    DELIVERY: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME),
    DELAY: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME, *_FAILURE),
    BOUNCE: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME, *_FAILURE),
    OPEN: (*COMMON_FIELDS, *_TRACK, "rcpt_meta"),
    INITIAL_OPEN: (*COMMON_FIELDS, *_TRACK, "rcpt_meta"),
    CLICK: (*COMMON_FIELDS, *_CLICK),
    LINK_UNSUBSCRIBE: (*COMMON_FIELDS, *_CLICK),
}

# Fields an event has only sometimes: why tracking was skipped or a DKIM signature
# broken (injection); the recipient's metadata, when the clicked link carries it;
# the clicked link's anchor text (its text, or its image's alt), when it has one.
# Each marked ``<field>_truncated: true`` when its field was cut to its cap (``TEXT_CAPS``).
OPTIONAL_FIELDS: Mapping[str, tuple[str, ...]] = {
    INJECTION: ("tracking_skipped", "tracking_skipped_reason", "dkim_broken", "msg_from_truncated",
                "friendly_from_truncated", "subject_truncated"),
    POLICY_REJECTION: ("msg_from_truncated", "friendly_from_truncated", "subject_truncated",
                       "remote_addr_truncated", "reason_truncated", "raw_reason_truncated"),
    DELAY: ("msg_from_truncated", "reason_truncated", "raw_reason_truncated"),
    BOUNCE: ("msg_from_truncated", "reason_truncated", "raw_reason_truncated"),
    DELIVERY: ("msg_from_truncated",),
    CLICK: ("rcpt_meta", "target_link_anchor"),
    LINK_UNSUBSCRIBE: ("rcpt_meta", "target_link_anchor"),
}

# The most UTF-8 bytes an event carries of text that a message, an SMTP client,
# a policy or a remote server chose: a 1 MB folded subject would otherwise be
# written once per recipient. 998 is a header line's limit (RFC 5322 §2.1.1).
# The tracker caps its clients' values itself (``appliance.tracker.limits``).
TEXT_CAPS: Mapping[str, int] = {
    "msg_from": 998,
    "friendly_from": 998,
    "subject": 998,
    "remote_addr": 256,
    "reason": 998,
    "raw_reason": 998,
}

# SparkPost's event classes, the key under "msys" a webhook files an event under;
# every other type is a message_event (injection, delivery, delay, bounce, policy_rejection, ...).
TRACK_EVENTS = frozenset({"open", "initial_open", "click", "amp_open", "amp_initial_open",
                          "amp_click"})
UNSUBSCRIBE_EVENTS = frozenset({"link_unsubscribe", "list_unsubscribe"})


def event_class(event_type: str) -> str:
    """The key under ``msys`` that SparkPost files an event of this type under."""
    if event_type in TRACK_EVENTS:
        return "track_event"
    if event_type in UNSUBSCRIBE_EVENTS:
        return "unsubscribe_event"
    return "message_event"


class Draft(NamedTuple):
    """An event before ``EventLog.make`` gives it an id, a time and the node's fields."""

    type: str
    fields: dict[str, Any]


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary, and whether it was cut."""
    if len(text) * 4 <= limit:  # no string of this length can exceed it
        return text, False
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", "ignore"), True


def _capped(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with each text of ``TEXT_CAPS`` cut to its cap and marked where it was."""
    for name, limit in TEXT_CAPS.items():
        value = fields.get(name)
        if isinstance(value, str):
            fields[name], cut = cap_text(value, limit)
            if cut:
                fields[f"{name}_truncated"] = True
    return fields


def iso_time(ts: float) -> str:
    """SparkPost's ``injection_time`` form: 2016-04-18T14:25:07.000+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _routing_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


# -- injection ------------------------------------------------------------------------


def recipient_fields(transmission_id: str, address: str, message_id: str,
                     tracking: Tracking | None = None) -> dict[str, Any]:
    """
    ``RECIPIENT_FIELDS`` of one copy; without ``tracking`` (not resolved: refused) empty ones.

    ``rcpt_to`` is lower-cased and ``raw_rcpt_to`` as the client wrote it.
    """
    return {
        "message_id": message_id,
        "transmission_id": transmission_id,
        "campaign_id": tracking.campaign_id if tracking is not None else "",
        "rcpt_to": address.lower(),
        "raw_rcpt_to": address,
        "rcpt_meta": tracking.metadata if tracking is not None else {},
        "rcpt_tags": list(tracking.tags) if tracking is not None else [],
    }


def injection_event(envelope: Envelope, recipient: Recipient, friendly_from: str, subject: str,
                    tracking_skipped: Sequence[str] = (), dkim_broken: bool = False) -> Draft:
    """
    A committed message's ``injection`` event for one recipient.

    ``tracking_skipped`` says why the copy is tracked less than its settings
    ask; ``dkim_broken`` that the copy breaks the message's DKIM signature.
    """
    fields: dict[str, Any] = {
        **recipient.event_fields,
        "routing_domain": _routing_domain(recipient.address),
        "msg_from": envelope.mail_from,
        "friendly_from": friendly_from,
        "subject": subject,
        "msg_size": str(envelope.message_size),
        "recv_method": "esmtp",
        "injection_time": iso_time(envelope.received_at),
        # Not a SparkPost field: the SMTP AUTH user who injected the message, or null.
        "auth_user": envelope.auth_user,
        "open_tracking": recipient.tracking.open_tracking,
        "click_tracking": recipient.tracking.click_tracking,
    }
    if tracking_skipped:
        fields["tracking_skipped"] = True
        fields["tracking_skipped_reason"] = "; ".join(tracking_skipped)
    if dkim_broken:
        fields["dkim_broken"] = True
    return Draft(INJECTION, _capped(fields))


def policy_rejection_event(recipient: Recipient, mail_from: str, friendly_from: str, subject: str,
                           remote_addr: str, code: int, text: str, received_at: float) -> Draft:
    """A recipient refused at injection (policy, bad ``X-MSYS-API``, loop), with the reply it got."""
    return Draft(POLICY_REJECTION, _capped({
        **recipient.event_fields,
        "routing_domain": _routing_domain(recipient.address),
        "msg_from": mail_from,
        "friendly_from": friendly_from,
        "subject": subject,
        "remote_addr": remote_addr,
        "recv_method": "esmtp",
        "error_code": str(code),
        "reason": f"{code} {text}",
        "raw_reason": f"{code} {text}",
        "bounce_class": bounce_class(code, text),
        "injection_time": iso_time(received_at),
    }))


# -- delivery -------------------------------------------------------------------------


class Attempt(Protocol):
    """What one delivery attempt came to (``appliance.delivery.outcome.Outcome``)."""

    @property
    def kind(self) -> str: ...  # DELIVERY, DELAY or BOUNCE

    @property
    def code(self) -> int: ...

    @property
    def raw_reason(self) -> str: ...

    @property
    def ip_address(self) -> str: ...

    @property
    def tls(self) -> bool: ...


def delivery_event(envelope: Envelope, recipient: Recipient, outcome: Attempt, routing_domain: str,
                   queue_time: float, attempts: int) -> Draft:
    """
    The ``delivery``, ``delay`` or ``bounce`` event of one attempt, the ``attempts``-th.

    ``queue_time`` is in seconds since injection (written in milliseconds);
    a failure carries the reply and its classification.
    """
    fields: dict[str, Any] = {
        **recipient.event_fields,
        "msg_from": envelope.mail_from,
        "routing_domain": routing_domain,
        "ip_address": outcome.ip_address,
        "queue_time": str(int(queue_time * 1000)),
        "num_retries": str(attempts - 1),
        "delv_method": "esmtp",
        "outbound_tls": "1" if outcome.tls else "0",
    }
    if outcome.kind != DELIVERY:
        fields.update(
            error_code=str(outcome.code) if outcome.code else "",
            reason=canonical_reason(outcome.raw_reason),
            raw_reason=outcome.raw_reason,
            bounce_class=bounce_class(outcome.code, outcome.raw_reason),
        )
    return Draft(outcome.kind, _capped(fields))


# -- engagement -----------------------------------------------------------------------


def _track_fields(link: LinkData, ip_address: str, user_agent: str) -> dict[str, Any]:
    return {
        "message_id": link.message_id,
        "transmission_id": link.transmission_id,
        "campaign_id": link.campaign_id,
        "rcpt_to": link.rcpt_to.lower(),
        "raw_rcpt_to": link.rcpt_to,
        "rcpt_tags": list(link.tags),
        "ip_address": ip_address,
        "user_agent": user_agent,
    }


def open_event(link: LinkData, ip_address: str, user_agent: str) -> Draft:
    """An ``open`` or ``initial_open`` (``link.kind``); opens always carry the metadata, as SparkPost's do."""
    fields = _track_fields(link, ip_address, user_agent)
    fields["rcpt_meta"] = link.metadata if link.metadata is not None else {}
    return Draft(link.kind, fields)


def click_events(link: LinkData, ip_address: str, user_agent: str, accept_language: str) -> list[Draft]:
    """
    A ``click``, and a ``link_unsubscribe`` as well for an unsubscribe link.

    ``target_link_anchor`` (not a SparkPost field) names the link as its reader
    saw it, so reports can say "Shop now" rather than a URL; omitted when the
    link has no text (a text part's URL, an image without ``alt``, a link made
    before anchors were recorded).
    """
    fields = _track_fields(link, ip_address, user_agent)
    if link.metadata is not None:
        fields["rcpt_meta"] = link.metadata
    fields.update(target_link_url=link.target, target_link_name=link.link_name,
                  accept_language=accept_language)
    if link.anchor:
        fields["target_link_anchor"] = link.anchor
    if link.unsubscribe:
        return [Draft(CLICK, fields), Draft(LINK_UNSUBSCRIBE, dict(fields))]
    return [Draft(CLICK, fields)]
