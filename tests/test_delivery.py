"""Delivery: routing, the retry schedule on a fake clock, bounce classes, dot-stuffing."""

from __future__ import annotations

import os

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import DeliveryConfig, Route
from appliance.delivery import DeliveryService, Router, Sender, bounce_class, message_from_spool
from appliance.events import EventLog
from appliance.spool import Spool, run_synchronously
from tests.test_spool import envelope


class RouterTests(SynchronousTestCase):
    def test_exact_wildcard_smarthost(self) -> None:
        config = DeliveryConfig(routes={"example.com": Route("a", 1), "*.example.org": Route("b", 2)},
                                smarthost=Route("s", 25))
        router = Router(config)
        self.assertEqual(router.route("Example.COM."), Route("a", 1))
        self.assertEqual(router.route("mx.deep.example.org"), Route("b", 2))
        self.assertEqual(router.route("example.org"), Route("s", 25))
        self.assertFalse(Router(DeliveryConfig()).can_route("example.net"))


class BounceClassTests(SynchronousTestCase):
    def test_classes(self) -> None:
        self.assertEqual(bounce_class(550, "550 5.1.1 User unknown"), "10")
        self.assertEqual(bounce_class(552, "552 5.2.2 Mailbox full"), "22")
        self.assertEqual(bounce_class(554, "554 5.7.1 Rejected by policy"), "50")
        self.assertEqual(bounce_class(550, "550 Go away"), "40")
        self.assertEqual(bounce_class(451, "451 4.7.1 Greylisted"), "20")
        self.assertEqual(bounce_class(0, "Connection refused"), "1")


class SenderTests(SynchronousTestCase):
    def test_dot_stuffing_across_chunks(self) -> None:
        sender = Sender(None, None, None, b"helo")
        sender.makeConnection(StringTransport())
        chunks = [b".starts\r\n", b"mid\r\n", b".\r\n", b"x\r\n.", b"\r\n..y\r\n"]
        out = b"".join(sender.transformChunk(c) for c in chunks)
        self.assertEqual(out, b"..starts\r\nmid\r\n..\r\nx\r\n..\r\n...y\r\n")
        sender.finishedFileTransfer(b"")
        sender.setTimeout(None)


class ScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.spool = Spool(os.path.join(base, "spool"), run=run_synchronously)
        self.spool.prepare()
        self.events = EventLog(os.path.join(base, "events.jsonl"), "n", fsync_interval=0,
                               clock=self.reactor, now=self.reactor.seconds)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        self.written: list[dict] = []
        self.events.subscribe(self.written.append)
        config = DeliveryConfig(routes={"x.test": Route("127.0.0.1", 2526)}, retry_initial=300,
                                retry_max=1000, max_queue_lifetime=3000)
        self.service = DeliveryService(config, self.spool, self.events, message_from_spool(self.spool),
                                       Router(config), "me.test", reactor=self.reactor)
        self.service.startService()
        w = self.spool.writer("1")
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        self.queued = self.successResultOf(w.commit(envelope("1", n=1)))
        self.service.enqueue(self.queued)

    def fail_connection(self) -> None:
        self.reactor.advance(0)
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop()
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def test_backoff_doubles_to_max_then_bounces(self) -> None:
        delays = []
        for _ in range(8):
            self.fail_connection()
            if self.written[-1]["type"] == "bounce":
                break
            delays.append(self.queued.states[0].next_attempt - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        # Attempts at 0, 300, 900, 1900 and 2900 s of queue time delay; at 3900 s the
        # 3000 s lifetime is over and the copy bounces.
        self.assertEqual(delays, [300, 600, 1000, 1000, 1000])
        types = [e["type"] for e in self.written]
        self.assertEqual(types, ["delay"] * 5 + ["bounce"])
        self.assertEqual(self.written[-1]["num_retries"], "5")
        self.assertEqual(self.written[-1]["bounce_class"], "24")  # 5.4.7: expired in queue
        self.assertIn("expired", self.written[-1]["reason"])
        self.assertIn("Connection was refused", self.written[0]["reason"])
        self.assertFalse(os.path.exists(self.queued.path))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
