"""Who opened and clicked: parsed user agents, the machine rules, prefetch networks, geo_ip."""

from __future__ import annotations

import json
import os
import quopri
import time
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet
from twisted.internet import defer, reactor, utils
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from appliance.build import build
from appliance.config import ConfigError, parse_config
from appliance.engagement import Engagement, user_agent_parsed
from appliance.engagement.agents import agent_of, make_parser, parse_agent
from appliance.engagement.classify import (
    HEAD_WINDOW,
    RecentHeads,
    Verdict,
    classify_click,
    classify_open,
)
from appliance.engagement.geo import GeoDatabaseError, GeoIP, open_geoip
from appliance.engagement.networks import EMPTY, NetworksFileError, parse_networks, read_networks
from appliance.events import EventLog
from appliance.links import LinkCodec, click_url, open_url, read_keyring
from appliance.tracker import make_site
from tests.helpers import base_toml, in_thread, make_config, merge
from tests.memory import MemoryAppliance
from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS
from tests.test_tracker import CODEC, NOW, http, link, nets
from tests.test_tracking import TOKEN, TRACK_ALL, message, send

# Real user agents, as the tracker sees them.
APPLE_PREFETCH = "Mozilla/5.0"
APPLE_MAIL_MAC = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
APPLE_MAIL_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                     "(KHTML, like Gecko) Mobile/15E148")
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17531; Pro)"
THUNDERBIRD = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.12.2"
CHROME_WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/126.0.0.0 Safari/537.36")
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/125.0.6422.165 Mobile Safari/537.36")
SAFARI_IPAD = ("Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
               "Version/17.5 Mobile/15E148 Safari/604.1")
BING_PREVIEW = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                "BingPreview/1.0b")
OFFICE_DISCOVERY = "Microsoft Office Existence Discovery"
OFFICE_FETCH = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HEADLESS = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 "
            "Safari/537.36")
PYTHON = "python-requests/2.31.0"

# An excerpt in the form of Apple's egress-ip-ranges.csv (RFC 8805), with documentation prefixes.
RELAY = parse_networks(
    "# prefix,country,region,city,postal\n"
    "172.224.224.0/27,US,US-CA,Los Angeles,\n"
    "2a02:26f7:b3c0:4000::/64,DE,DE-BE,Berlin,\n")
IN_RELAY, IN_RELAY6, OUTSIDE = "172.224.224.17", "2a02:26f7:b3c0:4000::9", "198.51.100.7"


class OpenRulesTests(SynchronousTestCase):
    """(user agent, address, is_proxy, is_prefetched) for opens."""

    TABLE = [
        # Mail Privacy Protection's prefetch: the bare agent, from the relay's networks.
        (APPLE_PREFETCH, IN_RELAY, True, True),
        (APPLE_PREFETCH, IN_RELAY6, True, True),
        (APPLE_PREFETCH + " ", "::ffff:" + IN_RELAY, True, True),
        # The bare agent elsewhere, or a full agent from the relay: not Apple's prefetch.
        (APPLE_PREFETCH, OUTSIDE, False, False),
        (APPLE_MAIL_MAC, IN_RELAY, False, False),
        (APPLE_MAIL_IPHONE, IN_RELAY6, False, False),
        # Image proxies fetch when the message is shown: a proxy, not a prefetch.
        (GMAIL_PROXY, "66.249.84.1", True, False),
        (YAHOO_PROXY, "74.6.0.1", True, False),
        # Readers' own clients.
        (APPLE_MAIL_MAC, OUTSIDE, False, False),
        (OUTLOOK_DESKTOP, OUTSIDE, False, False),
        (THUNDERBIRD, OUTSIDE, False, False),
        (CHROME_ANDROID, OUTSIDE, False, False),
        ("", OUTSIDE, False, False),
    ]

    def test_table(self) -> None:
        for agent, address, proxy, prefetched in self.TABLE:
            self.assertEqual(classify_open(agent, address, RELAY), Verdict(proxy, prefetched),
                             (agent, address))

    def test_without_networks_no_open_is_a_prefetch(self) -> None:
        self.assertEqual(classify_open(APPLE_PREFETCH, IN_RELAY, EMPTY), Verdict(False, False))


class ClickRulesTests(SynchronousTestCase):
    """(user agent, is_prefetched) for clicks on their own, then each other rule."""

    TABLE = [
        (CHROME_WINDOWS, False),
        (CHROME_ANDROID, False),
        (SAFARI_IPAD, False),
        (APPLE_MAIL_MAC, False),
        (THUNDERBIRD, False),
        (BING_PREVIEW, True),
        (OFFICE_DISCOVERY, True),
        (OFFICE_FETCH, True),
        (GOOGLEBOT, True),
        (HEADLESS, True),
        (PYTHON, True),
        (YAHOO_PROXY, True),
        ("curl/8.5.0", True),
    ]

    def test_table(self) -> None:
        for agent, prefetched in self.TABLE:
            self.assertEqual(classify_click(agent).is_prefetched, prefetched, agent)

    def test_soon_after_sending(self) -> None:
        sent = 1_700_000_000
        for after, prefetched in ((0, True), (3, True), (9.9, True), (10, False), (3600, False)):
            verdict = classify_click(CHROME_WINDOWS, issued=sent, now=sent + after, prefetch_seconds=10)
            self.assertEqual(verdict.is_prefetched, prefetched, after)
        # Off, or a link made before tokens carried the send time.
        self.assertFalse(classify_click(CHROME_WINDOWS, issued=sent, now=sent + 1).is_prefetched)
        self.assertFalse(classify_click(CHROME_WINDOWS, issued=0, now=sent, prefetch_seconds=10)
                         .is_prefetched)

    def test_after_a_head_and_the_trap(self) -> None:
        self.assertTrue(classify_click(CHROME_WINDOWS, after_head=True).is_prefetched)
        self.assertTrue(classify_click(CHROME_WINDOWS, trap=True).is_prefetched)


class RecentHeadsTests(SynchronousTestCase):
    def test_same_address_and_link_within_the_window(self) -> None:
        heads = RecentHeads()
        heads.note("192.0.2.1", b"tok", 100.0)
        self.assertTrue(heads.after_head("192.0.2.1", b"tok", 100.0 + HEAD_WINDOW))
        self.assertFalse(heads.after_head("192.0.2.1", b"tok", 100.1 + HEAD_WINDOW))
        self.assertFalse(heads.after_head("192.0.2.2", b"tok", 101.0))
        self.assertFalse(heads.after_head("192.0.2.1", b"other", 101.0))

    def test_bounded(self) -> None:
        heads = RecentHeads(limit=3)
        for n in range(5):
            heads.note("192.0.2.1", b"%d" % n, 100.0)
        self.assertEqual([heads.after_head("192.0.2.1", b"%d" % n, 100.0) for n in range(5)],
                         [False, False, True, True, True])
        heads.note("192.0.2.1", b"2", 101.0)  # noted again: the newest now
        heads.note("192.0.2.1", b"5", 101.0)
        self.assertTrue(heads.after_head("192.0.2.1", b"2", 101.0))
        self.assertFalse(heads.after_head("192.0.2.1", b"3", 101.0))


class ParsedTests(SynchronousTestCase):
    def test_sparkpost_fields_and_types(self) -> None:
        parsed = user_agent_parsed(APPLE_MAIL_IPHONE, Verdict(False, False))
        self.assertEqual(parsed, {
            "agent_family": "Mobile Safari UI/WKWebView", "device_brand": "Apple",
            "device_family": "iPhone", "os_family": "iOS", "os_version": "17.5", "is_mobile": True,
            "is_proxy": False, "is_prefetched": False})
        self.assertEqual(list(parsed), ["agent_family", "device_brand", "device_family", "os_family",
                                        "os_version", "is_mobile", "is_proxy", "is_prefetched"])
        for agent in (APPLE_MAIL_MAC, GMAIL_PROXY, CHROME_ANDROID, "", "\x00\xff" * 300, APPLE_PREFETCH):
            parsed = user_agent_parsed(agent, Verdict(True, True))
            self.assertEqual({k: type(v) for k, v in parsed.items()}, {
                "agent_family": str, "device_brand": str, "device_family": str, "os_family": str,
                "os_version": str, "is_mobile": bool, "is_proxy": bool, "is_prefetched": bool}, agent)

    def test_values(self) -> None:
        mac = parse_agent(APPLE_MAIL_MAC)
        self.assertEqual((mac.agent_family, mac.os_family, mac.os_version, mac.device_brand, mac.is_mobile),
                         ("Apple Mail", "Mac OS X", "10.15.7", "Apple", False))
        android = parse_agent(CHROME_ANDROID)
        self.assertEqual((android.agent_family, android.os_family, android.os_version,
                          android.device_brand, android.is_mobile),
                         ("Chrome Mobile", "Android", "14", "Samsung", True))
        unknown = parse_agent("")
        self.assertEqual((unknown.agent_family, unknown.device_family, unknown.os_family,
                          unknown.os_version, unknown.device_brand), ("Other", "Other", "Other", "", ""))

    def test_the_basic_resolver_agrees(self) -> None:
        """Where ua-parser-rs does not install, the pure-Python resolver gives the same fields."""
        basic = make_parser(native=False)
        for agent in (APPLE_MAIL_MAC, APPLE_MAIL_IPHONE, GMAIL_PROXY, YAHOO_PROXY, OUTLOOK_DESKTOP,
                      CHROME_ANDROID, BING_PREVIEW, GOOGLEBOT, APPLE_PREFETCH, ""):
            self.assertEqual(agent_of(basic, agent), parse_agent(agent), agent)

    def test_cached(self) -> None:
        parse_agent.cache_clear()
        first = parse_agent(CHROME_WINDOWS)
        self.assertIs(parse_agent(CHROME_WINDOWS), first)
        self.assertEqual(parse_agent.cache_info().hits, 1)


class NetworksTests(SynchronousTestCase):
    def test_rfc8805_lines(self) -> None:
        nets = parse_networks(
            "\ufeff# Apple's format: prefix,country,region,city,postal\n"
            "\n"
            "172.224.224.0/27,US,US-CA,Los Angeles,\n"
            "172.224.224.32/27,US,US-CA,Los Angeles,\n"  # adjacent: merged
            "104.28.0.1/24,GB,GB-ENG,London,\n"  # host bits are ignored
            "  2a02:26f7:b3c0:4000::/64 ,DE,DE-BE,Berlin,10115\n"
            "192.0.2.9\n")  # a bare address is a /32
        self.assertEqual(nets.count, 5)
        for inside in ("172.224.224.0", "172.224.224.63", "104.28.0.255", "2a02:26f7:b3c0:4000:ffff::1",
                       "192.0.2.9", "::ffff:172.224.224.40"):
            self.assertIn(inside, nets)
        for outside in ("172.224.224.64", "172.224.223.255", "104.28.1.0", "2a02:26f7:b3c0:4001::",
                        "192.0.2.8", "", "not an address", "::1", "172.224.224.0/27"):
            self.assertNotIn(outside, nets)
        self.assertEqual(len(nets.v4.starts), 3)

    def test_a_bad_line_is_named(self) -> None:
        for bad, number in (("172.224.224.0/27,US\nhello,US\n", 2), ("\n\n10.0.0.0/33\n", 3),
                            ("<html>\n", 1), ("2a02::/129\n", 1), ("10.0.0/8\n", 1)):
            e = self.assertRaises(NetworksFileError, parse_networks, bad, "relay.csv")
            self.assertIn(f"relay.csv, line {number}: expected an IP prefix", str(e))

    def test_read(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(NetworksFileError, read_networks, path)
        self.assertIn("no such file", str(e))
        with open(path, "w") as f:
            f.write("172.224.224.0/27,US,US-CA,Los Angeles,\n")
        self.assertIn(IN_RELAY, read_networks(path))


def write_geo_database(path: str) -> None:
    """A small GeoIP2-City-like database: a US network with every field, a GB one with few."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City")
    writer.insert_network(IPSet(["198.51.100.0/24"]), {
        "continent": {"code": "NA"}, "country": {"iso_code": "US", "names": {"en": "United States"}},
        "subdivisions": [{"iso_code": "MD", "names": {"en": "Maryland"}}],
        "city": {"names": {"en": "Columbia", "de": "Columbia"}},
        "location": {"latitude": 39.1749, "longitude": -76.8375, "time_zone": "America/New_York"},
        "postal": {"code": "21046"}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {
        "country": {"iso_code": "GB"}, "postal": {"code": "SW1A"}})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"postal": {"code": "02134"}})
    writer.to_db_file(path)


class GeoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        write_geo_database(self.path)
        self.geo = open_geoip(self.path)
        self.addCleanup(self.geo.close)

    def test_sparkpost_fields_and_types(self) -> None:
        self.assertEqual(self.geo.lookup("198.51.100.7"), {
            "country": "US", "region": "MD", "city": "Columbia", "latitude": 39.1749,
            "longitude": -76.8375, "zip": 21046, "postal_code": "21046"})
        # Only what the database knows; zip only for a numeric postal code.
        self.assertEqual(self.geo.lookup("2001:db8::1"), {"country": "GB", "postal_code": "SW1A"})
        self.assertEqual(self.geo.lookup("203.0.113.9"), {"zip": 2134, "postal_code": "02134"})
        self.assertIsNone(self.geo.lookup("192.0.2.1"))
        self.assertIsNone(self.geo.lookup("not an address"))

    def test_bad_files(self) -> None:
        e = self.assertRaises(GeoDatabaseError, open_geoip, self.mktemp())
        self.assertIn("no such file", str(e))
        junk = self.mktemp()
        with open(junk, "wb") as f:
            f.write(b"this is not a MaxMind database\n" * 100)
        e = self.assertRaises(GeoDatabaseError, open_geoip, junk)
        self.assertIn("not a readable MaxMind database", str(e))


class EngagementTests(SynchronousTestCase):
    def test_fields_for_an_open_and_a_click(self) -> None:
        path = self.mktemp()
        write_geo_database(path)
        geo = open_geoip(path)
        self.addCleanup(geo.close)
        engagement = Engagement(RELAY, geo, click_prefetch_seconds=10)
        prefetch = engagement.open_fields(APPLE_PREFETCH, IN_RELAY)
        self.assertEqual(prefetch["user_agent_parsed"]["is_prefetched"], True)
        self.assertNotIn("geo_ip", prefetch)  # the database does not know the relay's address
        reader = engagement.open_fields(APPLE_MAIL_MAC, "198.51.100.7")
        self.assertEqual(reader["user_agent_parsed"]["is_prefetched"], False)
        self.assertEqual(reader["geo_ip"]["city"], "Columbia")
        engagement.head("198.51.100.7", b"tok", 50.0)
        click = engagement.click_fields(CHROME_WINDOWS, "198.51.100.7", b"tok", issued=0, trap=False,
                                        now=60.0)
        self.assertTrue(click["user_agent_parsed"]["is_prefetched"])
        other = engagement.click_fields(CHROME_WINDOWS, "198.51.100.7", b"other", issued=0, trap=False,
                                        now=60.0)
        self.assertFalse(other["user_agent_parsed"]["is_prefetched"])
        self.assertEqual(other["geo_ip"]["country"], "US")

    def test_the_cached_geo_is_not_shared_with_the_event(self) -> None:
        class Reader:
            def get(self, address: str) -> dict[str, Any]:
                return {"country": {"iso_code": "US"}}

        engagement = Engagement(geoip=GeoIP(Reader()))
        first = engagement.open_fields("", "192.0.2.1")
        first["geo_ip"]["country"] = "changed"
        self.assertEqual(engagement.open_fields("", "192.0.2.1")["geo_ip"], {"country": "US"})


class ConfigTests(SynchronousTestCase):
    def test_defaults_and_settings(self) -> None:
        c = parse_config(base_toml()).engagement_tracker
        self.assertEqual((c.prefetch_networks_file, c.geoip_database, c.click_prefetch_seconds),
                         ("", "", 10.0))
        c = parse_config(merge(base_toml(), {"engagement_tracker": {
            "prefetch_networks_file": "relay.csv", "geoip_database": "/x/City.mmdb",
            "click_prefetch_seconds": "0s"}})).engagement_tracker
        self.assertEqual((c.prefetch_networks_file, c.geoip_database, c.click_prefetch_seconds),
                         (os.path.abspath("relay.csv"), "/x/City.mmdb", 0.0))

    def test_bad_values_named(self) -> None:
        for key, value in (("click_prefetch_seconds", "-5s"), ("click_prefetch_seconds", "soon"),
                           ("prefetch_networks_file", 5), ("geoip_database", ["a"])):
            data = merge(base_toml(), {"engagement_tracker": {key: value}})
            e = self.assertRaises(ConfigError, parse_config, data)
            self.assertEqual([p for p, _ in e.problems], [f"engagement_tracker.{key}"], (key, value))

    def test_missing_or_unreadable_files_stop_the_start(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        junk = os.path.join(directory, "junk.mmdb")
        with open(junk, "w") as f:
            f.write("not a database")
        bad_csv = os.path.join(directory, "relay.csv")
        with open(bad_csv, "w") as f:
            f.write("172.224.224.0/27,US\n<!doctype html>\n")
        config = make_config(directory, engagement_tracker={
            "prefetch_networks_file": bad_csv, "geoip_database": junk})
        e = self.assertRaises(ConfigError, build, config)
        problems = dict(e.problems)
        self.assertEqual(sorted(problems), ["engagement_tracker.geoip_database",
                                            "engagement_tracker.prefetch_networks_file"])
        self.assertIn("line 2", problems["engagement_tracker.prefetch_networks_file"])
        self.assertIn("not a readable MaxMind database", problems["engagement_tracker.geoip_database"])
        # Nothing was half-done: the link keys, prepared last, were not created.
        self.assertFalse(os.path.exists(config.links.keys_file))
        missing = make_config(directory, engagement_tracker={
            "geoip_database": os.path.join(directory, "none.mmdb")})
        e = self.assertRaises(ConfigError, build, missing)
        self.assertIn("no such file", dict(e.problems)["engagement_tracker.geoip_database"])

    def test_built(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        db, csv = os.path.join(directory, "City.mmdb"), os.path.join(directory, "relay.csv")
        write_geo_database(db)
        with open(csv, "w") as f:
            f.write("172.224.224.0/27,US,US-CA,Los Angeles,\n")
        parts = build(make_config(directory, engagement_tracker={
            "prefetch_networks_file": csv, "geoip_database": db}))
        self.assertIn(IN_RELAY, parts.prefetch_networks)
        assert parts.geoip is not None
        self.assertEqual(parts.geoip.lookup("198.51.100.1")["city"], "Columbia")
        parts.geoip.close()


class TrackerTests(unittest.TestCase):
    """The tracker on a loopback port: what its events say of each hit."""

    def setUp(self) -> None:
        self.now = float(NOW)
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.events = EventLog(self.path, "node-t", fsync_interval=0, clock=Clock(), now=lambda: self.now)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        geo = self.mktemp()
        write_geo_database(geo)
        self.geo = open_geoip(geo)
        self.addCleanup(self.geo.close)
        engagement = Engagement(RELAY, self.geo, click_prefetch_seconds=10)
        # The peer, 127.0.0.1, is a trusted proxy: X-Forwarded-For gives each test its client.
        site = make_site(CODEC, self.events, nets("127.0.0.0/8"), now=lambda: self.now, reactor=reactor,
                         engagement=engagement)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def logged(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f]

    def get(self, path: str, client: str, agent: str, method: str = "GET") -> defer.Deferred:
        return in_thread(http, self.port, method, path, {"User-Agent": agent, "X-Forwarded-For": client})

    def open_path(self, **kw: Any) -> str:
        return open_url("http", "x", CODEC.encode(link("open", **kw))).removeprefix("http://x")

    def click_path(self, **kw: Any) -> str:
        return click_url("http", "x", CODEC.encode(link(**kw))).removeprefix("http://x")

    @defer.inlineCallbacks
    def test_opens(self) -> defer.Generator:
        for agent, client in ((APPLE_PREFETCH, IN_RELAY), (APPLE_PREFETCH, "198.51.100.7"),
                              (GMAIL_PROXY, "198.51.100.8"), (APPLE_MAIL_IPHONE, "2001:db8::5")):
            r = yield self.get(self.open_path(), client, agent)
            self.assertEqual(r.status, 200)
        prefetch, bare, gmail, iphone = self.logged()
        self.assertEqual(prefetch["user_agent_parsed"], {
            "agent_family": "Other", "device_brand": "", "device_family": "Other", "os_family": "Other",
            "os_version": "", "is_mobile": False, "is_proxy": True, "is_prefetched": True})
        self.assertNotIn("geo_ip", prefetch)
        self.assertEqual((bare["user_agent_parsed"]["is_prefetched"], bare["geo_ip"]["city"]),
                         (False, "Columbia"))
        self.assertEqual((gmail["user_agent_parsed"]["is_proxy"], gmail["user_agent_parsed"]["is_prefetched"],
                          gmail["user_agent_parsed"]["agent_family"]), (True, False, "GmailImageProxy"))
        self.assertEqual(iphone["user_agent_parsed"]["is_mobile"], True)
        self.assertEqual(iphone["geo_ip"], {"country": "GB", "postal_code": "SW1A"})

    @defer.inlineCallbacks
    def test_clicks(self) -> defer.Generator:
        reader = "198.51.100.7"
        yield self.get(self.click_path(issued=NOW - 3600), reader, CHROME_WINDOWS)  # a reader
        yield self.get(self.click_path(issued=NOW - 3), reader, CHROME_WINDOWS)  # seconds after sending
        yield self.get(self.click_path(), reader, BING_PREVIEW)  # a scanner by its name
        yield self.get(self.click_path(trap=True), reader, CHROME_WINDOWS)  # the hidden link
        # HEAD, then GET of the same link from the same address: a scanner. Not from another.
        checked = self.click_path(link_name="checked")
        head = yield self.get(checked, reader, CHROME_WINDOWS, "HEAD")
        self.assertEqual(head.status, 302)
        yield self.get(checked, "198.51.100.99", CHROME_WINDOWS)
        yield self.get(checked, reader, CHROME_WINDOWS)
        events = self.logged()
        self.assertEqual([e["type"] for e in events], ["click"] * 6)  # every hit is written
        self.assertEqual([e["user_agent_parsed"]["is_prefetched"] for e in events],
                         [False, True, True, True, False, True])
        self.assertEqual({e["geo_ip"]["city"] for e in events}, {"Columbia"})


class ApplianceTests(SynchronousTestCase):
    """As the appliance wires it: copies carry their send time, SIGHUP re-reads the networks."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.relay = os.path.join(directory, "relay.csv")
        with open(self.relay, "w") as f:
            f.write("172.224.224.0/27,US,US-CA,Los Angeles,\n")
        self.running = MemoryAppliance(directory, tracker={"trusted_proxies": ["127.0.0.1/32"]},
                                       engagement_tracker={"prefetch_networks_file": self.relay})
        self.running.start()
        self.addCleanup(self.running.stop)

    def test_a_click_right_after_sending_is_a_scanner(self) -> None:
        before = int(time.time())
        send(self.running, ["a@example.test"], message(TRACK_ALL))
        [copy] = self.running.sink.messages
        codec = LinkCodec(read_keyring(self.running.config.links.keys_file))
        tokens = TOKEN.findall(copy.data.replace(b"=\r\n", b""))
        links = [codec.decode(t) for t in tokens]
        self.assertEqual({d.issued >= before for d in links}, {True})
        self.assertLessEqual(max(d.issued for d in links), int(time.time()))
        click = next(t for t, d in zip(tokens, links, strict=True) if d.kind == "click")
        status, _, _ = self.running.get(f"/f/a/{click.decode()}", {"User-Agent": CHROME_WINDOWS})
        self.assertEqual(status, 302)
        [event] = [e for e in self.running.events() if e["type"] == "click"]
        self.assertTrue(event["user_agent_parsed"]["is_prefetched"])

    def open_prefetched(self, client: str) -> bool:
        codec = self.running.appliance.links
        token = codec.encode(link("open")._replace(expiry=int(time.time()) + 3600))
        status, _, _ = self.running.get(f"/q/{token}", {"User-Agent": APPLE_PREFETCH,
                                                        "X-Forwarded-For": client})
        self.assertEqual(status, 200)
        return bool(self.running.events()[-1]["user_agent_parsed"]["is_prefetched"])

    def test_sighup_rereads_the_networks(self) -> None:
        self.assertTrue(self.open_prefetched(IN_RELAY))
        self.assertFalse(self.open_prefetched("104.28.0.9"))
        with open(self.relay, "w") as f:
            f.write("104.28.0.0/24,GB,GB-ENG,London,\n")
        self.running.appliance.reload_prefetch_networks()
        self.assertFalse(self.open_prefetched(IN_RELAY))
        self.assertTrue(self.open_prefetched("104.28.0.9"))
        # A file that cannot be used keeps the networks in use, and says so.
        with open(self.relay, "w") as f:
            f.write("<html>not the list</html>\n")
        self.running.appliance.reload_prefetch_networks()
        self.assertTrue(self.open_prefetched("104.28.0.9"))
        os.remove(self.relay)
        self.running.appliance.reload_prefetch_networks()
        self.assertTrue(self.open_prefetched("104.28.0.9"))


class TrapLinkTests(SynchronousTestCase):
    """engagement_tracker.bot_trap_link: a hidden link first in each tracked HTML part."""

    def start(self, **changes: Any) -> MemoryAppliance:
        running = MemoryAppliance(self.mktemp(), engagement_tracker={"bot_trap_link": True}, **changes)
        running.start()
        self.addCleanup(running.stop)
        return running

    def test_the_trap_is_hidden_and_counts_a_machine(self) -> None:
        running = self.start()
        send(running, ["a@example.test"], message(TRACK_ALL))
        [copy] = running.sink.messages
        data = copy.data.replace(b"=\r\n", b"").replace(b"=3D", b"=")
        html = data[data.index(b"text/html"):]
        body = html.index(b"<body>") + len(b"<body>")
        # First in the body, before the initial pixel; hidden from readers and screen readers.
        self.assertTrue(html[body:].startswith(
            b'<div style="display:none !important;max-height:0;overflow:hidden;mso-hide:all" '
            b'aria-hidden="true"><a href="http://track.test:8080/f/a/'), html[body:body + 200])
        self.assertIn(b'" tabindex="-1"></a></div><div style="display:none', html)
        codec = LinkCodec(read_keyring(running.config.links.keys_file))
        tokens = TOKEN.findall(data)
        links = [codec.decode(t) for t in tokens]
        [trap] = [d for d in links if d.trap]
        self.assertEqual((trap.kind, trap.link_name, trap.target), ("click", "trap",
                                                                   "https://shop.example/p?id=1&x=2#top"))
        # Not in the text part, and every other link is as it was.
        text = data[data.index(b"text/plain"):data.index(b"text/html")]
        self.assertNotIn(b"aria-hidden", text)
        self.assertEqual(sorted(d.kind for d in links), ["click", "click", "click", "initial_open", "open"])
        token = tokens[[d.trap for d in links].index(True)].decode()
        status, headers, _ = running.get(f"/f/a/{token}", {"User-Agent": CHROME_WINDOWS})
        self.assertEqual((status, headers["location"]), (302, "https://shop.example/p?id=1&x=2#top"))
        [event] = [e for e in running.events() if e["type"] == "click"]
        self.assertEqual((event["target_link_name"], event["user_agent_parsed"]["is_prefetched"]),
                         ("trap", True))

    def test_no_trap_without_tracked_links(self) -> None:
        running = self.start()
        opens_only = json.dumps({"options": {"open_tracking": True, "click_tracking": False}})
        send(running, ["a@example.test"], message(opens_only))
        no_links = message(TRACK_ALL, html=b"<html><body><p>Hello</p></body></html>\r\n")
        send(running, ["a@example.test"], no_links)
        for copy in running.sink.messages:
            self.assertNotIn(b"aria-hidden", copy.data)
            self.assertIn(b"/q/", copy.data.replace(b"=\r\n", b""))  # the pixels are there


# Reports, into the page, what a reader's browser shows of the trap link and of the rest.
SHOWN = """<script>
addEventListener("load", () => {
  const trap = document.querySelector('a[tabindex="-1"]');
  const box = trap.getBoundingClientRect();
  const out = document.createElement("pre");
  out.id = "shown";
  out.textContent = JSON.stringify({trap: [box.width, box.height, trap.checkVisibility()],
                                    hidden: trap.closest("[aria-hidden=true]") !== null,
                                    text: document.body.innerText.trim(), links: document.links.length});
  document.documentElement.append(out);
});
</script>"""


class TrapInBrowserTests(unittest.TestCase):
    """Headless Chromium shows a reader nothing of the trap link."""

    if CHROMIUM is None:
        skip = "chromium is not installed (Debian: apt-get install chromium)"

    @defer.inlineCallbacks
    def test_nothing_shows(self) -> defer.Generator:
        running = MemoryAppliance(self.mktemp(), engagement_tracker={"bot_trap_link": True})
        running.start()
        self.addCleanup(running.stop)
        send(running, ["a@example.test"], message(TRACK_ALL))
        [copy] = running.sink.messages
        data = quopri.decodestring(copy.data)
        page = data[data.index(b"<html>"):data.index(b"</html>")] + SHOWN.encode() + b"</html>"
        path = os.path.abspath(self.mktemp() + ".html")
        with open(path, "wb") as f:
            f.write(page)
        profile = self.mktemp()
        out, _, code = yield utils.getProcessOutputAndValue(
            "timeout", ("60", CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        "--virtual-time-budget=5000", "--dump-dom", f"file://{path}"), env=dict(os.environ))
        self.assertEqual(code, 0)
        shown = json.loads(out[out.index(b'<pre id="shown">') + 16:out.index(b"</pre>")].decode())
        self.assertEqual(shown, {"trap": [0, 0, False], "hidden": True, "text": "Hello\n\nbuy mail",
                                 "links": 3})
