"""X-MSYS-API parsing and the per-setting precedence of SPEC §4, rule by rule and row by row."""

from __future__ import annotations

import base64
import json
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.trial.unittest import SynchronousTestCase

from appliance.config import EngagementTrackerConfig, SmtpapiConfig
from appliance.headers import decode_encoded_words, unfold
from appliance.settings import (
    ContextSettings,
    MsysApi,
    MsysApiError,
    PolicyValueError,
    Tracking,
    header_values,
    limit_notes,
    parse_context,
    parse_msys_api,
    resolve,
)
from tests.helpers import TRACKING_DOMAIN, make_config


def values(raw: bytes) -> list[str]:
    """The values the injection server's header parser gives for a real header block."""
    return header_values(BytesHeaderParser(policy=compat32).parsebytes(raw + b"\r\n"))


def parse(raw: bytes, max_metadata_len: int = 1000) -> MsysApi:
    return parse_msys_api(values(raw), max_metadata_len)


class MsysApiTests(SynchronousTestCase):
    def refused(self, raw: bytes, text: str, max_metadata_len: int = 1000) -> None:
        e = self.assertRaises(MsysApiError, parse, raw, max_metadata_len)
        self.assertEqual(str(e), text)

    def test_absent(self) -> None:
        self.assertEqual(parse(b"Subject: x\r\n"), MsysApi())

    def test_full_header(self) -> None:
        api = parse(b'X-MSYS-API: {"campaign_id":"spring","metadata":{"user":"42","n":[1,2]},'
                    b'"tags":["a","b"],"options":{"open_tracking":true,"click_tracking":false}}\r\n')
        self.assertEqual(api, MsysApi(True, False, "spring", {"user": "42", "n": [1, 2]}, ("a", "b")))

    def test_unfolding(self) -> None:
        api = parse(b'X-MSYS-API: {"campaign_id":\r\n  "a b",\r\n\t"tags": ["x"]}\r\n')
        self.assertEqual((api.campaign_id, api.tags), ("a b", ("x",)))
        self.assertEqual(unfold("a\r\n b\r\n\tc"), "a b\tc")

    def test_rfc2047(self) -> None:
        json_text = '{"campaign_id":"Été","metadata":{"k":"ü"}}'
        b64 = base64.b64encode(json_text.encode()).decode()
        api = parse(f"X-MSYS-API: =?utf-8?B?{b64}?=\r\n".encode())
        self.assertEqual((api.campaign_id, api.metadata), ("Été", {"k": "ü"}))
        # Two adjacent words: the white space between them is not part of the value.
        first, second = json_text[:10].encode(), json_text[10:].encode()
        raw = (f"X-MSYS-API: =?utf-8?B?{base64.b64encode(first).decode()}?=\r\n"
               f" =?utf-8?B?{base64.b64encode(second).decode()}?=\r\n").encode()
        self.assertEqual(parse(raw).campaign_id, "Été")
        # Q encoding, mixed with plain text whose spaces are kept.
        self.assertEqual(decode_encoded_words('{"a": "=?iso-8859-1?Q?caf=E9_au_lait?= x"}'),
                         '{"a": "café au lait x"}')

    def test_raw_utf8(self) -> None:
        self.assertEqual(parse('X-MSYS-API: {"campaign_id":"naïve"}\r\n'.encode()).campaign_id, "naïve")
        self.refused(b'X-MSYS-API: {"campaign_id":"\xff"}\r\n', "X-MSYS-API is not valid UTF-8")

    def test_bad_encoded_word(self) -> None:
        self.refused(b"X-MSYS-API: =?x-no-such-charset?B?e30=?=\r\n",
                     "X-MSYS-API has an encoded word that cannot be decoded")

    def test_unknown_fields_and_options_ignored_and_named(self) -> None:
        api = parse(b'X-MSYS-API: {"transactional":true,"campain_id":"x","options":'
                    b'{"transactional":true,"sandbox":1,"open_tracking":true}}\r\n')
        # options.transactional is read (one-click unsubscribe, suppression scopes); a
        # top-level "transactional" is not SparkPost's, and is named.
        self.assertEqual(api, MsysApi(open_tracking=True, transactional=True, unknown_fields=(
            "transactional", "campain_id", "options.sandbox")))
        self.assertEqual(limit_notes(api, ContextSettings()), {"msys_api_unknown_fields": [
            "transactional", "campain_id", "options.sandbox"]})
        self.assertEqual(limit_notes(parse(b'X-MSYS-API: {"campaign_id":"c"}\r\n'), ContextSettings()),
                         {})

    def test_initial_open_option(self) -> None:
        for value, expected in ((b"true", True), (b"false", False)):
            api = parse(b'X-MSYS-API: {"options":{"initial_open":' + value + b"}}\r\n")
            self.assertEqual((api.initial_open, api.unknown_fields), (expected, ()))
            # The header beats the listener's configuration, either way.
            for configured in (False, True):
                config = SmtpapiConfig(initial_open=configured)
                got = resolve(config, TRACKER, api, ContextSettings(), 0)
                self.assertEqual(got.initial_open, expected)
                self.assertEqual(resolve(config, TRACKER, MsysApi(), ContextSettings(), 0).initial_open,
                                 configured)
        self.refused(b'X-MSYS-API: {"options":{"initial_open":"no"}}\r\n',
                     "X-MSYS-API 'options.initial_open' must be of type 'boolean'")

    def test_every_type_rule(self) -> None:
        cases = {
            b"{": "X-MSYS-API is not valid JSON",
            b'{"a":NaN}': "X-MSYS-API is not valid JSON",
            b'{"a":1e999}': "X-MSYS-API 'a' must not contain a number out of range "
                            "(it would be Infinity)",
            b'{"metadata":{"x":{"y":-1E400}}}': "X-MSYS-API 'metadata' must not contain a number "
                                                "out of range (it would be Infinity)",
            b"[]": "X-MSYS-API must be of type 'json object'",
            b'"x"': "X-MSYS-API must be of type 'json object'",
            b'{"options":[]}': "X-MSYS-API 'options' must be of type 'json object'",
            b'{"options":{"open_tracking":"true"}}':
                "X-MSYS-API 'options.open_tracking' must be of type 'boolean'",
            b'{"options":{"click_tracking":1}}':
                "X-MSYS-API 'options.click_tracking' must be of type 'boolean'",
            b'{"campaign_id":5}': "X-MSYS-API 'campaign_id' must be of type 'string'",
            b'{"metadata":"x"}': "X-MSYS-API 'metadata' must be of type 'json object'",
            b'{"metadata":[1]}': "X-MSYS-API 'metadata' must be of type 'json object'",
            b'{"tags":"a"}': "X-MSYS-API 'tags' must be of type 'array'",
            b'{"tags":["a",1]}': "X-MSYS-API 'tags' must be an array of strings",
        }
        for value, text in cases.items():
            self.refused(b"X-MSYS-API: " + value + b"\r\n", text)

    def test_campaign_id_limit_in_bytes(self) -> None:
        ok = "é" * 32  # 64 bytes
        self.assertEqual(parse(f'X-MSYS-API: {{"campaign_id":"{ok}"}}\r\n'.encode()).campaign_id, ok)
        self.refused(f'X-MSYS-API: {{"campaign_id":"{ok}x"}}\r\n'.encode(),
                     "X-MSYS-API 'campaign_id' must not be longer than 64 bytes")

    def test_metadata_limit(self) -> None:
        """Longer than max_metadata_len, metadata is kept for events but left out of links."""
        meta = b'{"k":"' + b"v" * 22 + b'"}'  # 30 bytes of compact JSON
        fits = parse(b'X-MSYS-API: {"metadata": ' + meta + b"}\r\n", 30)
        self.assertEqual((fits.metadata, fits.metadata_oversized), ({"k": "v" * 22}, False))
        over = parse(b'X-MSYS-API: {"metadata":' + meta + b"}\r\n", 29)
        self.assertEqual((over.metadata, over.metadata_oversized), ({"k": "v" * 22}, True))
        tracking = resolve(CONFIG, TRACKER, over, ContextSettings(), 0)
        self.assertEqual((tracking.metadata, tracking.metadata_in_links, tracking.include_metadata),
                         ({"k": "v" * 22}, False, False))
        self.assertEqual(limit_notes(over, ContextSettings()), {"rcpt_meta_left_out_of_links": True})
        # A policy's metadata that fits replaces the header's, and rides in links again.
        policy = ContextSettings(metadata={"p": 1})
        self.assertTrue(resolve(CONFIG, TRACKER, over, policy, 0).metadata_in_links)
        self.assertEqual(limit_notes(over, policy), {})

    def test_cr_lf_in_any_string(self) -> None:
        for value, name in ((b'{"campaign_id":"a\\r\\nBcc: x"}', "campaign_id"),
                            (b'{"metadata":{"k":["ok","a\\nb"]}}', "metadata"),
                            (b'{"metadata":{"a\\rb":1}}', "metadata"),
                            (b'{"tags":["x\\n"]}', "tags"),
                            (b'{"ignored_field":"x\\ny"}', "ignored_field")):
            self.refused(b"X-MSYS-API: " + value + b"\r\n",
                         f"X-MSYS-API '{name}' must not contain CR or LF")

    def test_lone_surrogates_in_any_string(self) -> None:
        """JSON escapes can name half a character: not text, so nothing could write it."""
        for value, name in ((rb'{"campaign_id":"\ud800"}', "campaign_id"),
                            (rb'{"tags":["ok","a\udfffb"]}', "tags"),
                            (rb'{"metadata":{"k":{"\ud800":1}}}', "metadata"),
                            (rb'{"ignored":["\udbff"]}', "ignored"),
                            (rb'{"\ud800":1}', "?")):
            self.refused(b"X-MSYS-API: " + value + b"\r\n",
                         f"X-MSYS-API '{name}' must not contain a lone surrogate (not Unicode text)")
        # A pair of escapes is one character, and fine.
        self.assertEqual(parse(rb'X-MSYS-API: {"campaign_id":"\ud83d\ude00"}' + b"\r\n").campaign_id,
                         "\U0001f600")

    def test_nesting(self) -> None:
        def nested(depth: int) -> bytes:
            return b"[" * depth + b"]" * depth

        # Folded over many lines, a header can nest deeper than the JSON parser recurses.
        text = b'{"x":' + nested(4000) + b"}"
        deep = b"\r\n ".join(text[i:i + 900] for i in range(0, len(text), 900))
        self.refused(b"X-MSYS-API: " + deep + b"\r\n", "X-MSYS-API is nested too deeply")
        self.refused(b'X-MSYS-API: {"x":' + nested(101) + b"}\r\n",
                     "X-MSYS-API 'x' must not be nested more than 100 levels deep")
        self.refused(b'X-MSYS-API: {"metadata":' + b'{"a":' * 101 + b"1" + b"}" * 102 + b"\r\n",
                     "X-MSYS-API 'metadata' must not be nested more than 100 levels deep")
        self.assertEqual(parse(b'X-MSYS-API: {"x":' + nested(100) + b', "campaign_id":"c"}\r\n'
                               ).campaign_id, "c")

    def test_tag_length_in_bytes(self) -> None:
        ok = "é" * 32  # 64 bytes
        self.assertEqual(parse(f'X-MSYS-API: {{"tags":["{ok}"]}}\r\n'.encode()).tags, (ok,))
        self.refused(f'X-MSYS-API: {{"tags":["a","{ok}x"]}}\r\n'.encode(),
                     "X-MSYS-API 'tags' must not contain a tag longer than 64 bytes")
        # Tags past the tenth are ignored, however long.
        tags = [f"t{i}" for i in range(10)] + ["x" * 100]
        raw = ('X-MSYS-API: {"tags":[' + ",".join(f'"{t}"' for t in tags) + "]}\r\n").encode()
        self.assertEqual(parse(raw).tags, tuple(tags[:10]))

    def test_more_than_ten_tags(self) -> None:
        """Momentum: tags beyond ten "are ignored"; the injection event says how many."""
        tags = [f"t{i}" for i in range(14)]
        raw = ('X-MSYS-API: {"tags":[' + ",".join(f'"{t}"' for t in tags) + "]}\r\n").encode()
        api = parse(raw)
        self.assertEqual((api.tags, api.tags_ignored), (tuple(tags[:10]), 4))
        self.assertEqual(limit_notes(api, ContextSettings()), {"rcpt_tags_ignored": 4})
        self.assertEqual(parse(b'X-MSYS-API: {"tags":["a"]}\r\n').tags_ignored, 0)

    def test_twice(self) -> None:
        self.refused(b'X-MSYS-API: {}\r\nX-MSYS-API: {"campaign_id":"x"}\r\n',
                     "X-MSYS-API must not appear more than once")


class ContextTests(SynchronousTestCase):
    def test_values(self) -> None:
        c = parse_context({
            "smtpapi_open_tracking": "true", "smtpapi_click_tracking": "0",
            "smtpapi_campaign_id": "c", "smtpapi_metadata": '{"a":1}', "smtpapi_tags": '["x"]',
            "smtpapi_open_tracking_scheme": "https", "smtpapi_click_tracking_scheme": "https",
            "smtpapi_tracking_domain": "t.example.com:8443", "smtpapi_tracking_link_expiry": "5d",
            "unrelated": "kept out",
        }, 1000)
        self.assertEqual(c, ContextSettings(True, False, "c", {"a": 1}, ("x",), "https", "https",
                                            "t.example.com:8443", 5 * 86400.0))
        for text, value in (("1", True), ("0", False), ("TRUE", True), (" false ", False)):
            self.assertEqual(parse_context({"smtpapi_open_tracking": text}, 10).open_tracking, value)

    def test_bad_values_name_the_variable(self) -> None:
        for name, value in (("smtpapi_open_tracking", "yes"), ("smtpapi_click_tracking", 1),
                            ("smtpapi_campaign_id", "x" * 65), ("smtpapi_campaign_id", "a\nb"),
                            ("smtpapi_metadata", "[1]"), ("smtpapi_metadata", "{"),
                            ("smtpapi_tags", '{"a":1}'), ("smtpapi_tags", "[1]"),
                            ("smtpapi_tags", '["' + "x" * 65 + '"]'),
                            ("smtpapi_tags", '["\\ud800"]'), ("smtpapi_metadata", '{"\\udc00":1}'),
                            ("smtpapi_campaign_id", "\ud800"), ("smtpapi_tracking_domain", "\ud800"),
                            ("smtpapi_metadata", '{"a":' * 2000 + "1" + "}" * 2000),
                            ("smtpapi_metadata", '{"a":' + "[" * 100 + "]" * 100 + "}"),
                            ("smtpapi_metadata", '{"a":1e999}'),
                            ("smtpapi_metadata", '{"a":{"b":[-1e309]}}'),
                            ("smtpapi_open_tracking_scheme", "ftp"),
                            ("smtpapi_tracking_domain", "a b"),
                            ("smtpapi_tracking_link_expiry", "soon")):
            e = self.assertRaises(PolicyValueError, parse_context, {name: value}, 100)
            self.assertIn(name, str(e))

    def test_more_than_ten_tags(self) -> None:
        context = parse_context({"smtpapi_tags": str([f"t{i}" for i in range(12)]).replace("'", '"')}, 100)
        self.assertEqual((context.tags, context.tags_ignored), (tuple(f"t{i}" for i in range(10)), 2))
        self.assertEqual(limit_notes(MsysApi(tags=("h",) * 10, tags_ignored=5), context),
                         {"rcpt_tags_ignored": 2})

    def test_long_metadata_is_left_out_of_links(self) -> None:
        context = parse_context({"smtpapi_metadata": '{"k":"' + "v" * 200 + '"}'}, 100)
        self.assertEqual((len(context.metadata["k"]), context.metadata_oversized), (200, True))
        self.assertFalse(resolve(CONFIG, TRACKER, MsysApi(), context, 0).metadata_in_links)
        self.assertEqual(limit_notes(MsysApi(), context), {"rcpt_meta_left_out_of_links": True})


CONFIG = SmtpapiConfig(open_tracking_enabled=False, click_tracking_enabled=True,
                       open_tracking_scheme="http", click_tracking_scheme="http",
                       tracking_domain="config.example", tracking_link_expiry=100.0)
TRACKER = EngagementTrackerConfig()


class PrecedenceTests(SynchronousTestCase):
    """Every row of SPEC §4's table: policy beats header beats configuration."""

    def rows(self) -> list[tuple[str, object, object, object, object]]:
        # (setting, policy value, header value or None where the header has no field,
        #  the value when neither says anything: CONFIG's, or empty)
        return [
            ("open_tracking", True, True, False),
            ("click_tracking", False, False, True),
            ("campaign_id", "from-policy", "from-header", ""),
            ("metadata", {"p": 1}, {"h": 1}, {}),
            ("tags", ("p",), ("h",), ()),
            ("open_tracking_scheme", "https", None, "http"),
            ("click_tracking_scheme", "https", None, "http"),
            ("tracking_domain", "policy.example", None, "config.example"),
        ]

    def test_each_row(self) -> None:
        for name, policy, header, default in self.rows():
            with_header = MsysApi(**{name: header}) if header is not None else MsysApi()
            # Nothing set: configuration (or empty).
            self.assertEqual(getattr(resolve(CONFIG, TRACKER, MsysApi(), ContextSettings(), 0), name),
                             default, name)
            if header is not None:
                got = resolve(CONFIG, TRACKER, with_header, ContextSettings(), 0)
                self.assertEqual(getattr(got, name), header, name)
            got = resolve(CONFIG, TRACKER, with_header, ContextSettings(**{name: policy}), 0)
            self.assertEqual(getattr(got, name), policy, name)
            self.assertNotEqual(policy, default, name)  # each row really changes the outcome

    def test_flags_every_combination(self) -> None:
        """An explicit false is a setting, not an absence; each level beats the ones below."""
        for name in ("open_tracking", "click_tracking"):
            for config_value in (False, True):
                config = SmtpapiConfig(**{f"{name}_enabled": config_value})
                for header in (None, False, True):
                    for policy in (None, False, True):
                        got = getattr(resolve(config, TRACKER, MsysApi(**{name: header}),
                                              ContextSettings(**{name: policy}), 0), name)
                        expected = next(v for v in (policy, header, config_value) if v is not None)
                        self.assertEqual(got, expected, (name, config_value, header, policy))

    def test_expiry_row(self) -> None:
        self.assertEqual(resolve(CONFIG, TRACKER, MsysApi(), ContextSettings(), 1000.5).expiry, 1100)
        got = resolve(CONFIG, TRACKER, MsysApi(), ContextSettings(tracking_link_expiry=7.0), 1000)
        self.assertEqual(got.expiry, 1007)

    def test_settings_are_independent(self) -> None:
        """A policy that sets one variable leaves the others to the header and configuration."""
        got = resolve(CONFIG, TRACKER, MsysApi(open_tracking=True, campaign_id="h"),
                      ContextSettings(click_tracking=False), 0)
        self.assertEqual((got.open_tracking, got.click_tracking, got.campaign_id), (True, False, "h"))

    def test_per_listener_configuration(self) -> None:
        config = make_config(self.mktemp(), smtpapi={"click_tracking_enabled": False},
                             smtp={"listeners": {"marketing": {
                                 "endpoint": "tcp:0:interface=127.0.0.1",
                                 "smtpapi": {"click_tracking_enabled": True,
                                             "tracking_domain": "m.example"}}}})
        by_name = {lc.name: lc.smtpapi for lc in config.smtp.listeners}
        default = resolve(by_name["default"], TRACKER, MsysApi(), ContextSettings(), 0)
        marketing = resolve(by_name["marketing"], TRACKER, MsysApi(), ContextSettings(), 0)
        self.assertEqual((default.click_tracking, default.tracking_domain), (False, TRACKING_DOMAIN))
        self.assertEqual((marketing.click_tracking, marketing.tracking_domain), (True, "m.example"))
        # The header still beats the listener's configuration.
        off = resolve(by_name["marketing"], TRACKER, MsysApi(click_tracking=False), ContextSettings(), 0)
        self.assertFalse(off.click_tracking)

    def test_round_trip_through_the_envelope(self) -> None:
        t = resolve(CONFIG, TRACKER, MsysApi(tags=("a",), metadata={"x": [1]}),
                    ContextSettings(open_tracking=True), 5)
        self.assertEqual(Tracking.from_json(json.loads(json.dumps(t.to_json()))), t)
        self.assertEqual(Tracking.from_json({}), Tracking())
