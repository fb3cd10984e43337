"""
Tracking end to end on a memory reactor: X-MSYS-API, the policy hook, tracked copies at the sink.
"""

from __future__ import annotations

import hashlib
import json
import quopri
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from appliance.links import LinkCodec, LinkData, read_keyring
from appliance.spool import REMOVE_DELAY, entries_on_disk
from tests import policies
from tests.helpers import TRACKING_DOMAIN
from tests.memory import MemoryAppliance, sendmail

HTML = (
    b'<html><body><p>Hello</p><a href="https://shop.example/p?id=1&amp;x=2#top" '
    b'data-msys-linkname="Hero">buy</a> <a href="mailto:s@example.net">mail</a></body></html>\r\n'
)


def message(api: str | None = None, extra: bytes = b"", html: bytes = HTML) -> bytes:
    head = b"From: Sender <s@example.net>\r\nSubject: Tracked\r\n"
    if api is not None:
        head += b"X-MSYS-API: " + api.encode() + b"\r\n"
    return (head + extra + b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n"
            b"\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee https://shop.example/t\r\n"
            b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + b"--b--\r\n")


TRACK_ALL = json.dumps({"campaign_id": "spring", "metadata": {"user": "42"}, "tags": ["a", "b"],
                        "options": {"open_tracking": True, "click_tracking": True}})
TOKEN = re.compile(rb"http://" + re.escape(TRACKING_DOMAIN.encode()) + rb"/(?:f/[^/]+|q)/([A-Za-z0-9_-]+)")


def send(running: MemoryAppliance, recipients: list[str], data: bytes) -> list[tuple[int, list[bytes]]]:
    """One whole conversation; every reply, greeting to QUIT."""
    return sendmail(running.smtp(), "s@example.net", recipients, data)


def send_expecting_refusal(running: MemoryAppliance, recipients: list[str], data: bytes) -> tuple[int, bytes]:
    """The refusal of the message's end: its code and text, as smtplib reports them."""
    code, [line] = send(running, recipients, data)[-2]
    if code < 400:
        raise AssertionError("the message was accepted")
    return code, line[4:]


class TrackingTestCase(SynchronousTestCase):
    changes: dict[str, Any] = {}

    def setUp(self) -> None:
        self.running = MemoryAppliance(self.mktemp(), **self.changes)
        self.codec = LinkCodec(read_keyring(self.running.config.links.keys_file))
        self.running.start()
        self.addCleanup(self.running.stop)

    def events(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.running.events() if e["type"] == type_]

    def spool_is_empty(self) -> bool:
        spool = self.running.config.spool.directory
        return not entries_on_disk(spool)

    def delivered(self, count: int) -> None:
        """The outcome events are written too: nothing is left in flight."""
        self.assertEqual(len(self.events("delivery")), count)
        self.running.advance(REMOVE_DELAY)  # finished entries leave active/ in batches
        self.assertTrue(self.spool_is_empty())

    def tokens(self, data: bytes) -> list[LinkData]:
        return [self.codec.decode(t) for t in TOKEN.findall(data.replace(b"=\r\n", b""))]


class HeaderTests(TrackingTestCase):
    def test_tracked_copies(self) -> None:
        send(self.running, ["a@example.test", "B@example.org"], message(TRACK_ALL))
        copies = self.running.sink.messages
        self.assertEqual(len(copies), 2)
        by_rcpt = {c.rcpt_to[0]: c.data for c in copies}
        injections = {e["raw_rcpt_to"]: e for e in self.events("injection")}
        for rcpt, data in by_rcpt.items():
            self.assertNotIn(b"X-MSYS-API", data)
            links = self.tokens(data)
            kinds = sorted(d.kind for d in links)
            self.assertEqual(kinds, ["click", "click", "initial_open", "open"])
            event = injections[rcpt]
            for d in links:
                self.assertEqual((d.message_id, d.rcpt_to, d.campaign_id, d.tags, d.metadata),
                                 (event["message_id"], rcpt, "spring", ("a", "b"), {"user": "42"}))
            self.assertEqual(sorted(d.target for d in links if d.kind == "click"),
                             ["https://shop.example/p?id=1&x=2#top", "https://shop.example/t"])
            self.assertIn(b'href="mailto:s@example.net"', quopri.decodestring(data))
            self.assertEqual((event["open_tracking"], event["click_tracking"]), (True, True))
            self.assertEqual((event["campaign_id"], event["rcpt_meta"], event["rcpt_tags"]),
                             ("spring", {"user": "42"}, ["a", "b"]))
            self.assertNotIn("tracking_skipped", event)
            self.assertNotIn("dkim_broken", event)
        self.delivered(2)
        for delivery in self.events("delivery"):
            self.assertEqual((delivery["campaign_id"], delivery["rcpt_meta"], delivery["rcpt_tags"]),
                             ("spring", {"user": "42"}, ["a", "b"]))

    def test_initial_open_option_per_message(self) -> None:
        """options.initial_open turns the top pixel off (or on) for this message only."""
        off = json.dumps({"options": {"open_tracking": True, "click_tracking": False, "initial_open": False}})
        send(self.running, ["a@example.test"], message(off))
        send(self.running, ["b@example.test"], message(off.replace("false}", "true}")))
        kinds = {c.rcpt_to[0]: sorted(d.kind for d in self.tokens(c.data))
                 for c in self.running.sink.messages}
        self.assertEqual(kinds, {"a@example.test": ["open"], "b@example.test": ["initial_open", "open"]})
        pixels = {e["rcpt_to"]: e["initial_pixel"] for e in self.events("injection")}
        self.assertEqual(pixels, {"a@example.test": False, "b@example.test": True})
        self.assertEqual({e["rcpt_to"]: e["initial_pixel"] for e in self.events("delivery")}, pixels)

    def test_long_metadata_stays_out_of_links(self) -> None:
        metadata = {k: "v" * 800 for k in "abc"}  # 2.4 kB, over max_metadata_len's 1000 bytes
        # Folded between its members, so each line stays under SMTP's 1000 octets.
        api = '{"options": {"open_tracking": true, "click_tracking": true}, "metadata": {' + ",\r\n ".join(
            f'"{k}": "{v}"' for k, v in metadata.items()) + "}}"
        send(self.running, ["a@example.test"], message(api))
        [copy] = self.running.sink.messages
        links = self.tokens(copy.data)
        self.assertEqual(sorted(d.kind for d in links), ["click", "click", "initial_open", "open"])
        self.assertEqual({repr(d.metadata) for d in links}, {"None"})
        [event] = self.events("injection")
        self.assertEqual((event["rcpt_meta"], event["rcpt_meta_left_out_of_links"]), (metadata, True))
        [delivery] = self.events("delivery")
        self.assertEqual(delivery["rcpt_meta"], metadata)

    def test_delivery_events_carry_the_message(self) -> None:
        send(self.running, ["Ann@Example.test"], message(TRACK_ALL))
        [injection] = self.events("injection")
        [delivery] = self.events("delivery")
        for name in ("subject", "friendly_from", "msg_from", "msg_size", "injection_time", "routing_domain",
                     "ip_pool", "open_tracking", "click_tracking", "initial_pixel", "recv_method",
                     "sending_domain", "recipient_domain", "raw_rcpt_to", "rcpt_to"):
            self.assertEqual(delivery[name], injection[name], name)
        self.assertEqual((delivery["subject"], delivery["friendly_from"], delivery["raw_rcpt_to"]),
                         ("Tracked", "s@example.net", "Ann@Example.test"))
        self.assertRegex(delivery["injection_time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertIsInstance(delivery["sending_ip"], str)

    def test_engagement_events_keep_the_case_it_was_injected_with(self) -> None:
        send(self.running, ["Ann@Example.ORG"], message(TRACK_ALL))
        [copy] = self.running.sink.messages
        data = copy.data.replace(b"=\r\n", b"")
        [pixel] = re.findall(rb"/q/([A-Za-z0-9_-]+)", data)[:1]
        click = re.findall(rb"/f/[^/]+/([A-Za-z0-9_-]+)", data)[0]
        for path in (b"/q/" + pixel, b"/f/a/" + click):
            status, _headers, _body = self.running.get(path.decode())
            self.assertIn(status, (200, 302))
        engaged = [e for e in self.running.events() if e["type"] in ("open", "initial_open", "click")]
        self.assertEqual(len(engaged), 2)
        for event in engaged:
            self.assertEqual((event["raw_rcpt_to"], event["rcpt_to"]), ("Ann@Example.ORG", "ann@example.org"))
            self.assertEqual((event["routing_domain"], event["recipient_domain"]),
                             ("example.org", "example.org"))

    def test_bad_header_refuses_the_message(self) -> None:
        code, text = send_expecting_refusal(self.running, ["a@example.test", "b@example.org"],
                                            message('{"metadata": ["not", "an", "object"]}'))
        self.assertEqual((code, text), (550, b"5.6.0 X-MSYS-API 'metadata' must be of type 'json object'"))
        rejections = self.events("policy_rejection")
        self.assertEqual(sorted(e["rcpt_to"] for e in rejections), ["a@example.test", "b@example.org"])
        for e in rejections:
            self.assertEqual(e["error_code"], "550")
            self.assertEqual(e["reason"], "550 5.6.0 X-MSYS-API 'metadata' must be of type 'json object'")
            self.assertEqual(e["subject"], "Tracked")
        self.assertEqual(self.events("injection"), [])
        self.assertTrue(self.spool_is_empty())
        self.assertEqual(self.running.sink.messages, [])

    def test_headers_that_could_not_be_stored_are_refused(self) -> None:
        """Half characters, nesting past what JSON tools recurse on, tags too long to carry."""
        deep = '{"x":' + "[" * 3000 + "]" * 3000 + "}"
        cases = [
            (r'{"campaign_id":"\ud800"}',
             "X-MSYS-API 'campaign_id' must not contain a lone surrogate (not Unicode text)"),
            (r'{"tags":["\ud800"]}',
             "X-MSYS-API 'tags' must not contain a lone surrogate (not Unicode text)"),
            ("\r\n ".join(deep[i:i + 900] for i in range(0, len(deep), 900)),
             "X-MSYS-API is nested too deeply"),
            ('{"tags":["' + "t" * 65 + '"]}',
             "X-MSYS-API 'tags' must not contain a tag longer than 64 bytes"),
            ('{"a": 1e999}',
             "X-MSYS-API 'a' must not contain a number out of range (it would be Infinity)"),
            ('{"metadata": {"n": [1, -1e400]}}',
             "X-MSYS-API 'metadata' must not contain a number out of range (it would be Infinity)"),
        ]
        for api, text in cases:
            code, reply = send_expecting_refusal(self.running, ["a@example.test"], message(api))
            self.assertEqual((code, reply.decode()), (550, f"5.6.0 {text}"))
            rejection = self.events("policy_rejection")[-1]
            self.assertEqual(rejection["reason"], f"550 5.6.0 {text}")
        self.assertEqual(len(self.events("policy_rejection")), len(cases))
        self.assertEqual(self.events("injection"), [])
        self.assertTrue(self.spool_is_empty())
        self.assertEqual(self.running.sink.messages, [])

    def test_skipped_tracking_and_dkim_are_reported(self) -> None:
        lying = (b"<a href='https://x.example/'>caf\xe9</a>\r\n")
        data = message(TRACK_ALL, b"DKIM-Signature: v=1; d=example.net; h=from:subject; b=x\r\n", lying)
        send(self.running, ["a@example.test"], data)
        [copy] = self.running.sink.messages
        [event] = self.events("injection")
        self.assertTrue(event["tracking_skipped"])
        self.assertEqual(event["tracking_skipped_reason"], "text/html part: it is not valid utf-8")
        self.assertTrue(event["dkim_broken"])  # the text part was still rewritten
        self.assertIn(lying, copy.data)  # the bad part exactly as it came
        self.assertEqual([d.target for d in self.tokens(copy.data)], ["https://shop.example/t"])
        self.delivered(1)


class LongLinkTests(TrackingTestCase):
    changes = {"engagement_tracker": {"max_metadata_len": 8000}}

    def test_links_too_long_are_left_out_and_said_so(self) -> None:
        """SPEC §6: no link over 4096 characters; the injection event says what was left out."""
        chance = hashlib.sha256()
        members = []
        for i in range(55):
            chance.update(b"x")
            value = "".join(chr(0x100 + b) for b in chance.digest() * 2)  # deflate cannot help
            members.append(f'"k{i}": "{value}"')
        api = ('{"options": {"open_tracking": true, "click_tracking": true}, "metadata": {'
               + ",\r\n ".join(members) + "}}")
        send(self.running, ["a@example.test"], message(api))
        [copy] = self.running.sink.messages
        self.assertEqual(self.tokens(copy.data), [])
        self.assertIn(b"https://shop.example/t", copy.data)
        for line in copy.data.replace(b"=\r\n", b"").split(b"\r\n"):
            self.assertLessEqual(len(line), 4096)
        [event] = self.events("injection")
        self.assertEqual(len(event["rcpt_meta"]), 55)
        self.assertTrue(event["tracking_skipped"])
        self.assertEqual(event["tracking_skipped_reason"],
                         "2 links left untracked: the tracked URL would be over 4096 characters; "
                         "open and initial_open pixel left out: its URL would be over 4096 characters")
        self.delivered(1)


class PolicyTests(TrackingTestCase):
    changes = {"policy": {"hook": "tests.policies:per_recipient"},
               "smtpapi": {"open_tracking_enabled": True, "click_tracking_enabled": True}}

    def test_per_recipient_verdicts(self) -> None:
        del policies.calls[:]
        del policies.held[:]
        replies = send(self.running, ["yes@example.test", "no@example.test", "plain@example.org"],
                       message('{"campaign_id": "from-header"}'))
        # yes@ is answered later: until then the message waits for its reply.
        self.assertEqual(replies[-1][0], 354)
        self.assertEqual(self.running.sink.messages, [])
        [decision] = policies.held
        decision.callback(None)
        self.running.settle()
        self.assertEqual([(c[0].rcpt_to, c[1], c[2], c[3]) for c in policies.calls],
                         [(r, "127.0.0.1", None, "Tracked")
                          for r in ("yes@example.test", "no@example.test", "plain@example.org")])
        copies = self.running.sink.messages
        by_rcpt = {c.rcpt_to[0]: c.data for c in copies}
        self.assertEqual(sorted(by_rcpt), ["plain@example.org", "yes@example.test"])
        yes = self.tokens(by_rcpt["yes@example.test"])
        self.assertEqual({(d.campaign_id, d.tags) for d in yes}, {("from-policy", ("policy",))})
        plain = self.tokens(by_rcpt["plain@example.org"])
        self.assertEqual(sorted(d.kind for d in plain), ["initial_open", "open"])  # no clicks
        self.assertEqual({d.campaign_id for d in plain}, {"from-header"})
        [rejection] = self.events("policy_rejection")
        self.assertEqual((rejection["rcpt_to"], rejection["error_code"], rejection["reason"]),
                         ("no@example.test", "550", "550 5.7.1 Not this one"))
        injections = {e["rcpt_to"]: e for e in self.events("injection")}
        self.assertEqual(sorted(injections), ["plain@example.org", "yes@example.test"])
        self.assertEqual(injections["plain@example.org"]["click_tracking"], False)
        self.assertEqual(injections["yes@example.test"]["campaign_id"], "from-policy")
        self.delivered(2)


class RejectAllTests(TrackingTestCase):
    changes = {"policy": {"hook": "tests.policies:reject_all"}}

    def test_everyone_rejected(self) -> None:
        code, text = send_expecting_refusal(self.running, ["a@example.test", "b@example.org"], message())
        self.assertEqual((code, text), (554, b"5.7.1 Go away"))
        self.assertEqual(len(self.events("policy_rejection")), 2)
        self.assertTrue(self.spool_is_empty())


class BrokenPolicyTests(TrackingTestCase):
    changes = {"policy": {"hook": "tests.policies:broken"}}

    def test_failure_is_temporary_for_everyone(self) -> None:
        code, text = send_expecting_refusal(self.running, ["a@example.test", "b@example.org"], message())
        self.assertEqual((code, text), (451, b"4.3.5 Policy not available, try again later"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.spool_is_empty())  # a@ was fine, but nobody is half-accepted
        self.assertEqual({e["error_code"] for e in self.events("policy_rejection")}, {"451"})


class RestartTests(SynchronousTestCase):
    """A copy made after a restart is prepared again from the spooled text."""

    def test_copy_after_restart(self) -> None:
        directory = self.mktemp()
        # First run: the destination refuses connections, so the copy waits in the spool.
        first = MemoryAppliance(directory, delivery={"retry_initial": "1s"})
        first.servers.clear()
        first.start()
        send(first, ["a@example.test"], message(TRACK_ALL))
        self.assertEqual([e["type"] for e in first.events()], ["injection", "delay"])
        first.stop()
        [injection] = [e for e in first.events() if e["type"] == "injection"]

        second = MemoryAppliance(directory, delivery={"retry_initial": "1s"})
        second.start()
        self.addCleanup(second.stop)
        self.assertEqual(second.sink.messages, [])
        second.advance(1)  # the retry is due
        [copy] = second.sink.messages
        self.assertTrue(any(e["type"] == "delivery" for e in second.events()))
        codec = LinkCodec(read_keyring(second.config.links.keys_file))
        links = [codec.decode(t) for t in TOKEN.findall(copy.data.replace(b"=\r\n", b""))]
        self.assertEqual(len(links), 4)
        self.assertEqual({d.message_id for d in links}, {injection["message_id"]})
        self.assertNotIn(b"X-MSYS-API", copy.data)
