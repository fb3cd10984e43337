"""
A test batch for ``engage-appliance webhooks test``: one sample event of each type a webhook takes.

The samples are marked as SparkPost marks the ones its webhook test sends:
example values that no real message has (``recipient@example.com``,
``Example Campaign Name``, reasons that begin with ``000 Example``), so a
receiver that stores them is not misled. Each sample carries exactly the
fields its type carries in the event log (``appliance.eventtypes.FIELDS``).
The batch is posted with the webhook's own credentials, once, outside the
queue: nothing is retried or recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from appliance.config import WebhookConfig
from appliance.events import Event
from appliance.eventtypes import BOUNCE, DELAY, EVENT_TYPES, FIELDS, POLICY_REJECTION, iso_time
from appliance.webhooks.auth import authorizer
from appliance.webhooks.envelope import batch_body, envelope_line
from appliance.webhooks.http import BytesProducer, read_prefix

_SAMPLE: dict[str, Any] = {
    "message_id": "000443ee14578172be22",
    "transmission_id": "65832150921904138",
    "campaign_id": "Example Campaign Name",
    "rcpt_to": "recipient@example.com",
    "raw_rcpt_to": "Recipient@example.com",
    "rcpt_meta": {"customKey": "customValue"},
    "rcpt_tags": ["male", "US"],
    "routing_domain": "example.com",
    "msg_from": "sender@example.com",
    "friendly_from": "sender@example.com",
    "subject": "Summer deals are here!",
    "msg_size": "1337",
    "recv_method": "esmtp",
    "auth_user": None,
    "open_tracking": True,
    "click_tracking": True,
    "initial_pixel": True,
    "ip_pool": "default",
    "sending_ip": "127.0.0.1",
    "sending_domain": "example.com",
    "recipient_domain": "example.com",
    "remote_addr": "127.0.0.1",
    "ip_address": "127.0.0.1",
    "queue_time": "12",
    "num_retries": "2",
    "delv_method": "esmtp",
    "outbound_tls": "1",
    "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_10_3) AppleWebKit/537.36 "
                  "(KHTML, like Gecko) Chrome/41.0.2272.118 Safari/537.36",
    "user_agent_parsed": {"agent_family": "Chrome", "device_brand": "Apple", "device_family": "Mac",
                          "os_family": "Mac OS X", "os_version": "10.10.3", "is_mobile": False,
                          "is_proxy": False, "is_prefetched": False},
    "target_link_url": "http://example.com",
    "target_link_name": "Example Link Name",
    "accept_language": "en-US,en;q=0.9",
    "transactional": "0",
}
_FAILURES = {
    POLICY_REJECTION: ("554", "554 5.7.1 Example policy rejection", "25"),
    DELAY: ("454", "454 4.7.1 Example Remote MTA Delay Message", "22"),
    BOUNCE: ("554", "554 5.7.1 000 Example Remote MTA Bounce Message", "10"),
}


def sample_events(types: Iterable[str], now: float, node_name: str, customer_id: str = "") -> list[Event]:
    """One sample of each of ``types``, in the order of ``EVENT_TYPES``."""
    wanted = set(types)
    events = []
    for n, kind in enumerate(t for t in EVENT_TYPES if t in wanted):
        values = dict(_SAMPLE, type=kind, event_id=f"9235692769381385{n}", timestamp=str(int(now)),
                      node_name=node_name, customer_id=customer_id, injection_time=iso_time(now))
        if kind in _FAILURES:
            code, reason, bounce_class = _FAILURES[kind]
            values.update(error_code=code, reason=reason, raw_reason=reason, bounce_class=bounce_class)
        events.append({key: values[key] for key in FIELDS[kind]})
    return events


class Answer(NamedTuple):
    """What the receiver said to the test batch."""

    batch_id: str
    count: int
    code: int
    phrase: str
    body: str


def post_test_batch(config: WebhookConfig, agent: IAgent, clock: IReactorTime, node_name: str,
                    user_agent: bytes = b"engage-appliance") -> defer.Deferred:
    """POST the sample batch of ``config``'s event types with its credentials; fires with an ``Answer``."""
    events = sample_events(config.events, clock.seconds(), node_name)
    body, count = batch_body(b"".join(envelope_line(e) for e in events))
    batch_id = str(uuid.uuid4())

    def send(credentials: list[tuple[bytes, bytes]]) -> defer.Deferred:
        headers = Headers({
            b"Content-Type": [b"application/json"],
            b"User-Agent": [user_agent],
            b"X-MessageSystems-Batch-ID": [batch_id.encode("ascii")],
        })
        for name, value in credentials:
            headers.addRawHeader(name, value)
        d = agent.request(b"POST", config.target.encode("ascii"), headers, BytesProducer(body))
        d.addCallback(answered)
        d.addTimeout(config.timeout, clock)
        return d

    def answered(response: IResponse) -> defer.Deferred:
        return read_prefix(response, 2000).addCallback(lambda prefix: Answer(
            batch_id, count, response.code, response.phrase.decode("latin-1"),
            prefix.decode("utf-8", "replace")))

    return authorizer(config, agent, clock, user_agent).credentials().addCallback(send)
