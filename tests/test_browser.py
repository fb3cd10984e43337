"""
A real browser against the tracker.

A message is injected with open and click tracking on; headless Chromium
opens the recipient's copy as delivered, loads its pixels, follows one of
its tracked links through the appliance's tracker and must land on exactly the
URL the sender wrote; the appliance's event log must then hold the ``open``,
``initial_open`` and ``click`` that the browser caused.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import os
import re
import shutil
import smtplib
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest
from twisted.web import resource, server

from tests.helpers import RunningAppliance, free_port, in_thread, wait_until

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")

# What the sender's link points at: a landing page on loopback. The path and
# query carry escapes, an ampersand, a broken escape and non-ASCII text.
TARGET = "/landing/p%C3%A4th?q=a%26b&x=1&y=%2F&z=ü&bad=%zz#frag-ö"
# Where a browser must end up: the same, with only the non-ASCII encoded.
LANDED = "/landing/p%C3%A4th?q=a%26b&x=1&y=%2F&z=%C3%BC&bad=%zz#frag-%C3%B6"

# Stands in for the reader: once the page and its images have loaded, click
# the first tracked link, as a person would.
CLICKER = """<script>
addEventListener("load", () => {
  for (const a of document.links) if (a.pathname.startsWith("/f/")) { a.click(); break; }
});
</script>"""

LANDING_PAGE = b"""<!doctype html><html><body><p id="landed"></p>
<script>document.getElementById("landed").textContent = location.href;</script></body></html>"""


@defer.inlineCallbacks
def delivered_html(running: RunningAppliance, target: str) -> Any:
    """
    The HTML of a recipient's copy of a message that links to ``target``, as
    delivered: injected over SMTP with open and click tracking on, rewritten by
    the appliance and taken from the sink. Also the identity the copy's events
    must carry (``message_id``, ``rcpt_to``, ``rcpt_meta``).
    """
    message = EmailMessage()
    message["From"] = "Sender <sender@example.net>"
    message["To"] = "reader@example.test"
    message["Subject"] = "Hello"
    message["X-MSYS-API"] = json.dumps({"campaign_id": "browser", "metadata": {"cohort": "b"},
                                        "options": {"open_tracking": True, "click_tracking": True}})
    message.set_content(
        "<!doctype html>\n<html><head><title>Hello</title></head><body>\n"
        f'<p>Hello! <a href="{html.escape(target)}" data-msys-linkname="Landing">See the offer</a>.'
        "</p>\n</body></html>\n", subtype="html", cte="quoted-printable")

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as client:
            client.sendmail("sender@example.net", ["reader@example.test"],
                            message.as_bytes(policy=email.policy.SMTP))

    yield in_thread(send)
    [copy] = yield running.sink.wait_for(1)
    # The test must not end while the delivery's outcome is still being written.
    yield wait_until(lambda: any(e["type"] == "delivery" for e in running.events()))
    [injection] = [e for e in running.events() if e["type"] == "injection"]
    body = email.message_from_bytes(copy.data, policy=email.policy.default).get_body(("html",))
    expected = {"message_id": injection["message_id"], "rcpt_to": "reader@example.test",
                "rcpt_meta": {"cohort": "b"}, "campaign_id": "browser"}
    return body.get_content(), expected


class PageServer(resource.Resource):
    """``/mail``: the copy as a mail client would show it; ``/landing/…``: the target site."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mail = ""
        self.landings: list[bytes] = []

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/mail":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return (self.mail + CLICKER).encode("utf-8")
        if request.path.startswith(b"/landing/"):
            self.landings.append(request.uri)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return LANDING_PAGE
        request.setResponseCode(404)
        return b""


class BrowserTests(unittest.TestCase):
    if CHROMIUM is None:
        skip = "chromium is not installed (Debian: apt-get install chromium; .ci/run does this)"

    def setUp(self) -> None:
        port = free_port()
        self.running = RunningAppliance(
            self.mktemp(),
            tracker={"endpoint": f"tcp:{port}:interface=127.0.0.1"},
            smtpapi={"tracking_domain": f"127.0.0.1:{port}", "open_tracking_enabled": True,
                     "click_tracking_enabled": True},
        )
        self.pages = PageServer()
        site = server.Site(self.pages)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        self.pages_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.pages_port.stopListening)
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    def browse(self, url: str) -> defer.Deferred:
        """Chromium's DOM of wherever ``url`` leads once it has settled (at most 60 s)."""
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        args = ("60", CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                "--virtual-time-budget=10000", "--dump-dom", url)
        return utils.getProcessOutputAndValue("timeout", args, env=dict(os.environ))

    @defer.inlineCallbacks
    def test_pixels_load_and_a_click_lands_exactly(self) -> defer.Generator:
        base = f"http://127.0.0.1:{self.pages_port.getHost().port}"
        self.pages.mail, expected = yield delivered_html(self.running, base + TARGET)
        out, err, code = yield self.browse(base + "/mail")
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-2000:])

        # The browser landed on the exact target, fragment included ...
        m = re.search(rb'<p id="landed">(.*?)</p>', out)
        self.assertIsNotNone(m, out.decode("utf-8", "replace")[-2000:])
        self.assertEqual(html.unescape(m.group(1).decode()), base + LANDED)
        # ... and the site received exactly its path and query, once.
        self.assertEqual(self.pages.landings, [LANDED.split("#")[0].encode()])

        engagement = [e for e in self.running.events() if e["type"] in ("open", "initial_open", "click")]
        events = {e["type"]: e for e in engagement}
        self.assertEqual(sorted(e["type"] for e in engagement), ["click", "initial_open", "open"])
        for event in events.values():
            for key, value in expected.items():
                self.assertEqual(event[key], value, (event["type"], key))
            self.assertEqual(event["ip_address"], "127.0.0.1")
            self.assertIn("HeadlessChrome", event["user_agent"])
        self.assertEqual(events["click"]["target_link_url"], base + TARGET)
        self.assertEqual(events["click"]["target_link_name"], "Landing")
        self.assertNotEqual(events["click"]["accept_language"], "")
