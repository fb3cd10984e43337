"""
Bounded work per message: the cap on tracked links, the size cap on tracked
copies, and large copies rendered off the reactor thread.
"""

from __future__ import annotations

import json
from typing import NoReturn

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError, parse_config
from appliance.delivery.copies import RENDER_INLINE_BYTES, CopyMaker
from appliance.links import LinkCodec
from appliance.rewrite import Identity, prepare
from appliance.spool import run_synchronously
from tests.building import checked
from tests.helpers import base_toml, merge
from tests.test_rewrite import (
    ALTERNATIVE_IN_MIXED,
    BOTH,
    CLICK,
    CODEC,
    ID,
    OPEN,
    Queued,
    Worker,
    base64_message,
    crlf,
    html_part,
    message,
    part_text,
    targets,
)
from tests.test_tracking import TRACK_ALL, TrackingTestCase, send
from tests.test_tracking import message as tracking_message


def text_of_links(count: int, url: str = "http://a") -> bytes:
    return message(crlf("Content-Type: text/plain\n\n" + "".join(f"{url}\n" for _ in range(count))))


class TrackedLinkCapTests(SynchronousTestCase):
    def test_links_past_the_cap_stay_as_they_came(self) -> None:
        prepared = prepare(text_of_links(1500))
        text = part_text(prepared.render(CODEC, ID, CLICK), "text/plain")
        assert text is not None
        self.assertEqual(targets(text), ["http://a"] * 1000)
        lines = text.splitlines()
        self.assertEqual(lines[-501:-500] + lines[-500:], [lines[999]] + ["http://a"] * 500)
        self.assertTrue(lines[999].startswith("http://track.example/f/"))
        self.assertEqual(prepared.tracking_notes(CODEC, ID, CLICK), [
            "500 links left untracked: a part may have at most 1000 tracked links"])
        # Without click tracking, nothing was left out.
        self.assertEqual(prepared.tracking_notes(CODEC, ID, OPEN), [])

    def test_the_cap_is_per_part_and_configurable(self) -> None:
        html = "<body>" + "".join(f'<a href="https://h.example/{i}">{i}</a>' for i in range(5)) + "</body>"
        data = message(crlf("MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=b\n\n--b\n"
                            "Content-Type: text/plain\n\nhttps://t.example/1 https://t.example/2\n--b\n"),
                       html_part(html), crlf("\n--b--\n"))
        prepared = prepare(data, max_links=3)
        copy = prepared.render(CODEC, ID, CLICK)
        self.assertEqual(targets(part_text(copy, "text/plain") or ""),
                         ["https://t.example/1", "https://t.example/2"])
        out_html = part_text(copy, "text/html") or ""
        self.assertEqual(targets(out_html), [f"https://h.example/{i}" for i in range(3)])
        self.assertIn('<a href="https://h.example/3">3</a><a href="https://h.example/4">4</a>', out_html)
        self.assertEqual(prepared.tracking_notes(CODEC, ID, CLICK), [
            "2 links left untracked: a part may have at most 3 tracked links"])

    def test_a_cap_of_zero_tracks_no_link(self) -> None:
        prepared = prepare(text_of_links(2), max_links=0)
        self.assertEqual(prepared.render(CODEC, ID, CLICK), prepared.data)


class SizeCapTests(SynchronousTestCase):
    MESSAGES = (ALTERNATIVE_IN_MIXED,
                base64_message("see https://x.example/a and https://x.example/b\n" * 50),
                text_of_links(300, "https://x.example/long/" + "p" * 200),
                message(crlf("MIME-Version: 1.0\n"),
                        html_part("<body>" + '<a href="https://é.example/">é</a>' * 40 + "</body>",
                                  cte="8bit")))

    def test_the_bound_is_never_below_the_copy(self) -> None:
        for data in self.MESSAGES:
            prepared = prepare(data)
            for tracking in (BOTH, CLICK, OPEN):
                bound = prepared.size_bound(CODEC, ID, tracking)
                self.assertGreaterEqual(bound, len(prepared.render(CODEC, ID, tracking)))

    def test_the_coarse_bound_is_never_below_the_exact_one(self) -> None:
        too_long = text_of_links(3, "https://x.example/" + "q" * 5000)
        for data in self.MESSAGES + (text_of_links(1000), too_long):
            prepared = prepare(data)
            for tracking in (BOTH, CLICK, OPEN):
                self.assertGreaterEqual(prepared.coarse_size_bound,
                                        prepared.size_bound(CODEC, ID, tracking))

    def test_far_below_the_limit_no_link_is_priced(self) -> None:
        """The exact bound prices every link per recipient; a small message needs none of it."""
        prepared = prepare(text_of_links(1000))
        prepared.size_bound = None  # type: ignore[assignment,method-assign]  # calling it fails
        self.assertFalse(prepared.over_size(CODEC, ID, CLICK, 25 * 1024 * 1024))
        self.assertRaises(TypeError, prepared.over_size, CODEC, ID, CLICK, prepared.coarse_size_bound - 1)

    def test_the_bound_signs_no_link_that_fits(self) -> None:
        """At injection it runs for every recipient: its cost must not be a token per link."""
        prepared = prepare(text_of_links(1000, "https://x.example/a"))

        class Unsigned(LinkCodec):
            def click_encoder(self, common: object) -> NoReturn:
                raise AssertionError("a link was signed")

        unsigned = Unsigned(CODEC.keyring)
        self.assertGreaterEqual(prepared.size_bound(unsigned, ID, CLICK),
                                len(prepared.render(CODEC, ID, CLICK)))

    def test_a_copy_too_large_to_track_goes_untracked(self) -> None:
        data = text_of_links(1000)
        # The copy maker's identity for the first recipient of Queued.
        bound = prepare(data).size_bound(CODEC, Identity("m0", "1", "r0@x.test"), CLICK)
        queued = Queued("1", CLICK)
        small = CopyMaker(lambda q: data, CODEC, run=run_synchronously, max_size=bound - 1)
        prepared = self.successResultOf(small.prepare_later(queued))
        self.assertEqual(self.successResultOf(defer.maybeDeferred(small, queued, 0)), prepared.data)
        self.assertEqual(small.tracking_notes(prepared, "1", queued.envelope.recipients[0]), [
            f"copy not tracked: tracked, it could be over the {bound - 1}-byte message size limit"])
        # At the bound, the copy is tracked and nothing is said.
        fits = CopyMaker(lambda q: data, CODEC, run=run_synchronously, max_size=bound)
        prepared = self.successResultOf(fits.prepare_later(queued))
        copy = self.successResultOf(defer.maybeDeferred(fits, queued, 0))
        self.assertEqual(len(targets(copy.decode())), 1000)
        self.assertEqual(fits.tracking_notes(prepared, "1", queued.envelope.recipients[0]), [])


class RenderWhereTests(SynchronousTestCase):
    def test_a_large_copy_is_rendered_in_the_worker(self) -> None:
        big = text_of_links(RENDER_INLINE_BYTES // 9 + 1)
        self.assertGreater(len(big), RENDER_INLINE_BYTES)
        worker = Worker()
        maker = CopyMaker(lambda q: big, CODEC, run=worker)
        queued = Queued("1", CLICK)
        first = maker(queued, 0)
        worker.finish()  # the read and the parse
        worker.finish()  # the render
        self.assertEqual(len(targets(self.successResultOf(first).decode())), 1000)
        # Prepared and cached now, yet the next copy still waits for the worker.
        second = maker(queued, 0)
        assert isinstance(second, defer.Deferred)
        self.assertNoResult(second)
        self.assertEqual(len(worker.handed), 1)
        worker.finish()
        self.assertEqual(len(targets(self.successResultOf(second).decode())), 1000)

    def test_a_small_copy_is_rendered_at_once(self) -> None:
        worker = Worker()
        maker = CopyMaker(lambda q: ALTERNATIVE_IN_MIXED, CODEC, run=worker)
        queued = Queued("1", BOTH)
        first = maker(queued, 0)
        worker.finish()
        self.successResultOf(first)
        second = maker(queued, 0)
        self.assertIsInstance(second, bytes)
        self.assertEqual(worker.handed, [])


class EndToEndTests(TrackingTestCase):
    changes = {"smtpapi": {"max_tracked_links": 2}, "smtp": {"max_message_size": "64K"}}

    def test_the_injection_event_says_what_was_left_untracked(self) -> None:
        html = b"<html><body>" + b"".join(b'<a href="https://h.example/%d">x</a>' % i for i in range(5))
        send(self.running, ["a@example.test"], tracking_message(TRACK_ALL, html=html + b"</body></html>\r\n"))
        [copy] = self.running.sink.messages
        [event] = self.events("injection")
        self.assertTrue(event["tracking_skipped"])
        self.assertEqual(event["tracking_skipped_reason"],
                         "3 links left untracked: a part may have at most 2 tracked links")
        self.assertEqual(sorted(d.target for d in self.tokens(copy.data) if d.kind == "click"),
                         ["https://h.example/0", "https://h.example/1", "https://shop.example/t"])
        self.delivered(1)

    def test_a_copy_over_the_size_limit_goes_untracked(self) -> None:
        """Under the limit as it came, over it tracked: sent as it came, and said so."""
        html = b"<html><body>" + b'<a href="https://h.example/">x</a>\r\n' * 1000 + b"</body></html>\r\n"
        data = tracking_message(json.dumps({"options": {"click_tracking": True}}), html=html)
        self.assertLess(len(data), 64 * 1024)
        send(self.running, ["a@example.test"], data)
        [copy] = self.running.sink.messages
        [event] = self.events("injection")
        self.assertEqual(event["tracking_skipped_reason"],
                         "copy not tracked: tracked, it could be over the 65536-byte message size limit")
        self.assertEqual(self.tokens(copy.data), [])
        self.assertIn(b'<a href="https://h.example/">x</a>\r\n' * 1000, copy.data)
        self.delivered(1)


class ConfigTests(SynchronousTestCase):
    def test_the_default_and_a_setting(self) -> None:
        self.assertEqual(checked(base_toml()).smtpapi.max_tracked_links, 1000)
        self.assertEqual(checked(merge(base_toml(), {"smtpapi": {"max_tracked_links": 5}}))
                         .smtpapi.max_tracked_links, 5)

    def test_a_listener_may_not_set_it(self) -> None:
        """Copies are made at delivery, which does not know the listener a message came in on."""
        data = merge(base_toml(), {"smtp": {"listeners": {"default": {"smtpapi": {"max_tracked_links": 5}}}},
                                   "smtpapi": {"max_tracked_links": -1}})
        e = self.assertRaises(ConfigError, parse_config, data, "x.toml")
        self.assertIn("smtp.listeners.default.smtpapi.max_tracked_links: set it in [smtpapi]: "
                      "it applies to every message", str(e))
        self.assertIn("smtpapi.max_tracked_links: expected an integer >= 0, got -1", str(e))
