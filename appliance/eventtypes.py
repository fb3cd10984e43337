"""
The event contract: every event type the appliance writes, the fields each carries, and how each is built.

Consumers written for SparkPost and Momentum read the event log and the
webhooks, so the names and values here are theirs (SPEC §8), and this is the
one place that decides them: injection, delivery and the tracker call the
builders below instead of assembling events themselves. A builder returns a
``Draft``, the type and the fields particular to it; ``EventLog.make`` adds
what every event carries (``COMMON_FIELDS``).

``FIELDS`` lists what each type always carries and ``OPTIONAL_FIELDS`` what
it may; ``tests/test_eventtypes.py`` holds each builder to them, and
``tests/test_sparkpost_parity.py`` each type to SparkPost's own sample of it,
listing every field either side lacks with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from appliance.bounces import bounce_class, canonical_reason

if TYPE_CHECKING:
    from appliance.envelope import Envelope, Recipient
    from appliance.links import LinkData
    from appliance.settings import Tracking

INJECTION = "injection"
POLICY_REJECTION = "policy_rejection"
DELIVERY = "delivery"
DELAY = "delay"
BOUNCE = "bounce"
OPEN = "open"
INITIAL_OPEN = "initial_open"
CLICK = "click"
LINK_UNSUBSCRIBE = "link_unsubscribe"
LIST_UNSUBSCRIBE = "list_unsubscribe"

# Every type the appliance writes, in the order of a message's life. A webhook's
# ``events`` may name only these, so a misspelt type is a configuration error.
EVENT_TYPES = (INJECTION, POLICY_REJECTION, DELIVERY, DELAY, BOUNCE, OPEN, INITIAL_OPEN, CLICK,
               LINK_UNSUBSCRIBE, LIST_UNSUBSCRIBE)

# What EventLog.make puts first in every event.
COMMON_FIELDS = ("type", "event_id", "timestamp", "node_name", "customer_id")

# Who the event is about: one recipient's copy. Injection stores them with the
# recipient in the spool (``Recipient.event_fields``); a tracked link carries them.
RECIPIENT_FIELDS = ("message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to",
                    "rcpt_meta", "rcpt_tags")

_FAILURE = ("error_code", "reason", "raw_reason", "bounce_class")
# What SparkPost's samples of delivery, delay and bounce carry of the message and its
# settings (tests/data/sparkpost_samples): kept in the spool's envelope for every copy.
_MESSAGE = ("subject", "friendly_from", "sending_domain", "recipient_domain", "msg_size", "injection_time",
            "recv_method", "ip_pool", "open_tracking", "click_tracking", "initial_pixel")
_OUTCOME = ("msg_from", "routing_domain", "ip_address", "sending_ip", "queue_time", "num_retries",
            "delv_method", "outbound_tls", *_MESSAGE)
# An engagement event knows what its token carries, and what follows from it: the
# routing domain from the recipient, the pool and the way in (the appliance has one of
# each), and the tracking its link proves on.
_TRACK = ("message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to", "rcpt_tags",
          "ip_address", "user_agent", "user_agent_parsed", "routing_domain", "recipient_domain", "ip_pool",
          "recv_method", "delv_method")
_OPEN = (*_TRACK, "rcpt_meta", "open_tracking")
_CLICK = (*_TRACK, "target_link_url", "target_link_name", "accept_language", "click_tracking")

# The one IP pool the appliance sends from, named as SparkPost names an account's default pool.
IP_POOL = "default"
RECV_METHOD = "esmtp"  # SMTP injection is the only way in
DELV_METHOD = "esmtp"  # and SMTP the only way out

FIELDS: Mapping[str, tuple[str, ...]] = {
    INJECTION: (*COMMON_FIELDS, *RECIPIENT_FIELDS, "routing_domain", "msg_from", "friendly_from",
                "subject", "msg_size", "recv_method", "injection_time", "auth_user", "open_tracking",
                "click_tracking", "initial_pixel", "ip_pool", "sending_domain", "recipient_domain"),
    POLICY_REJECTION: (*COMMON_FIELDS, *RECIPIENT_FIELDS, "routing_domain", "msg_from", "friendly_from",
                       "subject", "remote_addr", "recv_method", *_FAILURE, "injection_time", "ip_pool",
                       "sending_domain", "recipient_domain"),
    DELIVERY: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME),
    DELAY: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME, *_FAILURE),
    BOUNCE: (*COMMON_FIELDS, *RECIPIENT_FIELDS, *_OUTCOME, *_FAILURE),
    OPEN: (*COMMON_FIELDS, *_OPEN),
    INITIAL_OPEN: (*COMMON_FIELDS, *_OPEN, "initial_pixel"),
    CLICK: (*COMMON_FIELDS, *_CLICK),
    LINK_UNSUBSCRIBE: (*COMMON_FIELDS, *_CLICK),
    # SparkPost's sample, where the token tells: the copy was not transactional (only such
    # copies carry the header) and went out by ESMTP.
    # SparkPost's has no user_agent_parsed: nothing is classified about a one-click POST.
    LIST_UNSUBSCRIBE: (*COMMON_FIELDS, *(f for f in _TRACK if f != "user_agent_parsed"), "rcpt_meta",
                       "transactional"),
}

# Fields an event has only sometimes: why tracking was skipped or a DKIM signature
# broken, and what Momentum's limits left out (injection, ``settings.limit_notes``);
# the recipient's metadata, when the clicked link carries it; the clicked link's anchor
# text (its text, or its image's alt), when it has one.
# Each marked ``<field>_truncated: true`` when its field was cut to its cap (``TEXT_CAPS``).
OPTIONAL_FIELDS: Mapping[str, tuple[str, ...]] = {
    INJECTION: ("tracking_skipped", "tracking_skipped_reason", "dkim_broken", "msg_from_truncated",
                "friendly_from_truncated", "subject_truncated", "rcpt_tags_ignored",
                "rcpt_meta_left_out_of_links", "msys_api_unknown_fields"),
    POLICY_REJECTION: ("msg_from_truncated", "friendly_from_truncated", "subject_truncated",
                       "remote_addr_truncated", "reason_truncated", "raw_reason_truncated"),
    DELAY: ("msg_from_truncated", "friendly_from_truncated", "subject_truncated", "reason_truncated",
            "raw_reason_truncated"),
    BOUNCE: ("msg_from_truncated", "friendly_from_truncated", "subject_truncated", "reason_truncated",
             "raw_reason_truncated"),
    DELIVERY: ("msg_from_truncated", "friendly_from_truncated", "subject_truncated"),
    # geo_ip: with a MaxMind database (engagement_tracker.geoip_database) that knows the address.
    OPEN: ("geo_ip",),
    INITIAL_OPEN: ("geo_ip",),
    CLICK: ("rcpt_meta", "geo_ip", "target_link_anchor"),
    LINK_UNSUBSCRIBE: ("rcpt_meta", "geo_ip", "target_link_anchor"),
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


_iso_second: tuple[int, str] = (-1, "")


def iso_time(ts: float) -> str:
    """
    SparkPost's ``injection_time`` form, as its webhooks write it: 2016-04-18T14:25:07.000Z.

    Written for every event of a copy; the text of the last second is kept,
    as the copies of a busy second share it.
    """
    global _iso_second
    ms = int(ts * 1000)
    second = ms // 1000
    if _iso_second[0] != second:
        _iso_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_iso_second[1]}{ms % 1000:03d}Z"


def _routing_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _sending_domain(friendly_from: str) -> str:
    """SparkPost's ``sending_domain``: the domain of the From header's address, if it has one."""
    return friendly_from.rpartition("@")[2].lower() if "@" in friendly_from else ""


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


def _initial_pixel(tracking: Tracking) -> bool:
    return tracking.open_tracking and tracking.initial_open


def injection_event(envelope: Envelope, recipient: Recipient, friendly_from: str, subject: str,
                    tracking_skipped: Sequence[str] = (), dkim_broken: bool = False,
                    limits: Mapping[str, Any] | None = None) -> Draft:
    """
    A committed message's ``injection`` event for one recipient.

    ``tracking_skipped`` says why the copy is tracked less than its settings
    ask; ``dkim_broken`` that the copy breaks the message's DKIM signature;
    ``limits`` what Momentum's limits left out (``settings.limit_notes``).
    """
    fields: dict[str, Any] = {
        **recipient.event_fields,
        "routing_domain": _routing_domain(recipient.address),
        "msg_from": envelope.mail_from,
        "friendly_from": friendly_from,
        "subject": subject,
        "msg_size": str(envelope.message_size),
        "recv_method": RECV_METHOD,
        "injection_time": iso_time(envelope.received_at),
        # Not a SparkPost field: the SMTP AUTH user who injected the message, or null.
        "auth_user": envelope.auth_user,
        "open_tracking": recipient.tracking.open_tracking,
        "click_tracking": recipient.tracking.click_tracking,
        "initial_pixel": _initial_pixel(recipient.tracking),
        "ip_pool": IP_POOL,
        "sending_domain": _sending_domain(friendly_from),
        "recipient_domain": _routing_domain(recipient.address),
    }
    if limits:
        fields.update(limits)
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
        "recv_method": RECV_METHOD,
        "error_code": str(code),
        "reason": f"{code} {text}",
        "raw_reason": f"{code} {text}",
        "bounce_class": bounce_class(code, text),
        "injection_time": iso_time(received_at),
        "ip_pool": IP_POOL,
        "sending_domain": _sending_domain(friendly_from),
        "recipient_domain": _routing_domain(recipient.address),
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

    @property
    def sending_ip(self) -> str: ...  # the appliance's own address on the connection, if one was made


def delivery_event(envelope: Envelope, recipient: Recipient, outcome: Attempt, routing_domain: str,
                   queue_time: float, attempts: int) -> Draft:
    """
    The ``delivery``, ``delay`` or ``bounce`` event of one attempt, the ``attempts``-th.

    ``queue_time`` is in seconds since injection (written in milliseconds);
    a failure carries the reply and its classification.
    """
    tracking = recipient.tracking
    fields: dict[str, Any] = {
        **recipient.event_fields,
        "msg_from": envelope.mail_from,
        "routing_domain": routing_domain,
        "ip_address": outcome.ip_address,
        "sending_ip": outcome.sending_ip,
        "queue_time": str(int(queue_time * 1000)),
        "num_retries": str(attempts - 1),
        "delv_method": DELV_METHOD,
        "outbound_tls": "1" if outcome.tls else "0",
        "subject": envelope.subject,
        "friendly_from": envelope.friendly_from,
        "sending_domain": _sending_domain(envelope.friendly_from),
        "recipient_domain": _routing_domain(recipient.address),
        "msg_size": str(envelope.message_size),
        "injection_time": iso_time(envelope.received_at),
        "recv_method": RECV_METHOD,
        "ip_pool": IP_POOL,
        "open_tracking": tracking.open_tracking,
        "click_tracking": tracking.click_tracking,
        "initial_pixel": _initial_pixel(tracking),
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


def _track_fields(link: LinkData, ip_address: str, user_agent: str,
                  who: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "message_id": link.message_id,
        "transmission_id": link.transmission_id,
        "campaign_id": link.campaign_id,
        "rcpt_to": link.rcpt_to.lower(),
        "raw_rcpt_to": link.rcpt_to,
        "rcpt_tags": list(link.tags),
        "ip_address": ip_address,
        "user_agent": user_agent,
        "routing_domain": _routing_domain(link.rcpt_to),
        "recipient_domain": _routing_domain(link.rcpt_to),
        "ip_pool": IP_POOL,
        "recv_method": RECV_METHOD,
        "delv_method": DELV_METHOD,
        **who,
    }


def open_event(link: LinkData, ip_address: str, user_agent: str, who: Mapping[str, Any]) -> Draft:
    """
    An ``open`` or ``initial_open`` (``link.kind``); opens always carry the metadata, as SparkPost's do.

    ``who`` is what ``appliance.engagement`` made of the client: ``user_agent_parsed``,
    and ``geo_ip`` where known.
    """
    fields = _track_fields(link, ip_address, user_agent, who)
    fields["rcpt_meta"] = link.metadata if link.metadata is not None else {}
    fields["open_tracking"] = True  # a pixel is only there when it is on
    if link.kind == INITIAL_OPEN:
        fields["initial_pixel"] = True
    return Draft(link.kind, fields)


def click_events(link: LinkData, ip_address: str, user_agent: str, accept_language: str,
                 who: Mapping[str, Any]) -> list[Draft]:
    """
    A ``click``, and a ``link_unsubscribe`` as well for an unsubscribe link; ``who`` as for opens.

    ``target_link_anchor`` (not a SparkPost field) names the link as its reader
    saw it, so reports can say "Shop now" rather than a URL; omitted when the
    link has no text (a text part's URL, an image without ``alt``, a link made
    before anchors were recorded).
    """
    fields = _track_fields(link, ip_address, user_agent, who)
    if link.metadata is not None:
        fields["rcpt_meta"] = link.metadata
    fields.update(target_link_url=link.target, target_link_name=link.link_name,
                  accept_language=accept_language, click_tracking=True)
    if link.anchor:
        fields["target_link_anchor"] = link.anchor
    if link.unsubscribe:
        return [Draft(CLICK, fields), Draft(LINK_UNSUBSCRIBE, dict(fields))]
    return [Draft(CLICK, fields)]


def list_unsubscribe_event(link: LinkData, ip_address: str, user_agent: str) -> Draft:
    """A one-click unsubscribe (RFC 8058) of the copy ``link`` names: SparkPost's ``list_unsubscribe``."""
    fields = _track_fields(link, ip_address, user_agent, {})
    fields.update(rcpt_meta=link.metadata if link.metadata is not None else {},
                  transactional="0")  # a transactional copy has no List-Unsubscribe
    return Draft(LIST_UNSUBSCRIBE, fields)
