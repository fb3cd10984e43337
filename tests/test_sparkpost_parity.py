"""
Each event type held against SparkPost's own sample of it: same keys, same value types.

The samples are in ``tests/data/sparkpost_samples`` (its README says where
they come from). Every field a sample has that the appliance's event lacks is
listed below with the reason, and so is every field the appliance adds; a
field that appears or disappears on either side fails the test until the
lists say why.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance import eventtypes as et
from appliance.delivery.outcome import internal, reply_outcome
from appliance.envelope import Envelope, Recipient
from appliance.events import Event, EventLog
from appliance.links import LinkData
from appliance.settings import Tracking

SAMPLES = os.path.join(os.path.dirname(__file__), "data", "sparkpost_samples")

# Fields of SparkPost's samples that no event of the appliance carries, and why.
NEVER: dict[str, str] = {
    "ab_test_id": "no A/B tests: SMTP injection sends the message it is given",
    "ab_test_version": "no A/B tests",
    "amp_enabled": "no AMP copies are made",
    "device_token": "push notifications: the appliance sends email only",
    "rcpt_hash": "SparkPost does not say how its hash is computed",
    "rcpt_type": "cc/bcc/archive of SparkPost's transmissions API recipients; SMTP has one kind",
    "subaccount_id": "no subaccounts: customer_id is the appliance's one account",
    "template_id": "no stored templates",
    "template_version": "no stored templates",
    # list_unsubscribe says "0": only non-transactional copies offer it.
    "transactional": "options.transactional decides List-Unsubscribe and suppression; not yet written here",
    "sms_coding": "SMS: email only", "sms_dst": "SMS", "sms_dst_npi": "SMS", "sms_dst_ton": "SMS",
    "sms_remoteids": "SMS", "sms_segments": "SMS", "sms_src": "SMS", "sms_src_npi": "SMS",
    "sms_src_ton": "SMS", "sms_text": "SMS",
}

# Fields an engagement event lacks because its link's token does not carry them. The
# tracker keeps no state; each of these would lengthen every tracked URL of the copy
# (the subject alone up to 998 bytes). The delivery event of the same message_id has them.
NOT_IN_TOKEN: dict[str, str] = {
    name: "not carried in the link's token; the message's delivery event has it"
    for name in ("subject", "friendly_from", "sending_domain", "msg_from", "msg_size", "injection_time",
                 "sending_ip", "num_retries", "queue_time")
}
# What the link does not prove: a pixel says open tracking was on, not whether clicks
# were tracked or the top pixel was there; a click says the reverse.
OPEN_UNKNOWN = {"click_tracking": "an open proves open tracking only; the token does not say the rest",
                "initial_pixel": "the bottom pixel's token does not say whether the top one was there"}
CLICK_UNKNOWN = {"open_tracking": "a click proves click tracking only; the token does not say the rest",
                 "initial_pixel": "a click's token does not say whether the top pixel was there"}

LACKS: dict[str, dict[str, str]] = {
    "injection": {"sending_ip": "chosen at delivery: the delivery event says it"},
    "policy_rejection": {"sending_ip": "a refused message is never sent"},
    "delivery": {},
    "delay": {},
    "bounce": {},
    "open": {**NOT_IN_TOKEN, **OPEN_UNKNOWN},
    "initial_open": {**NOT_IN_TOKEN, "click_tracking": OPEN_UNKNOWN["click_tracking"]},
    "click": {**NOT_IN_TOKEN, **CLICK_UNKNOWN},
    "link_unsubscribe": {**NOT_IN_TOKEN, **CLICK_UNKNOWN,
                         "mailfrom": "msg_from under another name, which the token does not carry"},
    "list_unsubscribe": {**NOT_IN_TOKEN,
                         "mailfrom": "msg_from under another name, which the token does not carry",
                         "open_tracking": "the unsubscribe token does not say how the copy was tracked",
                         "click_tracking": "the unsubscribe token does not say how the copy was tracked",
                         "initial_pixel": "the unsubscribe token does not say how the copy was tracked"},
}

# SparkPost's events carry user_agent_parsed (its Events API documents it); the stored
# documentation samples predate it.
PARSED = {"user_agent_parsed": "SparkPost's field, absent from these older documentation samples"}

# Fields the appliance adds that SparkPost's sample of the type lacks, and why.
ADDS: dict[str, dict[str, str]] = {
    "injection": {"auth_user": "the SMTP AUTH user who injected the message (SPEC §8)"},
    "policy_rejection": {"routing_domain": "as in every other event of the appliance",
                         "subject": "what was refused, for whoever reads the refusal"},
    "delivery": {},
    "delay": {},
    "bounce": {"queue_time": "as the delay events of the same copy have it",
               "outbound_tls": "as the delivery and delay events have it"},
    "open": {"recv_method": "SMTP injection, as every event of the copy says", **PARSED},
    "initial_open": {"recv_method": "SMTP injection", **PARSED},
    "click": {"recv_method": "SMTP injection", **PARSED,
              "accept_language": "the clicking browser's Accept-Language (SPEC §8)"},
    "list_unsubscribe": {"user_agent": "the client that posted the one-click unsubscribe",
                         "delv_method": "as every engagement event of the copy says"},
    "link_unsubscribe": {**PARSED, "geo_ip": "the click's, as the click has it",
                         "accept_language": "the click's Accept-Language",
                         "target_link_url": "the unsubscribe link's target, as the click has it",
                         "target_link_name": "the unsubscribe link's name, as the click has it"},
}
# Momentum's node name, on every event (SPEC §8).
ADDED_EVERYWHERE = {"node_name": "the node that wrote the event (Momentum's node_name)"}

# Values whose type differs from the sample's, and why.
TYPES: dict[str, str] = {
    # The documentation's sample is -1; SparkPost's webhooks send "1" or "0", as Momentum writes it.
    "outbound_tls": "a string, as SparkPost's webhook payloads carry it",
}

# Samples of types the appliance does not write.
NOT_WRITTEN: dict[str, str] = {
    "out_of_band": "no bounce processing of asynchronous reports",
    "generation_failure": "no templates to fail",
    "generation_rejection": "no generation step",
    "spam_complaint": "no feedback loop processing",
}


def sample(kind: str) -> dict[str, Any]:
    with open(os.path.join(SAMPLES, f"{kind}.json"), encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


TRACKING = Tracking(open_tracking=True, click_tracking=True, campaign_id="Example Campaign Name",
                    metadata={"customKey": "customValue"}, tags=("male", "US"), expiry=2000)
RECIPIENT = Recipient("Recipient@example.com", "000443ee14578172be22",
                      et.recipient_fields("65832150921904138", "Recipient@example.com",
                                          "000443ee14578172be22", TRACKING), TRACKING)
ENVELOPE = Envelope("65832150921904138", "sender@example.com", [RECIPIENT], received_at=1460989507.0,
                    client_address="127.0.0.1", auth_user=None, listener="default", message_size=1337,
                    subject="Summer deals are here!", friendly_from="sender@example.com")
LINK = LinkData("open", 2000, "000443ee14578172be22", "65832150921904138", "Recipient@example.com",
                "Example Campaign Name", ("male", "US"), {"customKey": "customValue"},
                "Example Link Name", "http://example.com")
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_10_3) AppleWebKit/537.36"
# What appliance.engagement makes of the client, in the shape the tracker writes it.
WHO = {"user_agent_parsed": {"agent_family": "Chrome", "device_brand": "Apple", "device_family": "Mac",
                             "os_family": "Mac OS X", "os_version": "10.10.3", "is_mobile": False,
                             "is_proxy": False, "is_prefetched": False},
       "geo_ip": {"country": "US", "region": "MD", "city": "Columbia", "latitude": 39.1749,
                  "longitude": -76.8375, "zip": "21046", "postal_code": "21046"}}


def drafts() -> dict[str, et.Draft]:
    """One event of each type the appliance writes, as its builders make them."""
    sent = reply_outcome(250, "2.0.0 Ok", "18.236.253.72", tls=True, sending_ip="127.0.0.1")
    later = internal(454, "4.7.1", "Example Remote MTA Delay Message", "18.236.253.72", True)
    refused = reply_outcome(554, "5.7.1 Example Remote MTA Bounce Message", "18.236.253.72")
    click, unsubscribe = et.click_events(LINK._replace(kind="click", unsubscribe=True), "127.0.0.1", UA,
                                         "en-US", WHO)
    return {
        "injection": et.injection_event(ENVELOPE, RECIPIENT, "sender@example.com", "Summer deals are here!"),
        "policy_rejection": et.policy_rejection_event(RECIPIENT, "sender@example.com", "sender@example.com",
                                                      "Summer deals are here!", "127.0.0.1", 554,
                                                      "5.7.1 Example policy rejection", 1460989507.0),
        "delivery": et.delivery_event(ENVELOPE, RECIPIENT, sent, "example.com", 0.012, 3),
        "delay": et.delivery_event(ENVELOPE, RECIPIENT, later, "example.com", 0.012, 3),
        "bounce": et.delivery_event(ENVELOPE, RECIPIENT, refused, "example.com", 0.012, 3),
        "open": et.open_event(LINK, "127.0.0.1", UA, WHO),
        "initial_open": et.open_event(LINK._replace(kind="initial_open"), "127.0.0.1", UA, WHO),
        "click": click,
        "link_unsubscribe": unsubscribe,
        "list_unsubscribe": et.list_unsubscribe_event(LINK._replace(kind="unsubscribe"), "127.0.0.1", UA),
    }


class ParityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = EventLog("unused", "node-a", customer_id="1", now=lambda: 1460989507.0, clock=Clock())
        self.events: dict[str, Event] = {kind: self.log.make(d.type, **d.fields)
                                         for kind, d in drafts().items()}

    def test_every_type_has_a_sample(self) -> None:
        stored = {name.removesuffix(".json") for name in os.listdir(SAMPLES) if name.endswith(".json")}
        self.assertEqual(set(et.EVENT_TYPES), set(self.events))
        self.assertEqual(stored, set(et.EVENT_TYPES) | set(NOT_WRITTEN))
        self.assertFalse(set(NOT_WRITTEN) & set(et.EVENT_TYPES))

    def test_same_keys_but_those_listed(self) -> None:
        for kind, event in self.events.items():
            theirs, ours = set(sample(kind)), set(event)
            lacks = {**{k: v for k, v in NEVER.items() if k in theirs and not (
                k == "transactional" and kind == "list_unsubscribe")}, **LACKS[kind]}
            adds = {**ADDED_EVERYWHERE, **ADDS[kind]}
            self.assertEqual(theirs - ours, set(lacks), f"{kind}: fields of the sample the event lacks")
            self.assertEqual(ours - theirs, set(adds), f"{kind}: fields the event adds")

    def test_same_value_types(self) -> None:
        for kind, event in self.events.items():
            theirs = sample(kind)
            for name in set(theirs) & set(event):
                if name in TYPES:
                    self.assertIsInstance(event[name], str, (kind, name))
                    continue
                self.assertIs(type(event[name]), type(theirs[name]), (kind, name, event[name], theirs[name]))

    def test_the_values_sparkpost_writes(self) -> None:
        """Where a value has one form (a time, a pool, a flag), the appliance writes it so."""
        for kind in ("injection", "policy_rejection", "delivery", "delay", "bounce"):
            event = self.events[kind]
            self.assertEqual(event["injection_time"], sample(kind)["injection_time"], kind)
            self.assertEqual(event["ip_pool"], "default", kind)
            self.assertEqual(event["recv_method"], sample(kind)["recv_method"], kind)
        delivered = self.events["delivery"]
        for name in ("subject", "friendly_from", "msg_from", "msg_size", "routing_domain", "sending_ip",
                     "sending_domain", "recipient_domain", "open_tracking", "click_tracking", "initial_pixel",
                     "queue_time", "num_retries", "delv_method", "message_id", "transmission_id",
                     "campaign_id", "rcpt_meta", "rcpt_tags", "rcpt_to"):
            self.assertEqual(delivered[name], sample("delivery")[name], name)
        self.assertEqual(delivered["raw_rcpt_to"], "Recipient@example.com")  # the case it came with
        self.assertTrue(delivered["timestamp"].isdigit())  # Unix seconds, as webhooks write it

    def test_the_webhook_test_batch_matches_the_events(self) -> None:
        """``engage-appliance webhooks test`` posts what the event log would hold: same keys, same types."""
        from appliance.webhooks.samples import sample_events

        for made in sample_events(et.EVENT_TYPES, 1460989507.0, "node-a", "1"):
            event = self.events[made["type"]]
            self.assertLessEqual(set(made), set(event), made["type"])
            self.assertLessEqual(set(event) - set(made), set(et.OPTIONAL_FIELDS.get(made["type"], ())))
            for name, value in made.items():
                self.assertIs(type(value), type(event[name]), (made["type"], name))
