"""
What DKIM signing adds to each copy, against the rewrite render of the same copy.

For the newsletter of ``rewrite_bench`` (15 KB HTML, 80 tracked links), measures in
one run, per recipient:

  render         Prepared.render: the recipient's tracked copy (the baseline)
  sign RSA-2048  Signer.sign of that copy with a 2048-bit RSA key
  sign Ed25519   Signer.sign of that copy with an Ed25519 key
  body hash      the relaxed body hash alone (the part of signing that grows with the copy)

and prints medians and their ratios to the render. Run from the repository root:

    PYTHONPATH=. python bench/dkim_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from appliance.dkim import Signer, SigningKey, body_hash, split_message
from appliance.links import LinkCodec, new_keyring
from appliance.rewrite import Identity, prepare
from appliance.settings import Tracking

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewrite_bench import newsletter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    rounds = parser.parse_args().rounds
    codec = LinkCodec(new_keyring())
    tracking = Tracking(open_tracking=True, click_tracking=True, campaign_id="spring",
                        metadata={"list": "news"}, tags=("spring",), tracking_domain="t.example.com",
                        expiry=2_000_000_000)
    prepared = prepare(newsletter())
    rsa_signer = Signer([SigningKey("shop.example.com", "r",
                                    rsa.generate_private_key(public_exponent=65537, key_size=2048))])
    ed_signer = Signer([SigningKey("shop.example.com", "e", ed25519.Ed25519PrivateKey.generate())])

    render, sign_rsa, sign_ed, bh = [], [], [], []
    clock = time.perf_counter
    size = 0
    for n in range(rounds):
        t0 = clock()
        copy = prepared.render(codec, Identity(f"{n:020x}", "1", f"rcpt{n}@example.test"), tracking)
        t1 = clock()
        signed = rsa_signer.sign(copy)
        t2 = clock()
        ed_signer.sign(copy)
        t3 = clock()
        body_hash(split_message(copy)[1])
        t4 = clock()
        assert signed != copy
        size = len(copy)
        render.append(t1 - t0)
        sign_rsa.append(t2 - t1)
        sign_ed.append(t3 - t2)
        bh.append(t4 - t3)

    base = statistics.median(render)
    print(f"copy: {size} bytes; {rounds} rounds; medians per copy:")
    for name, values in (("render (baseline)", render), ("sign, RSA-2048", sign_rsa),
                         ("sign, Ed25519", sign_ed), ("  of which the body hash", bh)):
        m = statistics.median(values)
        print(f"  {name:26s} {m * 1e3:8.3f} ms  {m / base:6.2f}x")


if __name__ == "__main__":
    main()
