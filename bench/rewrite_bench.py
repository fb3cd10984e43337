"""
What tracking costs per message and per recipient, against a standard-library baseline.

For a 15 KB HTML newsletter with 80 links (multipart/alternative, quoted-printable
HTML, a text part), measures in one run:

  baseline   email.message_from_bytes + as_bytes of the same message
  prepare    appliance.rewrite.prepare: parse, decode, find links, compile (once per message)
  render     Prepared.render for one more recipient (its tokens, join, re-encode, splice)
  one copy   prepare + render: the whole rewrite for a single recipient

and prints medians and their ratios to the baseline. Targets: one copy <= 4x,
each further recipient <= 1x. Run from the repository root:

    PYTHONPATH=. python bench/rewrite_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import binascii
import email
import statistics
import time

from appliance.links import LinkCodec, new_keyring
from appliance.rewrite import Identity, prepare
from appliance.settings import Tracking


def newsletter() -> bytes:
    rows = []
    for i in range(80):
        rows.append(
            f'<tr><td class="item">\n  <a href="https://shop.example.com/products/{i}?'
            f'utm_source=news&amp;utm_medium=email&amp;pos={i}" '
            f'data-msys-linkname="product {i}">Product {i}</a>\n</td></tr>\n')
    html = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Spring news</title>\n'
            "<style>td{font-family:Arial,sans-serif;font-size:14px}</style></head>\n"
            '<body style="margin:0;padding:0">\n<table width="600" cellpadding="0" cellspacing="0">\n'
            + "".join(rows) + "</table>\n<p>Unsubscribe: "
            '<a href="https://shop.example.com/unsubscribe?u=1" data-msys-unsubscribe="1">here</a></p>\n'
            "</body></html>\n")
    # Pad with copy text to 15 KB, as a real newsletter has.
    while len(html.replace("\n", "\r\n").encode()) < 15 * 1024:
        html = html.replace("</table>", "<p>Fresh arrivals for the season, hand-picked.</p>\n</table>", 1)
    html = html.replace("\n", "\r\n")
    text = "Spring news\r\n\r\nShop now: https://shop.example.com/?utm_source=newsletter\r\n"
    return (
        b"Received: from client ([127.0.0.1]) by localhost (engage-appliance) with ESMTP id 1;"
        b" Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"From: Shop <news@shop.example.com>\r\nTo: you@example.test\r\nSubject: Spring news\r\n"
        b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@shop.example.com>\r\n"
        b'X-MSYS-API: {"campaign_id":"spring","metadata":{"list":"news"},"tags":["spring"]}\r\n'
        b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() +
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
        b"\r\n\r\n" + binascii.b2a_qp(html.encode(), istext=True) + b"\r\n--b1--\r\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    rounds = parser.parse_args().rounds
    data = newsletter()
    codec = LinkCodec(new_keyring())
    tracking = Tracking(open_tracking=True, click_tracking=True, campaign_id="spring",
                        metadata={"list": "news"}, tags=("spring",), tracking_domain="t.example.com",
                        expiry=2_000_000_000)
    prepared = prepare(data)
    assert not prepared.skipped
    html = [p for p in prepared.parts if p.kind == "html"][0]
    links = sum(1 for _, e in html.dynamic if e.link is not None)

    baseline, prep, render, whole = [], [], [], []
    clock = time.perf_counter
    for n in range(rounds):
        identity = Identity(f"{n:020x}", "1", f"rcpt{n}@example.test")
        t0 = clock()
        email.message_from_bytes(data).as_bytes()
        t1 = clock()
        p = prepare(data)
        t2 = clock()
        p.render(codec, identity, tracking)
        t3 = clock()
        prepared.render(codec, Identity(f"{n:020x}", "1", f"other{n}@example.test"), tracking)
        t4 = clock()
        baseline.append(t1 - t0)
        prep.append(t2 - t1)
        whole.append(t3 - t1)
        render.append(t4 - t3)

    base = statistics.median(baseline)
    size = len(email.message_from_bytes(data).get_payload()[1].get_payload(decode=True))
    print(f"message: {len(data)} bytes; HTML part: {size} bytes decoded, {links} tracked links; "
          f"{rounds} rounds; medians:")
    for name, values, target in (("baseline (email parse + serialise)", baseline, None),
                                 ("prepare, once per message", prep, None),
                                 ("one copy (prepare + render)", whole, 4.0),
                                 ("each further recipient (render)", render, 1.0)):
        m = statistics.median(values)
        goal = f"  (target <= {target:g}x)" if target else ""
        print(f"  {name:36s} {m * 1e3:8.3f} ms  {m / base:6.2f}x{goal}")


if __name__ == "__main__":
    main()
