"""
The appliance's webhook batches read by a SparkPost consumer written by others: Anymail's Django view.

Anymail (``django-anymail``, a test-only dependency) tells its users to
protect the view with HTTP Basic auth by writing the credentials into the
SparkPost webhook URL. Here the appliance is set up that way: every event
type it writes, built by the appliance's own event builders and written to
its event log, is batched and posted by the webhook with the credentials
from the URL, and must come out of Anymail's ``tracking`` signal as the
right kind of event with its recipient, campaign, metadata, click URL, user
agent and bounce reason. The requests go through Django's own request
handling (its test client, in process), so the test runs on a test clock.
"""

from __future__ import annotations

import json
import smtplib
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest
from twisted.web import server
from twisted.web.wsgi import WSGIResource

from appliance import eventtypes as et
from appliance.delivery.outcome import internal, reply_outcome
from tests.building import checked
from tests.helpers import RunningAppliance, base_toml, in_thread, merge, wait_until
from tests.test_eventtypes import ENVELOPE, WHO, link, recipient
from tests.test_webhooks import FakeResponse, ServiceTestCase

try:
    import django
except ImportError:  # the test extra installs it
    django = None

USERNAME, PASSWORD = "engage", "s3cret pa:ss"  # Anymail's WEBHOOK_SECRET is "user:password"
TARGET = "http://engage:s3cret%20pa%3Ass@testserver/anymail/sparkpost/tracking/?src=appliance"
URL = b"http://testserver/anymail/sparkpost/tracking/?src=appliance"
AGENT = "Mozilla/5.0 (X11; Linux x86_64) Mail/1.0"


def _setup() -> None:
    if django is None:
        raise SkipTest("django-anymail is not installed: pip install -c constraints.txt '.[test]'")
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False, SECRET_KEY="not secret: tests only", ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__, INSTALLED_APPS=["anymail"], MIDDLEWARE=[], USE_TZ=True,
            ANYMAIL={"WEBHOOK_SECRET": f"{USERNAME}:{PASSWORD}",
                     # initial_open is Anymail's "opened" only when asked for.
                     "SPARKPOST_TRACK_INITIAL_OPEN_AS_OPENED": True},
        )
        django.setup()


def __getattr__(name: str) -> Any:
    """``urlpatterns``, made when Django first resolves a URL (after ``_setup``), as ROOT_URLCONF."""
    if name != "urlpatterns":
        raise AttributeError(name)
    from anymail.webhooks.sparkpost import SparkPostTrackingWebhookView
    from django.urls import path

    return [path("anymail/sparkpost/tracking/", SparkPostTrackingWebhookView.as_view())]


class DjangoAgent:
    """An ``IAgent`` that hands each request to Django, as a WSGI server would, and answers with its reply."""

    def __init__(self) -> None:
        from django.test import Client

        self.client = Client()
        self.sent: list[tuple[bytes, dict[str, str], bytes]] = []
        self.codes: list[int] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> defer.Deferred:
        consumer = StringTransport()
        bodyProducer.startProducing(consumer)
        fields = {k.decode(): v[0].decode() for k, v in headers.getAllRawHeaders()}
        self.sent.append((uri, dict(fields), consumer.value()))
        url = urlsplit(uri.decode())
        response = self.client.generic(method.decode(), f"{url.path}?{url.query}", consumer.value(),
                                       content_type=fields.pop("Content-Type"), headers=fields)
        self.codes.append(response.status_code)
        return defer.succeed(FakeResponse(response.status_code, response.content))


def every_event_type(log: Any) -> list[dict[str, Any]]:
    """One event of each type the appliance writes, made by its own builders."""
    rcpt = ENVELOPE.recipients[0]
    drafts = [
        et.injection_event(ENVELOPE, rcpt, "sender@example.net", "Hello"),
        et.policy_rejection_event(recipient(), "sender@example.net", "sender@example.net", "Hello",
                                  "192.0.2.1", 550, "5.7.1 Refused by policy", 1767225600.5),
        et.delivery_event(ENVELOPE, rcpt, reply_outcome(250, "2.0.0 Ok", "198.51.100.7"), "example.test",
                          1.5, 1),
        et.delivery_event(ENVELOPE, rcpt, internal(421, "4.4.1", "no answer", "198.51.100.7"),
                          "example.test", 300, 2),
        et.delivery_event(ENVELOPE, rcpt, reply_outcome(550, "5.1.1 <Ann@Example.TEST>: no such user",
                                                        "198.51.100.7"), "example.test", 301, 3),
        et.open_event(link("initial_open", {"plan": "gold"}), "203.0.113.5", AGENT, WHO),
        et.open_event(link("open", {"plan": "gold"}), "203.0.113.5", AGENT, WHO),
        *et.click_events(link("click", {"plan": "gold"}, unsubscribe=True), "203.0.113.5", AGENT, "de",
                         WHO),
        et.list_unsubscribe_event(link("unsubscribe", {"plan": "gold"}), "203.0.113.5", AGENT),
    ]
    return [log.make(kind, **fields) for kind, fields in drafts]


class AnymailTests(ServiceTestCase):
    def setUp(self) -> None:
        _setup()
        super().setUp()
        from anymail.signals import tracking

        self.received: list[Any] = []

        def handler(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
            self.received.append(event)

        tracking.connect(handler, weak=False)
        self.addCleanup(tracking.disconnect, handler)
        self.agent = DjangoAgent()  # what the webhooks post with

    def webhook(self, target: str = TARGET) -> Any:
        [hook] = checked(merge(base_toml(), {"webhooks": [{"name": "hook", "target": target}]})).webhooks
        return self.webhooks(hook).webhooks[0]

    def test_every_event_type_is_received_and_understood(self) -> None:
        svc = self.webhook()
        self.assertEqual(svc.config.auth_type, "basic")
        events = every_event_type(self.events)
        self.assertEqual({e["type"] for e in events}, set(et.EVENT_TYPES))
        for event in events:
            self.emit(event)
        svc.seal()
        self.assertEqual(self.agent.codes, [200])
        [(uri, headers, body)] = self.agent.sent
        self.assertEqual(uri, URL)  # the credentials went as a header, not in the URL
        self.assertTrue(headers["Authorization"].startswith("Basic "))
        self.assertEqual(svc.batches, [])

        kinds = [(e.esp_event["msys"], e.event_type) for e in self.received]
        self.assertEqual([(list(msys)[0], list(msys.values())[0]["type"], kind) for msys, kind in kinds], [
            ("message_event", "injection", "queued"),
            ("message_event", "policy_rejection", "rejected"),
            ("message_event", "delivery", "delivered"),
            ("message_event", "delay", "deferred"),
            ("message_event", "bounce", "bounced"),
            ("track_event", "initial_open", "opened"),
            ("track_event", "open", "opened"),
            ("track_event", "click", "clicked"),
            ("unsubscribe_event", "link_unsubscribe", "unsubscribed"),
            ("unsubscribe_event", "list_unsubscribe", "unsubscribed"),
        ])
        for got, sent in zip(self.received, events, strict=True):
            self.assertEqual(got.event_id, sent["event_id"])
            self.assertEqual(int(got.timestamp.timestamp()), int(sent["timestamp"]))
            self.assertEqual(got.recipient, "Ann@Example.TEST")
            self.assertEqual(got.message_id, sent["transmission_id"])
            self.assertEqual(got.tags, ["spring"])  # the campaign is Anymail's tag
            self.assertEqual(got.metadata, {"plan": "gold"})
        by_type = {e["type"]: got for e, got in zip(events, self.received, strict=True)}
        for kind in ("initial_open", "open", "click", "link_unsubscribe", "list_unsubscribe"):
            self.assertEqual(by_type[kind].user_agent, AGENT)
        for kind in ("click", "link_unsubscribe"):
            self.assertEqual(by_type[kind].click_url, "https://example.net/x")
        self.assertEqual(by_type["bounce"].mta_response, "550 5.1.1 <Ann@Example.TEST>: no such user")
        self.assertEqual(by_type["bounce"].reject_reason, "invalid")  # bounce_class 10
        self.assertEqual(by_type["delay"].mta_response, "421 4.4.1 [internal] no answer")
        self.assertEqual(by_type["policy_rejection"].mta_response, "550 5.7.1 Refused by policy")
        self.assertEqual(by_type["policy_rejection"].reject_reason, "blocked")  # bounce_class 50

    def test_a_wrong_password_is_refused_and_the_batch_waits(self) -> None:
        svc = self.webhook(TARGET.replace("s3cret", "wrong"))
        self.emit(every_event_type(self.events)[2])
        svc.seal()
        self.assertEqual(self.agent.codes, [400])  # Anymail's answer to failed Basic auth
        self.assertEqual(self.received, [])
        self.assertEqual((svc.failures, len(svc.batches)), (1, 1))
        self.assertNotIn("wrong", json.dumps([m for m in self.messages("warn")]))

    def test_the_samples_of_webhooks_test_are_understood(self) -> None:
        """What ``engage-appliance webhooks test`` posts is a batch Anymail reads, one event per type."""
        from appliance.webhooks.samples import post_test_batch

        hook = self.webhook().config
        answer = self.successResultOf(post_test_batch(hook, self.agent, self.clock, "node-a"))
        self.assertEqual((answer.code, answer.count), (200, len(et.EVENT_TYPES)))
        self.assertEqual([e.event_type for e in self.received],
                         ["queued", "rejected", "delivered", "deferred", "bounced", "opened", "opened",
                          "clicked", "unsubscribed", "unsubscribed"])
        self.assertEqual({e.recipient for e in self.received}, {"Recipient@example.com"})
        self.assertEqual({tuple(e.tags) for e in self.received}, {("Example Campaign Name",)})


class AnymailOverHttpTests(unittest.TestCase):
    """
    The whole way on loopback: a message sent over SMTP, its events posted by the running
    appliance to Anymail served over real HTTP (twisted.web's WSGI container), with the
    credentials written into the target as Anymail's documentation asks.
    """

    def setUp(self) -> defer.Deferred:
        _setup()
        from anymail.signals import tracking
        from django.core.handlers.wsgi import WSGIHandler

        self.received: list[Any] = []

        def handler(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
            self.received.append(event)  # in a thread of the reactor's pool; list.append is atomic

        tracking.connect(handler, weak=False)
        self.addCleanup(tracking.disconnect, handler)
        site = server.Site(WSGIResource(reactor, reactor.getThreadPool(), WSGIHandler()))
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        port = self.port.getHost().port
        self.running = RunningAppliance(self.mktemp(), webhooks=[{
            "name": "anymail",
            "target": f"http://engage:s3cret%20pa%3Ass@127.0.0.1:{port}/anymail/sparkpost/tracking/",
            "batch_interval": "100ms",
            "retry_initial": "200ms",
        }])
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    @defer.inlineCallbacks
    def test_a_message_s_events_reach_anymail(self) -> defer.Generator:
        api = json.dumps({"campaign_id": "spring", "metadata": {"plan": "gold"}})
        message = (f"From: sender@example.net\r\nTo: Ann@Example.TEST\r\nX-MSYS-API: {api}\r\n"
                   "Subject: hooks\r\n\r\nHello.\r\n").encode()

        def send() -> dict:
            with smtplib.SMTP("127.0.0.1", self.running.smtp_port, timeout=10) as client:
                return client.sendmail("sender@example.net", ["Ann@Example.TEST"], message)

        self.assertEqual((yield in_thread(send)), {})
        yield wait_until(lambda: len(self.received) == 2)
        self.assertEqual(sorted(e.event_type for e in self.received), ["delivered", "queued"])
        for got in self.received:
            self.assertEqual((got.recipient, got.tags, got.metadata), ("Ann@Example.TEST", ["spring"],
                                                                       {"plan": "gold"}))
        written = {e["event_id"] for e in self.running.events()}
        self.assertEqual({e.event_id for e in self.received}, written)
