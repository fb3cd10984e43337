"""The tracker under abuse: connection limits, request deadlines, repeated hits, long header values."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError, parse_config
from appliance.events import EventLog
from appliance.eventtypes import cap_text
from appliance.links import click_url
from appliance.tracker import SUMMARY_INTERVAL, Client, Refused, Tracker, make_site
from appliance.tracker.limits import HitLimiter, Limits
from tests.fakes import self_signed
from tests.helpers import base_toml, in_thread, merge
from tests.memory import MemoryAppliance
from tests.test_tracker import CODEC, NOW, UA, FakeEvents, http, link

ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n"


# -- pure logic ---------------------------------------------------------------------


class CapTests(SynchronousTestCase):
    def test_cut_on_a_character_boundary(self) -> None:
        self.assertEqual(cap_text("a" * 10, 10), ("a" * 10, False))
        self.assertEqual(cap_text("a" * 11, 10), ("a" * 10, True))
        # "é" is two bytes: byte 10 would split the fifth one, so only four stay.
        self.assertEqual(cap_text("é" * 6, 10), ("é" * 5, True))
        self.assertEqual(cap_text("é" * 6, 9), ("é" * 4, True))
        self.assertEqual(cap_text("€€€", 8), ("€€", True))

    def test_client_values_capped_and_marked_in_events(self) -> None:
        events = FakeEvents()
        tracker = Tracker(CODEC, events, now=lambda: float(NOW))  # type: ignore[arg-type]
        ua = "Mozilla/5.0 " + "ü" * 16000
        client = Client.capped("198.51.100.7", ua, "de-CH," * 100)
        [click] = tracker.events_for(link(), client)
        self.assertEqual(len(click["user_agent"].encode()), 512)
        self.assertTrue(ua.startswith(click["user_agent"]))
        self.assertIs(click["user_agent_truncated"], True)
        self.assertEqual(click["accept_language"], ("de-CH," * 100)[:256])
        self.assertIs(click["accept_language_truncated"], True)
        self.assertNotIn("ip_address_truncated", click)
        [opened] = tracker.events_for(link("open"), client)
        self.assertIs(opened["user_agent_truncated"], True)
        self.assertNotIn("accept_language_truncated", opened)  # opens carry no accept_language
        [plain] = tracker.events_for(link(), Client.capped("198.51.100.7", UA, "en"))
        self.assertEqual((plain["user_agent"], plain["accept_language"]), (UA, "en"))
        self.assertFalse([k for k in plain if k.endswith("_truncated")])


class HitLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = HitLimiter(2, 60, 3, now=self.clock.seconds)

    def test_same_link_same_address_limited_per_window(self) -> None:
        hits = [self.limiter.allow("192.0.2.1", b"tok") for _ in range(4)]
        self.assertEqual(hits, [True, True, False, False])
        self.assertEqual(self.limiter.suppressed, 2)
        self.assertTrue(self.limiter.allow("192.0.2.2", b"tok"))  # another address
        self.clock.advance(60)
        self.assertTrue(self.limiter.allow("192.0.2.1", b"tok"))

    def test_many_links_from_one_address_never_limited(self) -> None:
        for i in range(100):
            self.assertTrue(self.limiter.allow("192.0.2.1", b"tok%d" % i))
        self.assertEqual(self.limiter.suppressed, 0)

    def test_memory_bounded(self) -> None:
        for i in range(100):
            self.limiter.allow("192.0.2.1", b"tok%d" % i)
            self.assertLessEqual(len(self.limiter), 3)

    def test_tracker_answers_but_writes_no_event_past_the_limit(self) -> None:
        events = FakeEvents()
        tracker = Tracker(CODEC, events, now=lambda: float(NOW),  # type: ignore[arg-type]
                          limiter=self.limiter)
        client = Client("198.51.100.7", UA)
        for _ in range(5):
            tracker.record(link(), client, b"token-a")
        tracker.record(link(), client, b"token-b")
        self.assertEqual(len(events.written), 3)
        self.assertEqual(self.limiter.suppressed, 3)


class ConfigTests(SynchronousTestCase):
    def test_defaults_and_values(self) -> None:
        t = parse_config(base_toml()).tracker.limits
        self.assertEqual((t.max_connections, t.max_connections_per_address, t.header_timeout,
                          t.keepalive_timeout, t.max_requests_per_connection, t.event_rate_limit,
                          t.event_rate_window, t.event_rate_entries),
                         (512, 32, 20.0, 5.0, 1000, 10, 60.0, 100_000))
        t = parse_config(merge(base_toml(), {"tracker": {
            "max_connections": 7, "header_timeout": "3s", "event_rate_window": "5m"}})).tracker.limits
        self.assertEqual((t.max_connections, t.header_timeout, t.event_rate_window), (7, 3.0, 300.0))

    def test_bad_values_named(self) -> None:
        for key, bad in (("max_connections", 0), ("max_connections_per_address", -1),
                         ("header_timeout", "0s"), ("event_rate_limit", "x"),
                         ("keepalive_timeout", "soon")):
            e = self.assertRaises(ConfigError, parse_config,
                                  merge(base_toml(), {"tracker": {key: bad}}))
            self.assertEqual([p for p, _ in e.problems], [f"tracker.{key}"], key)


# -- connections, in memory ---------------------------------------------------------


class ChannelTests(SynchronousTestCase):
    """The limits on requests twisted.web answers; ``DirectChannelTests`` runs them on the tracker's own."""

    request = ROBOTS

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.limits = Limits(max_connections=3, max_connections_per_address=2, header_timeout=20,
                             keepalive_timeout=5, max_requests_per_connection=2)
        self.site = make_site(CODEC, FakeEvents(), reactor=self.reactor,  # type: ignore[arg-type]
                              limits=self.limits)

    def connect(self, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        self.assertIsNotNone(proto)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def assertRefused(self, host: str) -> None:
        """A connection from ``host`` is refused: closed at accept, as ``None`` tells plain TCP."""
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", host, 1)))

    def test_behind_tls_a_refused_connection_is_aborted_when_made(self) -> None:
        self.site.behind_tls = True
        self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        proto = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        self.assertIsInstance(proto, Refused)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        self.assertEqual((self.site.connections.refused, self.site.connections.total), (1, 2))

    def test_trickled_bytes_do_not_extend_the_deadline(self) -> None:
        proto, transport = self.connect()
        for _ in range(19):
            self.reactor.advance(1)  # well inside the 5 s idle timer each time
            proto.dataReceived(b"X")
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_deadline_restarts_after_each_answer(self) -> None:
        proto, transport = self.connect()
        self.reactor.advance(4)
        proto.dataReceived(self.request)
        self.assertRegex(transport.value(), rb"^HTTP/1.1 (200 OK|302 Found)\r\n")
        self.reactor.advance(4)
        proto.dataReceived(b"GET /robots.txt HTTP/1.1\r\n")
        self.reactor.advance(4)
        proto.dataReceived(b"Host: x\r\n")
        self.reactor.advance(4)
        proto.dataReceived(b"X-A: b\r\n")
        self.reactor.advance(4)
        proto.dataReceived(b"X-B: c\r\n")
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(4)  # 20 s since the first answer, the head still open
        self.assertTrue(transport.disconnecting)

    def test_idle_keepalive_closed(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(self.request)
        self.reactor.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_requests_per_connection_capped(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(self.request)
        self.assertNotIn(b"connection: close", transport.value().lower())
        proto.dataReceived(self.request)
        self.assertIn(b"connection: close", transport.value().lower())
        self.assertTrue(transport.disconnecting)

    def test_per_address_limit_and_release(self) -> None:
        a1, _ = self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        self.assertRefused("192.0.2.1")
        self.assertEqual(self.site.connections.refused, 1)
        a1.connectionLost(None)
        self.connect("192.0.2.1")
        self.assertEqual(self.site.connections.total, 2)

    def test_full_table_closes_the_longest_waiting_connection(self) -> None:
        a, ta = self.connect("192.0.2.1")
        b, tb = self.connect("192.0.2.2")
        a.dataReceived(self.request)  # answered: a waits again, now the newest
        self.connect("192.0.2.3")
        d, _ = self.connect("192.0.2.4")  # over the total of 3: b has waited longest
        self.assertTrue(tb.disconnecting)
        self.assertFalse(ta.disconnecting)
        self.assertEqual((self.site.connections.total, self.site.connections.evicted), (3, 1))
        b.connectionLost(None)  # the transport's own report changes nothing more
        self.assertEqual(self.site.connections.total, 3)
        self.assertEqual(self.site.connections.by_address,
                         {"192.0.2.1": 1, "192.0.2.3": 1, "192.0.2.4": 1})

    def test_a_lost_connection_never_waits_again(self) -> None:
        proto, _ = self.connect()
        proto.connectionLost(None)
        proto._arm()  # as an answer finished after the loss would
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.site.connections.total, 0)
        for i in (1, 2, 3):
            self.connect(f"192.0.2.{i}")
        self.assertEqual(self.site.connections.evicted, 0)

    def test_full_table_with_none_waiting_refuses(self) -> None:
        channels = [self.connect(f"192.0.2.{i}")[0] for i in (1, 2, 3)]
        for channel in channels:  # as while their answers are being written
            self.site.connections.not_waiting(channel)
        self.assertRefused("192.0.2.4")
        self.assertEqual((self.site.connections.total, self.site.connections.refused), (3, 1))

    def test_no_server_header(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(self.request)
        self.assertNotIn(b"\r\nserver:", transport.value().lower())

    def test_what_the_limits_refused_is_logged_once_an_interval(self) -> None:
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        for _ in range(2):
            self.connect("192.0.2.9")
        self.assertRefused("192.0.2.9")
        for _ in range(12):
            self.site.limiter.allow("192.0.2.9", b"tok")
        self.reactor.advance(SUMMARY_INTERVAL)
        self.assertEqual([x for x in lines if "tracker limits" in x], [
            "tracker limits in the last 60s: 1 connection(s) refused, "
            "0 waiting connection(s) closed to make room, "
            "2 repeated hit(s) answered without events"])
        self.reactor.advance(SUMMARY_INTERVAL)  # nothing new, no line
        self.assertEqual(len([x for x in lines if "tracker limits" in x]), 1)


class DirectChannelTests(ChannelTests):
    """Each of these requests is answered by the channel itself, never by twisted.web."""

    request = b"GET /f/a/" + CODEC.encode(link()).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"

    def setUp(self) -> None:
        super().setUp()
        self.sent = self.answered_here = 0
        self.addCleanup(lambda: self.assertEqual(self.answered_here, self.sent))

    def connect(self, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        proto, transport = super().connect(host)
        receive, hit = proto.dataReceived, proto._hit

        def received(data: bytes) -> None:
            self.sent += data == self.request
            receive(data)

        def counted(*args: Any) -> bytes:
            self.answered_here += 1
            return hit(*args)

        proto.dataReceived, proto._hit = received, counted
        return proto, transport


class WiringTests(SynchronousTestCase):
    def test_appliance_site_takes_the_configured_limits(self) -> None:
        running = MemoryAppliance(self.mktemp(), tracker={
            "max_connections": 9, "max_connections_per_address": 3, "header_timeout": "7s",
            "keepalive_timeout": "2s", "max_requests_per_connection": 4, "event_rate_limit": 5,
            "event_rate_window": "30s", "event_rate_entries": 50})
        running.start()
        self.addCleanup(running.stop)
        site = running.appliance.tracker_site
        self.assertEqual(site.limits, Limits(9, 3, 7.0, 2.0, 4, 5, 30.0, 50))
        self.assertEqual((site.timeOut, site.limiter.limit, site.limiter.window,
                          site.limiter.capacity), (2.0, 5, 30.0, 50))


    def test_an_ssl_endpoint_refuses_with_a_protocol(self) -> None:
        for endpoint, behind_tls in (("tcp:8080:interface=127.0.0.1", False), ("ssl", True)):
            if endpoint == "ssl":
                directory = self.mktemp()
                _, cert = self_signed(directory)
                key = os.path.join(directory, "sink-key.pem")
                endpoint = f"ssl:8443:interface=127.0.0.1:privateKey={key}:certKey={cert}"
            running = MemoryAppliance(self.mktemp(), tracker={"endpoint": endpoint})
            running.start()
            self.addCleanup(running.stop)
            self.assertIs(running.appliance.tracker_site.behind_tls, behind_tls, endpoint)


# -- connections, over loopback -----------------------------------------------------


def trickle(port: int, interval: float, give_up: float) -> float | None:
    """Send a never-ending request head a byte at a time; seconds until the server closed, or ``None``."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as s:
        s.sendall(b"GET /robots.txt HTTP/1.1\r\nX-Pad: ")
        s.settimeout(interval)
        while time.monotonic() - start < give_up:
            try:
                if s.recv(1024) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                pass
            except OSError:
                return time.monotonic() - start
            try:
                s.sendall(b"a")
            except OSError:
                return time.monotonic() - start
    return None


def refused(port: int) -> bool:
    """Whether the server closes a new connection without answering a request on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(ROBOTS)
            return s.recv(1024) == b""
        except OSError:
            return True


class LoopbackTests(unittest.TestCase):
    def setUp(self) -> None:
        path = os.path.join(self.mktemp(), "events.jsonl")
        self.path = path
        self.events = EventLog(path, "node-t", fsync_interval=0, clock=Clock(), now=lambda: NOW)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        limits = Limits(max_connections_per_address=2, header_timeout=0.5, keepalive_timeout=30,
                        event_rate_limit=2)
        self.site = make_site(CODEC, self.events, now=lambda: NOW, reactor=reactor, limits=limits)
        self.listening = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    @defer.inlineCallbacks
    def test_slow_client_cut_off(self) -> defer.Generator:
        elapsed = yield in_thread(trickle, self.port, 0.05, 8.0)
        self.assertIsNotNone(elapsed, "a byte-at-a-time client kept its connection")
        self.assertLess(elapsed, 8.0)

    @defer.inlineCallbacks
    def test_per_address_limit(self) -> defer.Generator:
        def third_refused() -> bool:
            held = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(2)]
            try:
                for s in held:  # an answer on each: the server has counted both
                    s.sendall(ROBOTS)
                    self.assertIn(b"200 OK", s.recv(4096))
                return refused(self.port)
            finally:
                for s in held:
                    s.close()

        self.assertTrue((yield in_thread(third_refused)))

    @defer.inlineCallbacks
    def test_per_address_limit_over_tls(self) -> defer.Generator:
        """Refused under TLS too, quietly: a refusal is no error to log, however many come."""
        context, cert = self_signed(self.mktemp())
        self.site.behind_tls = True
        listening = reactor.listenSSL(0, self.site, context, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        client = ssl.create_default_context(cafile=cert)

        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            return client.wrap_socket(raw, server_hostname="localhost")

        def third_refused() -> list[bool]:
            held = [connect() for _ in range(2)]
            try:
                for s in held:
                    s.sendall(ROBOTS)
                    self.assertIn(b"200 OK", s.recv(4096))
                outcomes = []
                for _ in range(3):
                    try:
                        with connect() as s:
                            s.sendall(ROBOTS)
                            outcomes.append(s.recv(1024) == b"")
                    except OSError:
                        outcomes.append(True)
                return outcomes
            finally:
                for s in held:
                    s.close()

        self.assertEqual((yield in_thread(third_refused)), [True, True, True])
        self.assertEqual(self.site.connections.refused, 3)

    @defer.inlineCallbacks
    def test_repeated_clicks_answered_without_events(self) -> defer.Generator:
        path = click_url("http", "x", CODEC.encode(link()), "").removeprefix("http://x")
        for _ in range(4):
            r = yield in_thread(http, self.port, "GET", path, {"User-Agent": "é" * 600})
            self.assertEqual(r.status, 302)
            self.assertIsNone(r.header(b"server"))
        with open(self.path, "rb") as f:
            logged = [json.loads(line) for line in f]
        self.assertEqual(len(logged), 2)
        self.assertEqual(len(logged[0]["user_agent"].encode()), 512)
        self.assertIs(logged[0]["user_agent_truncated"], True)
        self.assertEqual(self.site.limiter.suppressed, 2)
