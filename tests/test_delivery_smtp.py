"""
Delivery over real loopback sockets to the scriptable sink, with time on a ``Clock``.

Connections, TLS and the SMTP dialogue are real; retries and timeouts run on
a fake clock the tests advance, and DNS answers come from ``FakeResolver``.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from appliance.config import DeliveryConfig, Route
from appliance.delivery import DeliveryService, Router, message_from_spool
from appliance.envelope import Envelope, QueuedMessage, Recipient
from appliance.events import EventLog
from appliance.spool import Spool, run_synchronously
from appliance.tls import load_trust_root
from tests.fakes import FakeResolver, self_signed
from tests.helpers import free_port, wait_until
from tests.sink import SinkFactory

MESSAGE = b"From: a@sender.test\r\nSubject: hi\r\n\r\nHello.\r\n"


class Dialling:
    """The real reactor, noting each connection delivery dials: a retry shows at once, not later."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.dialled: list[tuple[str, int]] = []
        self.connectors: list[Any] = []

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any:
        self.dialled.append((host, port))
        connector = self._real.connectTCP(host, port, factory, timeout, bindAddress)
        self.connectors.append(connector)
        return connector

    def hung_up(self) -> bool:
        """Every connection dialled has ended on delivery's side too."""
        return all(c.state == "disconnected" for c in self.connectors)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class DeliveryCase(unittest.TestCase):
    """Spool, event log and delivery service on a fake clock; sinks on real loopback ports."""

    @property
    def written(self) -> list[dict[str, Any]]:
        """The events in the log file, which is what every consumer of events reads."""
        with open(self.events.path, "rb") as f:
            return [json.loads(line) for line in f]

    def setUp(self) -> None:
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.spool = Spool(os.path.join(self.base, "spool"), run=run_synchronously)
        self.spool.prepare()
        self.events = EventLog(os.path.join(self.base, "events.jsonl"), "n", fsync_interval=0,
                               clock=self.clock, now=self.clock.seconds)
        self.events.startService()
        self.resolver = FakeResolver()
        self.service: DeliveryService | None = None
        self._tids = iter(range(1, 1_000_000))
        self.sinks: list[SinkFactory] = []
        self.dialler = Dialling(reactor)

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        if self.service is not None and self.service.running:
            yield self.stop()
        self.events.stopService()
        # The sinks' ends of the connections close after the service's: no socket is left open.
        yield wait_until(lambda: all(s.closed == s.connections for s in self.sinks))

    def listen(self, sink: SinkFactory, interface: str = "127.0.0.1", port: int = 0) -> int:
        listening = reactor.listenTCP(port, sink, interface=interface)
        self.sinks.append(sink)
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    def start(self, mx_port: int = 25, **config: Any) -> DeliveryService:
        # A connection closes once its copies are sent unless a test asks for reuse: most
        # tests here follow one connection's whole life (ReuseTests keep them open).
        config.setdefault("connection_reuse_time", 0.0)
        self.config = DeliveryConfig(**config)
        trust = load_trust_root(self.config.tls_ca_file) if self.config.tls_ca_file else None
        self.service = DeliveryService(self.config, self.spool, self.events, message_from_spool(self.spool),
                                       Router(self.config), "client.test", reactor=self.dialler,
                                       clock=self.clock, resolver=self.resolver, rng=random.Random(0),
                                       mx_port=mx_port, trust=trust)
        self.service.startService()
        return self.service

    def stop(self) -> defer.Deferred:
        assert self.service is not None
        d = self.service.stopService()
        self.clock.advance(self.service.stop_grace)
        return d

    def queue(self, recipients: list[str], message: bytes = MESSAGE,
              mail_from: str = "sender@sender.test") -> QueuedMessage:
        tid = str(next(self._tids))
        writer = self.spool.writer(tid)
        writer.write(message)
        ids = [f"{tid:0>10}{i:010x}" for i in range(len(recipients))]
        rcpts = [Recipient(r, mid, {"message_id": mid, "rcpt_to": r.lower()})
                 for r, mid in zip(recipients, ids, strict=True)]
        queued = self.successResultOf(writer.commit(
            Envelope(tid, mail_from, rcpts, received_at=self.clock.seconds())))
        assert self.service is not None
        self.service.enqueue(queued)
        self.clock.advance(0)
        return queued

    def wait_events(self, count: int) -> defer.Deferred:
        def written() -> bool:
            # What is due now runs, as the reactor would run it: a copy queued while the
            # connection it would have taken was closing is dialled once that one ends
            # (``callLater(0)``), which on this clock would otherwise never come.
            self.clock.advance(0)
            return len(self.written) >= count

        return wait_until(written)

    def timer_due_in(self, seconds: float) -> bool:
        """Whether a call is scheduled ``seconds`` from now (a client's timeout once it waits)."""
        return any(c.getTime() == self.clock.seconds() + seconds for c in self.clock.getDelayedCalls())

    @defer.inlineCallbacks
    def finished(self, sink: SinkFactory) -> Any:
        """
        Wait until the sink has read all it was sent and both ends of every connection have
        closed, then run what is due now: a connection delivery would make next is dialled
        by then, or never.
        """
        yield wait_until(lambda: sink.connections > 0 and sink.closed == sink.connections
                         and self.dialler.hung_up())
        self.clock.advance(0)

    def active(self) -> list[str]:
        return os.listdir(self.spool.active)


class OutcomeTests(DeliveryCase):
    @defer.inlineCallbacks
    def test_delivery_reuses_the_connection(self) -> Any:
        sink = SinkFactory()
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        self.queue(["a@x.test", "b@x.test", "c@x.test"])
        yield self.wait_events(3)
        self.assertEqual([m.rcpt_to for m in sink.messages], [["a@x.test"], ["b@x.test"], ["c@x.test"]])
        self.assertEqual({m.connection for m in sink.messages}, {1})  # one connection carried all
        self.assertEqual([m.data for m in sink.messages], [MESSAGE] * 3)
        # The QUIT follows the last reply, and so the last event: it may still be on its way.
        yield wait_until(lambda: sink.commands[-1][1] == b"QUIT")
        verbs = [line.split(b" ")[0].split(b":")[0] for _n, line in sink.commands]
        self.assertEqual(verbs, [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA", b"RSET"] * 2
                         + [b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertIn(b"MAIL FROM:<sender@sender.test> SIZE=%d" % len(MESSAGE), sink.commands[1][1])
        for event in self.written:
            self.assertEqual(event["type"], "delivery")
            self.assertEqual(event["ip_address"], "127.0.0.1")
            self.assertEqual(event["sending_ip"], "127.0.0.1")  # our end of the connection
            self.assertEqual((event["num_retries"], event["queue_time"]), ("0", "0"))
            self.assertEqual((event["delv_method"], event["outbound_tls"]), ("esmtp", "0"))
            self.assertEqual(event["routing_domain"], "x.test")
            self.assertNotIn("bounce_class", event)
        yield wait_until(lambda: not self.active())

    @defer.inlineCallbacks
    def test_4xx_delays_then_the_retry_delivers(self) -> Any:
        replies = iter([(451, "4.7.1 Greylisted, come back later")])
        sink = SinkFactory(lambda cmd, arg: next(replies, None) if cmd == "RCPT" else None)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        queued = self.queue(["a@x.test"])
        yield self.wait_events(1)
        delay = self.written[0]
        self.assertEqual(delay["type"], "delay")
        self.assertEqual((delay["error_code"], delay["bounce_class"]), ("451", "70"))
        self.assertEqual(delay["raw_reason"], "451 4.7.1 Greylisted, come back later")
        self.assertEqual(delay["reason"], delay["raw_reason"])
        self.assertEqual(sink.messages, [])
        self.assertEqual(self.active(), [queued.envelope.transmission_id])
        yield self.finished(sink)  # the first connection is over: the retry needs a new one
        self.clock.advance(299)
        self.assertEqual(len(self.written), 1)  # not before its five minutes:
        self.assertEqual(len(self.dialler.dialled), 1)  # no second connection was even dialled
        self.clock.advance(1)
        yield self.wait_events(2)
        delivery = self.written[1]
        self.assertEqual(delivery["type"], "delivery")
        self.assertEqual((delivery["num_retries"], delivery["queue_time"]), ("1", "300000"))
        self.assertEqual(len(sink.messages), 1)
        yield wait_until(lambda: not self.active())

    @defer.inlineCallbacks
    def test_5xx_bounces_at_once(self) -> Any:
        def script(cmd: str, arg: bytes) -> Any:
            if cmd == "RCPT" and b"unknown@" in arg:
                return 550, "5.1.1 <unknown@x.test>: Recipient address rejected: User unknown"
            if cmd == "EOM" and b"spam" in arg:
                return 554, "5.7.1 Message rejected as spam from 192.0.2.7"
            if cmd == "MAIL" and b"blocked" in arg:
                return 553, "sender blocked"
            return None

        sink = SinkFactory(script)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        self.queue(["unknown@x.test", "ok@x.test"])
        self.queue(["spam@x.test"], MESSAGE + b"spam\r\n")
        yield self.wait_events(3)
        by_rcpt = {e["rcpt_to"]: e for e in self.written}
        self.assertEqual(by_rcpt["ok@x.test"]["type"], "delivery")
        unknown = by_rcpt["unknown@x.test"]
        self.assertEqual((unknown["type"], unknown["error_code"], unknown["bounce_class"]),
                         ("bounce", "550", "10"))
        self.assertIn("User unknown", unknown["reason"])
        spam = by_rcpt["spam@x.test"]
        self.assertEqual((spam["type"], spam["error_code"], spam["bounce_class"]), ("bounce", "554", "50"))
        self.assertEqual(spam["raw_reason"], "554 5.7.1 Message rejected as spam from 192.0.2.7")
        self.assertEqual(spam["reason"], "554 5.7.1 Message rejected as spam from a.b.c.d")
        self.assertEqual([m.rcpt_to for m in sink.messages], [["ok@x.test"]])
        # The same connection went on after each refusal.
        self.assertEqual(sink.connections, 1)
        yield wait_until(lambda: not self.active())

    @defer.inlineCallbacks
    def test_address_with_a_line_break_is_never_sent(self) -> Any:
        # Injection refuses such addresses; a spool written by anything else must not smuggle.
        sink = SinkFactory()
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        self.queue(["a@x.test", '"y\r\nRCPT TO:<hidden@x.test>"@x.test', '"z\x00"@x.test', "b@x.test"])
        self.queue(["c@x.test"], mail_from='"s\nRCPT TO:<hidden@x.test>"@sender.test')
        yield self.wait_events(5)
        self.assertEqual([m.rcpt_to for m in sink.messages], [["a@x.test"], ["b@x.test"]])
        self.assertFalse([line for _n, line in sink.commands if b"hidden" in line or b"\0" in line])
        self.assertEqual(sink.connections, 1)  # the good copies went on over the same connection
        bounces = {e["rcpt_to"]: e for e in self.written if e["type"] == "bounce"}
        self.assertEqual(len(bounces), 3)
        rcpt = bounces['"y\r\nrcpt to:<hidden@x.test>"@x.test']
        self.assertEqual((rcpt["error_code"], rcpt["bounce_class"]), ("550", "10"))
        self.assertEqual(rcpt["raw_reason"], "550 5.1.3 [internal] the recipient address holds a CR, LF "
                                             "or NUL and cannot be sent in RCPT TO")
        self.assertEqual(bounces['"z\x00"@x.test']["raw_reason"], rcpt["raw_reason"])
        self.assertEqual(bounces["c@x.test"]["raw_reason"],
                         "550 5.1.7 [internal] the sender address holds a CR, LF or NUL and cannot be sent "
                         "in MAIL FROM")
        yield wait_until(lambda: not self.active())


class BadServerTests(DeliveryCase):
    """A server that misbehaves ends each copy as a readable delay, and the copy stays queued."""

    def delay_for(self, script: Any, **config: Any) -> tuple[SinkFactory, int, QueuedMessage]:
        sink = SinkFactory(script)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, **config)
        queued = self.queue(["a@x.test"])
        return sink, port, queued

    @defer.inlineCallbacks
    def test_connection_dropped_during_data(self) -> Any:
        sink, port, queued = self.delay_for(lambda cmd, arg: "drop" if cmd == "DATA" else None)
        yield self.wait_events(1)
        [event] = self.written
        self.assertEqual((event["type"], event["error_code"]), ("delay", "421"))
        self.assertEqual(event["reason"], f"421 4.4.2 [internal] connection to 127.0.0.1:{port} lost "
                                          "while waiting for the reply to DATA")
        self.assertEqual(self.active(), [queued.envelope.transmission_id])
        self.assertEqual(queued.states[0].attempts, 1)

    @defer.inlineCallbacks
    def test_connection_refused(self) -> Any:
        port = free_port()
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        queued = self.queue(["a@x.test"])
        yield self.wait_events(1)
        [event] = self.written
        self.assertEqual((event["type"], event["error_code"], event["ip_address"]),
                         ("delay", "421", "127.0.0.1"))
        self.assertIn(f"cannot connect to 127.0.0.1:{port}", event["reason"])
        self.assertIn("refused", event["reason"])
        self.assertEqual(self.active(), [queued.envelope.transmission_id])

    @defer.inlineCallbacks
    def test_server_that_never_answers(self) -> Any:
        sink, port, _queued = self.delay_for(lambda cmd, arg: "silent" if cmd == "CONNECT" else None)
        # Connected, and waiting for the greeting: its timeout is set.
        yield wait_until(lambda: self.timer_due_in(300))
        self.assertEqual(self.written, [])
        self.clock.advance(300)
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertEqual(self.written[0]["reason"], f"421 4.4.2 [internal] no reply from 127.0.0.1:{port} "
                                                    "within 300s (waiting for the reply to greeting)")

    @defer.inlineCallbacks
    def test_silence_after_the_message(self) -> Any:
        sink, port, _queued = self.delay_for(lambda cmd, arg: "silent" if cmd == "EOM" else None,
                                                   command_timeout=60, data_timeout=600)
        yield wait_until(lambda: any(c == b"DATA" for _n, c in sink.commands))
        # The message is sent, and the reply to its end awaited: that wait's timeout is set.
        yield wait_until(lambda: self.timer_due_in(600))
        self.clock.advance(599)  # the end of data has its own, longer wait
        self.assertEqual(self.written, [])
        self.clock.advance(1)
        yield self.wait_events(1)
        self.assertIn("within 600s (waiting for the reply to end of data)", self.written[0]["reason"])

    @defer.inlineCallbacks
    def test_reply_that_is_not_smtp(self) -> Any:
        sink, port, _queued = self.delay_for(
            lambda cmd, arg: b"HTTP/1.1 400 Bad Request" if cmd == "CONNECT" else None)
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertEqual(self.written[0]["reason"],
                         f"421 4.5.0 [internal] 127.0.0.1:{port} answered greeting with "
                         "not an SMTP reply: 'HTTP/1.1 400 Bad Request'")

    @defer.inlineCallbacks
    def test_refusal_of_everything(self) -> Any:
        """EHLO and HELO both refused: one delay, no endless HELO loop."""
        sink, port, _queued = self.delay_for(
            lambda cmd, arg: (500, "5.5.1 No") if cmd in ("EHLO", "HELO") else None)
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertEqual(self.written[0]["raw_reason"], "500 5.5.1 No")
        yield self.finished(sink)
        self.assertEqual(len(self.dialler.dialled), 1)
        self.assertEqual([c for _n, c in sink.commands], [b"EHLO client.test", b"HELO client.test", b"QUIT"])

    @defer.inlineCallbacks
    def test_greeting_refused(self) -> Any:
        sink, port, _queued = self.delay_for(
            lambda cmd, arg: (554, "5.7.1 No mail from you") if cmd == "CONNECT" else None)
        yield self.wait_events(1)
        # A refusing greeting defers (Postfix's smtp_skip_5xx_greeting): the next MX may take it.
        self.assertEqual((self.written[0]["type"], self.written[0]["error_code"]), ("delay", "554"))


class TlsTests(DeliveryCase):
    def setUp(self) -> None:
        super().setUp()
        self.tls, self.cert_path = self_signed(os.path.join(self.base, "tls"))

    @defer.inlineCallbacks
    def test_opportunistic_starttls(self) -> Any:
        sink = SinkFactory(tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        self.queue(["a@x.test", "b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([m.tls for m in sink.messages], [True, True])
        self.assertEqual([e["outbound_tls"] for e in self.written], ["1", "1"])
        self.assertEqual([c for _n, c in sink.commands][:3],
                         [b"EHLO client.test", b"STARTTLS", b"EHLO client.test"])

    @defer.inlineCallbacks
    def test_required_tls_refuses_plaintext(self) -> Any:
        sink = SinkFactory()
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, tls="required")
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        event = self.written[0]
        self.assertEqual(event["type"], "delay")
        self.assertIn("does not offer STARTTLS, and TLS is required", event["reason"])
        self.assertFalse(any(c.startswith(b"MAIL") for _n, c in sink.commands))
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_broken_tls_falls_back_to_plaintext(self) -> Any:
        sink = SinkFactory(broken_tls=True)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delivery")
        self.assertEqual(self.written[0]["outbound_tls"], "0")
        self.assertEqual([(m.tls, m.connection) for m in sink.messages], [(False, 2)])

    @defer.inlineCallbacks
    def test_starttls_refused(self) -> Any:
        def script(cmd: str, arg: bytes) -> Any:
            return (454, "4.7.0 TLS not available due to local problem") if cmd == "STARTTLS" else None

        sink = SinkFactory(script, tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port), "y.test": Route("127.0.0.1", port)},
                   tls="required")
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertEqual(self.written[0]["raw_reason"], "454 4.7.0 TLS not available due to local problem")
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_starttls_refused_opportunistic_goes_on_in_plaintext(self) -> Any:
        def script(cmd: str, arg: bytes) -> Any:
            return (454, "4.7.0 TLS not available") if cmd == "STARTTLS" else None

        sink = SinkFactory(script, tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual((self.written[0]["type"], self.written[0]["outbound_tls"]), ("delivery", "0"))
        self.assertEqual([(m.tls, m.connection) for m in sink.messages], [(False, 2)])

    @defer.inlineCallbacks
    def test_broken_tls_with_tls_required_delays(self) -> Any:
        sink = SinkFactory(broken_tls=True)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, tls="required")
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertIn("TLS handshake with 127.0.0.1", self.written[0]["reason"])
        self.assertEqual((sink.connections, sink.messages), (1, []))

    @defer.inlineCallbacks
    def test_verified_tls(self) -> Any:
        sink = SinkFactory(tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, tls="required", tls_verify=True,
                   tls_ca_file=self.cert_path)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delivery")
        self.assertEqual(self.written[0]["outbound_tls"], "1")

    @defer.inlineCallbacks
    def test_verified_tls_with_a_ca_bundle_read_once(self) -> Any:
        """Every certificate of the bundle is trusted, and the file is read at start, not per connection."""
        _other, other_path = self_signed(os.path.join(self.base, "other"), names=("other.test",))
        bundle = os.path.join(self.base, "bundle.pem")
        with open(bundle, "wb") as out:
            for path in (other_path, self.cert_path):  # the server's issuer second
                with open(path, "rb") as f:
                    out.write(f.read())
        sink = SinkFactory(tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, tls="required", tls_verify=True,
                   tls_ca_file=bundle)
        os.remove(bundle)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delivery")
        self.assertEqual(self.written[0]["outbound_tls"], "1")

    @defer.inlineCallbacks
    def test_unverifiable_certificate_delays(self) -> Any:
        _other, other_path = self_signed(os.path.join(self.base, "other"))
        sink = SinkFactory(tls=self.tls)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, tls="required", tls_verify=True,
                   tls_ca_file=other_path)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertIn("TLS handshake with 127.0.0.1", self.written[0]["reason"])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_smarthost_auth_over_tls(self) -> Any:
        sink = SinkFactory(tls=self.tls, accounts={"relay-user": "s3cret"})
        port = self.listen(sink)
        self.start(smarthost=Route("127.0.0.1", port), smarthost_username="relay-user",
                   smarthost_password="s3cret", tls_ca_file=self.cert_path)
        self.queue(["a@anywhere.example", "b@elsewhere.example"])
        yield self.wait_events(2)
        self.assertEqual([e["type"] for e in self.written], ["delivery", "delivery"])
        self.assertEqual([(m.tls, m.auth_user, m.connection) for m in sink.messages],
                         [(True, "relay-user", 1), (True, "relay-user", 1)])
        self.assertEqual(self.resolver.queries, [])  # the smarthost replaces the DNS

    @defer.inlineCallbacks
    def test_smarthost_auth_refused_delays(self) -> Any:
        sink = SinkFactory(tls=self.tls, accounts={"relay-user": "s3cret"})
        port = self.listen(sink)
        self.start(smarthost=Route("127.0.0.1", port), smarthost_username="relay-user",
                   smarthost_password="wrong", tls_ca_file=self.cert_path)
        self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertEqual(self.written[0]["raw_reason"], "535 5.7.8 Authentication credentials invalid")

    @defer.inlineCallbacks
    def test_smarthost_auth_needs_a_certificate_it_can_check(self) -> Any:
        """TLS with a certificate nobody vouches for (a man in the middle's) gets no password."""
        sink = SinkFactory(tls=self.tls, accounts={"relay-user": "s3cret"})
        port = self.listen(sink)
        _other, other_ca = self_signed(os.path.join(self.base, "other-ca"))
        self.start(smarthost=Route("127.0.0.1", port), smarthost_username="relay-user",
                   smarthost_password="s3cret", tls_ca_file=other_ca)
        self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        yield self.finished(sink)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertIn("TLS handshake with 127.0.0.1", self.written[0]["reason"])
        self.assertFalse(any(c.startswith(b"AUTH") for _n, c in sink.commands), sink.commands)
        self.assertEqual(sink.messages, [])

    def start_auth_smarthost(self, sink: SinkFactory, **config: Any) -> int:
        port = self.listen(sink)
        self.start(smarthost=Route("127.0.0.1", port), smarthost_username="relay-user",
                   smarthost_password="s3cret", **config)
        return port

    def assert_no_plaintext_auth(self, sink: SinkFactory) -> None:
        self.assertEqual(sink.connections, 1)  # the connection with TLS was not tried again without
        self.assertEqual(len(self.dialler.dialled), 1)  # nor is it about to be
        self.assertFalse(any(c.startswith(b"AUTH") for _n, c in sink.commands), sink.commands)
        self.assertFalse(any(b"dXNlcgB" in c or b"s3cret" in c for _n, c in sink.commands))
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_smarthost_auth_never_in_plaintext(self) -> Any:
        """A smarthost (or a man in the middle) that offers AUTH but no STARTTLS gets no password."""
        sink = SinkFactory(accounts={"relay-user": "s3cret"}, plaintext_auth=True)
        port = self.start_auth_smarthost(sink)
        queued = self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        yield self.finished(sink)  # a second connection, were one made, is dialled by now
        event = self.written[0]
        self.assertEqual(event["type"], "delay")
        self.assertEqual(event["raw_reason"],
                         f"421 4.7.4 [internal] 127.0.0.1:{port} does not offer STARTTLS, and TLS is "
                         "required (not tried without TLS: the smarthost AUTH credentials are only "
                         "sent over TLS)")
        self.assert_no_plaintext_auth(sink)
        self.assertEqual(self.active(), [queued.envelope.transmission_id])

    @defer.inlineCallbacks
    def test_smarthost_auth_not_retried_in_plaintext_after_a_failed_handshake(self) -> Any:
        sink = SinkFactory(accounts={"relay-user": "s3cret"}, plaintext_auth=True, broken_tls=True)
        self.start_auth_smarthost(sink)
        self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        yield self.finished(sink)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertIn("TLS handshake with 127.0.0.1", self.written[0]["reason"])
        self.assertIn("only sent over TLS", self.written[0]["reason"])
        self.assert_no_plaintext_auth(sink)

    @defer.inlineCallbacks
    def test_smarthost_auth_not_retried_in_plaintext_after_starttls_is_refused(self) -> Any:
        def script(cmd: str, arg: bytes) -> Any:
            return (454, "4.7.0 TLS not available") if cmd == "STARTTLS" else None

        sink = SinkFactory(script, tls=self.tls, accounts={"relay-user": "s3cret"}, plaintext_auth=True)
        self.start_auth_smarthost(sink)
        self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        yield self.finished(sink)
        self.assertEqual(self.written[0]["type"], "delay")
        self.assertTrue(self.written[0]["raw_reason"].startswith("454 4.7.0 TLS not available ("))
        self.assert_no_plaintext_auth(sink)

    @defer.inlineCallbacks
    def test_smarthost_without_auth_still_falls_back_to_plaintext(self) -> Any:
        """Only the password forbids the fallback: a smarthost without AUTH gets the mail."""
        sink = SinkFactory(broken_tls=True)
        port = self.listen(sink)
        self.start(smarthost=Route("127.0.0.1", port))
        self.queue(["a@anywhere.example"])
        yield self.wait_events(1)
        self.assertEqual(self.written[0]["type"], "delivery")
        self.assertEqual([(m.tls, m.connection) for m in sink.messages], [(False, 2)])


class DnsTests(DeliveryCase):
    @defer.inlineCallbacks
    def test_next_mx_when_one_is_unreachable_and_ipv6(self) -> Any:
        sink = SinkFactory()
        port = self.listen(sink, interface="::1")
        # mx1 is preferred but nothing listens on its address; mx2 is reachable over IPv6 only.
        self.resolver.mx("example.com", (20, "mx2.example.com"), (10, "mx1.example.com"))
        self.resolver.host("mx1.example.com", "127.0.0.3").host("mx2.example.com", "::1")
        self.start(mx_port=port)
        self.queue(["a@example.com"])
        yield self.wait_events(1)
        event = self.written[0]
        self.assertEqual((event["type"], event["ip_address"], event["sending_ip"]),
                         ("delivery", "::1", "::1"))
        self.assertEqual(sink.messages[0].rcpt_to, ["a@example.com"])

    @defer.inlineCallbacks
    def test_no_mx_reached_delays_with_the_last_error(self) -> Any:
        port = free_port()
        self.resolver.mx("example.com", (10, "mx1.example.com"), (20, "mx2.example.com"))
        self.resolver.host("mx1.example.com", "127.0.0.3").host("mx2.example.com", "127.0.0.4")
        self.start(mx_port=port)
        self.queue(["a@example.com", "b@example.com"])
        yield self.wait_events(2)
        for event in self.written:
            self.assertEqual(event["type"], "delay")
            self.assertIn(f"cannot connect to mx2.example.com[127.0.0.4]:{port}", event["reason"])
            self.assertIn("1 other address(es) of example.com failed too", event["reason"])

    @defer.inlineCallbacks
    def test_null_mx_bounces_without_connecting(self) -> Any:
        self.resolver.mx("example.com", (0, "."))
        self.start()
        self.queue(["a@example.com"])
        yield self.wait_events(1)
        event = self.written[0]
        self.assertEqual((event["type"], event["error_code"], event["bounce_class"]), ("bounce", "556", "10"))
        self.assertEqual(event["ip_address"], "")
        self.assertFalse(self.active())


class BodyTests(DeliveryCase):
    @defer.inlineCallbacks
    def test_dot_lines_at_chunk_boundaries_and_any_line_ending(self) -> Any:
        sink = SinkFactory()
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        bodies = []
        for offset in (16383, 16384, 16385, 32768):
            head = b"Subject: dots\r\n\r\n"
            filler = b"x" * (offset - len(head) - 2) + b"\r\n"
            bodies.append(head + filler + b".\r\n..\r\n.\r\nend\r\n")
        bodies.append(b".\r\nstarts with a dot line\r\n")
        bodies.append(b"Subject: lf\n\nbare LF\n.\nand a bare CR\r.\rno final newline")
        for body in bodies:
            self.queue(["a@x.test"], body)
        yield self.wait_events(len(bodies))
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * len(bodies))
        received = [m.data for m in sink.messages]
        self.assertEqual(received[:5], bodies[:5])
        self.assertEqual(received[5], b"Subject: lf\r\n\r\nbare LF\r\n.\r\nand a bare CR\r\n.\r\n"
                                      b"no final newline\r\n")

    @defer.inlineCallbacks
    def test_a_30_megabyte_message(self) -> Any:
        sink = SinkFactory()
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        line = b".line of a big message, starting with a dot: " + b"y" * 28 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (30 * 1024 * 1024 // len(line))
        self.queue(["a@x.test"], body)
        yield wait_until(lambda: len(self.written) >= 1, timeout=60)
        self.assertEqual(self.written[0]["type"], "delivery")
        self.assertEqual(len(sink.messages[0].data), len(body))
        self.assertTrue(sink.messages[0].data == body)


class RestartTests(DeliveryCase):
    @defer.inlineCallbacks
    def test_restart_mid_queue_delivers_every_copy_exactly_once(self) -> Any:
        """Stop with one copy in flight and others waiting; start again; every copy arrives once."""
        eoms = 0

        def script(cmd: str, arg: bytes) -> Any:
            nonlocal eoms
            if cmd == "EOM":
                eoms += 1
                if eoms == 5:
                    return "silent"  # the fifth copy's reply never comes: it is in flight at the stop
            return None

        sink = SinkFactory(script)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        recipients = [f"r{i}@x.test" for i in range(12)]
        self.queue(recipients[:6])
        self.queue(recipients[6:])
        yield wait_until(lambda: eoms == 5)
        self.assertEqual(len(sink.messages), 4)
        yield self.stop()  # cuts the silent transaction off after the grace period
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * 4 + ["delay"])
        self.assertEqual(len(self.active()), 2)

        # A new process: a new service over the same spool, the clock past the retry time.
        self.clock.advance(300)
        self.start(routes={"x.test": Route("127.0.0.1", port)})
        self.clock.advance(0)
        yield wait_until(lambda: len(self.written) >= 13)
        yield wait_until(lambda: not self.active())
        delivered = [r for m in sink.messages for r in m.rcpt_to]
        self.assertEqual(sorted(delivered), sorted(recipients))
        deliveries = [e["rcpt_to"] for e in self.written if e["type"] == "delivery"]
        self.assertEqual(sorted(deliveries), sorted(recipients))


class ResolverTests(DeliveryCase):
    """The resolver the appliance makes from ``delivery.dns_servers``, against a DNS server on loopback."""

    @defer.inlineCallbacks
    def test_dns_servers_are_asked(self) -> Any:
        from twisted.names import dns, server

        from appliance.delivery import Destination, Hop, HopFinder

        answers = FakeResolver().mx("example.com", (10, "mx.example.com")).host("mx.example.com", "::1")
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[answers])),
                                interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        config = DeliveryConfig(dns_servers=(("127.0.0.1", udp.getHost().port),), address_preference="ipv6")
        finder = HopFinder(config, rng=random.Random(0), reactor=reactor)
        hops = yield finder.hops(Destination("example.com", "example.com"))
        self.assertEqual(hops, [Hop("mx.example.com", "::1")])
        self.assertIn(("example.com", dns.MX), answers.queries)
        for call in finder.resolver.resolvers[1].cancel.values():  # the cache's expiry timers
            call.cancel()
