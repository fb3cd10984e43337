"""
The tracker's own answer to a plain hit (``appliance.tracker.channel``) against twisted.web's.

The same request is sent whole, which the channel answers itself, and split
across two reads, which it hands to twisted.web: the answers must be the same
bytes (but for the ``Date``) and the events the same.
"""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from appliance.links import click_url, open_url
from appliance.tracker import TrackerSite, make_site
from appliance.tracker.channel import MAX_HEAD, TrackerChannel
from appliance.tracker.limits import Limits
from tests.fakes import self_signed
from tests.helpers import in_thread
from tests.test_tracker import CODEC, NOW, UA, FakeEvents, link, nets

PROXY = "10.0.0.5"


def click(**kw: Any) -> bytes:
    return click_url("http", "x", CODEC.encode(link(**kw))).removeprefix("http://x").encode()


def pixel(kind: str = "open", **kw: Any) -> bytes:
    return open_url("http", "x", CODEC.encode(link(kind, **kw))).removeprefix("http://x").encode()


def request(method: bytes, target: bytes, *fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join((method + b" " + target + b" " + version, b"Host: x", *fields)) + b"\r\n\r\n"


def undated(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", answer)


class Run:
    """One connection to a fresh tracker site (its own hit state), fed ``chunks``."""

    def __init__(self, chunks: list[bytes], peer: str = "192.0.2.1", limits: Limits | None = None,
                 now: float = NOW + 60) -> None:
        self.reactor = MemoryReactorClock()
        self.events = FakeEvents()
        self.site = make_site(CODEC, self.events, nets("10.0.0.0/8"),  # type: ignore[arg-type]
                              now=lambda: now, reactor=self.reactor,
                              limits=limits or Limits(max_requests_per_connection=100))
        self.answered: list[float] = []
        self.site.on_answered = self.answered.append
        address = IPv4Address("TCP", peer, 40000)
        self.channel: TrackerChannel = self.site.buildProtocol(address)  # type: ignore[assignment]
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)
        for chunk in chunks:
            self.channel.dataReceived(chunk)

    @property
    def answer(self) -> bytes:
        return self.transport.value()


class SameAnswerTests(SynchronousTestCase):
    """Each request answered here matches twisted.web's answer and events."""

    def assertSame(self, data: bytes, peer: str = "192.0.2.1", now: float = NOW + 60) -> Run:
        direct = Run([data], peer, now=now)
        cut = data.index(b"\r\n") + 2
        web = Run([data[:cut], data[cut:]], peer, now=now)
        self.assertTrue(direct.channel._direct, "answered here")
        self.assertFalse(web.channel._direct, "handed to twisted.web")
        self.assertEqual(undated(direct.answer), undated(web.answer))
        self.assertTrue(direct.answer.startswith(b"HTTP/1.1 "))
        self.assertIn(b"\r\nDate: ", direct.answer)
        self.assertEqual(direct.events.written, web.events.written)
        self.assertEqual(direct.transport.disconnecting, web.transport.disconnecting)
        # A closing channel stops being the transport's producer, or the close waits on it.
        self.assertEqual(direct.transport.producer is None, web.transport.producer is None)
        return direct

    def test_click(self) -> None:
        run = self.assertSame(request(b"GET", click(), b"User-Agent: " + UA.encode(),
                                      b"Accept-Language:  de-CH, en;q=0.5 \t"))
        self.assertIn(b"302 Found", run.answer)
        [event] = run.events.written
        self.assertEqual((event["type"], event["user_agent"], event["accept_language"]),
                         ("click", UA, "de-CH, en;q=0.5"))

    def test_head_of_a_click_counts_nothing(self) -> None:
        run = self.assertSame(request(b"HEAD", click()))
        self.assertEqual(run.events.written, [])

    def test_pixel(self) -> None:
        for kind in ("open", "initial_open"):
            run = self.assertSame(request(b"GET", pixel(kind), b"User-Agent: " + UA.encode()))
            self.assertTrue(run.answer.endswith(b"\r\n\r\nGIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff"
                                                b"\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00"
                                                b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"))
            self.assertEqual([e["type"] for e in run.events.written], [kind])
        self.assertSame(request(b"HEAD", pixel()))

    def test_not_found(self) -> None:
        token = CODEC.encode(link()).encode()
        for target in (b"/q/" + token,  # a click token where a pixel's belongs
                       b"/f/a/" + CODEC.encode(link("open")).encode(),
                       b"/f/a/" + token[:-2],  # does not verify
                       b"/f//" + token,  # no sublink
                       b"/f/a/" + token + b"/",  # a segment too many
                       b"/f/a/b/" + token,
                       b"/q/",
                       b"/f/",
                       click(target="javascript:alert(1)")):  # no target a redirect may go to
            for method in (b"GET", b"HEAD"):
                run = self.assertSame(request(method, target))
                self.assertIn(b"404 Not Found", run.answer)
                self.assertEqual(run.events.written, [])

    def test_expired_links_answer_and_count_nothing(self) -> None:
        run = self.assertSame(request(b"GET", click()), now=NOW + 86400)
        self.assertIn(b"302 Found", run.answer)
        self.assertEqual(run.events.written, [])
        self.assertSame(request(b"GET", pixel()), now=NOW + 86400)

    def test_a_head_marks_the_next_get_from_there(self) -> None:
        target = click()
        direct = Run([request(b"HEAD", target) + request(b"GET", target)])
        web = Run([request(b"HEAD", target)[:5], request(b"HEAD", target)[5:] + request(b"GET", target)])
        self.assertTrue(direct.channel._direct)
        self.assertFalse(web.channel._direct)
        self.assertEqual(direct.events.written, web.events.written)
        self.assertNotEqual(direct.events.written, Run([request(b"GET", target)]).events.written)

    def test_unsubscribe_link_writes_two_events(self) -> None:
        run = self.assertSame(request(b"GET", click(unsubscribe=True)))
        self.assertEqual([e["type"] for e in run.events.written], ["click", "link_unsubscribe"])

    def test_connection_close_and_keep_alive(self) -> None:
        for value in (b"close", b"Close", b"keep-alive", b"Keep-Alive"):
            run = self.assertSame(request(b"GET", click(), b"Connection: " + value))
            self.assertEqual(run.transport.disconnecting, value.lower() == b"close")
            self.assertEqual(b"Connection: close" in run.answer, value.lower() == b"close")

    def test_trusted_proxy_names_the_client(self) -> None:
        run = self.assertSame(request(b"GET", click(), b"X-Forwarded-For: 198.51.100.7, 10.0.0.9",
                                      b"X-Forwarded-For: 10.0.0.8"), peer=PROXY)
        self.assertEqual(run.events.written[0]["ip_address"], "198.51.100.7")
        run = self.assertSame(request(b"GET", click(), b"X-Forwarded-For: 198.51.100.7"))
        self.assertEqual(run.events.written[0]["ip_address"], "192.0.2.1")

    def test_header_values_as_twisted_web_reads_them(self) -> None:
        long_agent = b"Mozilla/5.0 " + "\u00e9".encode() * 400 + b"\xff"
        run = self.assertSame(request(b"GET", click(), b"user-agent: first", b"USER-AGENT:" + long_agent,
                                      b"X-Other: a:b:c", b"Cookie: a=b"))
        [event] = run.events.written
        self.assertTrue(event["user_agent_truncated"])
        self.assertTrue(event["user_agent"].startswith("Mozilla/5.0 \u00e9"))
        self.assertSame(request(b"GET", click(), b"User-Agent:"))


class HandedOverTests(SynchronousTestCase):
    """What the channel does not answer itself goes to twisted.web whole, and is answered there."""

    def assertHandedOver(self, data: bytes) -> Run:
        whole = Run([data])
        self.assertFalse(whole.channel._direct)
        cut = data.index(b" ") + 1
        split = Run([data[:cut], data[cut:]])
        self.assertEqual(undated(whole.answer), undated(split.answer))
        self.assertEqual(whole.events.written, split.events.written)
        return whole

    def test_requests_for_twisted_web(self) -> None:
        target = click()
        sublink_escaped = target.replace(b"/f/a/", b"/f/%41/")
        for data in (
            request(b"GET", target, version=b"HTTP/1.0"),
            request(b"GET", target + b"?utm=1"),
            request(b"GET", sublink_escaped),
            request(b"GET", target, b"Content-Length: 0"),
            request(b"GET", target, b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
            request(b"GET", target, b"Expect: 100-continue"),
            request(b"GET", target, b"Upgrade: websocket"),
            request(b"GET", target, b"Connection: Upgrade"),
            request(b"GET", target, b"Connection: keep-alive, close"),
            request(b"GET", target, b"Connection: close", b"Connection: keep-alive"),
            request(b"get", target),
            request(b"POST", target),
            request(b"GET", b"/robots.txt"),
            request(b"GET", b"/"),
            request(b"GET", b"/q"),
            request(b"POST", b"/u/" + CODEC.encode(link("unsubscribe")).encode(),
                    b"Content-Length: 26") + b"List-Unsubscribe=One-Click",
            request(b"GET", target, b"X-Long: " + b"a" * MAX_HEAD),
            request(b"GET", target, *[b"X-N: %d" % i for i in range(101)]),
        ):
            self.assertHandedOver(data)

    def test_heads_twisted_web_reads_its_own_way(self) -> None:
        target = click()
        run = self.assertHandedOver(request(b"GET", target, b"User-Agent: a", b" folded"))
        self.assertIn(b"302 Found", run.answer)
        self.assertEqual(run.events.written[0]["user_agent"], "a folded")
        run = self.assertHandedOver(b"\r\n" + request(b"GET", target))  # one empty line is skipped
        self.assertIn(b"302 Found", run.answer)
        for data in (
            request(b"GET", target, b"No colon"),
            request(b"GET", target, b"User Agent: a"),
            request(b"GET", target, b"User-Agent: a\x00b"),
            request(b"GET", target, b"User-Agent: a\nb"),
            request(b"GET", target, b"User-Agent: a\rb"),
            b"GET  " + target + b" HTTP/1.1\r\n\r\n",
        ):
            run = self.assertHandedOver(data)
            self.assertIn(b"400 Bad Request", run.answer)
            self.assertEqual(run.events.written, [])

    def test_a_site_without_a_tracker_is_all_twisted_web(self) -> None:
        class Hello(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"hello"

        site = TrackerSite(Hello(), reactor=MemoryReactorClock())
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request(b"GET", click()))
        self.assertFalse(channel._direct)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))


class ConnectionTests(SynchronousTestCase):
    def test_pipelined_hits_answered_in_order(self) -> None:
        run = Run([request(b"GET", click()) + request(b"HEAD", pixel()) + request(b"GET", pixel())])
        self.assertTrue(run.channel._direct)
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", run.answer), [b"302", b"200", b"200"])
        self.assertEqual([e["type"] for e in run.events.written], ["click", "open"])
        self.assertEqual(len(run.answered), 3)
        self.assertFalse(run.transport.disconnecting)

    def test_the_rest_of_a_read_goes_to_twisted_web_in_order(self) -> None:
        second = request(b"GET", b"/robots.txt")
        run = Run([request(b"GET", click()) + second[:10]])
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", run.answer), [b"302"])
        self.assertFalse(run.channel._direct)
        run.channel.dataReceived(second[10:] + request(b"GET", click()))
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", run.answer), [b"302", b"200", b"302"])
        self.assertEqual([e["type"] for e in run.events.written], ["click", "click"])

    def test_nothing_after_a_close_is_answered(self) -> None:
        run = Run([request(b"GET", click(), b"Connection: close") + request(b"GET", click())])
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", run.answer), [b"302"])
        self.assertTrue(run.transport.disconnecting)
        run.channel.dataReceived(request(b"GET", click()))
        self.assertEqual(len(run.events.written), 1)
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", run.answer), [b"302"])

    def test_a_closing_connection_is_cut_off_if_the_close_never_ends(self) -> None:
        limits = Limits(header_timeout=20, keepalive_timeout=5, max_requests_per_connection=100)
        closing = request(b"GET", click(), b"Connection: close")
        for chunks in ([closing], [closing[:5], closing[5:]]):  # here, and on twisted.web's path
            logged: list[str] = []
            globalLogPublisher.addObserver(logged.append)
            self.addCleanup(globalLogPublisher.removeObserver, logged.append)
            run = Run([], limits=limits)
            run.reactor.advance(4)  # within the idle timer, and 4 s into the first deadline
            for chunk in chunks:
                run.channel.dataReceived(chunk)
            self.assertTrue(run.transport.disconnecting)
            self.assertIsNone(run.transport.producer)
            # Not evictable: its answer may still be in the transport's buffer.
            self.assertNotIn(run.channel, run.site.connections._waiting)
            self.assertEqual([c.getTime() for c in run.reactor.getDelayedCalls()], [24.0])  # no idle timer
            run.reactor.advance(19)
            self.assertFalse(run.transport.disconnected)
            run.reactor.advance(1)  # 20 s after the answer
            self.assertTrue(run.transport.disconnected, chunks)  # aborted: the close never ended
            self.assertEqual(logged, [])

    def test_a_closing_answer_is_not_evicted_for_a_newcomer(self) -> None:
        limits = Limits(max_connections=1, max_requests_per_connection=100)
        closing = request(b"GET", click(), b"Connection: close")
        for chunks in ([closing], [closing[:5], closing[5:]]):
            run = Run(chunks, limits=limits)
            self.assertIsNone(run.site.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)))
            self.assertFalse(run.transport.disconnected)
            self.assertIn(b"302 Found", run.answer)
            self.assertEqual((run.site.connections.refused, run.site.connections.evicted), (1, 0))

    def test_requests_per_connection_capped_here_too(self) -> None:
        run = Run([request(b"GET", click())] * 3, limits=Limits(max_requests_per_connection=2))
        self.assertEqual(run.answer.count(b"HTTP/1.1 302"), 2)
        first, second = run.answer.split(b"HTTP/1.1 302")[1:]
        self.assertNotIn(b"Connection: close", first)
        self.assertIn(b"\r\nConnection: close\r\n", second)
        self.assertTrue(run.transport.disconnecting)
        self.assertEqual(len(run.events.written), 2)

    def test_the_count_spans_both_paths(self) -> None:
        run = Run([request(b"GET", click()), request(b"GET", b"/robots.txt")[:5]],
                  limits=Limits(max_requests_per_connection=2))
        run.channel.dataReceived(request(b"GET", b"/robots.txt")[5:])
        self.assertIn(b"\r\nConnection: close\r\n", run.answer.split(b"HTTP/1.1 200")[1])
        self.assertTrue(run.transport.disconnecting)

    def test_deadline_and_waiting_after_an_answer(self) -> None:
        limits = Limits(header_timeout=20, keepalive_timeout=300, max_requests_per_connection=100)
        run = Run([], limits=limits)
        connections = run.site.connections
        self.assertIn(run.channel, connections._waiting)
        run.reactor.advance(19)
        run.channel.dataReceived(request(b"GET", click()))
        self.assertIn(run.channel, connections._waiting)  # waiting again, for the next request
        run.reactor.advance(19)
        self.assertFalse(run.transport.disconnecting)
        run.reactor.advance(1)  # 20 s after the answer, and no request since
        self.assertTrue(run.transport.disconnecting)

    def test_idle_timer_restarts_on_each_read(self) -> None:
        limits = Limits(header_timeout=100, keepalive_timeout=5, max_requests_per_connection=100)
        run = Run([], limits=limits)
        for _ in range(3):
            run.reactor.advance(4)
            run.channel.dataReceived(request(b"GET", click()))
        self.assertFalse(run.transport.disconnecting)
        run.reactor.advance(5)
        self.assertTrue(run.transport.disconnecting)

    def test_a_failing_hit_is_a_500_and_a_closed_connection(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("broken")

        for method in (b"GET", b"HEAD"):
            run = Run([])
            run.site.tracker.click = broken  # type: ignore[union-attr, method-assign]
            run.channel.dataReceived(request(method, click()) + request(b"GET", click()))
            head, _, body = run.answer.partition(b"\r\n\r\n")
            self.assertRegex(head, rb"(?s)^HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n"
                                   rb"Date: [^\r]+ GMT\r\n.*Content-Length: 22$")
            self.assertEqual(body, b"Internal Server Error\n" if method == b"GET" else b"")
            self.assertTrue(run.transport.disconnecting)
            self.assertIsNone(run.transport.producer)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LoopbackTests(unittest.TestCase):
    """Several hits on one kept-alive connection over a real socket."""

    def setUp(self) -> None:
        self.events = FakeEvents()
        site = make_site(CODEC, self.events, now=lambda: NOW + 60, reactor=reactor)  # type: ignore[arg-type]
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)

    @defer.inlineCallbacks
    def test_keep_alive_and_pipelined(self) -> defer.Generator:
        port = self.listening.getHost().port

        def talk() -> list[bytes]:
            answers = []
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for data, count in ((request(b"GET", click()), 1),
                                    (request(b"GET", pixel()) + request(b"HEAD", click()), 2),
                                    (request(b"GET", click(), b"Connection: close"), 1)):
                    s.sendall(data)
                    got = b""
                    while got.count(b"HTTP/1.1 ") < count or not got.endswith((b"\r\n\r\n", b";")):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                    answers.append(got)
                answers.append(s.recv(65536))  # the server closes after the last
            return answers

        answers = yield in_thread(talk)
        self.assertEqual([re.findall(rb"HTTP/1.1 (\d+)", a) for a in answers],
                         [[b"302"], [b"200", b"302"], [b"302"], []])
        self.assertEqual([e["type"] for e in self.events.written], ["click", "open", "click"])


class ClosingLoopbackTests(unittest.TestCase):
    """
    A closing answer ends a TLS connection at once, with the timers far off.

    The idle timer and the deadline are 120 s, the client waits 30 s: a close
    that waited for them (the channel still the transport's producer) fails here.
    """

    limits = Limits(header_timeout=120, keepalive_timeout=120, max_requests_per_connection=10_000)

    def site(self) -> TrackerSite:
        return make_site(CODEC, FakeEvents(), now=lambda: NOW + 60, reactor=reactor,  # type: ignore[arg-type]
                         limits=self.limits)

    def read_to_end(self, s: socket.socket) -> bytes:
        s.settimeout(30)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data

    @defer.inlineCallbacks
    def test_over_tls(self) -> defer.Generator:
        context, cert = self_signed(self.mktemp())
        listening = reactor.listenSSL(0, self.site(), context, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port

        def talk() -> bytes:
            client = ssl.create_default_context(cafile=cert)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with client.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(request(b"GET", click()) + request(b"GET", click(), b"Connection: close"))
                    return self.read_to_end(s)

        answer = yield in_thread(talk)
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+)", answer), [b"302", b"302"])
