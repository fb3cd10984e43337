"""Stopping the appliance while clients are connected: nothing accepted goes unannounced."""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from appliance.spool import without_spares
from tests import policies
from tests.memory import MemoryAppliance, SmtpConversation

MESSAGE = b"From: a@example.net\r\nSubject: stop\r\n\r\nbody\r\n.\r\n"


def send(client: SmtpConversation, sender: str = "a@example.net") -> list[tuple[int, list[bytes]]]:
    """One message, up to its end: the replies so far (its own is not due until it is decided)."""
    replies = [client.command(b"EHLO client.test"), client.command(b"MAIL FROM:<" + sender.encode() + b">"),
               client.command(b"RCPT TO:<r@example.test>"), client.command(b"DATA")]
    client.send(MESSAGE)
    return replies + client.replies()


class StopTests(SynchronousTestCase):
    """
    The appliance on a memory reactor; the policy hook decides when the test says
    (``tests.policies:hold``), so a stop lands in the middle of a decision every time.
    """

    def start(self, **changes: Any) -> None:
        del policies.deciding[:]
        del policies.held[:]
        self.running = MemoryAppliance(self.mktemp(), **changes)
        self.running.start()
        self.addCleanup(self.running.stop)

    def connect(self) -> SmtpConversation:
        client = self.running.smtp()
        client.reply()  # the greeting
        return client

    def stop(self) -> Any:
        """Begin the stop; the Deferred fires once every part has stopped."""
        d = self.running.appliance.stopService()
        self.running.settle()
        return d

    def logged(self) -> list[str]:
        seen: list[str] = []

        def observe(event: dict) -> None:
            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    def test_message_being_decided_is_announced_and_acknowledged(self) -> None:
        """A stop during the policy decision waits for it: the client hears 250, the log has the event."""
        self.start(policy={"hook": "tests.policies:hold"})
        client = self.connect()
        replies = send(client)
        [tid] = policies.deciding
        stopped = self.stop()
        self.assertNoResult(stopped)  # waiting for the decision
        policies.held[0].callback(None)
        self.running.settle()
        self.successResultOf(stopped)
        replies += client.replies()
        self.assertTrue(client.closed)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 354, 250, 421])
        self.assertEqual(replies[4][1], [b"250 2.0.0 OK queued as " + tid.encode()])
        self.assertEqual(replies[5][1], [b"421 4.3.2 localhost Service shutting down, closing connection"])
        injections = [e for e in self.running.events() if e["type"] == "injection"]
        self.assertEqual([(e["transmission_id"], e["rcpt_to"]) for e in injections],
                         [(tid, "r@example.test")])

    def test_delivered_entries_leave_the_spool_at_the_stop_not_after_their_delay(self) -> None:
        """Finished entries wait for one fsync of active/ together; a stop makes it without waiting."""
        self.start()
        client = self.connect()
        replies = send(client)
        self.running.settle()
        self.assertEqual(replies[-1][0], 250)
        self.assertEqual(len(self.running.sink.messages), 1)
        spool = self.running.config.spool.directory
        self.assertEqual(os.listdir(os.path.join(spool, "active")), [])  # left at once
        removed = without_spares(os.listdir(os.path.join(spool, "incoming")))
        self.assertEqual(len(removed), 1)  # deleted after the fsync
        self.assertNotEqual(os.listdir(os.path.join(spool, "incoming")), removed)  # and spares
        self.successResultOf(self.stop())  # no time passes
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(os.listdir(os.path.join(spool, "incoming")), [])  # spares too

    def test_idle_sessions_are_told_and_closed(self) -> None:
        """Sessions with nothing in flight hear 421 at once, so clients do not wait on a stopped server."""
        self.start()
        idle = self.connect()
        in_data = self.connect()
        for command in (b"HELO c.test", b"MAIL FROM:<a@example.net>", b"RCPT TO:<r@example.test>", b"DATA"):
            in_data.command(command)
        in_data.send(b"Subject: half\r\n\r\nonly half of it")
        sessions = self.running.appliance.smtp_limits.sessions
        self.assertTrue(any(s._transaction is not None and s._transaction.writer.size for s in sessions))
        self.successResultOf(self.stop())
        for client in (idle, in_data):
            self.assertEqual(client.replies(), [(421, [b"421 4.3.2 localhost Service shutting down, "
                                                       b"closing connection"])])
            self.assertTrue(client.closed)
        self.assertEqual(self.running.events(), [])
        spool = self.running.config.spool.directory
        self.assertEqual(os.listdir(os.path.join(spool, "active")), [])

    def test_grace_period_ends_the_wait(self) -> None:
        """A decision that outlasts the grace period is cut off, said in the log, and never committed."""
        self.start(policy={"hook": "tests.policies:hold"})
        grace = self.running.appliance.smtp_drain.stop_grace
        logged = self.logged()
        client = self.connect()
        replies = send(client)
        [tid] = policies.deciding
        stopped = self.stop()
        self.running.advance(grace - 0.001)
        self.assertNoResult(stopped)
        self.running.advance(0.001)
        self.successResultOf(stopped)
        replies += client.replies()
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 354])  # cut off: no reply
        self.assertTrue(client.closed)
        self.assertTrue(any("still being decided" in line and tid in line for line in logged), logged)
        # The hook accepts after the stop; with the client gone nothing is kept.
        policies.held[0].callback(None)
        self.running.settle()
        self.assertEqual(self.running.appliance.injector.in_flight, set())
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(self.running.events(), [])
