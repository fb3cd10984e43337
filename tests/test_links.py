"""The link codec: signed tokens, key rotation, the key file and its command."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import zlib

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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


def raw_bytes(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def token_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


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
        anchored = click(anchor="Shop <now> & \"save\" ☃")
        self.assertEqual(CODEC.decode(CODEC.encode(anchored)), anchored)
        opened = LinkData("open", 1, "m", "t", "r")
        self.assertEqual(CODEC.decode(CODEC.encode(opened)), opened)

    def test_send_time_and_trap_round_trip(self) -> None:
        for data in (click(issued=1_700_000_000), click(issued=1_700_000_000, trap=True),
                     LinkData("open", 1, "m", "t", "r", issued=5)):
            self.assertEqual(CODEC.decode(CODEC.encode(data)), data)
        common = click(issued=1_700_000_123)
        token = CODEC.click_encoder(common)(click_suffix("Hero image", common.target, False)).decode()
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
            self.assertEqual(token, CODEC.encode(expected).encode())  # the copy's bytes
            self.assertEqual(CODEC.decode(token), expected)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=200), st.integers(0, 255), st.text(max_size=40),
           st.text(max_size=400), st.booleans(), st.text(max_size=30), st.text(max_size=100))
    def test_tokens_are_the_aes_siv_of_their_body(self, key: bytes, kid: int, name: str, target: str,
                                                  unsub: bool, rcpt: str, anchor: str) -> None:
        """
        Every token, from ``encode`` or a recipient's ``click_encoder``, is exactly the one the
        format defines: AES-SIV over the JSON body (deflated from ``DEFLATE_FROM`` bytes, where
        shorter), keyed by HKDF-SHA256 from the file's key with the version byte in its info,
        whatever the key's length.
        """
        codec = LinkCodec(Keyring(((kid, key),)))
        data = click(link_name=name, target=target, unsubscribe=unsub, rcpt_to=rcpt, anchor=anchor)
        body = json.dumps(data.to_array(), separators=(",", ":"), ensure_ascii=False).encode()
        version = 0x20
        if len(body) >= 320:
            deflater = zlib.compressobj(9, zlib.DEFLATED, -12, 2)
            packed = deflater.compress(body) + deflater.flush()
            if len(packed) < len(body):
                body, version = packed, 0x21
        info = b"engage-appliance link tokens: AES-SIV-512 key for version " + bytes((version,))
        aead_key = HKDF(algorithm=SHA256(), length=64, salt=None, info=info).derive(key)
        raw = bytes((version, kid)) + AESSIV(aead_key).encrypt(body, None)
        expected = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.assertEqual(codec.encode(data), expected)
        self.assertEqual(codec.click_encoder(data)(click_suffix(name, target, unsub, anchor)).decode(),
                         expected)
        self.assertEqual(codec.decode(expected), data)

    def test_long_bodies_are_deflated(self) -> None:
        short = CODEC.encode(click())
        self.assertEqual(base64.urlsafe_b64decode(short + "==")[0], 0x20)
        data = click(metadata={f"key{i}": "value" for i in range(60)})
        token = CODEC.encode(data)
        self.assertEqual(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[0], 0x21)
        self.assertLess(len(token), 500)
        self.assertEqual(CODEC.decode(token), data)

    def test_the_version_byte_is_authenticated(self) -> None:
        """The deflated bit cannot be flipped: each version has its own key."""
        for data in (click(), click(metadata={f"key{i}": "value" for i in range(60)})):
            raw = bytearray(raw_bytes(CODEC.encode(data)))
            raw[0] ^= 0x01
            self.assertRaises(InvalidToken, CODEC.decode, token_of(bytes(raw)))

    def test_every_byte_changed_fails(self) -> None:
        """Each byte of a token, its low or its high bit changed, makes it fail: short, deflated, open."""
        for data in (click(), click(metadata={f"key{i}": "value" for i in range(60)}), click(kind="open")):
            raw = raw_bytes(CODEC.encode(data))
            for i in range(len(raw)):
                for flip in (0x01, 0x80):
                    altered = bytearray(raw)
                    altered[i] ^= flip
                    self.assertRaises(InvalidToken, CODEC.decode, token_of(bytes(altered)))
            for cut in (raw[:-1], raw[:18], raw + b"\0"):
                self.assertRaises(InvalidToken, CODEC.decode, token_of(cut))

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


def carried(data: LinkData) -> list[str]:
    """The values a link carries that its URL must not show."""
    values = [data.message_id, data.transmission_id, data.rcpt_to, data.rcpt_to.lower(), data.campaign_id,
              *data.tags, data.link_name, data.target, data.anchor]
    for key, value in (data.metadata or {}).items():
        values += [key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)]
    return list(dict.fromkeys(filter(None, values)))


def secrets_in(raw: bytes, data: LinkData, window: int = 5) -> list[str]:
    """
    Every value the link carries that shows in ``raw``, whole or by any ``window`` bytes of it.

    A value shorter than that is looked for as JSON writes it, in its quotes: a
    single letter shows by chance in any bytes.
    """
    found = []
    for value in carried(data):
        encoded = value.encode()
        if len(encoded) < window:
            pieces = {json.dumps(value, ensure_ascii=False).encode()}
        else:
            pieces = {encoded[i:i + window] for i in range(len(encoded) - window + 1)}
        if any(piece in raw for piece in pieces):
            found.append(value)
    return found


class PrivacyTests(SynchronousTestCase):
    """Nothing a link carries can be read from its URL: not whole, not in part, not deflated."""

    LINKS = [
        click(anchor="Shop the spring sale"),
        click(metadata={f"field{i}": f"value number {i}" for i in range(40)}),  # deflated
        click(kind="open", link_name="", target="", rcpt_to="ann.example@example.org"),
        click(kind="initial_open", link_name="", target=""),
        click(target="https://例え.jp/パス?q=ü", anchor="Ünïcödé ☃", tags=("ÄÖÜ-tag",)),
    ]

    def test_no_field_shows_in_the_token(self) -> None:
        for data in self.LINKS:
            token = CODEC.encode(data)
            self.assertEqual(secrets_in(raw_bytes(token), data), [], data)
            self.assertEqual(secrets_in(token.encode(), data, window=4), [], data)
            self.assertEqual(CODEC.decode(token), data)

    def test_nor_in_a_copys_click_tokens(self) -> None:
        common = self.LINKS[0]
        encode = CODEC.click_encoder(common)
        for name, target, anchor in (("Hero", "https://shop.example/a?b=1", "Shop now"),
                                     ("Raw URL", "https://shop.example/" + "p" * 400, "")):
            data = common._replace(link_name=name, target=target, anchor=anchor)
            token = encode(click_suffix(name, target, False, anchor)).decode()
            self.assertEqual(secrets_in(raw_bytes(token), data), [])
            self.assertEqual(CODEC.decode(token), data)

    def test_the_check_finds_what_a_signed_only_token_shows(self) -> None:
        """The first format carried its body in clear: the same check reads every field in it."""
        data = click()
        legacy = [t for t in _legacy()["tokens"] if t["what"] == "click"][0]
        decoded = LinkData.from_array(legacy["link"])
        self.assertEqual(secrets_in(raw_bytes(legacy["token"]), decoded), carried(decoded))
        self.assertTrue(secrets_in(raw_bytes(legacy["token"]), data))


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokens-e46094d", "tokens.json")


def _legacy() -> dict:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


class SignedOnlyTokenTests(SynchronousTestCase):
    """
    Tokens the first format issued (signed, readable) keep working until they expire.

    The fixture holds tokens that code really issued, with the link each says.
    """

    def setUp(self) -> None:
        fixture = _legacy()
        key = base64.urlsafe_b64decode(fixture["key"] + "=" * (-len(fixture["key"]) % 4))
        self.kid, self.key = fixture["key_id"], key
        self.tokens = fixture["tokens"]
        self.codec = LinkCodec(Keyring(((self.kid, key),)))

    def test_each_still_reads_as_it_was_issued(self) -> None:
        self.assertEqual(len(self.tokens), 7)
        for entry in self.tokens:
            self.assertEqual(raw_bytes(entry["token"])[0] & ~1, 0x10, entry["what"])
            data = self.codec.decode(entry["token"])
            self.assertEqual(data, LinkData.from_array(entry["link"]), entry["what"])
            self.assertEqual(data.anchor, "")

    def test_until_they_expire(self) -> None:
        expired = [e for e in self.tokens if e["what"] == "click, expired"][0]
        self.assertTrue(self.codec.decode(expired["token"]).expired(1_000_000_000))
        self.assertFalse(self.codec.decode(self.tokens[0]["token"]).expired(1_999_999_999))

    def test_beside_new_tokens_after_a_rotation(self) -> None:
        codec = LinkCodec(rotated(self.codec.keyring))
        data = codec.decode(self.tokens[0]["token"])
        new = codec.encode(data)
        self.assertEqual(raw_bytes(new)[0], 0x20)
        self.assertEqual(codec.decode(new), data)
        retired = LinkCodec(Keyring((codec.keyring.signing,)))
        e = self.assertRaises(InvalidToken, retired.decode, self.tokens[0]["token"])
        self.assertIn("unknown key id", str(e))

    def test_altered_or_with_another_key_fails(self) -> None:
        raw = raw_bytes(self.tokens[0]["token"])
        for i in range(len(raw)):
            altered = bytearray(raw)
            altered[i] ^= 0x01
            self.assertRaises(InvalidToken, self.codec.decode, token_of(bytes(altered)))
        other = LinkCodec(Keyring(((self.kid, b"x" * 32),)))
        self.assertRaises(InvalidToken, other.decode, self.tokens[0]["token"])

    def test_an_encrypted_body_in_the_first_format_fails(self) -> None:
        """Relabelling a new token as the first format gives a tag that cannot verify."""
        raw = bytearray(raw_bytes(CODEC.encode(click())))
        raw[0] = 0x10
        self.assertRaises(InvalidToken, CODEC.decode, token_of(bytes(raw)))


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
