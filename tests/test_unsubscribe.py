"""
One-click unsubscribe (RFC 8058): the settings that decide it, the header fields each copy
gets, their DKIM signature, and the tracker's ``/u/`` route from a real HTTP client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import urllib.error
import urllib.request
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError, EngagementTrackerConfig, SmtpapiConfig, parse_config
from appliance.dkim import Signer, SigningKey, verify
from appliance.events import EventLog
from appliance.headers import read_header
from appliance.links import InvalidToken, Keyring, LinkCodec
from appliance.rewrite.unsubscribe import MAX_LINE, add_list_unsubscribe, list_unsubscribe_fields
from appliance.settings import ContextSettings, MsysApi, Tracking, parse_context, parse_msys_api, resolve
from appliance.tracker import make_site
from appliance.tracker.limits import MAX_BODY_BYTES
from appliance.tracker.unsubscribe import is_one_click
from tests.helpers import base_toml, in_thread, merge
from tests.test_dkim import lookup_in, record_of
from tests.test_tracker import link as tracker_link

CODEC = LinkCodec(Keyring(((4, b"u" * 32),)))
NOW = 1_700_000_000
ON = Tracking(list_unsubscribe=True, tracking_domain="track.example", expiry=NOW + 86400,
              campaign_id="spring", tags=("news",), metadata={"plan": "gold"})
NO_HEADER, NO_CONTEXT = MsysApi(), ContextSettings()
MESSAGE = (b"Received: from x\r\nFrom: Shop <news@shop.example>\r\nTo: ann@example.test\r\n"
           b"Subject: Sale\r\n\r\nBody\r\n")


def fields_of(copy: bytes) -> dict[str, list[bytes]]:
    block = read_header(copy)
    out: dict[str, list[bytes]] = {}
    for f in block.fields:
        out.setdefault(f.name, []).append(f.value.strip())
    return out


def token_of(copy: bytes) -> str:
    [value] = fields_of(copy)["list-unsubscribe"]
    m = re.search(rb"<https://track\.example/u/([A-Za-z0-9_-]+)>", value)
    assert m is not None, value
    return m.group(1).decode()


class SettingsTests(SynchronousTestCase):
    """options.transactional decides per message; then the listener's setting, then the global one."""

    def resolved(self, config: SmtpapiConfig, header: MsysApi = NO_HEADER,
                 context: ContextSettings = NO_CONTEXT) -> Tracking:
        return resolve(config, EngagementTrackerConfig(), header, context, NOW)

    def test_transactional_header_beats_the_configuration(self) -> None:
        on = SmtpapiConfig(list_unsubscribe=True, list_unsubscribe_mailto="u@shop.example")
        self.assertTrue(self.resolved(on).list_unsubscribe)
        self.assertEqual(self.resolved(on).list_unsubscribe_mailto, "u@shop.example")
        t = self.resolved(on, parse_msys_api(['{"options":{"transactional":true}}'], 1000))
        self.assertEqual((t.transactional, t.list_unsubscribe, t.list_unsubscribe_mailto), (True, False, ""))
        t = self.resolved(on, parse_msys_api(['{"options":{"transactional":false}}'], 1000))
        self.assertEqual((t.transactional, t.list_unsubscribe), (False, True))
        self.assertFalse(self.resolved(SmtpapiConfig()).list_unsubscribe)  # off by default

    def test_the_policy_beats_the_header(self) -> None:
        on = SmtpapiConfig(list_unsubscribe=True)
        header = parse_msys_api(['{"options":{"transactional":true}}'], 1000)
        context = parse_context({"smtpapi_transactional": "false"}, 1000)
        self.assertTrue(self.resolved(on, header, context).list_unsubscribe)

    def test_a_wrong_type_is_refused_by_name(self) -> None:
        from appliance.settings import MsysApiError, PolicyValueError

        e = self.assertRaises(MsysApiError, parse_msys_api, ['{"options":{"transactional":"yes"}}'], 1000)
        self.assertEqual(str(e), "X-MSYS-API 'options.transactional' must be of type 'boolean'")
        self.assertRaises(PolicyValueError, parse_context, {"smtpapi_transactional": "maybe"}, 1000)

    def test_the_listener_overrides_the_global_table(self) -> None:
        config = parse_config(merge(base_toml(), {
            "smtpapi": {"list_unsubscribe": False},
            "smtp": {"listeners": {"default": {"endpoint": "tcp:0", "smtpapi": {"list_unsubscribe": True}},
                                   "other": {"endpoint": "tcp:1"}}}}), "test")
        by_name = {listener.name: listener.smtpapi.list_unsubscribe for listener in config.smtp.listeners}
        self.assertEqual(by_name, {"default": True, "other": False})

    def test_a_bad_mailto_address_is_named(self) -> None:
        for bad in ("unsubscribe", "a b@shop.example", "u@shop.example?subject=x", "<u@shop.example>"):
            e = self.assertRaises(ConfigError, parse_config, merge(base_toml(), {
                "smtpapi": {"list_unsubscribe_mailto": bad}}), "test")
            self.assertEqual([path for path, _ in e.problems], ["smtpapi.list_unsubscribe_mailto"])

    def test_the_spool_keeps_the_decision(self) -> None:
        t = Tracking(transactional=True)
        self.assertEqual(Tracking.from_json(t.to_json()), t)
        self.assertEqual(Tracking.from_json(ON.to_json()), ON)
        # An envelope written before these fields existed: its copies are made as they were.
        self.assertFalse(Tracking.from_json({"open_tracking": True}).list_unsubscribe)


class FieldsTests(SynchronousTestCase):
    def test_off_adds_nothing(self) -> None:
        self.assertIsNone(list_unsubscribe_fields(CODEC, Tracking(), "m1", "t1", "ann@example.test"))
        transactional = Tracking(transactional=True, list_unsubscribe=False)
        self.assertIsNone(list_unsubscribe_fields(CODEC, transactional, "m1", "t1", "ann@example.test"))

    def test_https_url_and_one_click_post(self) -> None:
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "ann@example.test")
        assert fields is not None
        copy = add_list_unsubscribe(MESSAGE, fields)
        header = fields_of(copy)
        self.assertEqual(header["list-unsubscribe-post"], [b"List-Unsubscribe=One-Click"])
        data = CODEC.decode(token_of(copy))
        self.assertEqual((data.kind, data.message_id, data.transmission_id, data.rcpt_to, data.campaign_id,
                          data.tags, data.metadata, data.expiry),
                         ("unsubscribe", "00ab", "4711", "ann@example.test", "spring", ("news",),
                          {"plan": "gold"}, NOW + 86400))
        # At the end of the header, the body untouched, every other field where it was.
        self.assertTrue(copy.startswith(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"))
        self.assertTrue(copy.endswith(b"\r\n\r\nBody\r\n"))
        self.assertEqual(len(copy), len(MESSAGE) + len(fields))

    def test_mailto_form(self) -> None:
        tracking = Tracking(**{**ON.__dict__, "list_unsubscribe_mailto": "unsub@shop.example"})
        fields = list_unsubscribe_fields(CODEC, tracking, "00ab", "4711", "ann@example.test")
        assert fields is not None
        lines = fields.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"List-Unsubscribe: <https://track.example/u/"))
        self.assertTrue(lines[0].endswith(b">,"))
        m = re.fullmatch(rb" <mailto:unsub@shop\.example\?subject=unsubscribe%20([A-Za-z0-9_-]+)>", lines[1])
        assert m is not None, lines[1]
        self.assertEqual(CODEC.decode(m.group(1)).kind, "unsubscribe")

    def test_lines_stay_within_998_octets(self) -> None:
        """Metadata that would make the line too long is left out of the token, then the tags."""
        # Text that does not deflate: what a token cannot shrink.
        noise = base64.urlsafe_b64encode(b"".join(hashlib.sha512(bytes([i])).digest()
                                                  for i in range(20))).decode()[:1200]
        big = Tracking(**{**ON.__dict__, "metadata": {"k": noise},
                          "list_unsubscribe_mailto": "u@shop.example"})
        fields = list_unsubscribe_fields(CODEC, big, "00ab", "4711", "ann@example.test")
        assert fields is not None
        self.assertTrue(all(len(line) <= MAX_LINE for line in fields.split(b"\r\n")))
        data = CODEC.decode(token_of(add_list_unsubscribe(MESSAGE, fields)))
        self.assertEqual((data.metadata, data.tags), (None, ("news",)))
        # Ten tags of 63 UTF-8 bytes each (the most a copy may carry), in characters that do not
        # deflate, and a long tracking domain.
        pick = random.Random(1)
        tags = tuple("".join(chr(pick.randrange(0x4E00, 0x9FFF)) for _ in range(21)) for _ in range(10))
        bigger = Tracking(**{**big.__dict__, "tags": tags, "tracking_domain": "t" * 80 + ".example"})
        fields = list_unsubscribe_fields(CODEC, bigger, "00ab", "4711", "a" * 64 + "@" + "b" * 200 + ".test")
        assert fields is not None
        self.assertTrue(all(len(line) <= MAX_LINE for line in fields.split(b"\r\n")))
        [value] = fields_of(add_list_unsubscribe(MESSAGE, fields))["list-unsubscribe"]
        m = re.search(rb"/u/([A-Za-z0-9_-]+)>", value)
        assert m is not None
        self.assertEqual(CODEC.decode(m.group(1)).tags, ())

    def test_the_senders_own_header_is_kept(self) -> None:
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "ann@example.test")
        assert fields is not None
        own = MESSAGE.replace(b"Subject: Sale\r\n", b"Subject: Sale\r\nList-Unsubscribe: <https://shop.example/"
                              b"prefs?u=1>\r\n")
        self.assertEqual(add_list_unsubscribe(own, fields), own)
        own_post = MESSAGE.replace(b"Subject: Sale\r\n",
                                   b"Subject: Sale\r\nlist-unsubscribe-post: List-Unsubscribe=One-Click\r\n")
        self.assertEqual(add_list_unsubscribe(own_post, fields), own_post)

    def test_odd_headers(self) -> None:
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "ann@example.test")
        assert fields is not None
        no_body = b"From: a@shop.example\r\nSubject: x"
        copy = add_list_unsubscribe(no_body, fields)
        self.assertEqual(copy, no_body + b"\r\n" + fields[:-2])
        self.assertIn("list-unsubscribe", fields_of(copy))
        broken = b" continuation first\r\nFrom: a@shop.example\r\n\r\nx"
        self.assertEqual(add_list_unsubscribe(broken, fields), broken)

    def test_a_token_of_another_kind_does_not_pass_for_one(self) -> None:
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "ann@example.test")
        assert fields is not None
        token = token_of(add_list_unsubscribe(MESSAGE, fields))
        self.assertRaises(InvalidToken, LinkCodec(Keyring(((4, b"v" * 32),))).decode, token)


class DkimTests(SynchronousTestCase):
    def test_both_fields_are_signed_whatever_the_key_lists(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        signer = Signer([SigningKey("shop.example", "s1", key, headers=("from", "subject"))], now=lambda: NOW)
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "ann@example.test")
        assert fields is not None
        signed = signer.sign(add_list_unsubscribe(MESSAGE, fields))
        [signature] = fields_of(signed)["dkim-signature"]
        h = re.search(rb"h=([^;]*);", signature.replace(b" ", b""))
        assert h is not None
        self.assertEqual(h.group(1).split(b":"), [b"from", b"from", b"subject", b"subject",
                                                  b"list-unsubscribe", b"list-unsubscribe",
                                                  b"list-unsubscribe-post", b"list-unsubscribe-post"])
        lookup = lookup_in({("shop.example", "s1"): record_of(key)})
        self.assertTrue(verify(signed, lookup)[0].ok)
        # A relay that swaps the URL breaks the signature, as it would one added later.
        swapped = signed.replace(b"https://track.example/u/", b"https://evil.example/u/")
        self.assertEqual(verify(swapped, lookup)[0].reason, "signature mismatch")
        added = signer.sign(MESSAGE).replace(b"\r\n\r\n", b"\r\n" + fields + b"\r\n", 1)
        self.assertEqual(verify(added, lookup)[0].reason, "signature mismatch")


class BodyTests(SynchronousTestCase):
    """What counts as RFC 8058's one-click body."""

    def test_urlencoded(self) -> None:
        form = b"application/x-www-form-urlencoded"
        self.assertTrue(is_one_click(form, b"List-Unsubscribe=One-Click"))
        self.assertTrue(is_one_click(form + b"; charset=utf-8", b"List-Unsubscribe=One-Click"))
        for body in (b"", b"List-Unsubscribe=one-click", b"List-Unsubscribe=One-Click&List-Unsubscribe=x",
                     b"x=1", b"List-Unsubscribe=\xff"):
            self.assertFalse(is_one_click(form, body), body)

    def test_multipart(self) -> None:
        ctype = b"multipart/form-data; boundary=XyZ"
        body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
                b"One-Click\r\n--XyZ--\r\n")
        self.assertTrue(is_one_click(ctype, body))
        self.assertFalse(is_one_click(ctype, body.replace(b"One-Click", b"Two-Clicks")))
        self.assertFalse(is_one_click(ctype, b"garbage"))
        self.assertFalse(is_one_click(b"text/plain", b"List-Unsubscribe=One-Click"))


def request(port: int, path: str, method: str = "GET", body: bytes | None = None,
            content_type: str = "application/x-www-form-urlencoded") -> tuple[int, dict[str, str], bytes]:
    """One request with urllib, as a mail client's HTTP stack would make it; redirects are not followed."""

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirects)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Content-Type": content_type, "User-Agent": "MailClient/1.0"}
                                 if body is not None else {"User-Agent": "MailClient/1.0"})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class RouteTests(unittest.TestCase):
    """``/u/`` on a tracker site on a loopback port, with a real event log file."""

    def setUp(self) -> None:
        self.now = float(NOW)
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.events = EventLog(self.path, "node-t", fsync_interval=0, clock=Clock(), now=lambda: self.now)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        site = make_site(CODEC, self.events, now=lambda: self.now, reactor=reactor)
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port
        fields = list_unsubscribe_fields(CODEC, ON, "00ab", "4711", "Ann@Example.TEST")
        assert fields is not None
        self.token = token_of(add_list_unsubscribe(MESSAGE, fields))

    def logged(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f]

    def call(self, path: str, method: str = "GET", body: bytes | None = None, **kw: Any) -> defer.Deferred:
        return in_thread(request, self.port, path, method, body, **kw)

    @defer.inlineCallbacks
    def test_one_click_post(self) -> defer.Generator:
        status, headers, body = yield self.call(f"/u/{self.token}", "POST", b"List-Unsubscribe=One-Click")
        self.assertEqual(status, 200)
        self.assertNotIn("location", headers)
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertIn(b"You will not receive these emails any more.", body)
        [event] = self.logged()
        self.assertEqual({k: v for k, v in event.items() if k not in ("event_id", "timestamp")}, {
            "type": "list_unsubscribe", "node_name": "node-t", "customer_id": "1",
            "message_id": "00ab", "transmission_id": "4711", "campaign_id": "spring",
            "rcpt_to": "ann@example.test", "raw_rcpt_to": "Ann@Example.TEST", "rcpt_tags": ["news"],
            "rcpt_meta": {"plan": "gold"}, "ip_address": "127.0.0.1", "user_agent": "MailClient/1.0",
            "routing_domain": "example.test", "recipient_domain": "example.test", "ip_pool": "default",
            "recv_method": "esmtp", "transactional": "0", "delv_method": "esmtp"})
        self.assertEqual(event["timestamp"], str(NOW))

    @defer.inlineCallbacks
    def test_multipart_post(self) -> defer.Generator:
        body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
                b"One-Click\r\n--b0undary--\r\n")
        status, _, _ = yield self.call(f"/u/{self.token}", "POST", body,
                                       content_type="multipart/form-data; boundary=b0undary")
        self.assertEqual(status, 200)
        self.assertEqual([e["type"] for e in self.logged()], ["list_unsubscribe"])

    @defer.inlineCallbacks
    def test_get_shows_a_page_and_unsubscribes_nobody(self) -> defer.Generator:
        status, headers, body = yield self.call(f"/u/{self.token}")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertIn("form-action 'self'", headers["content-security-policy"])
        self.assertIn(b'<form method="post" id="unsubscribe">', body)
        self.assertIn(b'<input type="hidden" name="List-Unsubscribe" value="One-Click">', body)
        status, headers, body = yield self.call(f"/u/{self.token}", "HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_what_is_refused_writes_nothing(self) -> defer.Generator:
        click = CODEC.encode(tracker_link("click"))
        for path, method, body, expected in [
            (f"/u/{self.token[:-2]}", "POST", b"List-Unsubscribe=One-Click", 404),  # altered
            (f"/u/{click}", "POST", b"List-Unsubscribe=One-Click", 404),  # not an unsubscribe token
            ("/u/", "GET", None, 404),
            (f"/u/{self.token}/more", "POST", b"List-Unsubscribe=One-Click", 404),
            (f"/u/{self.token}", "POST", b"List-Unsubscribe=Maybe", 400),
            (f"/u/{self.token}", "POST", b"", 400),
            (f"/u/{self.token}", "POST", b"x" * (MAX_BODY_BYTES + 1), 413),
            (f"/u/{self.token}", "PUT", b"List-Unsubscribe=One-Click", 405),
            (f"/u/{self.token}", "DELETE", None, 405),
        ]:
            status, headers, _ = yield self.call(path, method, body)
            self.assertEqual(status, expected, (path[:20], method, body and body[:30]))
            self.assertNotIn("location", headers)
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_an_expired_link_is_not_found(self) -> defer.Generator:
        self.now = NOW + 86400
        status, _, body = yield self.call(f"/u/{self.token}", "POST", b"List-Unsubscribe=One-Click")
        self.assertEqual(status, 404)
        self.assertIn(b"not valid, or has expired", body)
        status, _, _ = yield self.call(f"/u/{self.token}")
        self.assertEqual(status, 404)
        self.assertEqual(self.logged(), [])

    @defer.inlineCallbacks
    def test_repeated_posts_are_limited_like_every_hit(self) -> defer.Generator:
        for _ in range(12):
            status, _, _ = yield self.call(f"/u/{self.token}", "POST", b"List-Unsubscribe=One-Click")
            self.assertEqual(status, 200)
        self.assertEqual(len(self.logged()), 10)  # the default event_rate_limit
