"""
Where a tracked copy's render should leave the reactor thread.

Prints the median time to render one recipient's copy of a quoted-printable
HTML message of several sizes, the median and 90th percentile of a thread
hop (``deferToThread`` of nothing, on an idle pool), and Python's GIL switch
interval. A render in the worker still holds the GIL, so the reactor only
gets back in once per switch interval: moving a render shorter than that
interval off the reactor saves nothing and costs the hop. The copy maker's
``RENDER_INLINE_BYTES`` sits where the render reaches the switch interval.
Run from the repository root:

    PYTHONPATH=. python bench/render_hop_bench.py
"""

from __future__ import annotations

import statistics
import sys
import time

from twisted.internet import defer, reactor, threads

from appliance.links import LinkCodec, new_keyring
from appliance.rewrite import Identity, encode_qp, prepare
from appliance.settings import Tracking

TRACKING = Tracking(open_tracking=True, click_tracking=True, campaign_id="c",
                    tracking_domain="t.example", expiry=2_000_000_000)
LINE = "<p>" + "word " * 30 + '<a href="https://shop.example/p?i={}">x</a></p>\r\n'


def message(kib: int) -> bytes:
    html = "".join(LINE.format(i % 200) for i in range(kib * 1024 // len(LINE)))
    return (b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encode_qp(html.encode()))


def renders(codec: LinkCodec) -> None:
    for kib in (16, 32, 64, 128, 256, 512, 1024):
        prepared = prepare(message(kib))
        assert prepared.parts and not prepared.skipped, prepared.skipped
        times = []
        for i in range(15):
            start = time.perf_counter()
            prepared.render(codec, Identity(f"m{i}", "t", "r@x.test"), TRACKING)
            times.append(time.perf_counter() - start)
        print(f"render {kib:5d} KiB: {statistics.median(times) * 1e3:7.2f} ms")


@defer.inlineCallbacks
def hops() -> defer.Deferred:
    times = []
    for _ in range(300):
        start = time.perf_counter()
        yield threads.deferToThread(lambda: None)
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"thread hop: median {statistics.median(times) * 1e6:.0f} us, "
          f"p90 {times[int(len(times) * 0.9)] * 1e6:.0f} us")
    print(f"GIL switch interval: {sys.getswitchinterval() * 1e3:.1f} ms")
    reactor.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    renders(LinkCodec(new_keyring()))
    reactor.callWhenRunning(hops)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
