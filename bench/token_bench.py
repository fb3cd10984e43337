"""
What encrypted link tokens cost against the first, signed-only format, measured in one run.

For the typical click link of ``bench/tracker_bench.py`` (a campaign, two tags,
two metadata fields, an 85-character target), prints:

  length     the token and its click URL, without and with an anchor text
  decode     ``LinkCodec.decode`` of a first-format token (HMAC-SHA256, the
             body in clear; still read until such links expire) against an
             encrypted one (AES-SIV): the tracker's cost per hit
  encode     one link of a copy: ``click_encoder``'s function (AES-SIV over the
             body) against HMAC-SHA256 over the same body, the first format's
             work for it

Medians of several repeats; the difference is what each hit or each link
costs more. Run from the repository root:

    PYTHONPATH=. python bench/token_bench.py [--repeat 15] [--number 20000]
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import statistics
import timeit
from hashlib import sha256

from appliance.links import Keyring, LinkCodec, LinkData, click_suffix, click_url

KEY = b"b" * 32
CODEC = LinkCodec(Keyring(((1, KEY),)))
LINK = LinkData("click", 2_000_000_000, "00a1b2c3d4e5f6a7b8c9", "84813762132582711", "someone@example.com",
                "Spring sale", ("news", "spring"), {"user": "42", "plan": "gold"}, "Hero image",
                "https://shop.example/products/42?utm_source=mail&utm_campaign=spring%20sale#reviews")


def signed_only(data: LinkData) -> str:
    """A token of the first format, as it was made: 11 fields, HMAC-SHA256 tag truncated to 16 bytes."""
    body = json.dumps(data.to_array()[:11], separators=(",", ":"), ensure_ascii=False).encode()
    signed = bytes((0x10, 1)) + body
    return base64.urlsafe_b64encode(signed + hmac.digest(KEY, signed, "sha256")[:16]).decode().rstrip("=")


def timed(function: object, repeat: int, number: int) -> float:
    """Median microseconds per call."""
    runs = timeit.repeat(function, number=number, repeat=repeat)  # type: ignore[arg-type]
    return statistics.median(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()

    old, new = signed_only(LINK), CODEC.encode(LINK)
    anchored = CODEC.encode(LINK._replace(anchor="Shop now"))
    assert CODEC.decode(old) == LINK and CODEC.decode(new) == LINK
    url = click_url("https", "t.example.com", "")
    print("typical click link: token characters (click URL characters)")
    print(f"  first format (signed, readable)   {len(old):4d} ({len(url) + len(old)})")
    print(f"  encrypted, no anchor text         {len(new):4d} ({len(url) + len(new)})")
    print(f"  encrypted, anchor 'Shop now'      {len(anchored):4d} ({len(url) + len(anchored)})")

    # Interleaved, so drift on a shared machine hits both alike.
    decode_old, decode_new, encode_old, encode_new = [], [], [], []
    encode = CODEC.click_encoder(LINK)
    suffix = click_suffix(LINK.link_name, LINK.target, LINK.unsubscribe, LINK.anchor)
    body = json.dumps(LINK.to_array(), separators=(",", ":"), ensure_ascii=False).encode()
    mac = hmac.new(KEY, digestmod=sha256)

    def sign() -> bytes:
        m = mac.copy()
        m.update(body)
        return base64.urlsafe_b64encode(bytes((0x10, 1)) + body + m.digest()[:16])

    for _ in range(args.repeat):
        decode_old.append(timed(lambda: CODEC.decode(old), 1, args.number))
        decode_new.append(timed(lambda: CODEC.decode(new), 1, args.number))
        encode_old.append(timed(sign, 1, args.number))
        encode_new.append(timed(lambda: encode(suffix), 1, args.number))
    print(f"medians of {args.repeat} repeats of {args.number} calls, microseconds per call:")
    for name, before, after in (("decode (a tracker hit)", decode_old, decode_new),
                                ("encode (one link of a copy)", encode_old, encode_new)):
        b, a = statistics.median(before), statistics.median(after)
        print(f"  {name:28s} first format {b:6.2f}  encrypted {a:6.2f}  x{a / b:4.2f}  {a - b:+6.2f}")


if __name__ == "__main__":
    main()
