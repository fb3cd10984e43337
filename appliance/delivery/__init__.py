"""
The outbound side: from a spooled message to each recipient's mail server (SPEC §7).

- ``routing``: where a domain's mail goes (routes, smarthost, MX and A/AAAA).
- ``client``: the SMTP client that carries many copies over one connection.
- ``queue``: the schedule, the concurrency limits and the outcome events.
- ``attempt``: one connection to one hop, and what it needs of the queue (``AttemptOwner``).
- ``outcome``: outcomes and the replies that decided them (classified by ``appliance.bounces``).
"""

from appliance.bounces import bounce_class
from appliance.delivery.client import BodyEncoder, DeliveryClient, encode_body
from appliance.delivery.outcome import Outcome
from appliance.delivery.queue import CopyRenderer, DeliveryService, Job, message_from_spool
from appliance.delivery.routing import Destination, Hop, HopFinder, Router, domain_problem

__all__ = [
    "BodyEncoder",
    "CopyRenderer",
    "DeliveryClient",
    "DeliveryService",
    "Destination",
    "Hop",
    "HopFinder",
    "Job",
    "Outcome",
    "Router",
    "bounce_class",
    "domain_problem",
    "encode_body",
    "message_from_spool",
]
