"""``engage-appliance preview``: the links, pixels and settings it reports, the copy it writes, its errors."""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import json
import os
import tomllib
from email.message import Message
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from appliance import console
from appliance.links import LinkCodec, new_keyring
from appliance.policy import ACCEPT, PolicyEnvelope, Reject, Verdict
from appliance.preview import PreviewError, make_preview, not_trackable, read_message, with_msys_api
from appliance.preview.command import ask_policy, main
from appliance.rewrite import Audit, html_edits, prepare, text_edits
from appliance.settings import ContextSettings
from tests.helpers import base_toml, merge, parse_config

HTML = """<html><head><title>Sale</title></head><body>
<p>Spring is here. <a href="https://shop.example/sale?x=1&amp;y=2"
 data-msys-linkname="hero">Shop <b>now</b></a> before it ends.</p>
<p><a href="mailto:help@shop.example">Write to us</a> or <a href="#top">go up</a>.</p>
<p><a href="https://shop.example/unsub" data-msys-clicktrack="0">Unsubscribe</a>
 <a href="/account">Your account</a> <a href="javascript:void(0)">Menu</a></p>
<a href="https://shop.example/"><img src="logo.png" alt="Shop logo"></a>
</body></html>
"""
TEXT = """Shop now: https://shop.example/sale?x=1&y=2
Unsubscribe: https://shop.example/unsub[[data-msys-clicktrack="0"]]
"""


def message(html: str = HTML, text: str | None = TEXT, msys_api: dict[str, Any] | None = None,
            to: str = "Reader <reader@example.test>") -> bytes:
    head = f"From: Shop <shop@example.net>\r\nTo: {to}\r\nSubject: Sale\r\nMIME-Version: 1.0\r\n"
    if msys_api is not None:
        head += f"X-MSYS-API: {json.dumps(msys_api)}\r\n"
    parts = []
    if text is not None:
        parts.append(f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}")
    if html:
        parts.append(f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}")
    body = "".join(f"--b1\r\n{p}\r\n" for p in parts) + "--b1--\r\n"
    whole = head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n' + body
    return whole.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def toml(**changes: Any) -> dict[str, Any]:
    return merge(base_toml("var"), changes)


def preview(data: bytes, toml_data: dict[str, Any] | None = None, verdict: Verdict = ACCEPT,
            rcpt: str = "reader@example.test", codec: LinkCodec | None = None) -> Any:
    toml_data = toml_data if toml_data is not None else toml()
    config = parse_config(toml_data, "test")
    return make_preview(data, config, toml_data, config.smtp.listeners[0], rcpt, verdict, 1_800_000_000.0,
                        codec)


TRACKING_ON = {"options": {"open_tracking": True, "click_tracking": True}, "campaign_id": "spring"}


class LinkTableTests(SynchronousTestCase):
    def test_every_link_with_its_anchor_text_and_why(self) -> None:
        result = preview(message(msys_api=TRACKING_ON))
        rows = [(r.part, r.anchor_text, r.target, r.link_name, r.tracked, r.why) for r in result.links]
        tracked = "an http(s) link, and click tracking is on"
        self.assertEqual(rows, [
            ("text/plain", "", "https://shop.example/sale?x=1&y=2", "Raw URL", True, tracked),
            ("text/plain", "", "https://shop.example/unsub", "", False, '[[data-msys-clicktrack="0"]]'),
            ("text/html", "Shop now", "https://shop.example/sale?x=1&y=2", "hero", True, tracked),
            ("text/html", "Write to us", "mailto:help@shop.example", "", False,
             "not http(s): a mailto: link"),
            ("text/html", "go up", "#top", "", False, "a link within the page (#...)"),
            ("text/html", "Unsubscribe", "https://shop.example/unsub", "", False, 'data-msys-clicktrack="0"'),
            ("text/html", "Your account", "/account", "", False, "a relative link (no http:// or https://)"),
            ("text/html", "Menu", "javascript:void(0)", "", False, "not http(s): a javascript: link"),
            ("text/html", "[image: Shop logo]", "https://shop.example/", "Raw URL", True, tracked),
        ])
        self.assertEqual([r.line for r in result.links if r.part == "text/html"], [2, 4, 4, 5, 6, 6, 7])
        self.assertEqual(result.links[2].context, "Spring is here. Shop now before it ends.")
        self.assertEqual(result.links[2].written, "https://shop.example/sale?x=1&amp;y=2")

    def test_the_tracked_urls_are_the_copys_and_lead_to_the_target(self) -> None:
        codec = LinkCodec(new_keyring())
        result = preview(message(msys_api=TRACKING_ON), codec=codec)
        copy = email.message_from_bytes(result.copy, policy=email.policy.default)
        self.assertIsNone(copy["X-MSYS-API"])
        html = copy.get_body(("html",)).get_content()
        for row in result.links:
            if row.tracked:
                self.assertIn(row.tracked_url, result.copy.decode())
                data = codec.decode(row.tracked_url.rsplit("/", 1)[1])
                self.assertEqual((data.target, data.link_name, data.rcpt_to, data.campaign_id),
                                 (row.target, row.link_name, "reader@example.test", "spring"))
        for pixel in result.pixels:
            self.assertTrue(pixel.placed)
            self.assertIn(f'src="{pixel.url}"', html)
        self.assertIn('<a href="https://shop.example/unsub">Unsubscribe</a>', html)  # attribute removed

    def test_click_tracking_off_leaves_every_link_and_says_where_it_was_turned_off(self) -> None:
        api = {"options": {"open_tracking": True, "click_tracking": False}}
        result = preview(message(msys_api=api))
        http = [r for r in result.links if r.link_name]
        self.assertTrue(http)
        for row in http:
            self.assertFalse(row.tracked)
            self.assertEqual(row.why, "click tracking is off (X-MSYS-API options.click_tracking)")
            self.assertEqual(row.tracked_url, "")
            self.assertIn(row.target, result.copy.decode())

    def test_links_past_max_tracked_links(self) -> None:
        links = "".join(f'<a href="https://x.example/{i}">L{i}</a>' for i in range(4))
        result = preview(message(f"<html><body>{links}</body></html>", text=None, msys_api=TRACKING_ON),
                         toml(smtpapi={"max_tracked_links": 2}))
        self.assertEqual([r.tracked for r in result.links], [True, True, False, False])
        self.assertEqual(result.links[3].why,
                         "past smtpapi.max_tracked_links: a part has at most 2 tracked links")
        self.assertIn("2 links left untracked: a part may have at most 2 tracked links", result.notes)

    def test_reasons_for_every_kind_of_target(self) -> None:
        self.assertEqual(not_trackable(""), "an empty link")
        self.assertEqual(not_trackable("tel:+441234"), "not http(s): a tel: link")
        self.assertEqual(not_trackable("{{unsubscribe_url}}"), "a template placeholder, not a URL")
        self.assertEqual(not_trackable("//cdn.example/x"), "a scheme-relative link (no http: or https:)")
        self.assertEqual(not_trackable("https://a b.example/"),
                         "the URL has white space or control characters in it")


class PixelTests(SynchronousTestCase):
    def test_where_the_pixels_go(self) -> None:
        result = preview(message(msys_api=TRACKING_ON))
        self.assertEqual([(p.kind, p.where) for p in result.pixels], [
            ("open", "just before </body> (line 8)"),
            ("initial_open", "in a hidden <div> just after <body> (line 1)"),
        ])
        self.assertTrue(all(p.url.startswith("http://track.test:8080/q/") for p in result.pixels))

    def test_no_body_and_open_tracking_off(self) -> None:
        result = preview(message("<p>Hi <a href='https://x.example/'>x</a></p>", text=None,
                                 msys_api={"options": {"open_tracking": True}}))
        self.assertEqual([(p.kind, p.placed, p.where) for p in result.pixels], [
            ("open", True, "at the end of the HTML (it has no </body>)"),
            ("initial_open", False, "nowhere: the HTML has no <body> to put it after")])
        off = preview(message(msys_api={"options": {"open_tracking": False}}))
        self.assertEqual([p.placed for p in off.pixels], [False, False])
        self.assertTrue(off.pixels[0].where.startswith(
            "none: open tracking is off (X-MSYS-API options.open_tracking); it would go just before </body>"))


class SettingSourceTests(SynchronousTestCase):
    def sources(self, result: Any) -> dict[str, tuple[str, str]]:
        return {s.name: (s.value, s.source) for s in result.settings}

    def test_policy_then_header_then_listener_then_global_then_default(self) -> None:
        data = toml(smtpapi={"click_tracking_enabled": True, "tracking_domain": "global.example"},
                    smtp={"listeners": {"default": {"smtpapi": {"open_tracking_enabled": True}}}})
        context = ContextSettings(campaign_id="from-policy", tracking_domain="policy.example")
        result = preview(message(msys_api={"campaign_id": "from-header", "tags": ["a"]}), data,
                         Verdict(context=context))
        sources = self.sources(result)
        self.assertEqual(sources["campaign_id"], ("from-policy", "policy hook (smtpapi_campaign_id)"))
        self.assertEqual(sources["tracking_domain"],
                         ("policy.example", "policy hook (smtpapi_tracking_domain)"))
        self.assertEqual(sources["tags"], ('["a"]', "X-MSYS-API tags"))
        self.assertEqual(sources["open_tracking"], (
            "on", "listener configuration (smtp.listeners.default.smtpapi.open_tracking_enabled)"))
        self.assertEqual(sources["click_tracking"], ("on", "configuration (smtpapi.click_tracking_enabled)"))
        self.assertEqual(sources["click_tracking_scheme"],
                         ("http", "default (smtpapi.click_tracking_scheme)"))
        self.assertEqual(sources["metadata"], ("{}", "not set"))
        self.assertEqual(result.tracking.tracking_domain, "policy.example")

    def test_values_are_the_resolved_tracking(self) -> None:
        """The table shows the values ``settings.resolve`` decided, not values of its own."""
        result = preview(message(msys_api={"options": {"click_tracking": False}}),
                         toml(smtpapi={"click_tracking_enabled": True}))
        self.assertFalse(result.tracking.click_tracking)
        self.assertEqual(self.sources(result)["click_tracking"][0], "off")


class RefusalTests(SynchronousTestCase):
    def test_no_html_part(self) -> None:
        e = self.assertRaises(PreviewError, preview, message(html="", msys_api=TRACKING_ON))
        self.assertIn("the message has no text/html part", str(e))

    def test_malformed_mime_is_a_preview_of_an_untouched_copy(self) -> None:
        data = b"From: a@example.net\r\nTo: b@example.test\r\nContent-Type: multipart/mixed\r\n\r\nhi\r\n"
        result = preview(data)
        self.assertEqual(result.parts,
                         ["delivered as it came: malformed MIME: multipart/mixed without a boundary"])
        self.assertEqual(result.copy, data)

    def test_a_bad_x_msys_api_header_is_the_appliances_refusal(self) -> None:
        data = message().replace(b"Subject: Sale", b'Subject: Sale\r\nX-MSYS-API: {"tags": "x"}')
        e = self.assertRaises(PreviewError, preview, data)
        self.assertEqual(str(e), "the appliance would refuse this message: 550 5.6.0 "
                                 "X-MSYS-API 'tags' must be of type 'array'")

    def test_x_msys_api_option_replaces_the_header_and_must_be_json(self) -> None:
        data = with_msys_api(message(msys_api={"campaign_id": "old"}), '{"campaign_id": "new"}')
        self.assertEqual(data.count(b"X-MSYS-API"), 1)
        self.assertEqual(preview(data).tracking.campaign_id, "new")
        e = self.assertRaises(PreviewError, with_msys_api, message(), '{"campaign_id": ')
        self.assertIn("--x-msys-api is not valid JSON: Expecting value", str(e))

    def test_a_policy_rejection(self) -> None:
        e = self.assertRaises(PreviewError, preview, message(), verdict=Verdict(550, "5.7.1 Not this one"))
        self.assertEqual(str(e), "the policy hook refuses reader@example.test: 550 5.7.1 Not this one")

    def test_unreadable_and_empty_files(self) -> None:
        e = self.assertRaises(PreviewError, read_message, os.path.join(self.mktemp(), "nope.eml"))
        self.assertIn("No such file or directory", str(e))
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\n")
        self.assertEqual(str(self.assertRaises(PreviewError, read_message, path)), f"{path} is empty")

    def test_lf_line_ends_are_read_as_crlf(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(message().replace(b"\r\n", b"\n"))
        data, notes = read_message(path)
        self.assertEqual(data, message())
        self.assertEqual(notes, ["line ends read as CRLF, as an SMTP client sends them"])


class RewriterAuditTests(SynchronousTestCase):
    def test_asking_for_the_untracked_links_changes_nothing(self) -> None:
        html = HTML + '<a href="' + "https://x.example/" + "a" * 5000 + '">long</a>'
        for edits in (html_edits, text_edits):
            self.assertEqual(edits(html), edits(html, []))
        self.assertEqual(prepare(message(html)).parts[1].template,
                         prepare(message(html), audit=Audit()).parts[1].template)

    def test_skipped_parts_are_in_the_audit(self) -> None:
        data = message().replace(b"text/html; charset=utf-8", b"text/html; charset=x-unknown")
        audit = Audit()
        prepare(data, audit=audit)
        self.assertEqual([(p.kind, p.skipped) for p in audit.parts],
                         [("text", ""), ("html", "unknown charset 'x-unknown'")])


def campaign_hook(envelope: PolicyEnvelope, client: str, user: Any, headers: Message,
                  context: dict[str, str]) -> Any:
    if envelope.rcpt_to.startswith("no@"):
        return Reject(550, "5.7.1 Not this one")
    context["smtpapi_campaign_id"] = f"hook-{headers['Subject']}"
    return None


def synchronous_react(run: Any) -> None:
    run(task.Clock())


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "appliance.toml")
        self.write_config()
        self.eml = os.path.join(self.directory, "message.eml")
        with open(self.eml, "wb") as f:
            f.write(message(msys_api=TRACKING_ON).replace(b"\r\n", b"\n"))

    def write_config(self, extra: str = "") -> None:
        d = json.dumps(self.directory)[1:-1]
        with open(self.config, "w") as f:
            f.write(f"""[node]\nname = "n1"\nhostname = "localhost"\n[smtpapi]\ntracking_domain = "t.example"
[smtp]\ncreate_certificate = false\n[smtp.listeners.default]\nendpoint = "tcp:0"
[spool]\ndirectory = "{d}/spool"\n[events]\nlog_file = "{d}/events.jsonl"
[links]\nkeys_file = "{d}/links.keys"\n{extra}""")

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--config", self.config])
        return code, out.getvalue(), err.getvalue()

    def test_text_report_and_the_copy(self) -> None:
        out_path = os.path.join(self.directory, "copy.eml")
        code, out, err = self.run_main(self.eml, "--out", out_path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Preview of the copy for reader@example.test (listener default)", out)
        self.assertIn("Links (9, 3 tracked):", out)
        self.assertRegex(out, r"\n  open_tracking +on +X-MSYS-API options.open_tracking\n")
        self.assertRegex(out, r"\n  4 +html +4 +Write to us +mailto:help@shop.example +left alone +"
                              r"not http\(s\): a mailto: link\n")
        self.assertIn(f"The copy was written to {out_path}.", out)
        with open(out_path, "rb") as f:
            copy = f.read()
        self.assertIn(b"http://t.example/f/a/", copy)
        self.assertNotIn(b"X-MSYS-API", copy)
        # The key file is never read or created: the links are the preview's own.
        self.assertFalse(os.path.exists(os.path.join(self.directory, "links.keys")))

    def test_json(self) -> None:
        code, out, _ = self.run_main(self.eml, "--json", "--rcpt", "other@example.test",
                                     "--x-msys-api", '{"options": {"click_tracking": false}}')
        self.assertEqual(code, 0)
        result = json.loads(out)
        self.assertEqual(result["rcpt"], "other@example.test")
        self.assertFalse(result["tracking"]["click_tracking"])
        self.assertEqual(len(result["links"]), 9)
        self.assertFalse(any(link["tracked"] for link in result["links"]))
        self.assertIn("X-MSYS-API: the one given with --x-msys-api", result["notes"])

    def test_errors_write_nothing(self) -> None:
        out_path = os.path.join(self.directory, "copy.eml")
        cases = [
            ((os.path.join(self.directory, "missing.eml"),), "cannot read"),
            ((self.eml, "--x-msys-api", "{nope"), "--x-msys-api is not valid JSON"),
            ((self.eml, "--listener", "other"), "no SMTP listener named 'other' (default)"),
        ]
        for argv, text in cases:
            code, out, err = self.run_main(*argv, "--out", out_path)
            self.assertIn(code, (1, 2))
            self.assertEqual(out, "")
            self.assertIn(text, err)
            self.assertFalse(os.path.exists(out_path))

    def test_a_subcommand_of_engage_appliance(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(console.main(["preview", self.eml, "--config", self.config, "--json"]), 0)
        self.assertEqual(json.loads(out.getvalue())["rcpt"], "reader@example.test")
        with contextlib.redirect_stdout(io.StringIO()) as usage:
            e = self.assertRaises(SystemExit, console.main, ["preview", "--help"])
        self.assertEqual(e.code, 0)
        self.assertIn("--x-msys-api JSON", usage.getvalue())

    def test_a_bad_configuration(self) -> None:
        self.write_config("[smtpapi2]\n")
        code, _, err = self.run_main(self.eml)
        self.assertEqual(code, 2)
        self.assertIn("smtpapi2: unknown table", err)

    def test_the_policy_hook_is_asked_as_at_injection(self) -> None:
        self.write_config('[policy]\nhook = "tests.test_preview:campaign_hook"\n')
        config = parse_config(tomllib_load(self.config), self.config)
        headers = Message()
        headers["Subject"] = "Sale"
        envelope = PolicyEnvelope("shop@example.net", "reader@example.test", ("reader@example.test",), "0",
                                  "default", "preview", False)
        verdict = ask_policy(config, envelope, headers, synchronous_react)
        self.assertEqual(verdict.context.campaign_id, "hook-Sale")
        refused = ask_policy(config, PolicyEnvelope(**{**envelope.__dict__, "rcpt_to": "no@example.test"}),
                             headers, synchronous_react)
        self.assertEqual((refused.code, refused.text), (550, "5.7.1 Not this one"))


def tomllib_load(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)
