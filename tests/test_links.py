"""The link codec: signed tokens, key rotation, the key file and its command."""

from __future__ import annotations

import base64
import hmac
import io
import json
import os
import sys
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from appliance.links import (
    InvalidToken,
    KeyFileError,
    Keyring,
    LinkCodec,
    LinkData,
    click_suffix,
    click_url,
    keys_main,
    location_header,
    new_keyring,
    open_url,
    parse_keyring,
    prepare_keyring,
    read_keyring,
    rotated,
)

KEYRING = Keyring(((7, b"k" * 32),))
CODEC = LinkCodec(KEYRING)


def click(target: str = "https://example.com/a?b=1&c=%20#frag", **kw: object) -> LinkData:
    values: dict = dict(kind="click", expiry=2_000_000_000, message_id="0123456789abcdef0123",
                        transmission_id="84813762132582711", rcpt_to="someone@example.com",
                        campaign_id="Spring sale", tags=("a", "b"), metadata={"user": "42"},
                        link_name="Hero image", target=target)
    values.update(kw)
    return LinkData(**values)


urls = st.builds(
    lambda scheme, host, rest: f"{scheme}://{host}/{rest}",
    st.sampled_from(["http", "https", "HTTPS"]),
    st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
)


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        data = click()
        self.assertEqual(CODEC.decode(CODEC.encode(data)), data)
        opened = LinkData("open", 1, "m", "t", "r")
        self.assertEqual(CODEC.decode(CODEC.encode(opened)), opened)

    def test_send_time_and_trap_round_trip(self) -> None:
        for data in (click(issued=1_700_000_000), click(issued=1_700_000_000, trap=True),
                     LinkData("open", 1, "m", "t", "r", issued=5)):
            self.assertEqual(CODEC.decode(CODEC.encode(data)), data)
        common = click(issued=1_700_000_123)
        token = CODEC.click_encoder(common)(click_suffix("Hero image", common.target, False))
        self.assertEqual(CODEC.decode(token), common)
        for wrong in ("1700000000", 1.5, None, True):
            body = click(issued=0).to_array()
            body[8] = wrong
            self.assertRaises(InvalidToken, LinkData.from_array, body)
        trapped = click().to_array()
        trapped[12] = 2
        self.assertRaises(InvalidToken, LinkData.from_array, trapped)
        self.assertRaises(InvalidToken, LinkData.from_array, click().to_array()[:12])

    def test_links_from_before_the_send_time_still_decode(self) -> None:
        """Tokens made by the code before links carried ``issued`` and ``trap`` (key 3, b"s" * 32)."""
        codec = LinkCodec(Keyring(((3, b"s" * 32),)))
        old_click = ("EANbImMiLDQxMDI0NDQ4MDAsIjAwYTFiMmMzZDRlNWY2YTdiOGM5IiwiNDcxMSIsIlNvbWVvbmVARXhhbXBs"
                     "ZS5DT00iLCJTcHJpbmcgc2FsZSIsWyJuZXdzIl0seyJ1c2VyIjoiNDIifSwiSGVybyIsImh0dHBzOi8vc2hv"
                     "cC5leGFtcGxlL3AiLDBdD7411rEBYG9rPfUtYX9gVg")
        old_open = ("EANbIm8iLDQxMDI0NDQ4MDAsIjAwYTFiMmMzZDRlNWY2YTdiOGM5IiwiNDcxMSIsIlNvbWVvbmVARXhhbXBsZ"
                    "S5DT00iLCJTcHJpbmcgc2FsZSIsWyJuZXdzIl0sbnVsbCwiIiwiIiwwXQgSYRyPlFjFVkPdbxcCvLQ")
        self.assertEqual(codec.decode(old_click), LinkData(
            "click", 4102444800, "00a1b2c3d4e5f6a7b8c9", "4711", "Someone@Example.COM", "Spring sale",
            ("news",), {"user": "42"}, "Hero", "https://shop.example/p", False, issued=0, trap=False))
        self.assertEqual(codec.decode(old_open), LinkData(
            "open", 4102444800, "00a1b2c3d4e5f6a7b8c9", "4711", "Someone@Example.COM", "Spring sale",
            ("news",), None))

    def test_typical_token_is_short(self) -> None:
        token = CODEC.encode(click())
        self.assertLess(len(token), 500)
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")

    def test_click_encoder_gives_the_same_tokens(self) -> None:
        common = click(link_name="ignored", target="ignored", unsubscribe=True)
        encode = CODEC.click_encoder(common)
        for name, target, unsub in (("Raw URL", "https://e.com/a?b=1&c=2#f", False),
                                    ("Ünï", "https://例え.jp/パス?q=ü", True),
                                    ("x" * 63, "https://e.com/" + "p" * 2000, False)):
            expected = click(link_name=name, target=target, unsubscribe=unsub)
            token = encode(click_suffix(name, target, unsub))
            self.assertEqual(token, CODEC.encode(expected))
            self.assertEqual(CODEC.decode(token), expected)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=200), st.integers(0, 255), st.text(max_size=40),
           st.text(max_size=400), st.booleans(), st.text(max_size=30))
    def test_tokens_are_the_hmac_of_their_body(self, key: bytes, kid: int, name: str, target: str,
                                               unsub: bool, rcpt: str) -> None:
        """
        Every token, from ``encode`` or a recipient's ``click_encoder``, is exactly the one the
        format defines: signed with ``hmac.digest`` over version, key id and the JSON body
        (deflated from ``DEFLATE_FROM`` bytes, where shorter), whatever the key's length and
        wherever the recipient's half of the body ends in a base64 group.
        """
        codec = LinkCodec(Keyring(((kid, key),)))
        data = click(link_name=name, target=target, unsubscribe=unsub, rcpt_to=rcpt)
        body = json.dumps(data.to_array(), separators=(",", ":"), ensure_ascii=False).encode()
        version = 0x10
        if len(body) >= 320:
            deflater = zlib.compressobj(9, zlib.DEFLATED, -12, 2)
            packed = deflater.compress(body) + deflater.flush()
            if len(packed) < len(body):
                body, version = packed, 0x11
        signed = bytes((version, kid)) + body
        raw = signed + hmac.digest(key, signed, "sha256")[:16]
        expected = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.assertEqual(codec.encode(data), expected)
        self.assertEqual(codec.click_encoder(data)(click_suffix(name, target, unsub)), expected)
        self.assertEqual(codec.decode(expected), data)

    def test_long_bodies_are_deflated(self) -> None:
        short = CODEC.encode(click())
        self.assertEqual(base64.urlsafe_b64decode(short + "==")[0], 0x10)
        data = click(metadata={f"key{i}": "value" for i in range(60)})
        token = CODEC.encode(data)
        self.assertEqual(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[0], 0x11)
        self.assertLess(len(token), 500)
        self.assertEqual(CODEC.decode(token), data)

    def test_padding_forms_accepted(self) -> None:
        token = CODEC.encode(click())
        padding = "=" * (-len(token) % 4)
        self.assertEqual(CODEC.decode(token + padding.replace("=", "~")), click())
        self.assertEqual(CODEC.decode(token + padding), click())

    def test_garbage_rejected(self) -> None:
        for bad in ("", "a", "!!!!!!!!!!!!", "A" * 40, "é" * 20, b"\xff" * 20,
                    base64.urlsafe_b64encode(b"\x10\x07" + b"x" * 30).decode()):
            self.assertRaises(InvalidToken, CODEC.decode, bad)

    def test_unknown_key_rejected(self) -> None:
        other = LinkCodec(Keyring(((8, b"k" * 32),)))
        self.assertRaises(InvalidToken, CODEC.decode, other.encode(click()))
        forged = LinkCodec(Keyring(((7, b"x" * 32),)))  # same id, wrong key
        self.assertRaises(InvalidToken, CODEC.decode, forged.encode(click()))

    def test_rotation(self) -> None:
        new = rotated(KEYRING)
        self.assertNotEqual(new.signing[0], 7)
        old_token = CODEC.encode(click())
        codec = LinkCodec(new)
        self.assertEqual(codec.decode(old_token), click())
        self.assertEqual(codec.decode(codec.encode(click())), click())
        self.assertRaises(InvalidToken, CODEC.decode, codec.encode(click()))

    def test_expiry(self) -> None:
        self.assertFalse(click(expiry=100).expired(99.9))
        self.assertTrue(click(expiry=100).expired(100))

    @settings(max_examples=200, deadline=None)
    @given(urls)
    def test_every_target_decodes_exactly(self, url: str) -> None:
        self.assertEqual(CODEC.decode(CODEC.encode(click(url))).target, url)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_any_single_byte_change_fails(self, data: st.DataObject) -> None:
        token = CODEC.encode(click(data.draw(urls)))
        raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
        altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        self.assertRaises(InvalidToken, CODEC.decode, altered)


class UrlTests(SynchronousTestCase):
    def test_shapes(self) -> None:
        self.assertEqual(open_url("https", "t.example.com", "TOK"), "https://t.example.com/q/TOK")
        self.assertEqual(click_url("http", "t.example.com:8080", "TOK"),
                         "http://t.example.com:8080/f/a/TOK")
        self.assertEqual(click_url("http", "t", "TOK", "spring sale/x"), "http://t/f/spring_sale%2Fx/TOK")

    def test_location_header(self) -> None:
        self.assertEqual(location_header("https://example.com/a?b=1&c=%2F#x"),
                         b"https://example.com/a?b=1&c=%2F#x")
        self.assertEqual(location_header("https://例え.jp/パス?q=ü"),
                         b"https://%E4%BE%8B%E3%81%88.jp/%E3%83%91%E3%82%B9?q=%C3%BC")
        for bad in ("https://a/\r\nSet-Cookie: x", "https://a/b c", "javascript:alert(1)",
                    "ftp://a/", "//a/b", "https://a/\x00"):
            self.assertIsNone(location_header(bad), bad)


class KeyFileTests(SynchronousTestCase):
    def test_parse_errors_name_the_line(self) -> None:
        good = base64.urlsafe_b64encode(b"k" * 32).decode()
        for text, message in (
            ("", "no keys"),
            ("# only a comment\n", "no keys"),
            ("x " + good, "line 1"),
            ("1 " + base64.urlsafe_b64encode(b"short").decode(), "at least 32 bytes"),
            (f"1 {good}\n1 {good}", "listed twice"),
            (f"300 {good}", "line 1"),
        ):
            e = self.assertRaises(KeyFileError, parse_keyring, text)
            self.assertIn(message, str(e))

    def test_prepare_creates_private_file(self) -> None:
        path = os.path.join(self.mktemp(), "keys")
        keyring = prepare_keyring(path, create=True)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(read_keyring(path), keyring)
        self.assertEqual(prepare_keyring(path, create=True), keyring)  # never replaced
        missing = os.path.join(self.mktemp(), "none")
        e = self.assertRaises(KeyFileError, prepare_keyring, missing, create=False)
        self.assertIn("engage-appliance-keys", str(e))

    def test_command(self) -> None:
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", io.StringIO())
        path = os.path.join(self.mktemp(), "keys")
        self.assertEqual(keys_main(["--file", path, "create"]), 0)
        self.assertEqual(keys_main(["--file", path, "create"]), 1)  # never overwrites
        self.assertIn("exists already", sys.stderr.getvalue())
        first = read_keyring(path)
        self.assertEqual(keys_main(["--file", path, "rotate"]), 0)
        second = read_keyring(path)
        self.assertEqual(second.keys[1:], first.keys)
        self.assertEqual(keys_main(["--file", path, "retire", str(second.signing[0])]), 1)
        self.assertEqual(keys_main(["--file", path, "retire", str(first.signing[0])]), 0)
        self.assertEqual(read_keyring(path).keys, second.keys[:1])
        self.assertEqual(len(new_keyring().signing[1]), 32)
