"""The HTTP tracker: pixels, redirects and their events, over real loopback connections."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError, parse_config
from appliance.events import EventLog
from appliance.links import Keyring, LinkCodec, LinkData, click_url, open_url
from appliance.tracker import PIXEL, Client, Tracker, client_address, make_site
from tests.helpers import base_toml, in_thread, merge
from tests.memory import MemoryAppliance

KEYRING = Keyring(((3, b"s" * 32), (2, b"o" * 32)))
CODEC = LinkCodec(KEYRING)
NOW = 1_700_000_000
EXPIRY = NOW + 86400
UA = "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"
UA_PARSED = {"agent_family": "Firefox", "device_brand": "", "device_family": "Other",
             "os_family": "Linux", "os_version": "", "is_mobile": False, "is_proxy": False,
             "is_prefetched": False}


def link(kind: str = "click", **kw: Any) -> LinkData:
    values: dict[str, Any] = dict(
        kind=kind, expiry=EXPIRY, message_id="00a1b2c3d4e5f6a7b8c9", transmission_id="4711",
        rcpt_to="Someone@Example.COM", campaign_id="Spring sale", tags=("news", "spring"),
        metadata={"user": "42", "plan": "gold"},
    )
    if kind == "click":
        values.update(link_name="Hero image", target="https://shop.example/p?a=1&b=%2F#top")
    values.update(kw)
    return LinkData(**values)


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# -- a raw HTTP/1.1 client: exact bytes out, exact bytes back -----------------------


@dataclass
class Response:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def http(port: int, method: str, path: bytes | str, headers: dict[str, str] | None = None) -> Response:
    """One request on its own connection, read until the server closes it."""
    if isinstance(path, str):
        path = path.encode("ascii")
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parsed: dict[bytes, list[bytes]] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        parsed.setdefault(name.strip().lower(), []).append(value.strip())
    return Response(int(status_line.split()[1]), parsed, body)


# -- pure logic ---------------------------------------------------------------------


class ClientAddressTests(SynchronousTestCase):
    PROXIES = nets("127.0.0.0/8", "10.0.0.0/8", "fd00::/8")

    def test_header_ignored_from_untrusted_peer(self) -> None:
        self.assertEqual(client_address("192.0.2.1", [b"198.51.100.7"], self.PROXIES), "192.0.2.1")
        self.assertEqual(client_address("127.0.0.1", [b"198.51.100.7"], ()), "127.0.0.1")

    def test_right_most_untrusted_hop(self) -> None:
        # The client claims 203.0.113.66 itself; only what the proxies appended counts.
        chain = [b"203.0.113.66, 198.51.100.7, 10.1.2.3"]
        self.assertEqual(client_address("127.0.0.1", chain, self.PROXIES), "198.51.100.7")
        # Several header lines form one list, in order.
        lines = [b"203.0.113.66", b"198.51.100.7,10.1.2.3"]
        self.assertEqual(client_address("127.0.0.1", lines, self.PROXIES), "198.51.100.7")

    def test_all_hops_trusted(self) -> None:
        self.assertEqual(client_address("127.0.0.1", [b"10.0.0.9, 10.0.0.8"], self.PROXIES), "10.0.0.9")

    def test_no_header(self) -> None:
        self.assertEqual(client_address("127.0.0.1", [], self.PROXIES), "127.0.0.1")

    def test_ports_and_ipv6(self) -> None:
        for hop, expected in ((b"198.51.100.7:5555", "198.51.100.7"),
                              (b"[2001:db8::1]:443", "2001:db8::1"),
                              (b"2001:db8::1", "2001:db8::1"),
                              (b"::ffff:198.51.100.7", "198.51.100.7")):
            self.assertEqual(client_address("127.0.0.1", [hop + b", fd00::5"], self.PROXIES), expected)
        self.assertEqual(client_address("::ffff:127.0.0.1", [b"198.51.100.7"], self.PROXIES),
                         "198.51.100.7")

    def test_unreadable_hop_stops_at_last_known(self) -> None:
        for junk in (b"unknown", b"not an address", b"198.51.100.7\x00", b"_hidden"):
            self.assertEqual(client_address("127.0.0.1", [junk + b", 10.1.2.3"], self.PROXIES),
                             "10.1.2.3")
        self.assertEqual(client_address("127.0.0.1", [b"unknown"], self.PROXIES), "127.0.0.1")
        self.assertEqual(client_address("127.0.0.1", [b" , ,198.51.100.7"], self.PROXIES),
                         "198.51.100.7")


class FakeEvents:
    """The event log's make/write, in memory."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    def make(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, **fields}

    def write(self, event: dict[str, Any]) -> None:
        self.written.append(event)


class TrackerEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = float(NOW)
        self.events = FakeEvents()
        self.tracker = Tracker(CODEC, self.events, now=lambda: self.now)  # type: ignore[arg-type]
        self.client = Client("198.51.100.7", UA, "de-CH, en;q=0.5")

    def test_open_carries_the_link(self) -> None:
        for kind in ("open", "initial_open"):
            [event] = self.tracker.events_for(link(kind), self.client)
            self.assertEqual(event, {
                "type": kind, "message_id": "00a1b2c3d4e5f6a7b8c9", "transmission_id": "4711",
                "campaign_id": "Spring sale", "rcpt_to": "someone@example.com",
                "raw_rcpt_to": "Someone@Example.COM", "rcpt_tags": ["news", "spring"],
                "rcpt_meta": {"user": "42", "plan": "gold"},
                "ip_address": "198.51.100.7", "user_agent": UA, "user_agent_parsed": UA_PARSED,
                "routing_domain": "example.com", "recipient_domain": "example.com", "ip_pool": "default",
                "recv_method": "esmtp", "delv_method": "esmtp",
                "open_tracking": True, **({"initial_pixel": True} if kind == "initial_open" else {}),
            })
        [event] = self.tracker.events_for(link("open", metadata=None), self.client)
        self.assertEqual(event["rcpt_meta"], {})

    def test_click(self) -> None:
        [event] = self.tracker.events_for(link(), self.client)
        self.assertEqual(event["type"], "click")
        self.assertEqual(event["target_link_url"], "https://shop.example/p?a=1&b=%2F#top")
        self.assertEqual(event["target_link_name"], "Hero image")
        self.assertEqual(event["accept_language"], "de-CH, en;q=0.5")
        self.assertEqual(event["rcpt_meta"], {"user": "42", "plan": "gold"})
        [event] = self.tracker.events_for(link(metadata=None), self.client)
        self.assertNotIn("rcpt_meta", event)

    def test_unsubscribe_link(self) -> None:
        click, unsubscribe = self.tracker.events_for(link(unsubscribe=True), self.client)
        self.assertEqual((click["type"], unsubscribe["type"]), ("click", "link_unsubscribe"))
        self.assertEqual({k: v for k, v in click.items() if k != "type"},
                         {k: v for k, v in unsubscribe.items() if k != "type"})

    def test_expired_links_count_nothing(self) -> None:
        self.now = EXPIRY
        for kind in ("open", "initial_open", "click"):
            self.assertEqual(self.tracker.events_for(link(kind), self.client), [])
        self.now = EXPIRY - 1
        self.assertEqual(len(self.tracker.events_for(link(), self.client)), 1)

    def test_kind_must_match_the_path(self) -> None:
        token = CODEC.encode(link("open")).encode()
        self.assertIsNone(self.tracker.link(token, ("click",)))
        self.assertEqual(self.tracker.link(token, ("open", "initial_open")), link("open"))


class PixelTests(SynchronousTestCase):
    def test_transparent_one_by_one_gif(self) -> None:
        self.assertEqual(len(PIXEL), 43)
        self.assertEqual(PIXEL[:6], b"GIF89a")
        self.assertEqual(PIXEL[6:10], b"\x01\x00\x01\x00")  # 1 x 1
        gce = PIXEL.index(b"!\xf9\x04")  # graphic control extension
        self.assertEqual(PIXEL[gce + 3] & 1, 1)  # transparency flag set
        self.assertEqual(PIXEL[gce + 6], 0)  # colour 0 is the transparent one
        self.assertTrue(PIXEL.endswith(b";"))


class ConfigTests(SynchronousTestCase):
    def test_trusted_proxies(self) -> None:
        data = merge(base_toml(), {"tracker": {"trusted_proxies": ["10.0.0.0/8", "fd00::1"]}})
        config = parse_config(data)
        self.assertEqual(config.tracker.trusted_proxies, nets("10.0.0.0/8", "fd00::1/128"))
        self.assertEqual(parse_config(base_toml()).tracker.trusted_proxies, ())

    def test_bad_trusted_proxies_named(self) -> None:
        for bad in ("10.0.0.0/8", ["10.0.0.0/33"], ["proxy.example"], [10]):
            data = merge(base_toml(), {"tracker": {"trusted_proxies": bad}})
            e = self.assertRaises(ConfigError, parse_config, data)
            self.assertEqual([p for p, _ in e.problems], ["tracker.trusted_proxies"], bad)


# -- over HTTP ----------------------------------------------------------------------


class TrackerHTTPTests(unittest.TestCase):
    """A tracker site on a loopback port with a real event log file."""

    trusted = nets("127.0.0.0/8", "10.0.0.0/8")

    def setUp(self) -> None:
        self.now = float(NOW)
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.events = EventLog(self.path, "node-t", fsync_interval=0, clock=Clock(),
                               now=lambda: self.now)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        site = make_site(CODEC, self.events, self.trusted, now=lambda: self.now, reactor=reactor)
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    def logged(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f]

    def get(self, path: bytes | str, method: str = "GET", **headers: str) -> defer.Deferred:
        return in_thread(http, self.port, method, path, headers)

    def open_path(self, kind: str = "open", **kw: Any) -> str:
        return open_url("http", "x", CODEC.encode(link(kind, **kw))).removeprefix("http://x")

    def click_path(self, sublink: str = "", **kw: Any) -> str:
        return click_url("http", "x", CODEC.encode(link(**kw)), sublink).removeprefix("http://x")

    @defer.inlineCallbacks
    def test_open_pixel(self) -> defer.Generator:
        for kind in ("open", "initial_open"):
            r = yield self.get(self.open_path(kind), **{"User-Agent": UA})
            self.assertEqual(r.status, 200)
            self.assertEqual(r.body, PIXEL)
            self.assertEqual(r.header(b"content-type"), b"image/gif")
            self.assertEqual(r.header(b"cache-control"), b"no-store")
            # The event is in the file by the time the response has arrived.
            event = self.logged()[-1]
            self.assertEqual(event["type"], kind)
            for key, value in (("message_id", "00a1b2c3d4e5f6a7b8c9"), ("transmission_id", "4711"),
                               ("campaign_id", "Spring sale"), ("rcpt_to", "someone@example.com"),
                               ("raw_rcpt_to", "Someone@Example.COM"),
                               ("rcpt_meta", {"user": "42", "plan": "gold"}),
                               ("rcpt_tags", ["news", "spring"]), ("ip_address", "127.0.0.1"),
                               ("user_agent", UA), ("timestamp", str(NOW)), ("node_name", "node-t")):
                self.assertEqual(event[key], value, key)
            self.assertRegex(event["event_id"], r"^[0-9]+$")
        self.assertEqual([e["type"] for e in self.logged()], ["open", "initial_open"])

    @defer.inlineCallbacks
    def test_click_redirects_to_the_exact_target(self) -> defer.Generator:
        targets = [
            ("https://shop.example/p?a=1&b=%2F&c=%zz#frag", b"https://shop.example/p?a=1&b=%2F&c=%zz#frag"),
            ("HTTP://Shop.Example:8443/a/../b/?x=[1]&y=@z;w=(v)!$'*,~|^`{}",
             b"HTTP://Shop.Example:8443/a/../b/?x=[1]&y=@z;w=(v)!$'*,~|^`{}"),
            ("https://user:pw@host.example/%E2%82%AC?q=a+b%20c&amp=&#x",
             b"https://user:pw@host.example/%E2%82%AC?q=a+b%20c&amp=&#x"),
            ("https://例え.jp/パス?q=ü&r=€#ö",
             b"https://%E4%BE%8B%E3%81%88.jp/%E3%83%91%E3%82%B9?q=%C3%BC&r=%E2%82%AC#%C3%B6"),
            ("http://[2001:db8::1]:8080/x?y=\"z\"<>", b"http://[2001:db8::1]:8080/x?y=\"z\"<>"),
        ]
        for i, (target, location) in enumerate(targets):
            r = yield self.get(self.click_path(target=target, link_name=f"link {i}"),
                               **{"User-Agent": UA, "Accept-Language": "fr-CH, fr;q=0.9"})
            self.assertEqual(r.status, 302, target)
            self.assertEqual(r.headers[b"location"], [location])
            self.assertEqual(r.body, b"")
            self.assertEqual(r.header(b"content-length"), b"0")
            self.assertIsNone(r.header(b"content-type"))
            self.assertEqual(r.header(b"cache-control"), b"no-store")
            self.assertEqual(r.header(b"x-robots-tag"), b"noindex")
            event = self.logged()[-1]
            self.assertEqual(event["type"], "click")
            self.assertEqual(event["target_link_url"], target)
            self.assertEqual(event["target_link_name"], f"link {i}")
            self.assertEqual(event["accept_language"], "fr-CH, fr;q=0.9")
            self.assertEqual(event["user_agent"], UA)
            self.assertEqual(event["ip_address"], "127.0.0.1")
            self.assertEqual(event["rcpt_meta"], {"user": "42", "plan": "gold"})
            self.assertEqual(event["rcpt_to"], "someone@example.com")
        self.assertEqual(len(self.logged()), len(targets))

    @defer.inlineCallbacks
    def test_sublink_and_missing_headers(self) -> defer.Generator:
        r = yield self.get(self.click_path("spring sale/hero", metadata=None))
        self.assertEqual(r.status, 302)
        [event] = self.logged()
        self.assertNotIn("rcpt_meta", event)  # the link carried no metadata
        self.assertEqual((event["user_agent"], event["accept_language"]), ("", ""))

    @defer.inlineCallbacks
    def test_unsubscribe_link(self) -> defer.Generator:
        r = yield self.get(self.click_path(unsubscribe=True))
        self.assertEqual(r.status, 302)
        click, unsubscribe = self.logged()
        self.assertEqual((click["type"], unsubscribe["type"]), ("click", "link_unsubscribe"))
        self.assertEqual(unsubscribe["target_link_url"], click["target_link_url"])
        self.assertEqual(unsubscribe["message_id"], click["message_id"])
        self.assertNotEqual(unsubscribe["event_id"], click["event_id"])

    @defer.inlineCallbacks
    def test_head_answers_like_get_without_an_event(self) -> defer.Generator:
        pixel = yield self.get(self.open_path(), "HEAD")
        self.assertEqual(pixel.status, 200)
        self.assertEqual(pixel.body, b"")
        self.assertEqual(pixel.header(b"content-length"), b"43")
        self.assertEqual(pixel.header(b"content-type"), b"image/gif")
        self.assertEqual(pixel.header(b"cache-control"), b"no-store")
        click = yield self.get(self.click_path(unsubscribe=True), "HEAD")
        self.assertEqual(click.status, 302)
        self.assertEqual(click.header(b"location"), b"https://shop.example/p?a=1&b=%2F#top")
        self.assertEqual(click.header(b"x-robots-tag"), b"noindex")
        self.assertEqual(click.body, b"")
        bad = yield self.get("/q/AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "HEAD")
        self.assertEqual((bad.status, bad.body), (404, b""))
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_other_methods_not_allowed(self) -> defer.Generator:
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "BREW"):
            for path in (self.open_path(), self.click_path(), "/robots.txt"):
                r = yield self.get(path, method)
                self.assertEqual(r.status, 405, (method, path))
                self.assertEqual(r.header(b"allow"), b"GET, HEAD")
                self.assertIsNone(r.header(b"location"))
        self.assertEqual(self.logged(), [])

    def bad_tokens(self) -> list[tuple[str, str]]:
        """(what, token) for tokens that must never be honoured, each for /f/ and /q/."""
        out = []
        for kind in ("click", "open"):
            token = CODEC.encode(link(kind))
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            tampered = bytearray(raw)
            tampered[len(raw) // 2] ^= 0x20
            b64 = lambda b: base64.urlsafe_b64encode(bytes(b)).decode().rstrip("=")  # noqa: E731
            out += [
                (f"{kind} truncated by one", token[:-1]),
                (f"{kind} truncated by half", token[: len(token) // 2]),
                (f"{kind} altered byte", b64(tampered)),
                (f"{kind} altered character", token[:10] + ("A" if token[10] != "A" else "B") + token[11:]),
                (f"{kind} unknown key id", LinkCodec(Keyring(((9, b"s" * 32),))).encode(link(kind))),
                (f"{kind} known id, wrong key", LinkCodec(Keyring(((3, b"x" * 32),))).encode(link(kind))),
                (f"{kind} key id relabelled", b64(raw[:1] + b"\x02" + raw[2:])),
                (f"{kind} forged", b64(os.urandom(len(raw)))),
            ]
        token = CODEC.encode(link())
        out += [("empty", ""), ("not base64", "!!!!!!!!!!!!!!!!"), ("long", "A" * 9000),
                ("non-ASCII", "%C3%A9" * 12), ("NUL inside", token[:20] + "%00" + token[20:]),
                ("CRLF inside", token[:20] + "%0D%0A" + token[20:])]
        return out

    @defer.inlineCallbacks
    def test_bad_tokens_are_not_found(self) -> defer.Generator:
        for what, token in self.bad_tokens():
            for path in (f"/f/a/{token}", f"/q/{token}"):
                r = yield self.get(path)
                self.assertEqual(r.status, 404, (what, path))
                self.assertIsNone(r.header(b"location"), what)
        # Authentic tokens on the wrong path, or with targets that must not be followed.
        wrong = [f"/q/{CODEC.encode(link('click'))}", f"/f/a/{CODEC.encode(link('open'))}",
                 f"/f/a/{CODEC.encode(link('initial_open'))}"]
        for target in ("https://a.example/\r\nSet-Cookie: x=1", "https://a.example/b c",
                       "javascript:alert(1)", "//a.example/", "ftp://a.example/", "data:text/html,x",
                       "https://a.example/\x00", ""):
            wrong.append(self.click_path(target=target))
        for path in wrong:
            r = yield self.get(path)
            self.assertEqual(r.status, 404, path)
            self.assertIsNone(r.header(b"location"), path)
            self.assertNotIn(b"Set-Cookie", r.body)
            self.assertNotIn(b"set-cookie", r.headers)
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_expired_link_still_served_without_an_event(self) -> defer.Generator:
        self.now = float(EXPIRY)
        pixel = yield self.get(self.open_path())
        self.assertEqual((pixel.status, pixel.body), (200, PIXEL))
        click = yield self.get(self.click_path())
        self.assertEqual(click.status, 302)
        self.assertEqual(click.header(b"location"), b"https://shop.example/p?a=1&b=%2F#top")
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_percent_encoded_path(self) -> defer.Generator:
        token = CODEC.encode(link())
        padded = token + "~" * (-len(token) % 4)
        encoded = "".join(f"%{ord(c):02X}" for c in padded)
        for path in (f"/f/a/{encoded}", f"/%66/%61/{encoded}", f"/f/spring%20sale/{token}",
                     f"/f/a/{padded}", f"/f/a/{token}?utm_source=forwarded&x=%0D%0A"):
            r = yield self.get(path)
            self.assertEqual(r.status, 302, path)
            self.assertEqual(r.header(b"location"), b"https://shop.example/p?a=1&b=%2F#top")
        open_token = CODEC.encode(link("open"))
        r = yield self.get("/q/" + "".join(f"%{ord(c):02x}" for c in open_token))
        self.assertEqual((r.status, r.body), (200, PIXEL))
        self.assertEqual([e["type"] for e in self.logged()], ["click"] * 5 + ["open"])

    @defer.inlineCallbacks
    def test_robots_and_other_paths(self) -> defer.Generator:
        r = yield self.get("/robots.txt")
        self.assertEqual((r.status, r.body), (200, b"User-agent: *\nDisallow: /\n"))
        token = CODEC.encode(link())
        for path in ("/", "/q", "/q/", "/f", "/f/", f"/f/{token}", f"/f//{token}", f"/f/a/{token}/",
                     f"/f/a/b/{token}", f"/q/{CODEC.encode(link('open'))}/x", "/favicon.ico",
                     f"/x/a/{token}", "/robots.txt/x"):
            r = yield self.get(path)
            self.assertEqual(r.status, 404, path)
            self.assertIsNone(r.header(b"location"))
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_client_address_behind_trusted_proxy(self) -> defer.Generator:
        # The peer, 127.0.0.1, is a trusted proxy here.
        yield self.get(self.open_path(), **{"X-Forwarded-For": "203.0.113.66, 198.51.100.7, 10.1.2.3"})
        yield self.get(self.click_path(), **{"X-Forwarded-For": "[2001:db8::7]:1234"})
        self.assertEqual([e["ip_address"] for e in self.logged()], ["198.51.100.7", "2001:db8::7"])

    @defer.inlineCallbacks
    def test_event_write_failure_still_redirects(self) -> defer.Generator:
        self.events.close()  # every write now fails
        click = yield self.get(self.click_path(unsubscribe=True))
        self.assertEqual(click.status, 302)
        self.assertEqual(click.header(b"location"), b"https://shop.example/p?a=1&b=%2F#top")
        pixel = yield self.get(self.open_path())
        self.assertEqual((pixel.status, pixel.body), (200, PIXEL))
        # Each failure was logged (trial fails a test whose logged errors are not flushed).
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.events.open()
        yield self.get(self.open_path())
        self.assertEqual([e["type"] for e in self.logged()], ["open"])

    @defer.inlineCallbacks
    def test_no_access_log(self) -> defer.Generator:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        token = CODEC.encode(link())
        yield self.get(f"/f/a/{token}", **{"User-Agent": UA})
        yield self.get(self.open_path(), "HEAD")
        yield self.get("/nothing-here")
        yield self.get(self.open_path(), "POST")
        self.assertEqual(len(self.logged()), 1)
        self.assertEqual(seen, [])


class UntrustedPeerTests(TrackerHTTPTests):
    """The same site with no trusted proxies: X-Forwarded-For is ignored."""

    trusted = ()

    @defer.inlineCallbacks
    def test_client_address_behind_trusted_proxy(self) -> defer.Generator:
        yield self.get(self.open_path(), **{"X-Forwarded-For": "198.51.100.7"})
        yield self.get(self.click_path(), **{"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual([e["ip_address"] for e in self.logged()], ["127.0.0.1", "127.0.0.1"])


def http6(port: int, path: str, forwarded_for: str) -> Response:
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"X-Forwarded-For: {forwarded_for}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return Response(int(data.split()[1]), {}, data.partition(b"\r\n\r\n")[2])


class FirstFormatLinkTests(unittest.TestCase):
    """Links sent before tokens were encrypted (signed only) are served until they expire."""

    def setUp(self) -> None:
        with open(os.path.join(os.path.dirname(__file__), "fixtures", "tokens-e46094d", "tokens.json"),
                  encoding="utf-8") as f:
            fixture = json.load(f)
        key = base64.urlsafe_b64decode(fixture["key"] + "=" * (-len(fixture["key"]) % 4))
        # The keys were rotated since: a new key makes new links, the old one still reads its links.
        codec = LinkCodec(Keyring(((9, b"n" * 32), (fixture["key_id"], key))))
        self.tokens = {t["what"]: t for t in fixture["tokens"]}
        self.now = 1_900_000_000.0
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.events = EventLog(self.path, "node-t", fsync_interval=0, clock=Clock(), now=lambda: self.now)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        site = make_site(codec, self.events, now=lambda: self.now, reactor=reactor)
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)

    def logged(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_served_until_they_expire(self) -> defer.Generator:
        port = self.listening.getHost().port
        click = yield in_thread(http, port, "GET", f"/f/a/{self.tokens['click']['token']}")
        self.assertEqual(click.status, 302)
        self.assertEqual(click.header(b"location"),
                         b"https://shop.example/products/42?utm_source=mail&c=%20#reviews")
        pixel = yield in_thread(http, port, "GET", f"/q/{self.tokens['open']['token']}")
        self.assertEqual((pixel.status, pixel.body), (200, PIXEL))
        expired = yield in_thread(http, port, "GET", f"/f/a/{self.tokens['click, expired']['token']}")
        self.assertEqual(expired.status, 302)  # served, as any expired link is, but counted no more
        events = self.logged()
        self.assertEqual([e["type"] for e in events], ["click", "open"])
        self.assertEqual((events[0]["raw_rcpt_to"], events[0]["campaign_id"], events[0]["rcpt_meta"]),
                         ("Someone@Example.com", "Spring sale", {"user": "42", "plan": "gold"}))
        self.assertNotIn("target_link_anchor", events[0])
        self.now = 2_000_000_000.0  # when the first-format links of the fixture expire
        again = yield in_thread(http, port, "GET", f"/f/a/{self.tokens['click']['token']}")
        self.assertEqual(again.status, 302)
        self.assertEqual(len(self.logged()), 2)


class IPv6Tests(unittest.TestCase):
    """A tracker on ::1: the peer is an IPv6 address, and may be a trusted proxy."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.events = EventLog(self.path, "node-t", fsync_interval=0, clock=Clock())
        self.events.startService()
        self.addCleanup(self.events.stopService)

    def listen(self, trusted: tuple[Any, ...]) -> int:
        site = make_site(CODEC, self.events, trusted, now=lambda: NOW, reactor=reactor)
        try:
            port = reactor.listenTCP(0, site, interface="::1")
        except Exception as e:  # pragma: no cover - hosts without IPv6
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_ipv6_peer(self) -> defer.Generator:
        token = CODEC.encode(link("open"))
        plain = self.listen(())
        behind = self.listen(nets("::1/128"))
        r = yield in_thread(http6, plain, f"/q/{token}", "198.51.100.7")
        self.assertEqual((r.status, r.body), (200, PIXEL))
        r = yield in_thread(http6, behind, f"/q/{token}", "2001:db8::5")
        self.assertEqual(r.status, 200)
        with open(self.path, "rb") as f:
            self.assertEqual([json.loads(line)["ip_address"] for line in f], ["::1", "2001:db8::5"])


class ApplianceTrackerTests(SynchronousTestCase):
    """The tracker as the appliance wires it: its keys, its event log, its configuration."""

    def setUp(self) -> None:
        self.running = MemoryAppliance(self.mktemp(), tracker={"trusted_proxies": ["127.0.0.1/32"]})
        self.running.start()
        self.addCleanup(self.running.stop)

    def test_links_minted_by_the_appliance(self) -> None:
        codec = self.running.appliance.links
        expiry = int(time.time()) + 3600
        click = link()._replace(expiry=expiry)
        status, headers, _ = self.running.get(f"/f/a/{codec.encode(click)}",
                                              {"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual(status, 302)
        self.assertEqual(headers["location"], "https://shop.example/p?a=1&b=%2F#top")
        status, _, _ = self.running.get(f"/q/{codec.encode(link('open')._replace(expiry=expiry))}")
        self.assertEqual(status, 200)
        # A link signed with keys this appliance does not hold.
        status, _, _ = self.running.get(f"/f/a/{CODEC.encode(click)}")
        self.assertEqual(status, 404)
        events = self.running.events()
        self.assertEqual([e["type"] for e in events], ["click", "open"])
        self.assertEqual([e["ip_address"] for e in events], ["198.51.100.7", "127.0.0.1"])
        self.assertEqual({e["node_name"] for e in events}, {"appliance1"})
