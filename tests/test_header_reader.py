"""
X-MSYS-API is found and checked wherever it stands in the header block, however long.

The injection server reads the header as it arrives (``HeaderReader``) and
keeps a bounded part of it; the rewriter reads the whole spooled message
(``read_header``). Both must find the same X-MSYS-API fields.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from appliance.headers import HeaderReader, read_header
from appliance.injection import MAX_HEADER_BYTES, Transaction
from appliance.rewrite import without_msys_api
from tests.test_headers import _SpoolWriter, header_blocks, injection_headers
from tests.test_tracking import TRACK_ALL, TrackingTestCase, send, send_expecting_refusal
from tests.test_tracking import message as tracking_message

MSYS = frozenset({"x-msys-api"})


def fed(message: bytes, cuts: list[int], keep_bytes: int) -> list[tuple[str, bytes]]:
    reader = HeaderReader(keep_bytes, MSYS)
    pos = 0
    for cut in sorted(cuts):
        reader.feed(message[pos:cut])
        pos = max(pos, cut)
    reader.feed(message[pos:])
    return [(f.name, f.raw) for f in reader.finish()]


def filler(total: int) -> bytes:
    line = b"X-Filler: " + b"f" * 88 + b"\r\n"
    return line * (total // len(line) + 1)


class HeaderReaderTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(header_blocks(), st.lists(st.integers(0, 200), max_size=8))
    def test_in_pieces_it_reads_what_read_header_reads(self, message: bytes, cuts: list[int]) -> None:
        expected = [(f.name, f.raw) for f in read_header(message).fields]
        self.assertEqual(fed(message, cuts, 1 << 20), expected)

    @settings(max_examples=300, deadline=None)
    @given(header_blocks(), st.lists(st.integers(0, 200), max_size=8), st.integers(0, 60))
    def test_over_its_budget_it_still_has_every_msys_api_field(self, message: bytes, cuts: list[int],
                                                               budget: int) -> None:
        expected = [(f.name, f.raw) for f in read_header(message).fields]
        got = fed(message, cuts, budget)
        self.assertEqual([f for f in got if f[0] == "x-msys-api"],
                         [f for f in expected if f[0] == "x-msys-api"])
        self.assertLessEqual(sum(len(raw) for name, raw in got if name != "x-msys-api"), budget)

    def test_a_field_far_down_a_long_header(self) -> None:
        api = b'X-MSYS-API: {"campaign_id":\r\n "far"}\r\n'
        message = filler(3 * MAX_HEADER_BYTES) + api + b"Subject: s\r\n\r\nbody\r\n"
        for piece in (1, 7, 4096, len(message)):
            reader = HeaderReader(MAX_HEADER_BYTES, MSYS)
            for i in range(0, len(message), piece if piece > 1 else 1 << 16):
                reader.feed(message[i:i + (piece if piece > 1 else 1 << 16)])
            fields = reader.finish()
            self.assertEqual([f.raw for f in fields if f.name == "x-msys-api"], [api])
            self.assertLessEqual(sum(len(f.raw) for f in fields), MAX_HEADER_BYTES + len(api))
        seen = injection_headers(message)
        self.assertEqual(seen.get_all("X-MSYS-API"), ['{"campaign_id":\r\n "far"}'])
        self.assertNotIn(b"X-MSYS-API", without_msys_api(message))

    def test_the_injection_transaction_finds_it_in_pieces(self) -> None:
        """As the network gives it: pieces of 64 KiB, the field well past MAX_HEADER_BYTES."""
        api = b'X-MSYS-API: {"campaign_id":"far"}\r\n'
        message = filler(2 * MAX_HEADER_BYTES) + api + b"Subject: s\r\n\r\nbody\r\n"
        transaction = Transaction(None, _SpoolWriter(), "a@x", ["b@y"], b"", 0.0)  # type: ignore[arg-type]
        for i in range(0, len(message), 65536):
            transaction.write(message[i:i + 65536])
        headers = transaction.headers()
        self.assertEqual(headers.get_all("X-MSYS-API"), ['{"campaign_id":"far"}'])
        self.assertEqual(len(headers.get_all("X-Filler") or []), MAX_HEADER_BYTES // 100)

    def test_one_huge_line_is_not_held(self) -> None:
        """A field line past the budget is dropped as it comes, and a line without a colon ends it."""
        reader = HeaderReader(100, MSYS)
        reader.feed(b"Subject: ")
        for _ in range(100):
            reader.feed(b"s" * 10000)
            self.assertLess(len(reader._line), 200)
        reader.feed(b"\r\nX-MSYS-API: {}\r\n\r\n")
        self.assertEqual([f.raw for f in reader.finish()], [b"X-MSYS-API: {}\r\n"])
        # A name that never gets its colon is not a field: the header ends there, as read_header says.
        message = b"A: b\r\n" + b"n" * 5000 + b"\r\nX-MSYS-API: {}\r\n\r\n"
        self.assertEqual(read_header(message).fields[-1].name, "a")
        self.assertEqual(fed(message, [10, 20, 3000], 10), [("a", b"A: b\r\n")])
        self.assertEqual(fed(message, [], 1 << 20), [("a", b"A: b\r\n")])


class InjectionTests(TrackingTestCase):
    def far(self, api: str) -> bytes:
        head = filler(MAX_HEADER_BYTES + 4096)
        data: Any = tracking_message(api)
        return head + data

    def test_a_bad_field_far_down_is_refused(self) -> None:
        code, text = send_expecting_refusal(self.running, ["a@example.test"],
                                            self.far('{"metadata": ["not", "an", "object"]}'))
        self.assertEqual((code, text), (550, b"5.6.0 X-MSYS-API 'metadata' must be of type 'json object'"))
        self.assertEqual(self.running.sink.messages, [])

    def test_a_good_field_far_down_is_applied_and_stripped(self) -> None:
        send(self.running, ["a@example.test"], self.far(TRACK_ALL))
        [copy] = self.running.sink.messages
        [event] = self.events("injection")
        self.assertEqual((event["campaign_id"], event["click_tracking"]), ("spring", True))
        self.assertNotIn(b"X-MSYS-API", copy.data)
        self.assertIn("https://shop.example/t", [d.target for d in self.tokens(copy.data)])
        self.delivered(1)
