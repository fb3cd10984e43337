"""Delivery without sockets: routing, DNS ordering, the body encoder, bounce classes, the schedule."""

from __future__ import annotations

import json
import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.bounces import canonical_reason
from appliance.build import build
from appliance.config import ConfigError, DeliveryConfig, Route
from appliance.delivery import (
    BodyEncoder,
    DeliveryService,
    Hop,
    HopFinder,
    Router,
    bounce_class,
    domain_problem,
    encode_body,
    message_from_spool,
)
from appliance.delivery.routing import Destination, NoHops, order_addresses, order_mx
from appliance.events import EventLog
from appliance.spool import Spool, run_synchronously
from tests.fakes import FakeResolver
from tests.helpers import make_config
from tests.test_spool import envelope


class RouterTests(SynchronousTestCase):
    def test_exact_wildcard_smarthost(self) -> None:
        config = DeliveryConfig(routes={"example.com": Route("a", 1), "*.example.org": Route("b", 2)},
                                smarthost=Route("s", 25))
        router = Router(config)
        self.assertEqual(router.route("Example.COM."), Route("a", 1))
        self.assertEqual(router.route("mx.deep.example.org"), Route("b", 2))
        self.assertEqual(router.route("example.org"), Route("s", 25))
        self.assertIsNone(Router(DeliveryConfig()).route("example.net"))

    def test_destinations(self) -> None:
        config = DeliveryConfig(routes={"example.com": Route("a", 1), "*.example.com": Route("a", 1)})
        router = Router(config)
        # One route, one queue, whichever domain led to it.
        self.assertEqual(router.destination("example.com"), router.destination("x.example.com"))
        self.assertEqual(router.destination("Example.NET."), Destination("example.net", "example.net"))
        smart = Router(DeliveryConfig(smarthost=Route("relay.test", 587))).destination("example.net")
        self.assertTrue(smart.smarthost)
        self.assertEqual((smart.route, smart.key), (Route("relay.test", 587), "smarthost relay.test:587"))

    def test_only_the_never_deliverable_is_refused(self) -> None:
        router = Router(DeliveryConfig(routes={"intranet": Route("10.0.0.1", 25)}))
        for ok in ("example.com", "EXAMPLE.com.", "xn--bcher-kva.example", "bücher.example", "intranet",
                   "a-b.c"):
            self.assertIsNone(router.undeliverable(ok), ok)
        for bad in ("nowhere.invalid", "INVALID", "bad..dots", "-lead.example", "under_score.example",
                    "[192.0.2.1]", "a" * 64 + ".example", ""):
            self.assertIsNotNone(router.undeliverable(bad), bad)
        self.assertIn("RFC 6761", domain_problem("x.invalid") or "")


class BounceClassTests(SynchronousTestCase):
    def test_classes(self) -> None:
        cases = [
            (550, "550 5.1.1 User unknown", "10"),
            (556, "556 5.1.10 [internal] null MX", "10"),
            (550, "550 5.2.1 Mailbox disabled", "10"),
            (552, "552 5.2.2 Mailbox full", "22"),
            (552, "552 5.3.4 Message too big", "23"),
            (550, "550 5.4.4 [internal] no address", "21"),
            (554, "554 5.4.7 [internal] message expired", "24"),
            (554, "554 5.7.1 Rejected by policy", "50"),
            (550, "550 5.2.10 something new", "40"),  # 5.2.1 is matched exactly, not as a prefix
            (550, "550 Go away", "40"),
            (451, "451 4.7.1 Greylisted", "70"),
            (452, "452 4.2.2 Over quota", "22"),
            (451, "451 4.4.3 [internal] DNS lookup failed", "21"),
            (421, "421 Too busy", "70"),
            (0, "Connection refused", "1"),
        ]
        for code, reason, klass in cases:
            self.assertEqual(bounce_class(code, reason), klass, reason)

    def test_canonical_reason(self) -> None:
        raw = "550-5.7.1 IP 192.0.2.77 is listed\n550 5.7.1 see http://example/192.0.2.77"
        self.assertEqual(canonical_reason(raw),
                         "550-5.7.1 IP a.b.c.d is listed 550 5.7.1 see http://example/a.b.c.d")
        self.assertEqual(len(canonical_reason("x" * 5000)), 1024)
        self.assertEqual(canonical_reason("a\x00b\x1bc"), "abc")


def canonical(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def expected(body: bytes) -> bytes:
    """What should arrive: CRLF everywhere, and a last line that is ended."""
    if body and not body.endswith((b"\n", b"\r")):
        body += b"\n"
    return canonical(body)


def unstuff(wire: bytes) -> bytes:
    """What a receiving server makes of DATA's wire form: the text before the lone dot, unstuffed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", wire[-20:]
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert line != b".", "a lone dot inside the body would end DATA early"
        assert b"\r" not in line and b"\n" not in line
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


class BodyEncoderTests(SynchronousTestCase):
    def test_dot_lines_at_chunk_boundaries(self) -> None:
        for offset in (0, 1, 2, 16381, 16382, 16383, 16384, 16385, 32767, 32768, 49152):
            # A lone "." line that starts exactly at ``offset``.
            prefix = b"\n" if offset == 1 else b"x" * (offset - 2) + b"\r\n" if offset else b""
            body = prefix + b".\r\n..\r\n.x\r\nend"
            self.assertEqual(body.index(b".\r\n.."), offset)
            self.assertEqual(unstuff(encode_body(body)), expected(body), offset)

    def test_line_endings_are_made_crlf(self) -> None:
        self.assertEqual(encode_body(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd\r\n.\r\n")
        self.assertEqual(encode_body(b".\n.\r."), b"..\r\n..\r\n..\r\n.\r\n")
        self.assertEqual(encode_body(b""), b".\r\n")

    def test_cr_split_from_its_lf(self) -> None:
        encoder = BodyEncoder()
        out = encoder.encode(b"line\r") + encoder.encode(b"\n.next\r") + encoder.end()
        self.assertEqual(out, b"line\r\n..next\r\n.\r\n")

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"..", b"x", b"\r\n", b"\n", b"\r", b" "]), max_size=60),
           st.integers(min_value=1, max_value=7))
    def test_any_body_any_chunking(self, pieces: list[bytes], chunk: int) -> None:
        body = b"".join(pieces)
        self.assertEqual(unstuff(encode_body(body, chunk_size=chunk)), expected(body))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"x" * 20, b"\r\n", b"\r\n.", b"\r\n..", b"\n", b"\r", b"\r\r\n",
                                     b"\n\r"]), max_size=40),
           st.integers(min_value=1, max_value=200))
    def test_chunks_as_the_plain_rewrite_gives_them(self, pieces: list[bytes], chunk: int) -> None:
        """Each chunk is what rewriting every line end and dot gives, clean or not."""
        body = b"".join(pieces)
        encoder, at_line_start, pending_cr = BodyEncoder(), True, False
        for i in range(0, len(body), chunk):
            piece = body[i:i + chunk]
            if pending_cr:
                piece, pending_cr = b"\r" + piece, False
            if piece.endswith(b"\r"):
                piece, pending_cr = piece[:-1], True
            want = canonical(piece)
            if want:
                want = (b"." if at_line_start and want[:1] == b"." else b"") + want.replace(b"\n.", b"\n..")
                at_line_start = want.endswith(b"\n")
            self.assertEqual(encoder.encode(body[i:i + chunk]), want)


class OrderingTests(SynchronousTestCase):
    def test_mx_by_preference_ties_shuffled(self) -> None:
        records = [(20, "c"), (10, "b"), (10, "a"), (30, "d"), (10, "e")]
        seen = set()
        for seed in range(40):
            order = order_mx(records, random.Random(seed))
            self.assertEqual(sorted(order[:3]), ["a", "b", "e"])
            self.assertEqual(order[3:], ["c", "d"])
            seen.add(tuple(order[:3]))
        self.assertGreater(len(seen), 1)  # ties really are shuffled

    def test_address_preference(self) -> None:
        rng = random.Random(1)
        self.assertEqual(order_addresses(["::1"], ["127.0.0.1"], "ipv4", rng), ["127.0.0.1", "::1"])
        self.assertEqual(order_addresses(["::1"], ["127.0.0.1"], "ipv6", rng), ["::1", "127.0.0.1"])
        both = {tuple(order_addresses(["::1"], ["127.0.0.1"], "any", rng)) for _ in range(40)}
        self.assertEqual(len(both), 2)


class HopFinderTests(SynchronousTestCase):
    def finder(self, resolver: FakeResolver, **config: object) -> HopFinder:
        return HopFinder(DeliveryConfig(address_preference="ipv6", **config), resolver,  # type: ignore
                         random.Random(0))

    def hops(self, resolver: FakeResolver, domain: str = "example.com", **config: object) -> list[Hop]:
        return self.successResultOf(self.finder(resolver, **config).hops(Destination(domain, domain)))

    def no_hops(self, resolver: FakeResolver, domain: str = "example.com") -> NoHops:
        return self.failureResultOf(self.finder(resolver).hops(Destination(domain, domain)), NoHops).value

    def test_mx_order_and_addresses(self) -> None:
        r = (FakeResolver().mx("example.com", (20, "mx2.example.com"), (10, "mx1.example.com"))
             .host("mx1.example.com", "192.0.2.1", "2001:db8::1").host("mx2.example.com", "192.0.2.2"))
        self.assertEqual(self.hops(r), [Hop("mx1.example.com", "2001:db8::1"),
                                        Hop("mx1.example.com", "192.0.2.1"),
                                        Hop("mx2.example.com", "192.0.2.2")])

    def test_mx_host_without_address_is_skipped(self) -> None:
        r = (FakeResolver().mx("example.com", (10, "gone.example.com"), (20, "mx2.example.com"))
             .host("mx2.example.com", "192.0.2.2"))
        self.assertEqual(self.hops(r), [Hop("mx2.example.com", "192.0.2.2")])

    def test_address_limit(self) -> None:
        r = FakeResolver().mx("example.com", *[(i, f"mx{i}.example.com") for i in range(9)])
        for i in range(9):
            r.host(f"mx{i}.example.com", f"192.0.2.{i + 1}")
        self.assertEqual([h.address for h in self.hops(r, mx_address_limit=3)],
                         ["192.0.2.1", "192.0.2.2", "192.0.2.3"])

    def test_no_mx_falls_back_to_the_domain_itself(self) -> None:
        r = FakeResolver().host("example.com", "192.0.2.9", "2001:db8::9")
        self.assertEqual(self.hops(r), [Hop("example.com", "2001:db8::9"), Hop("example.com", "192.0.2.9")])
        self.assertIn(("example.com", dns.MX), r.queries)

    def test_null_mx_bounces(self) -> None:
        for name in ("", "."):
            r = FakeResolver().mx("example.com", (0, name))
            e = self.no_hops(r)
            self.assertEqual((e.outcome.kind, e.outcome.code), ("bounce", 556))
            self.assertIn("5.1.10", e.outcome.raw_reason)
            self.assertIn("null MX", e.outcome.raw_reason)
            self.assertNotIn(("example.com", dns.A), r.queries)  # no fallback to the A record

    def test_nxdomain_bounces(self) -> None:
        e = self.no_hops(FakeResolver(), "nowhere.example")
        self.assertEqual((e.outcome.kind, e.outcome.code), ("bounce", 550))
        self.assertIn("nowhere.example does not exist", e.outcome.raw_reason)
        self.assertEqual(bounce_class(e.outcome.code, e.outcome.raw_reason), "10")

    def test_servfail_and_timeout_delay(self) -> None:
        for exc, text in ((dns_error.DNSServerError("example.com"), "SERVFAIL"),
                          (dns_error.DNSQueryTimeoutError(1), "no answer in time")):
            e = self.no_hops(FakeResolver(errors={("example.com", dns.MX): exc}))
            self.assertEqual((e.outcome.kind, e.outcome.code), ("delay", 451))
            self.assertIn(text, e.outcome.raw_reason)

    def test_domain_without_any_address_bounces(self) -> None:
        e = self.no_hops(FakeResolver(nxdomain=False))
        self.assertEqual(e.outcome.kind, "bounce")
        self.assertIn("5.4.4", e.outcome.raw_reason)

    def test_mx_hosts_without_addresses_delay(self) -> None:
        e = self.no_hops(FakeResolver().mx("example.com", (10, "a.example.com")))
        self.assertEqual(e.outcome.kind, "delay")
        self.assertIn("a.example.com", e.outcome.raw_reason)

    def test_route_by_name_and_by_address(self) -> None:
        r = FakeResolver().host("relay.test", "192.0.2.5")
        finder = self.finder(r)
        by_name = Destination("route relay.test:2525", "relay.test", Route("relay.test", 2525))
        self.assertEqual(self.successResultOf(finder.hops(by_name)), [Hop("relay.test", "192.0.2.5", 2525)])
        by_ip = Destination("route ::1:2525", "::1", Route("::1", 2525))
        self.assertEqual(self.successResultOf(finder.hops(by_ip)), [Hop("::1", "::1", 2525)])
        self.assertNotIn(("relay.test", dns.MX), r.queries)  # a route is a host, not a domain


class ServiceTestBase(SynchronousTestCase):
    """A DeliveryService on a memory reactor: connections are recorded, not made."""

    config = DeliveryConfig(routes={"x.test": Route("127.0.0.1", 2601)}, retry_initial=300,
                            retry_max=1000, max_queue_lifetime=3000)

    @property
    def written(self) -> list[dict]:
        """The events in the log file, which is what every consumer of events reads."""
        with open(self.events.path, "rb") as f:
            return [json.loads(line) for line in f]

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
        self.service = DeliveryService(self.config, self.spool, self.events,
                                       message_from_spool(self.spool), Router(self.config), "me.test",
                                       reactor=self.reactor, resolver=FakeResolver())
        self.service.startService()

    def queue(self, tid: str = "1", n: int = 1, domain: str = "x.test") -> object:
        w = self.spool.writer(tid)
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        env = envelope(tid, n=n)
        for r in env.recipients:
            r.address = r.address.replace("x.test", domain)
        queued = self.successResultOf(w.commit(env))
        self.service.enqueue(queued)
        return queued

    def connect(self, index: int = -1) -> tuple[object, StringTransport]:
        """Complete a recorded connection attempt with a StringTransport, as if the server were there."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        client = factory.buildProtocol(None)
        transport = StringTransport()
        client.makeConnection(transport)
        return client, transport


class ScheduleTests(ServiceTestBase):
    def fail_connection(self) -> None:
        self.reactor.advance(0)
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop()
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def test_backoff_doubles_to_max_then_bounces(self) -> None:
        queued = self.queue()
        delays = []
        for _ in range(8):
            self.fail_connection()
            if self.written[-1]["type"] == "bounce":
                break
            delays.append(queued.states[0].next_attempt - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        # Attempts at 0, 300, 900, 1900 and 2900 s of queue time delay; at 3900 s the
        # 3000 s lifetime is over and the copy bounces.
        self.assertEqual(delays, [300, 600, 1000, 1000, 1000])
        types = [e["type"] for e in self.written]
        self.assertEqual(types, ["delay"] * 5 + ["bounce"])
        self.assertEqual([e["num_retries"] for e in self.written], ["0", "1", "2", "3", "4", "5"])
        last = self.written[-1]
        self.assertEqual(last["bounce_class"], "24")  # 5.4.7: expired in queue
        self.assertEqual(last["error_code"], "554")
        self.assertIn("expired after 1.08h in the queue", last["reason"])
        self.assertIn("Connection was refused", last["raw_reason"])
        self.assertEqual(last["queue_time"], str(3900 * 1000))
        first = self.written[0]
        self.assertEqual(first["error_code"], "421")
        self.assertEqual(first["bounce_class"], "70")
        self.assertIn("cannot connect to 127.0.0.1:2601", first["reason"])
        self.assertFalse(os.path.exists(queued.path))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_retry_schedule_survives_restart(self) -> None:
        self.queue()
        self.fail_connection()
        self.service.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        again = DeliveryService(self.config, self.spool, self.events, message_from_spool(self.spool),
                                Router(self.config), "me.test", reactor=self.reactor)
        again.startService()
        self.reactor.advance(299)
        self.assertEqual(self.reactor.tcpClients, [])  # not before its time
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_dead_destination_costs_one_connection(self) -> None:
        for tid in "123":
            self.queue(tid, n=3)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # one probe, not nine
        self.fail_connection()
        self.assertEqual([e["type"] for e in self.written], ["delay"] * 9)
        self.assertEqual(self.reactor.tcpClients, [])


class ConcurrencyTests(ServiceTestBase):
    config = DeliveryConfig(routes={"x.test": Route("127.0.0.1", 2601), "y.test": Route("127.0.0.2", 2601)},
                            max_connections=4, max_connections_per_destination=3)

    def test_limits_per_destination_and_in_total(self) -> None:
        self.queue("1", n=10)
        self.queue("2", n=10, domain="y.test")
        self.reactor.advance(0)
        # One probe per destination until it proves reachable.
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["127.0.0.1", "127.0.0.2"])
        client, transport = self.connect(0)
        client.dataReceived(b"220 hi\r\n")
        client.dataReceived(b"250-ok\r\n250 SIZE 1000000\r\n")  # EHLO: the session is established
        self.assertIn(b"MAIL FROM:<a@b.test> SIZE=", transport.value())
        # x.test may now use its three; the total of four leaves y.test its one.
        self.assertEqual([c[0] for c in self.reactor.tcpClients],
                         ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.1"])
        transport.clear()
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:  # a pull producer: the transport asks for each chunk
            transport.producer.resumeProducing()
        self.assertTrue(transport.value().endswith(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"))
        transport.clear()
        client.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.written[-1]["type"], "delivery")
        # More copies wait, so the connection is reused after RSET.
        self.assertTrue(transport.value().endswith(b"RSET\r\n"), transport.value())
        client.dataReceived(b"250 ok\r\n")
        self.assertIn(b"MAIL FROM:", transport.value())
        client.setTimeout(None)

    def test_one_failed_connection_does_not_defer_a_working_destination(self) -> None:
        self.queue("1", n=10)
        self.reactor.advance(0)
        client, _transport = self.connect(0)
        client.dataReceived(b"220 hi\r\n250 ok\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 3)
        _h, _p, factory, _t, _b = self.reactor.tcpClients[1]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.written, [])  # the established connection takes the waiting copies
        client.setTimeout(None)

    def test_delivery_stands_when_its_event_cannot_be_written(self) -> None:
        queued = self.queue("1", n=1)
        self.reactor.advance(0)
        client, transport = self.connect(0)
        self.events.close()  # the event log's disk is gone
        client.dataReceived(b"220 hi\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        client.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertFalse(transport.value().endswith(b"QUIT\r\n"))  # kept for the next copy...
        self.reactor.advance(self.config.connection_reuse_time)
        self.assertTrue(transport.value().endswith(b"QUIT\r\n"))  # ...until the reuse time is out
        # The copy is final (the journal says so and the spool let it go): never sent twice.
        self.assertFalse(os.path.exists(queued.path))
        self.assertEqual(list(self.spool.recover()), [])
        self.assertEqual(self.service._jobs, {})  # and nothing scheduled for it
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        client.setTimeout(None)


class CopyMadeLaterTests(ServiceTestBase):
    """A renderer may give a Deferred (the message is read or parsed in a worker): the connection waits."""

    def setUp(self) -> None:
        super().setUp()
        self.making: list[tuple[int, defer.Deferred]] = []
        self.service.render = self.render

    def render(self, queued: object, index: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.making.append((index, d))
        return d

    def established(self) -> tuple[object, StringTransport]:
        self.reactor.advance(0)
        client, transport = self.connect(0)
        client.dataReceived(b"220 hi\r\n250-ok\r\n250 SIZE 1000000\r\n")
        self.assertEqual(transport.value(), b"EHLO me.test\r\n")  # no MAIL FROM before the copy
        transport.clear()
        return client, transport

    def test_the_connection_waits_for_the_copy(self) -> None:
        self.queue("1", n=2)
        client, transport = self.established()
        self.assertEqual([i for i, _ in self.making], [0])
        self.reactor.advance(self.config.command_timeout * 3)  # the server is not the one waited for
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.written, [])
        self.making[0][1].callback(b"Subject: made\r\n\r\nlater\r\n")
        self.assertEqual(transport.value(), b"MAIL FROM:<a@b.test> SIZE=24\r\n")
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.assertIn(b"\r\nlater\r\n.\r\n", transport.value())
        transport.clear()
        client.dataReceived(b"250 2.0.0 queued\r\n250 ok\r\n")  # the copy, then RSET
        self.assertEqual([e["type"] for e in self.written], ["delivery"])
        # The next copy cannot be made: it is delayed, and the connection has nothing left.
        self.making[1][1].errback(OSError("the spooled message is gone"))
        self.assertEqual([e["type"] for e in self.written], ["delivery", "delay"])
        self.assertIn("could not make the copy: the spooled message is gone", self.written[1]["reason"])
        self.assertEqual(transport.value(), b"RSET\r\n")  # idle, for the reuse time
        self.reactor.advance(self.config.connection_reuse_time)
        self.assertEqual(transport.value(), b"RSET\r\nQUIT\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        client.setTimeout(None)

    def test_a_copy_made_after_its_connection_closed_waits_for_the_next(self) -> None:
        self.queue("1", n=1)
        client, transport = self.established()
        transport.loseConnection()
        client.connectionLost(Failure(error.ConnectionDone()))
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # not before the copy is there
        self.making[0][1].callback(b"Subject: made\r\n\r\nlater\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.written, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # the copy is due again, on a new connection
        client, transport = self.connect(1)
        client.dataReceived(b"220 hi\r\n250 ok\r\n")
        self.assertEqual([i for i, _ in self.making], [0, 0])
        self.assertEqual(transport.value(), b"EHLO me.test\r\n")
        self.making[1][1].callback(b"x\r\n")
        self.assertTrue(transport.value().endswith(b"MAIL FROM:<a@b.test>\r\n"))
        client.setTimeout(None)

    def test_a_copy_made_after_its_session_failed_is_not_sent_there(self) -> None:
        queued = self.queue("1", n=1)
        client, transport = self.established()
        client.dataReceived(b"421 4.3.2 shutting down\r\n")  # said while the copy is being made
        self.assertTrue(transport.disconnecting)
        transport.clear()
        self.making[0][1].callback(b"x\r\n")  # before the connection's end is heard of
        self.assertEqual(transport.value(), b"")  # no MAIL FROM on a session that failed
        client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.written, [])  # never tried: no event, and no attempt counted
        self.assertEqual(queued.states[0].attempts, 0)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # it is due on the next connection
        client, transport = self.connect(1)
        client.dataReceived(b"220 hi\r\n250 ok\r\n")
        self.making[1][1].callback(b"x\r\n")
        self.assertTrue(transport.value().endswith(b"MAIL FROM:<a@b.test>\r\n"))
        client.setTimeout(None)


class MessageDoneTests(ServiceTestBase):
    def test_told_once_when_the_last_copy_of_a_message_is_final(self) -> None:
        done: list[str] = []
        self.service.on_message_done = done.append
        w = self.spool.writer("1")
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        env = envelope("1", n=2)
        env.recipients[0].address = "r0@nowhere.invalid"  # bounces as soon as it is due
        self.service.enqueue(self.successResultOf(w.commit(env)))
        self.reactor.advance(0)
        self.assertEqual([e["type"] for e in self.written], ["bounce"])
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop()
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual([e["type"] for e in self.written], ["bounce", "delay"])
        self.assertEqual(done, [])  # one copy is still to be tried
        self.service.on_message_done = None
        self.queue("2", n=1, domain="nowhere.invalid")  # no one to tell: that is fine too
        self.reactor.advance(0)

        def broken(tid: str) -> None:
            done.append(tid)
            raise RuntimeError("a bug in the listener")

        self.service.on_message_done = broken
        self.reactor.advance(300)
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop()
        client = factory.buildProtocol(None)
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 hi\r\n250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n")
        self.assertEqual(self.written[-1]["type"], "bounce")
        self.assertEqual(done, ["1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged; the outcome stands
        self.assertEqual(self.service._jobs, {})
        client.setTimeout(None)


class SessionFailureTests(ServiceTestBase):
    """A bug or a bad file on the session path costs the waiting copies a delay, never the destination."""

    def assert_idle(self) -> None:
        """No session, connection or queue is left counted: the destination can be tried again."""
        self.assertEqual((self.service._connections, self.service._sessions), (0, set()))
        self.assertEqual(self.service._queues, {})

    def test_a_connection_that_cannot_be_opened_delays_and_is_retried(self) -> None:
        """A synchronous error (say, a CA file that will not load) is one delay, not a recursion."""
        calls = []
        real_connect = self.service._connect

        def broken(queue: object, hop: Hop, tls: bool) -> object:
            calls.append(hop)
            raise ValueError("no certificate in ca.pem")

        self.service._connect = broken  # type: ignore[method-assign]
        queued = self.queue(n=2)
        self.reactor.advance(0)
        # Each copy fell due on its own and its session failed at once: one try each, then rest.
        self.assertEqual(len(calls), 2)
        self.assertEqual([e["type"] for e in self.written], ["delay", "delay"])
        self.assertEqual(self.written[0]["raw_reason"],
                         "451 4.3.0 [internal] delivery to route 127.0.0.1:2601 failed: ValueError: "
                         "no certificate in ca.pem")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assert_idle()
        self.assertEqual([s.attempts for s in queued.states], [1, 1])
        self.service._connect = real_connect  # type: ignore[method-assign]
        self.reactor.advance(299)
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # the retry, on its schedule

    def test_a_ca_file_that_will_not_load_stops_the_start(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        whole = make_config(self.mktemp(), delivery={"tls": "required", "tls_verify": True,
                                                     "tls_ca_file": path})
        e = self.assertRaises(ConfigError, build, whole)
        self.assertIn(f"{path}: certificate 1 is not a valid PEM certificate",
                      dict(e.problems)["delivery.tls_ca_file"])
        # A service handed the file without its loaded roots refuses too, never trusting less.
        config = DeliveryConfig(routes=self.config.routes, tls="required", tls_verify=True, tls_ca_file=path)
        e = self.assertRaises(ValueError, DeliveryService, config, self.spool, self.events,
                              message_from_spool(self.spool), Router(config), "me.test",
                              reactor=self.reactor, resolver=FakeResolver())
        self.assertIn(f"delivery.tls_ca_file {path} is set, but its trust roots were not given", str(e))

    def test_a_crash_beside_a_working_connection_leaves_the_copies_to_it(self) -> None:
        self.service.config = DeliveryConfig(routes=self.config.routes, max_connections_per_destination=3)
        self.queue(n=5)
        self.reactor.advance(0)
        client, transport = self.connect(0)
        calls = []

        def broken(queue: object, hop: Hop, tls: bool) -> object:
            calls.append(hop)
            raise ValueError("cannot open")

        self.service._connect = broken  # type: ignore[method-assign]
        client.dataReceived(b"220 hi\r\n250 ok\r\n")  # established: more connections are wanted
        self.reactor.advance(0)
        self.reactor.advance(0)
        # One crash, and the destination is back to the one connection that works; no copy deferred.
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.written, [])
        self.assertEqual((self.service._connections, len(self.service._queues["route 127.0.0.1:2601"].ready)),
                         (1, 4))
        self.assertIn(b"MAIL FROM:", transport.value())
        client.setTimeout(None)

    def test_a_session_opener_that_raises_delays_and_is_retried(self) -> None:
        calls = []
        real_session = self.service._session

        def broken(queue: object) -> object:
            calls.append(queue)
            raise RuntimeError("session opener broke")

        self.service._session = broken  # type: ignore[method-assign]
        self.queue(n=1)
        self.reactor.advance(0)
        self.assertEqual(len(calls), 1)
        self.assertEqual([e["type"] for e in self.written], ["delay"])
        self.assertIn("RuntimeError: session opener broke", self.written[0]["raw_reason"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assert_idle()
        self.service._session = real_session  # type: ignore[method-assign]
        self.reactor.advance(300)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_an_outcome_whose_event_cannot_be_made_still_ends_the_session(self) -> None:
        """An unexpected error writing a copy's event must not leave its connection counted for ever."""
        queued = self.queue(n=1)
        self.reactor.advance(0)
        client, _transport = self.connect(0)
        client.dataReceived(b"220 hi\r\n250 ok\r\n")  # EHLO answered: MAIL FROM is out, the copy in flight
        self.assertEqual(self.service._queues["route 127.0.0.1:2601"].busy, 1)
        real_emit = self.events.emit

        def broken(type_: str, **fields: object) -> object:
            raise ValueError("cannot encode the event")

        self.events.emit = broken  # type: ignore[method-assign]
        client.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assert_idle()
        self.assertEqual(queued.states[0].attempts, 1)  # the delay stands and is journalled
        self.assertEqual(len(list(self.spool.recover())), 1)
        self.events.emit = real_emit  # type: ignore[method-assign]
        self.reactor.advance(300)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # and the copy is tried again

    def test_a_journal_that_fails_at_once_still_schedules_the_retry(self) -> None:
        queued = self.queue(n=1)

        def broken(queued: object, *args: object, **kwargs: object) -> object:
            raise OSError("journal: no space left on device")

        self.spool.record = broken  # type: ignore[method-assign]
        self.spool.record_states = broken  # type: ignore[method-assign]  # copies failed together
        self.reactor.advance(0)
        _h, _p, factory, _t, _b = self.reactor.tcpClients.pop()
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual([e["type"] for e in self.written], ["delay"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assert_idle()
        self.assertEqual(queued.states[0].attempts, 1)
        self.reactor.advance(300)
        self.assertEqual(len(self.reactor.tcpClients), 1)
