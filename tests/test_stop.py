"""Stopping the appliance while clients are connected: nothing accepted goes unannounced."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests import policies
from tests.helpers import RunningAppliance, in_thread, wait_until
from tests.smtpclient import RawClient

MESSAGE = b"From: a@example.net\r\nSubject: stop\r\n\r\nbody\r\n.\r\n"


def send_then_listen(client: RawClient, sender: str = "a@example.net") -> list[tuple[int, list[bytes]]]:
    """One message; then every reply the server sends before it closes the connection."""
    replies = [client.command(b"EHLO client.test"), client.command(b"MAIL FROM:<" + sender.encode() + b">"),
               client.command(b"RCPT TO:<r@example.test>"), client.command(b"DATA")]
    client.send(MESSAGE)
    return replies + listen(client)


def listen(client: RawClient) -> list[tuple[int, list[bytes]]]:
    replies = []
    try:
        while True:
            replies.append(client.reply())
    except ConnectionError:
        return replies


class StopTests(unittest.TestCase):
    def start(self, **changes: Any) -> defer.Deferred:
        del policies.deciding[:]
        self.running = RunningAppliance(self.mktemp(), **changes)
        self.stopped = False
        self.addCleanup(self.stop)
        self.clients: list[RawClient] = []
        self.addCleanup(lambda: [c.close() for c in self.clients])
        return self.running.start()

    def stop(self) -> defer.Deferred:
        if self.stopped:
            return defer.succeed(None)
        self.stopped = True
        return self.running.stop()

    def connect(self) -> defer.Deferred:
        def connect() -> RawClient:
            client = RawClient(self.running.smtp_port)
            self.clients.append(client)
            client.reply()  # the greeting
            return client

        return in_thread(connect)

    def logged(self) -> list[str]:
        seen: list[str] = []

        def observe(event: dict) -> None:
            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    @defer.inlineCallbacks
    def test_message_being_decided_is_announced_and_acknowledged(self) -> Any:
        """A stop during the policy decision waits for it: the client hears 250, the log has the event."""
        yield self.start(policy={"hook": "tests.policies:slow"})
        client = yield self.connect()
        talk = in_thread(send_then_listen, client)
        yield wait_until(lambda: policies.deciding)
        yield self.stop()
        replies = yield talk
        [tid] = policies.deciding
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 354, 250, 421])
        self.assertEqual(replies[4][1], [b"250 2.0.0 OK queued as " + tid.encode()])
        self.assertEqual(replies[5][1], [b"421 4.3.2 localhost Service shutting down, closing connection"])
        injections = [e for e in self.running.events() if e["type"] == "injection"]
        self.assertEqual([(e["transmission_id"], e["rcpt_to"]) for e in injections],
                         [(tid, "r@example.test")])

    @defer.inlineCallbacks
    def test_idle_sessions_are_told_and_closed(self) -> Any:
        """Sessions with nothing in flight hear 421 at once, so clients do not wait on a stopped server."""
        yield self.start()
        idle = yield self.connect()
        in_data = yield self.connect()
        yield in_thread(lambda: [in_data.command(c) for c in (b"HELO c.test", b"MAIL FROM:<a@example.net>",
                                                              b"RCPT TO:<r@example.test>", b"DATA")])
        yield in_thread(in_data.send, b"Subject: half\r\n\r\nonly half of it")
        sessions = self.running.appliance.smtp_limits.sessions
        yield wait_until(lambda: any(s._transaction is not None and s._transaction.writer.size
                                     for s in sessions))
        yield self.stop()
        for client in (idle, in_data):
            replies = yield in_thread(listen, client)
            self.assertEqual(replies, [(421, [b"421 4.3.2 localhost Service shutting down, "
                                              b"closing connection"])])
        self.assertEqual(self.running.events(), [])
        spool = self.running.config.spool.directory
        self.assertEqual(os.listdir(os.path.join(spool, "active")), [])

    @defer.inlineCallbacks
    def test_grace_period_ends_the_wait(self) -> Any:
        """A decision that outlasts the grace period is cut off, said in the log, and never committed."""
        yield self.start(policy={"hook": "tests.policies:slower"})
        self.running.appliance.smtp_drain.stop_grace = 0.2
        logged = self.logged()
        client = yield self.connect()
        talk = in_thread(send_then_listen, client)
        yield wait_until(lambda: policies.deciding)
        yield self.stop()
        replies = yield talk
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 354])  # cut off: no reply
        [tid] = policies.deciding
        self.assertTrue(any("still being decided" in line and tid in line for line in logged), logged)
        # The hook accepts after the stop; with the client gone nothing is kept.
        yield wait_until(lambda: not self.running.appliance.injector.in_flight)
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(self.running.events(), [])
