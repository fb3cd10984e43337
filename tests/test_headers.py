"""The one header parser: its rules, and every consumer seeing the same fields on hostile input."""

from __future__ import annotations

import base64
import re
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from appliance import headers
from appliance.dkim import DkimError, split_message
from appliance.headers import _FIELD as FIELD
from appliance.headers import (
    EncodedWordError,
    as_message,
    decode_encoded_words,
    is_field_name,
    read_header,
    readable,
)
from appliance.injection import Transaction, friendly_from, header_text
from appliance.rewrite import prepare, without_msys_api
from appliance.settings import MsysApiError, header_values, parse_msys_api

# -- hostile header blocks ----------------------------------------------------------------------

NAMES = st.sampled_from([
    b"From", b"Subject", b"subject", b"X-MSYS-API", b"x-msys-api", b"X-Msys-Api \t", b"DKIM-Signature",
    b"Received", b"Content-Type", b"To", b"a:b", b"Sub ject", b"", b"\xff", b"X\x00Y", b"~!", b" From",
])
PIECES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([
        b"\r", b"\n", b"\r\n", b"\x00", b"\xe9", b"\xc3\xa9", b"\xf0\x9f", b" ", b"\t", b":", b"=?",
        b"?=", b"=?utf-8?q?caf=C3=A9?=", b"=?utf-8?b?Y2Fm?=", b"=?utf-8?b?Y2Fmw6k?=", b"=?utf-8?b?!!!?=",
        b"=?x-unknown?q?a?=", b"=?utf-8?q?", b"=??=", b"=?utf-8*en?Q?a_b?=", b"=?utf-7?b?KzJBQS0?=",
        b'{"campaign_id":"c"}', b"<a@example.com>", b'"Doe, Jane" <j@x>',
    ]),
)
VALUES = st.lists(PIECES, max_size=6).map(b"".join)
FIELD_LINES = st.tuples(NAMES, st.sampled_from([b":", b" :", b"\t:", b"", b"::"]), VALUES).map(b"".join)
CONTINUATIONS = st.tuples(st.sampled_from([b" ", b"\t", b" \t"]), VALUES).map(b"".join)
LONG_LINES = st.integers(min_value=990, max_value=5000).map(lambda n: b"Subject: " + b"x=?" * (n // 3))
LINES = st.one_of(FIELD_LINES, FIELD_LINES, CONTINUATIONS, LONG_LINES, VALUES)
ENDINGS = st.sampled_from([b"\r\n\r\n", b"\r\n", b"", b"\n\n", b"\r\n\r\n\r\n"])


@st.composite
def header_blocks(draw: Any) -> bytes:
    lines = draw(st.lists(LINES, max_size=10))
    return b"\r\n".join(lines) + draw(ENDINGS) + draw(st.binary(max_size=20))


class _SpoolWriter:
    """What a transaction writes its text to; only the header matters here."""

    transmission_id = "1"

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def injection_headers(message: bytes) -> Any:
    """The fields the injection server reads from a message, through its own transaction."""
    transaction = Transaction(None, _SpoolWriter(), "a@x", ["b@y"], b"", 0.0)  # type: ignore[arg-type]
    transaction.write(message)
    return transaction.headers()


def without(message: bytes, fields: list[headers.Field], name: str) -> bytes:
    out, pos = [], 0
    for f in fields:
        if f.name == name:
            out.append(message[pos:f.start])
            pos = f.end
    return b"".join(out) + message[pos:]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(header_blocks())
    @example(b"Subject: x=?\r\n a")  # a one-character continuation ends the message
    def test_splitting_round_trips_the_bytes(self, message: bytes) -> None:
        block, body = headers.split_message(message)
        pos = 0
        for f in block.fields:
            self.assertEqual(f.start, pos)
            self.assertEqual(f.raw, message[f.start:f.end])
            self.assertTrue(is_field_name(f.written_name), f.raw)
            self.assertEqual(f.name, f.written_name.lower())
            self.assertTrue(f.raw.endswith(b"\r\n") or f.end == len(message), f.raw)
            # Every line break inside a field is folding: CRLF followed by white space. The
            # last field of a block with no final CRLF ends where the message does.
            inside = f.raw[:-2] if f.raw.endswith(b"\r\n") else f.raw
            self.assertNotIn(b"\r\n", inside.replace(b"\r\n ", b"").replace(b"\r\n\t", b""))
            self.assertEqual(f.value, f.raw.partition(b":")[2].replace(b"\r\n", b""))
            pos = f.end
        rest = message[pos:block.body_start]
        if block.separated:
            self.assertEqual(rest, b"\r\n")
        else:
            self.assertEqual(rest, b"")
            self.assertEqual(bool(block.error), block.body_start < len(message))
        self.assertEqual(b"".join(f.raw for f in block.fields) + rest + body, message)

    @settings(max_examples=300, deadline=None)
    @given(header_blocks(), st.integers(0, 8), st.integers(0, 8))
    @example(b"Subject: x\r", 0, 0)  # a CR ends the message
    @example(b"A: b\r\n c\r\n\td\r\n\r\nbody", 0, 0)
    def test_whole_fields_read_as_line_by_line(self, message: bytes, lead: int, trail: int) -> None:
        """The one-call match of a whole field finds what reading line by line finds."""
        data = b"x" * lead + message + b"y" * trail

        def read(whole_fields: bool) -> Any:
            if not whole_fields:
                self.patch(headers, "_FIELD", re.compile(rb"(?!)"))
            try:
                block = read_header(data, lead, len(data) - trail)
            finally:
                self.patch(headers, "_FIELD", FIELD)
            return ([(f.name, f.start, f.end, f.raw) for f in block.fields], block.body_start,
                    block.separated, block.error)

        self.assertEqual(read(True), read(False))

    def test_an_end_past_the_data_is_the_data_s_end(self) -> None:
        block = read_header(b"A: v", 0, 9)
        self.assertEqual([(f.name, f.start, f.end, f.raw) for f in block.fields], [("a", 0, 4, b"A: v")])
        self.assertEqual((block.body_start, block.separated, block.error), (4, False, ""))

    @settings(max_examples=200, deadline=None)
    @given(header_blocks())
    def test_every_consumer_sees_the_same_fields(self, message: bytes) -> None:
        block = read_header(message)
        names = [f.name for f in block.fields]
        msys_api = [f for f in block.fields if f.name == "x-msys-api"]

        # DKIM signs exactly these fields, or nothing when a line is not a field.
        if block.error:
            self.assertRaises(DkimError, split_message, message)
        else:
            fields, body = split_message(message)
            self.assertEqual(fields, [(f.name, f.raw) for f in block.fields])
            self.assertEqual(body, message[block.body_start:])

        # The rewriter removes exactly these X-MSYS-API fields, whatever else it makes of the message.
        stripped = without(message, block.fields, "x-msys-api")
        prepared = prepare(message)
        self.assertEqual(prepared.data, stripped)
        self.assertEqual(prepared.had_msys_api, bool(msys_api))
        self.assertEqual(without_msys_api(message), stripped)

        # The injection server (policy, X-MSYS-API, events) sees the same fields.
        seen = injection_headers(message)
        self.assertEqual([k.lower() for k, _ in seen.raw_items()], names)
        values = header_values(seen)
        self.assertEqual([v.encode("ascii", "surrogateescape") for v in values],
                         [f.folded_value.lstrip(b" \t") for f in msys_api])
        try:
            parse_msys_api(values, 1000)
        except MsysApiError:
            pass
        subjects = [f for f in block.fields if f.name == "subject"]
        self.assertEqual(header_text(seen, "Subject"), readable(subjects[0].value) if subjects else "")
        self.assertIsInstance(friendly_from(seen), str)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(st.text(max_size=8), PIECES.map(lambda b: b.decode("latin-1"))), max_size=12)
           .map("".join))
    def test_decoding_never_raises(self, text: str) -> None:
        decoded = decode_encoded_words(text)
        self.assertIsInstance(decoded, str)
        if "=?" not in text:
            self.assertEqual(decoded, text)
        try:
            self.assertEqual(decode_encoded_words(text, strict=True), decoded)
        except EncodedWordError:
            pass
        self.assertIsInstance(readable(text.encode("utf-8", "surrogatepass")), str)


# -- the rules, one by one ------------------------------------------------------------------------


class SplittingTests(SynchronousTestCase):
    def names(self, message: bytes) -> list[str]:
        return [f.name for f in read_header(message).fields]

    def test_fields_folding_and_body(self) -> None:
        message = b"From: a@b\r\nSubject: x\r\n y\r\n\tz\r\n\r\nbody\r\n"
        block, body = headers.split_message(message)
        self.assertEqual([(f.name, f.raw) for f in block.fields],
                         [("from", b"From: a@b\r\n"), ("subject", b"Subject: x\r\n y\r\n\tz\r\n")])
        self.assertEqual(block.fields[1].value, b" x y\tz")
        self.assertEqual(block.fields[1].folded_value, b" x\r\n y\r\n\tz")
        self.assertEqual((body, block.separated, block.error), (b"body\r\n", True, ""))

    def test_bare_cr_and_lf_do_not_end_a_line(self) -> None:
        # Otherwise the X-MSYS-API "field" would decide tracking for one reader and not for another.
        message = b"Subject: a\nX-MSYS-API: {}\rTo: b\r\n\r\n"
        self.assertEqual(self.names(message), ["subject"])
        self.assertEqual(header_values(injection_headers(message)), [])
        self.assertFalse(prepare(message).had_msys_api)

    def test_white_space_before_the_colon(self) -> None:
        # RFC 5322 §4.5.3's obsolete syntax: every reader takes it for the field it names.
        message = b'X-MSYS-API \t: {"campaign_id":"c"}\r\nSubject : s\r\n\r\n'
        self.assertEqual(self.names(message), ["x-msys-api", "subject"])
        self.assertEqual(header_values(injection_headers(message)), ['{"campaign_id":"c"}'])
        self.assertEqual(header_text(injection_headers(message), "Subject"), "s")
        self.assertEqual(prepare(message).data, b"Subject : s\r\n\r\n")

    def test_a_line_that_is_not_a_field_ends_the_fields(self) -> None:
        for bad in (b"no colon here", b"a b: c", b": empty name", b"caf\xe9: x", b"nul\x00: x"):
            message = b"From: a@b\r\n" + bad + b"\r\nX-MSYS-API: {}\r\n\r\nbody"
            block = read_header(message)
            self.assertEqual(self.names(message), ["from"], bad)
            self.assertEqual(block.body_start, len(b"From: a@b\r\n"))
            self.assertTrue(block.error.startswith("not a header field"), block.error)
            self.assertRaises(DkimError, split_message, message)
            self.assertEqual(header_values(injection_headers(message)), [])

    def test_a_continuation_line_first(self) -> None:
        block = read_header(b" x: y\r\nFrom: a@b\r\n\r\n")
        self.assertEqual((block.fields, block.body_start), ([], 0))
        self.assertEqual(block.error, "the header block starts with a continuation line")

    def test_no_body_separator(self) -> None:
        for message in (b"From: a@b\r\nSubject: s\r\n", b"From: a@b\r\nSubject: s"):
            block, body = headers.split_message(message)
            self.assertEqual((body, block.separated, block.error), (b"", False, ""))
            self.assertEqual(block.fields[-1].raw, message[len(b"From: a@b\r\n"):])  # no CRLF added

    def test_empty_message_and_empty_header(self) -> None:
        self.assertEqual(headers.split_message(b"")[0].fields, [])
        block, body = headers.split_message(b"\r\nbody")
        self.assertEqual((block.fields, body, block.separated), ([], b"body", True))

    def test_empty_value_and_colons_in_the_value(self) -> None:
        [empty, colons] = read_header(b"X-Empty:\r\nX-Time: 12:30:00\r\n\r\n").fields
        self.assertEqual((empty.value, colons.value), (b"", b" 12:30:00"))

    def test_part_bounds(self) -> None:
        data = b"junk\r\nContent-Type: text/plain\r\n\r\nbody\r\n--b--"
        block = read_header(data, 6, len(data) - 5)
        self.assertEqual([f.name for f in block.fields], ["content-type"])
        self.assertEqual(block.fields[0].start, 6)
        self.assertEqual(data[block.body_start:len(data) - 5], b"body\r\n")

    def test_field_names(self) -> None:
        for name in ("From", "X-MSYS-API", "~!#", "a.b"):
            self.assertTrue(is_field_name(name), name)
        for name in ("", "a b", "a:b", "caf\u00e9", "a\x00", "a\x7f"):
            self.assertFalse(is_field_name(name), name)

    def test_as_message_values_are_what_compat32_parses(self) -> None:
        from email.parser import BytesHeaderParser
        from email.policy import compat32

        message = b"Subject:   caf\xc3\xa9\r\n  folded\r\nX-A:\r\n b\r\nTo: x\r\n\r\n"
        parsed = BytesHeaderParser(policy=compat32).parsebytes(message)
        self.assertEqual(list(as_message(read_header(message).fields).raw_items()), list(parsed.raw_items()))


class EncodedWordTests(SynchronousTestCase):
    def test_words_and_the_white_space_between_them(self) -> None:
        self.assertEqual(decode_encoded_words("=?utf-8?q?a?= \r\n =?utf-8?q?b?= c =?utf-8?q?d?="), "ab c d")
        self.assertEqual(decode_encoded_words('{"a": "=?iso-8859-1?Q?caf=E9_au_lait?= x"}'),
                         '{"a": "caf\u00e9 au lait x"}')

    def test_a_character_split_across_two_words(self) -> None:
        word = "\u65e5\u672c".encode()
        a, b = base64.b64encode(word[:4]).decode(), base64.b64encode(word[4:]).decode()
        decoded = decode_encoded_words(f"=?UTF-8?B?{a}?= =?utf-8?b?{b}?=", strict=True)
        self.assertEqual(decoded, "\u65e5\u672c")

    def test_unpadded_base64_and_language(self) -> None:
        self.assertEqual(decode_encoded_words("=?utf-8?b?Y2Fmw6k?=", strict=True), "caf\u00e9")
        self.assertEqual(decode_encoded_words("=?utf-8*en?q?a_b?=", strict=True), "a b")

    def test_undecodable_words(self) -> None:
        for word in ("=?x-unknown?q?abc?=", "=?utf-8?b?!!!?=", "=?utf-8?q?caf=E9?=", "=?base64?q?YQ?="):
            self.assertEqual(decode_encoded_words(f"a {word} c =?utf-8?q?b?="), f"a {word} c b", word)
            self.assertRaises(EncodedWordError, decode_encoded_words, f"a {word}", strict=True)

    def test_readable(self) -> None:
        self.assertEqual(readable(b" Caf\xc3\xa9\r\n  =?iso-8859-1?q?cr=E8me?= "), "Caf\u00e9 cr\u00e8me")
        self.assertEqual(readable(b"Caf\xe9"), "Caf\u00e9")
