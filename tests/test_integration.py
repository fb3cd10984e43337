"""
The whole path on a memory reactor: SMTP client -> appliance -> spool -> delivery -> sink, the
log and the tracker, each step finished before the next is checked.
"""

from __future__ import annotations

import os
import re

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from appliance import rewrite
from appliance.spool import REMOVE_DELAY
from tests.memory import MemoryAppliance, sendmail

MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: a@example.test, b@example.org\r\n"
    b"Subject: Hello there\r\n"
    b"Message-ID: <1@example.net>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".A line that starts with a dot.\r\n"
    b"..\r\n"
    b"Last line.\r\n"
)


def send(running: MemoryAppliance, sender: str, recipients: list[str], message: bytes) -> list[int]:
    """The reply codes of one whole conversation, greeting to QUIT."""
    return [code for code, _ in sendmail(running.smtp(), sender, recipients, message)]


class EndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.running = MemoryAppliance(self.mktemp())
        self.running.start()
        self.addCleanup(self.running.stop)

    def test_two_recipients_two_domains(self) -> None:
        """One message to two routed domains arrives as two copies and writes four events."""
        prepared: list[bytes] = []
        self.patch(rewrite, "prepare", prepared.append)  # tracking is off: nothing to prepare
        codes = send(self.running, "sender@example.net", ["a@example.test", "B@Example.org"], MESSAGE)
        self.assertEqual(codes, [220, 250, 250, 250, 250, 354, 250, 221])
        received = self.running.sink.messages
        self.assertEqual(len(received), 2)
        self.assertEqual(sorted(r for m in received for r in m.rcpt_to),
                         ["B@Example.org", "a@example.test"])
        for copy in received:
            self.assertEqual(copy.mail_from, "sender@example.net")
            self.assertEqual(len(copy.rcpt_to), 1)
            # A trace header is added, and the Date the message lacks (it has a Message-ID);
            # the rest is byte for byte what was sent.
            self.assertTrue(copy.data.startswith(b"Received: from "))
            self.assertTrue(copy.data.endswith(MESSAGE), copy.data)
            self.assertEqual(copy.data.count(b"Message-ID:"), 1)
        dates = {re.search(rb"\r\nDate: [^\r]+ \+0000\r\nFrom: ", copy.data).group(0) for copy in received}
        self.assertEqual(len(dates), 1, dates)  # every copy carries the same one
        events = self.running.events()
        by_type: dict[str, list[dict]] = {}
        for e in events:
            by_type.setdefault(e["type"], []).append(e)
        self.assertEqual(sorted(by_type), ["delivery", "injection"])
        self.assertEqual(len(by_type["injection"]), 2)
        self.assertEqual(len(by_type["delivery"]), 2)

        injections = {e["rcpt_to"]: e for e in by_type["injection"]}
        self.assertEqual(sorted(injections), ["a@example.test", "b@example.org"])
        b = injections["b@example.org"]
        self.assertEqual(b["raw_rcpt_to"], "B@Example.org")
        self.assertEqual(b["msg_from"], "sender@example.net")
        self.assertEqual(b["friendly_from"], "sender@example.net")
        self.assertEqual(b["subject"], "Hello there")
        self.assertEqual(b["routing_domain"], "example.org")
        self.assertEqual(b["recv_method"], "esmtp")
        self.assertEqual(b["node_name"], "appliance1")
        self.assertRegex(b["message_id"], r"^[0-9a-f]{20}$")
        self.assertRegex(b["transmission_id"], r"^[0-9]+$")
        self.assertRegex(b["timestamp"], r"^[0-9]+$")
        self.assertNotEqual(injections["a@example.test"]["message_id"], b["message_id"])
        self.assertEqual(injections["a@example.test"]["transmission_id"], b["transmission_id"])

        for d in by_type["delivery"]:
            inj = injections[d["rcpt_to"]]
            for key in ("message_id", "transmission_id", "raw_rcpt_to", "campaign_id"):
                self.assertEqual(d[key], inj[key])
            self.assertEqual(d["delv_method"], "esmtp")
            self.assertEqual(d["num_retries"], "0")
            self.assertIn("queue_time", d)
            self.assertEqual(d["ip_address"], "127.0.0.1")
            self.assertEqual(d["outbound_tls"], "0")
        self.assertEqual(len({e["event_id"] for e in events}), 4)
        # Every copy has its final outcome: nothing is left in the spool, nor held in memory.
        self.running.advance(REMOVE_DELAY)  # finished entries leave active/ in batches
        self.assertEqual(os.listdir(os.path.join(self.running.config.spool.directory, "active")), [])
        self.assertNotIn(b["transmission_id"], self.running.appliance.copies)
        self.assertEqual(prepared, [])
        self.assertEqual(self.running.appliance.copies.bytes_held, 0)

    def test_undeliverable_domain_refused_at_rcpt(self) -> None:
        """Only what no DNS answer could deliver is refused at RCPT; nothing is stored for it."""

        def attempt(rcpt: str) -> tuple[int, bytes]:
            client = self.running.smtp()
            client.replies()
            self.assertEqual(client.command(b"EHLO client.test")[0], 250)
            self.assertEqual(client.command(b"MAIL FROM:<sender@example.net>")[0], 250)
            code, lines = client.command(f"RCPT TO:<{rcpt}>".encode())
            client.close()
            return code, b"\n".join(lines)

        for rcpt, text in (("someone@nowhere.invalid", b"nowhere.invalid"),
                           ("someone@bad_name.example", b"not a valid domain name")):
            code, reply = attempt(rcpt)
            self.assertEqual(code, 550, rcpt)
            self.assertIn(b"5.1.2", reply)
            self.assertIn(text, reply)
        self.assertEqual(self.running.events(), [])

    def test_unknown_domain_goes_to_the_dns(self) -> None:
        """A domain no route knows is accepted and asked of the DNS; NXDOMAIN bounces it at once."""
        codes = send(self.running, "sender@example.net", ["someone@unknown.example"], MESSAGE)
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250, 221])
        injection, bounce = self.running.events()
        self.assertEqual((injection["type"], bounce["type"]), ("injection", "bounce"))
        self.assertEqual(bounce["message_id"], injection["message_id"])
        self.assertEqual(bounce["error_code"], "550")
        self.assertEqual(bounce["bounce_class"], "10")
        self.assertIn("unknown.example does not exist", bounce["reason"])
        self.assertIn(("unknown.example", dns.MX), self.running.resolver.queries)
        self.assertEqual(os.listdir(os.path.join(self.running.config.spool.directory, "active")), [])

    def test_robots_and_not_found(self) -> None:
        status, _headers, body = self.running.get("/robots.txt")
        self.assertEqual((status, body), (200, b"User-agent: *\nDisallow: /\n"))
        for path in ("/", "/anything", "/q/", "/f/a/x"):
            status, _headers, _body = self.running.get(path)
            self.assertEqual(status, 404, path)


class RelayTests(SynchronousTestCase):
    """A client outside relay_networks is refused at RCPT, and nothing is stored."""

    def setUp(self) -> None:
        self.running = MemoryAppliance(self.mktemp(), smtp={"relay_networks": ["192.0.2.0/24"]})
        self.running.start()
        self.addCleanup(self.running.stop)

    def test_relay_denied(self) -> None:
        client = self.running.smtp()
        client.replies()
        client.command(b"EHLO client.test")
        client.command(b"MAIL FROM:<sender@example.net>")
        code, lines = client.command(b"RCPT TO:<a@example.test>")
        text = b"\n".join(lines)
        self.assertEqual(code, 554)
        self.assertIn(b"5.7.1", text)
        self.assertEqual(self.running.events(), [])
        self.assertEqual(os.listdir(os.path.join(self.running.config.spool.directory, "active")), [])
