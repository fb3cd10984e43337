"""
What adding a missing Date and Message-ID costs a transaction, against a message that has both.

The injection ``Transaction`` reads the header as the DATA reader passes it
on (1 KiB pieces here) and writes the text to a spool writer that only keeps
it (no disk): the same message is timed with both fields (stored byte for
byte, the baseline) and without them (the fields are added after the trace
header). Rounds alternate between the two; medians and the ratio are printed.

    python bench/header_bench.py [--messages 3000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from appliance.injection import Transaction  # noqa: E402

RECEIVED = (b"Received: from client.example ([127.0.0.1])\r\n\tby mx.example (engage-appliance) with ESMTP "
            b"id 1883479728346553600; Wed, 02 Dec 2026 19:00:00 -0000\r\n")
BODY = (b"From: bench@example.net\r\nTo: r@example.test\r\nSubject: bench\r\n\r\n"
        + b"".join(b"Line %d of a plain message body that looks like mail.\r\n" % i for i in range(60)))
BOTH = b"Date: Wed, 02 Dec 2026 19:00:00 +0000\r\nMessage-ID: <bench@example.net>\r\n" + BODY
PIECE = 1024


class KeepingWriter:
    """A spool writer that keeps the text in memory: the transaction's own cost is what is timed."""

    transmission_id = "1883479728346553600"

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


def per_message(message: bytes, count: int) -> float:
    """Microseconds per message: begin, the DATA text in pieces, the header read at the end."""
    start = time.perf_counter()
    for n in range(count):
        transaction = Transaction(None, KeepingWriter(), "a@example.net",  # type: ignore[arg-type]
                                  ["b@example.test"], RECEIVED, 1_764_700_000.0 + n / 1000,
                                  "mx.example")
        for i in range(0, len(message), PIECE):
            transaction.write(message[i:i + PIECE])
        transaction.headers()
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    both, missing = [], []
    for _ in range(args.rounds):
        both.append(per_message(BOTH, args.messages))
        missing.append(per_message(BODY, args.messages))
    base, added = statistics.median(both), statistics.median(missing)
    print(f"{args.messages} messages of {len(BODY)} bytes, {args.rounds} rounds (medians)")
    print(f"  with Date and Message-ID   {base:7.1f} us/message   ratio 1.00")
    print(f"  without (both added)       {added:7.1f} us/message   ratio {added / base:.2f}")


if __name__ == "__main__":
    main()
