"""
One-click unsubscribe and suppression through the whole appliance, on loopback sockets.

A message goes in over SMTP with ``list_unsubscribe`` on; its copy comes out
of the sink with the fields; a real HTTP client makes the one-click POST the
way a mailbox provider does; the appliance's own follower turns the event
into a suppression; the next message leaves that recipient out with a
``policy_rejection``, a transactional one does not, and all of it holds
after a restart. ``engage-appliance suppressions`` changes reach the running
appliance too.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import os
import re
import smtplib
from contextlib import redirect_stderr, redirect_stdout
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from appliance.console import main as console_main
from appliance.suppression import Change
from tests.helpers import RunningAppliance, in_thread, wait_until
from tests.test_unsubscribe import request

UNSUBSCRIBE = {"smtpapi": {"list_unsubscribe": True, "list_unsubscribe_mailto": "unsub@shop.example"}}


def message(transactional: bool | None = None, subject: str = "Sale") -> bytes:
    m = EmailMessage()
    m["From"] = "Shop <news@shop.example>"
    m["To"] = "ann@example.test"
    m["Subject"] = subject
    if transactional is not None:
        m["X-MSYS-API"] = json.dumps({"campaign_id": "spring", "options": {"transactional": transactional}})
    m.set_content("Hello\n")
    return m.as_bytes(policy=email.policy.SMTP)


def send(port: int, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("news@shop.example", recipients, data)


def fields(copy: bytes) -> email.message.Message:
    return email.message_from_bytes(copy, policy=email.policy.compat32)


class FlowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.running = RunningAppliance(self.directory, **UNSUBSCRIBE)
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop() if self.running.appliance.running else defer.succeed(None)

    @defer.inlineCallbacks
    def deliver(self, recipients: list[str], data: bytes, count: int) -> Any:
        """Send, and wait until ``count`` copies in all have reached the sink and are final."""
        yield in_thread(send, self.running.smtp_port, recipients, data)
        copies = yield self.running.sink.wait_for(count)
        yield wait_until(self.running.settled)
        return copies

    def types(self) -> list[str]:
        return [e["type"] for e in self.running.events()]

    @defer.inlineCallbacks
    def test_unsubscribe_then_suppressed_across_a_restart(self) -> defer.Generator:
        [copy_a, copy_b] = yield self.deliver(["ann@example.test", "bob@example.test"], message(), 2)
        by_rcpt = {c.rcpt_to[0]: fields(c.data) for c in (copy_a, copy_b)}
        ann = by_rcpt["ann@example.test"]
        self.assertEqual(ann["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        m = re.fullmatch(r"<https://track\.test:8080/u/([A-Za-z0-9_-]+)>,\s+<mailto:unsub@shop\.example"
                         r"\?subject=unsubscribe%20\1>", ann["List-Unsubscribe"])
        assert m is not None, ann["List-Unsubscribe"]
        self.assertNotEqual(by_rcpt["bob@example.test"]["List-Unsubscribe"], ann["List-Unsubscribe"])

        # The mailbox provider's one-click POST, to the tracker (TLS is the proxy's in front of it).
        status, headers, _ = yield in_thread(request, self.running.http_port, f"/u/{m.group(1)}", "POST",
                                             b"List-Unsubscribe=One-Click")
        self.assertEqual(status, 200)
        self.assertNotIn("location", headers)
        [unsub] = [e for e in self.running.events() if e["type"] == "list_unsubscribe"]
        [injection] = [e for e in self.running.events()
                       if e["type"] == "injection" and e["rcpt_to"] == "ann@example.test"]
        self.assertEqual((unsub["message_id"], unsub["transmission_id"]),
                         (injection["message_id"], injection["transmission_id"]))
        suppression = self.running.appliance.suppression
        yield wait_until(lambda: suppression.list.suppressed("ann@example.test", False) is not None)

        # The next campaign leaves Ann out, with an event naming why; Bob gets his copy.
        yield self.deliver(["Ann@Example.TEST", "bob@example.test"], message(False, "Sale 2"), 3)
        [rejection] = [e for e in self.running.events() if e["type"] == "policy_rejection"]
        self.assertEqual((rejection["rcpt_to"], rejection["raw_rcpt_to"], rejection["error_code"]),
                         ("ann@example.test", "Ann@Example.TEST", "550"))
        self.assertEqual(rejection["reason"], "550 5.7.1 Recipient address was suppressed due to customer "
                                              "policy (non_transactional suppression list)")
        self.assertEqual(rejection["subject"], "Sale 2")
        # A transactional message still reaches her, without the unsubscribe fields.
        copies = yield self.deliver(["ann@example.test"], message(True, "Receipt"), 4)
        receipt = fields(copies[3].data)
        self.assertEqual((receipt["Subject"], receipt["List-Unsubscribe"], receipt["List-Unsubscribe-Post"]),
                         ("Receipt", None, None))

        # After a restart, from the database.
        yield self.running.stop()
        self.running = RunningAppliance(self.directory, **UNSUBSCRIBE)
        yield self.running.start()
        self.assertEqual(self.running.appliance.suppression.list.suppressed("ann@example.test", False),
                         "non_transactional")
        yield in_thread(send, self.running.smtp_port, ["ann@example.test", "carl@example.test"], message())
        yield self.running.sink.wait_for(1)
        yield wait_until(self.running.settled)
        self.assertEqual([c.rcpt_to for c in self.running.sink.messages], [["carl@example.test"]])
        self.assertEqual(self.types().count("policy_rejection"), 2)

    @defer.inlineCallbacks
    def test_a_senders_signature_over_absent_fields_is_reported_broken(self) -> defer.Generator:
        signed = (b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.example; s=s; h=from:subject:"
                  b"list-unsubscribe; bh=x; b=y\r\n" + message())
        yield self.deliver(["ann@example.test"], signed, 1)
        [event] = [e for e in self.running.events() if e["type"] == "injection"]
        self.assertTrue(event["dkim_broken"])
        yield self.deliver(["ann@example.test"], signed.replace(b"list-unsubscribe;", b"to;"), 2)
        events = [e for e in self.running.events() if e["type"] == "injection"]
        self.assertNotIn("dkim_broken", events[1])

    @defer.inlineCallbacks
    def test_everyone_suppressed_refuses_the_message(self) -> defer.Generator:
        yield self.running.appliance.suppression.put([Change("ann@example.test", "non_transactional",
                                                             "Manually Added")])
        e = yield self.assertFailure(in_thread(send, self.running.smtp_port, ["ann@example.test"], message()),
                                     smtplib.SMTPDataError)
        self.assertEqual(e.smtp_code, 550)
        self.assertIn(b"5.7.1 Recipient address was suppressed", e.smtp_error)
        self.assertEqual(self.types(), ["policy_rejection"])
        self.assertEqual(self.running.spooled(), [])

    @defer.inlineCallbacks
    def test_the_command_reaches_the_running_appliance(self) -> defer.Generator:
        config = os.path.join(self.directory, "appliance.toml")
        with open(config, "w") as f:
            f.write('[smtp.listeners.default]\nendpoint = "tcp:0"\n[suppression]\n'
                    f'database = {json.dumps(self.running.config.suppression.database)}\n')

        def command(*argv: str) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                status = console_main(["suppressions", "-c", config, *argv])
            return status, out.getvalue(), err.getvalue()

        status, out, _ = yield in_thread(command, "add", "Ann@Example.TEST", "--type", "non_transactional",
                                         "--description", "asked by phone")
        self.assertEqual((status, out), (0, "suppressed ann@example.test (non_transactional)\n"))
        suppression = self.running.appliance.suppression.list
        yield wait_until(lambda: suppression.suppressed("ann@example.test", False) is not None, timeout=5)
        status, out, _ = yield in_thread(command, "list")
        self.assertEqual(status, 0)
        self.assertRegex(out, r"^ann@example\.test\tnon_transactional\tManually Added\t\S+\t"
                              r"asked by phone\n$")
        status, out, _ = yield in_thread(command, "remove", "ann@example.test")
        self.assertEqual(status, 0)
        yield wait_until(lambda: suppression.suppressed("ann@example.test", False) is None, timeout=5)
        status, _, err = yield in_thread(command, "remove", "ann@example.test")
        self.assertEqual((status, err), (1, "ann@example.test is not on the suppression list\n"))
