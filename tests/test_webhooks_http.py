"""Webhooks over real loopback HTTP: a running appliance posts its events to a twisted.web receiver."""

from __future__ import annotations

import json
import os
import smtplib
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server

from appliance.build import build
from appliance.follower import Cursor, load_cursor
from appliance.service import Appliance
from tests.fakes import self_signed
from tests.helpers import RunningAppliance, deferred_sleep, in_thread, wait_until

MESSAGE = b"From: sender@example.net\r\nTo: a@example.test\r\nSubject: hooks\r\n\r\nHello.\r\n"
UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class Receiver(resource.Resource):
    """Answers POSTs with the next of ``codes`` (then 200) and keeps what it was sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[int] = []
        self.received: list[dict[str, Any]] = []

    def render_POST(self, request: server.Request) -> bytes:
        code = self.codes.pop(0) if self.codes else 200
        self.received.append({
            "path": request.path,
            "code": code,
            "headers": {k.decode().lower(): v[0].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        request.setResponseCode(code)
        return b"try later" if code >= 300 else b""

    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.received if r["code"] == 200]

    def events(self) -> list[dict[str, Any]]:
        return [e for r in self.accepted() for e in json.loads(r["body"])]


def send(port: int) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("sender@example.net", ["a@example.test"], MESSAGE)


class WebhookHttpTests(unittest.TestCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        self.port = reactor.listenTCP(0, server.Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.running = RunningAppliance(self.mktemp(), webhooks=[{
            "name": "collector",
            "target": f"http://127.0.0.1:{self.port.getHost().port}/sparkpost?src=test",
            "auth_token": "t0ken",
            "batch_interval": "100ms",
            "retry_initial": "200ms",
            "timeout": "5s",
        }])
        self.queue = os.path.join(self.running.config.spool.directory, "webhooks", "collector")
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    def pending_batches(self) -> list[str]:
        return [f for f in os.listdir(self.queue) if f.endswith(".batch")]

    @defer.inlineCallbacks
    def test_injection_and_delivery_are_posted(self) -> defer.Generator:
        refused = yield in_thread(send, self.running.smtp_port)
        self.assertEqual(refused, {})
        yield wait_until(lambda: {e["msys"]["message_event"]["type"]
                                  for e in self.receiver.events()} == {"injection", "delivery"})
        for r in self.receiver.received:
            self.assertEqual(r["path"], b"/sparkpost")
            self.assertEqual(r["headers"]["content-type"], "application/json")
            self.assertEqual(r["headers"]["x-messagesystems-webhook-token"], "t0ken")
            self.assertRegex(r["headers"]["x-messagesystems-batch-id"], UUID)
            self.assertEqual(int(r["headers"]["content-length"]), len(r["body"]))
        ids = [r["headers"]["x-messagesystems-batch-id"] for r in self.receiver.received]
        self.assertEqual(len(set(ids)), len(ids))
        # Each event is posted exactly as the event log has it, under message_event.
        posted = [e["msys"]["message_event"] for e in self.receiver.events()]
        self.assertEqual(sorted(posted, key=lambda e: e["event_id"]),
                         sorted(self.running.events(), key=lambda e: e["event_id"]))
        yield wait_until(lambda: self.pending_batches() == [])

    @defer.inlineCallbacks
    def test_failed_batch_is_retried_with_the_same_id(self) -> defer.Generator:
        self.receiver.codes = [500]
        yield in_thread(send, self.running.smtp_port)
        yield wait_until(lambda: len(self.receiver.accepted()) >= 1)
        failed, retried = self.receiver.received[:2]
        self.assertEqual(failed["code"], 500)
        self.assertEqual(retried["code"], 200)
        self.assertEqual(retried["headers"]["x-messagesystems-batch-id"],
                         failed["headers"]["x-messagesystems-batch-id"])
        self.assertEqual(retried["body"], failed["body"])
        self.assertEqual(json.loads(retried["body"])[0]["msys"]["message_event"]["type"], "injection")
        yield wait_until(lambda: self.pending_batches() == [] and
                         {e["msys"]["message_event"]["type"] for e in self.receiver.events()}
                         == {"injection", "delivery"})

    @defer.inlineCallbacks
    def test_unposted_events_survive_a_restart(self) -> defer.Generator:
        self.receiver.codes = [503] * 1000
        yield in_thread(send, self.running.smtp_port)
        yield wait_until(lambda: len(self.running.events()) == 2 and len(self.receiver.received) >= 1)
        yield self.running.appliance.stopService()
        refused = [r["headers"]["x-messagesystems-batch-id"] for r in self.receiver.received]
        self.assertEqual(self.receiver.accepted(), [])

        self.receiver.codes = []
        self.running.appliance = Appliance(build(self.running.config), reactor,
                                           resolver=self.running.resolver, handle_sighup=False)
        self.running.appliance.startService()
        yield wait_until(lambda: {e["msys"]["message_event"]["event_id"] for e in self.receiver.events()}
                         == {e["event_id"] for e in self.running.events()})
        # The batch that was refused before the stop is posted under the same id.
        accepted = [r["headers"]["x-messagesystems-batch-id"] for r in self.receiver.accepted()]
        self.assertIn(refused[0], accepted)
        yield wait_until(lambda: self.pending_batches() == [])
        yield deferred_sleep(0.05)

    @defer.inlineCallbacks
    def test_events_across_a_rotation_are_posted(self) -> defer.Generator:
        """logrotate's rename, events still written to the renamed file, then the reopen (SIGHUP)."""
        log_file = self.running.config.events.log_file
        yield in_thread(send, self.running.smtp_port)
        yield wait_until(lambda: len(self.receiver.events()) == 2)
        os.rename(log_file, log_file + ".1")
        yield in_thread(send, self.running.smtp_port)
        yield wait_until(lambda: len(self.receiver.events()) == 4)
        self.running.appliance.events.reopen()
        yield in_thread(send, self.running.smtp_port)
        yield wait_until(lambda: len(self.receiver.events()) == 6)
        with open(log_file + ".1", "rb") as f:
            written = [json.loads(line) for line in f] + self.running.events()
        posted = [e["msys"]["message_event"] for e in self.receiver.events()]
        self.assertEqual(sorted(e["event_id"] for e in posted),
                         sorted(e["event_id"] for e in written))
        # The cursor names the new file, at its end.
        st = os.stat(log_file)
        end = Cursor(st.st_dev, st.st_ino, st.st_size)
        yield wait_until(lambda: load_cursor(os.path.join(self.queue, "cursor")) == end)


class WebhookHttpsTests(unittest.TestCase):
    """An https:// receiver with a self-signed certificate: trusted only through tls_ca_file."""

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        context, self.certificate = self_signed(os.path.join(directory, "tls"))
        self.receiver = Receiver()
        self.port = reactor.listenSSL(0, server.Site(self.receiver), context, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.directory = directory

    @defer.inlineCallbacks
    def run_appliance(self, **hook: Any) -> defer.Generator:
        running = RunningAppliance(self.directory, webhooks=[{
            "name": "tls",
            "target": f"https://127.0.0.1:{self.port.getHost().port}/hook",
            "batch_interval": "100ms",
            "retry_initial": "200ms",
            **hook,
        }])
        yield running.start()
        self.addCleanup(running.stop)
        yield in_thread(send, running.smtp_port)
        return running

    @defer.inlineCallbacks
    def test_trusted_certificate(self) -> defer.Generator:
        yield self.run_appliance(tls_ca_file=self.certificate)
        yield wait_until(lambda: {e["msys"]["message_event"]["type"] for e in self.receiver.events()}
                         == {"injection", "delivery"})

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_a_failure(self) -> defer.Generator:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        running = yield self.run_appliance()
        [hook] = running.appliance.webhooks.webhooks
        yield wait_until(lambda: hook.failures >= 2)
        self.assertEqual(self.receiver.received, [])
        self.assertTrue(hook.batches)
        warnings = [formatEvent(e) for e in logged if "not accepted by" in e.get("log_format", "")]
        self.assertIn("certificate verify failed", warnings[0])
