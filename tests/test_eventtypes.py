"""The event contract: which fields each event type carries, and the values its builder gives them."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance import eventtypes as et
from appliance.delivery.outcome import Outcome, internal, reply_outcome
from appliance.envelope import Envelope, Recipient
from appliance.events import Event, EventLog
from appliance.links import LinkData
from appliance.settings import Tracking

# What SPEC §8 and today's consumers expect, type by type: (always, sometimes).
COMMON = ["type", "event_id", "timestamp", "node_name", "customer_id"]
RECIPIENT = ["message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to", "rcpt_meta",
             "rcpt_tags"]
FAILURE = ["error_code", "reason", "raw_reason", "bounce_class"]
MESSAGE = ["subject", "friendly_from", "sending_domain", "recipient_domain", "msg_size", "injection_time",
           "recv_method", "ip_pool", "open_tracking", "click_tracking", "initial_pixel"]
OUTCOME = ["msg_from", "routing_domain", "ip_address", "sending_ip", "queue_time", "num_retries",
           "delv_method", "outbound_tls", *MESSAGE]
TRACK = ["message_id", "transmission_id", "campaign_id", "rcpt_to", "raw_rcpt_to", "rcpt_tags",
         "ip_address", "user_agent", "user_agent_parsed", "routing_domain", "recipient_domain", "ip_pool",
         "recv_method", "delv_method"]
OPEN = [*TRACK, "rcpt_meta", "open_tracking"]
CLICK = [*TRACK, "target_link_url", "target_link_name", "accept_language", "click_tracking"]
# A text field cut to its cap is marked ``<field>_truncated``.
CUT = ["msg_from_truncated", "friendly_from_truncated", "subject_truncated"]
CUT_REASON = ["reason_truncated", "raw_reason_truncated"]
CONTRACT: dict[str, tuple[list[str], list[str]]] = {
    "injection": ([*COMMON, *RECIPIENT, "routing_domain", "msg_from", "friendly_from", "subject",
                   "msg_size", "recv_method", "injection_time", "auth_user", "open_tracking",
                   "click_tracking", "initial_pixel", "ip_pool", "sending_domain", "recipient_domain"],
                  ["tracking_skipped", "tracking_skipped_reason", "dkim_broken", *CUT,
                   "rcpt_tags_ignored", "rcpt_meta_left_out_of_links", "msys_api_unknown_fields"]),
    "policy_rejection": ([*COMMON, *RECIPIENT, "routing_domain", "msg_from", "friendly_from", "subject",
                          "remote_addr", "recv_method", *FAILURE, "injection_time", "ip_pool",
                          "sending_domain", "recipient_domain"],
                         [*CUT, "remote_addr_truncated", *CUT_REASON]),
    "delivery": ([*COMMON, *RECIPIENT, *OUTCOME], CUT),
    "delay": ([*COMMON, *RECIPIENT, *OUTCOME, *FAILURE], [*CUT, *CUT_REASON]),
    "bounce": ([*COMMON, *RECIPIENT, *OUTCOME, *FAILURE], [*CUT, *CUT_REASON]),
    "open": ([*COMMON, *OPEN], ["geo_ip"]),
    "initial_open": ([*COMMON, *OPEN, "initial_pixel"], ["geo_ip"]),
    "click": ([*COMMON, *CLICK], ["rcpt_meta", "geo_ip", "target_link_anchor"]),
    "link_unsubscribe": ([*COMMON, *CLICK], ["rcpt_meta", "geo_ip", "target_link_anchor"]),
    "list_unsubscribe": ([*COMMON, *[f for f in TRACK if f != "user_agent_parsed"], "rcpt_meta",
                          "transactional"], []),
}

# What appliance.engagement made of the client (its own tests hold it to SparkPost's fields).
PARSED = {"agent_family": "Other", "device_brand": "", "device_family": "Other", "os_family": "Other",
          "os_version": "", "is_mobile": False, "is_proxy": False, "is_prefetched": False}
WHO = {"user_agent_parsed": PARSED}
GEO = {"country": "US", "region": "MD", "city": "Columbia", "latitude": 39.1749,
       "longitude": -76.8375, "zip": 21046, "postal_code": "21046"}

TID = "4242"
TRACKING = Tracking(open_tracking=True, click_tracking=False, campaign_id="spring",
                    metadata={"plan": "gold"}, tags=("a", "b"), expiry=2000)


def recipient(tracking: Tracking | None = TRACKING) -> Recipient:
    r = Recipient("Ann@Example.TEST", "00ab", et.recipient_fields(TID, "Ann@Example.TEST", "00ab", tracking))
    if tracking is not None:
        r.tracking = tracking
    return r


ENVELOPE = Envelope(TID, "sender@example.net", [recipient()], received_at=1767225600.5,
                    client_address="192.0.2.1", auth_user=None, listener="default", message_size=1234,
                    subject="Hi", friendly_from="s@example.net")


def link(kind: str, metadata: dict[str, Any] | None = None, unsubscribe: bool = False) -> LinkData:
    return LinkData(kind, 2000, "00ab", TID, "Ann@Example.TEST", "spring", ("a", "b"), metadata,
                    "cta", "https://example.net/x", unsubscribe)


class ContractTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = EventLog("unused", "node-a", customer_id="7", now=lambda: 1767225660.9, clock=Clock())

    def made(self, draft: et.Draft) -> Event:
        kind, fields = draft
        return self.log.make(kind, **fields)

    def assertCarries(self, event: Event, optional: list[str]) -> None:
        required, allowed = CONTRACT[event["type"]]
        self.assertEqual(sorted(event), sorted(required + optional), event["type"])
        self.assertTrue(set(optional) <= set(allowed), event["type"])

    def test_the_module_states_the_contract(self) -> None:
        self.assertEqual(set(et.EVENT_TYPES), set(CONTRACT))
        for kind, (required, optional) in CONTRACT.items():
            self.assertEqual(list(et.FIELDS[kind]), required, kind)
            self.assertEqual(list(et.OPTIONAL_FIELDS.get(kind, ())), optional, kind)

    def test_injection(self) -> None:
        plain = self.made(et.injection_event(ENVELOPE, ENVELOPE.recipients[0], "s@example.net", "Hi"))
        self.assertCarries(plain, [])
        self.assertEqual(plain, {
            "type": "injection", "event_id": plain["event_id"], "timestamp": "1767225660",
            "node_name": "node-a", "customer_id": "7",
            "message_id": "00ab", "transmission_id": TID, "campaign_id": "spring",
            "rcpt_to": "ann@example.test", "raw_rcpt_to": "Ann@Example.TEST",
            "rcpt_meta": {"plan": "gold"}, "rcpt_tags": ["a", "b"],
            "routing_domain": "example.test", "msg_from": "sender@example.net",
            "friendly_from": "s@example.net", "subject": "Hi", "msg_size": "1234", "recv_method": "esmtp",
            "injection_time": "2026-01-01T00:00:00.500Z", "auth_user": None,
            "open_tracking": True, "click_tracking": False, "initial_pixel": True, "ip_pool": "default",
            "sending_domain": "example.net", "recipient_domain": "example.test",
        })
        limits = {"rcpt_tags_ignored": 2, "rcpt_meta_left_out_of_links": True,
                  "msys_api_unknown_fields": ["campain_id"]}
        noted = self.made(et.injection_event(ENVELOPE, ENVELOPE.recipients[0], "", "", ["a", "b"], True,
                                             limits))
        self.assertCarries(noted, ["tracking_skipped", "tracking_skipped_reason", "dkim_broken", *limits])
        self.assertEqual((noted["tracking_skipped"], noted["tracking_skipped_reason"], noted["dkim_broken"]),
                         (True, "a; b", True))
        self.assertEqual({k: noted[k] for k in limits}, limits)
        # No initial pixel without open tracking, whatever initial_open says.
        closed = recipient(Tracking(open_tracking=False, initial_open=True))
        self.assertFalse(self.made(et.injection_event(ENVELOPE, closed, "", ""))["initial_pixel"])

    def test_injection_time_is_written_as_sparkpost_writes_it(self) -> None:
        self.assertEqual(et.iso_time(1460989507.0), "2016-04-18T14:25:07.000Z")
        self.assertEqual(et.iso_time(1460989507.999), "2016-04-18T14:25:07.999Z")
        self.assertEqual(et.iso_time(0), "1970-01-01T00:00:00.000Z")

    def test_policy_rejection_of_a_recipient_never_resolved(self) -> None:
        event = self.made(et.policy_rejection_event(recipient(None), "sender@example.net", "s@example.net",
                                                    "Hi", "192.0.2.1", 550, "5.7.1 No", 1767225600.5))
        self.assertCarries(event, [])
        self.assertEqual({k: event[k] for k in CONTRACT["policy_rejection"][0][5:]}, {
            "message_id": "00ab", "transmission_id": TID, "campaign_id": "",
            "rcpt_to": "ann@example.test", "raw_rcpt_to": "Ann@Example.TEST", "rcpt_meta": {},
            "rcpt_tags": [], "routing_domain": "example.test", "msg_from": "sender@example.net",
            "friendly_from": "s@example.net", "subject": "Hi", "remote_addr": "192.0.2.1",
            "recv_method": "esmtp", "error_code": "550", "reason": "550 5.7.1 No",
            "raw_reason": "550 5.7.1 No", "bounce_class": "50",
            "injection_time": "2026-01-01T00:00:00.500Z", "ip_pool": "default",
            "sending_domain": "example.net", "recipient_domain": "example.test",
        })

    def test_delivery_delay_bounce(self) -> None:
        rcpt = ENVELOPE.recipients[0]
        sent = reply_outcome(250, "2.0.0 Ok", "198.51.100.7", tls=True, sending_ip="192.0.2.25")
        delivered = self.made(et.delivery_event(ENVELOPE, rcpt, sent, "example.test", 1.25, 1))
        self.assertCarries(delivered, [])
        self.assertEqual({k: delivered[k] for k in OUTCOME},
                         {"msg_from": "sender@example.net", "routing_domain": "example.test",
                          "ip_address": "198.51.100.7", "sending_ip": "192.0.2.25", "queue_time": "1250",
                          "num_retries": "0", "delv_method": "esmtp", "outbound_tls": "1",
                          "subject": "Hi", "friendly_from": "s@example.net", "sending_domain": "example.net",
                          "recipient_domain": "example.test", "msg_size": "1234",
                          "injection_time": "2026-01-01T00:00:00.500Z", "recv_method": "esmtp",
                          "ip_pool": "default", "open_tracking": True, "click_tracking": False,
                          "initial_pixel": True})
        delayed = self.made(et.delivery_event(ENVELOPE, rcpt, internal(421, "4.4.1", "no answer"),
                                              "example.test", 300, 2))
        self.assertCarries(delayed, [])
        self.assertEqual({k: delayed[k] for k in ["type", "num_retries", "outbound_tls", *FAILURE]},
                         {"type": "delay", "num_retries": "1", "outbound_tls": "0", "error_code": "421",
                          "reason": "421 4.4.1 [internal] no answer",
                          "raw_reason": "421 4.4.1 [internal] no answer", "bounce_class": "70"})
        refused = reply_outcome(550, "5.1.1 from  192.0.2.9\r\nno")
        bounced = self.made(et.delivery_event(ENVELOPE, rcpt, refused, "example.test", 0, 1))
        self.assertCarries(bounced, [])
        self.assertEqual({k: bounced[k] for k in FAILURE},
                         {"error_code": "550", "reason": "550 5.1.1 from a.b.c.d no",
                          "raw_reason": "550 5.1.1 from  192.0.2.9\r\nno", "bounce_class": "10"})
        nothing = self.made(et.delivery_event(ENVELOPE, rcpt, Outcome("delay", 0, "timed out"), "x", 0, 1))
        self.assertEqual((nothing["error_code"], nothing["bounce_class"]), ("", "1"))

    def test_opens_always_carry_the_metadata(self) -> None:
        for kind in ("open", "initial_open"):
            event = self.made(et.open_event(link(kind), "203.0.113.5", "Mail/1.0", WHO))
            self.assertCarries(event, [])
            self.assertEqual({k: event[k] for k in OPEN}, {
                "message_id": "00ab", "transmission_id": TID, "campaign_id": "spring",
                "rcpt_to": "ann@example.test", "raw_rcpt_to": "Ann@Example.TEST", "rcpt_tags": ["a", "b"],
                "ip_address": "203.0.113.5", "user_agent": "Mail/1.0", "user_agent_parsed": PARSED,
                "rcpt_meta": {},
                "routing_domain": "example.test", "recipient_domain": "example.test", "ip_pool": "default",
                "recv_method": "esmtp", "delv_method": "esmtp", "open_tracking": True})
            self.assertEqual(event.get("initial_pixel"), True if kind == "initial_open" else None)
            placed = self.made(et.open_event(link(kind), "203.0.113.5", "", {**WHO, "geo_ip": GEO}))
            self.assertCarries(placed, ["geo_ip"])
            self.assertEqual(placed["geo_ip"], GEO)
        self.assertEqual(self.made(et.open_event(link("open", {"k": 1}), "", "", WHO))["rcpt_meta"],
                         {"k": 1})

    def test_clicks_carry_metadata_only_when_the_link_does(self) -> None:
        [click] = [self.made(d) for d in et.click_events(link("click"), "203.0.113.5", "UA", "de", WHO)]
        self.assertCarries(click, [])
        self.assertEqual({k: click[k] for k in CLICK[-4:]},
                         {"target_link_url": "https://example.net/x", "target_link_name": "cta",
                          "accept_language": "de", "click_tracking": True})
        drafts = et.click_events(link("click", {"k": 1}, unsubscribe=True), "", "", "",
                                 {**WHO, "geo_ip": GEO})
        click, unsubscribe = [self.made(d) for d in drafts]
        self.assertEqual((click["type"], unsubscribe["type"]), ("click", "link_unsubscribe"))
        for event in (click, unsubscribe):
            self.assertCarries(event, ["rcpt_meta", "geo_ip"])
            self.assertEqual(event["user_agent_parsed"], PARSED)
            self.assertEqual(event["rcpt_meta"], {"k": 1})
        self.assertNotEqual(click["event_id"], unsubscribe["event_id"])

    def test_clicks_carry_the_anchor_text_when_the_link_has_one(self) -> None:
        shop = link("click", unsubscribe=True)._replace(anchor="Shop now")
        for event in (self.made(d) for d in et.click_events(shop, "", "", "", WHO)):
            self.assertCarries(event, ["target_link_anchor"])
            self.assertEqual(event["target_link_anchor"], "Shop now")
        [plain] = [self.made(d) for d in et.click_events(link("click"), "", "", "", WHO)]
        self.assertNotIn("target_link_anchor", plain)  # omitted when empty

    def test_webhook_classes(self) -> None:
        self.assertEqual({t: et.event_class(t) for t in et.EVENT_TYPES}, {
            "injection": "message_event", "policy_rejection": "message_event", "delivery": "message_event",
            "delay": "message_event", "bounce": "message_event", "open": "track_event",
            "initial_open": "track_event", "click": "track_event", "link_unsubscribe": "unsubscribe_event",
            "list_unsubscribe": "unsubscribe_event"})


class CapTests(SynchronousTestCase):
    """Text from a message, a client, a policy or a remote server is cut to its cap, and marked."""

    def setUp(self) -> None:
        self.log = EventLog("unused", "node-a", now=lambda: 1767225660.9, clock=Clock())

    def made(self, draft: et.Draft) -> Event:
        kind, fields = draft
        return self.log.make(kind, **fields)

    def test_cap_text_cuts_on_a_character_boundary(self) -> None:
        self.assertEqual(et.cap_text("a" * 10, 10), ("a" * 10, False))
        self.assertEqual(et.cap_text("a" * 11, 10), ("a" * 10, True))
        self.assertEqual(et.cap_text("é" * 6, 9), ("é" * 4, True))

    def test_injection_subject_and_senders(self) -> None:
        subject = "ü" * 600  # 1,200 bytes
        envelope = Envelope(TID, "s" * 1200 + "@example.net", [recipient()], received_at=1767225600.5,
                            client_address="192.0.2.1", auth_user=None, listener="default",
                            message_size=1)
        event = self.made(et.injection_event(envelope, envelope.recipients[0], "f" * 999, subject))
        self.assertEqual(event["subject"], "ü" * 499)
        self.assertEqual(len(event["friendly_from"]), 998)
        self.assertEqual(len(event["msg_from"]), 998)
        self.assertEqual((event["subject_truncated"], event["friendly_from_truncated"],
                          event["msg_from_truncated"]), (True, True, True))
        whole = self.made(et.injection_event(envelope, envelope.recipients[0], "f" * 998, "ü" * 499))
        self.assertEqual((len(whole["friendly_from"]), whole["subject"]), (998, "ü" * 499))
        self.assertNotIn("subject_truncated", whole)
        self.assertNotIn("friendly_from_truncated", whole)

    def test_delivery_subject_and_sender_from_the_envelope(self) -> None:
        """The envelope keeps one byte past the cap (``Injector``): enough to mark the cut."""
        for subject, cut in (("s" * 998, False), ("s" * 999, True)):
            envelope = Envelope(TID, "a@example.net", [recipient()], received_at=0.0, subject=subject,
                                friendly_from="f" * len(subject))
            event = self.made(et.delivery_event(envelope, envelope.recipients[0], reply_outcome(250, "ok"),
                                                "example.test", 0, 1))
            self.assertEqual((event["subject"], event["friendly_from"]), ("s" * 998, "f" * 998))
            self.assertEqual((event.get("subject_truncated"), event.get("friendly_from_truncated")),
                             (True, True) if cut else (None, None))

    def test_policy_rejection_reason_and_address(self) -> None:
        event = self.made(et.policy_rejection_event(recipient(None), "a@example.net", "", "s" * 5000,
                                                    "x" * 300, 550, "5.7.1 " + "n" * 5000, 0.0))
        self.assertEqual((len(event["subject"]), len(event["remote_addr"]), len(event["reason"]),
                          len(event["raw_reason"])), (998, 256, 998, 998))
        self.assertEqual({k for k in event if k.endswith("_truncated")},
                         {"subject_truncated", "remote_addr_truncated", "reason_truncated",
                          "raw_reason_truncated"})

    def test_a_remote_servers_long_reply(self) -> None:
        event = self.made(et.delivery_event(ENVELOPE, ENVELOPE.recipients[0],
                                            reply_outcome(550, "5.1.1 " + "x" * 3000), "example.test", 0, 1))
        self.assertEqual((len(event["raw_reason"]), event["raw_reason_truncated"]), (998, True))
        self.assertLessEqual(len(event["reason"].encode()), 998)
