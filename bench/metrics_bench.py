"""
What the admin listener's metrics cost the paths they watch.

- event log: ``EventLog.emit`` of a delivery-sized event to a real file, without
  observers (baseline) and with the ``EventCounters`` observer that /metrics reads;
- tracker answer: the latency histogram's ``observe`` per answer, against an
  empty call (what an answer pays for being measured);
- scrape: one ``generate_latest`` of an appliance-sized registry with a queue of
  ``--copies`` copies over ``--destinations`` destinations.

Each variant runs in turn, the order rotated every round; the medians over the
rounds and the ratio to the baseline measured in the same run are printed.

    python bench/metrics_bench.py [--rounds 7] [--events 50000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from appliance.admin.metrics import EventCounters, Readings, tracker_latency  # noqa: E402
from appliance.events import EventLog  # noqa: E402

FIELDS = {"message_id": "0000018c2f5e9a1b2c3d", "transmission_id": "1234567890123", "campaign_id": "spring",
          "rcpt_to": "someone@example.test", "routing_domain": "example.test", "queue_time": "12",
          "num_retries": "0", "delv_method": "esmtp", "ip_address": "192.0.2.1", "outbound_tls": "1"}


def event_log_run(directory: str, events: int, observed: bool) -> float:
    log = EventLog(os.path.join(directory, f"events-{observed}.jsonl"), "bench", fsync_interval=0,
                   clock=Clock())
    if observed:
        log.observe(EventCounters(CollectorRegistry(auto_describe=False)))
    log.startService()
    try:
        began = time.perf_counter()
        for i in range(events):
            log.emit("delivery" if i % 4 else "bounce", bounce_class="21", **FIELDS)
        return (time.perf_counter() - began) / events
    finally:
        log.stopService()


def observe_run(events: int, measured: bool) -> float:
    observe: Callable[[float], object] = (tracker_latency(CollectorRegistry(auto_describe=False)).observe
                                          if measured else (lambda seconds: None))
    began = time.perf_counter()
    for i in range(events):
        observe(0.0003 + (i % 7) * 0.0001)
    return (time.perf_counter() - began) / events


def scrape_run(copies: int, destinations: int) -> float:
    registry = CollectorRegistry(auto_describe=False)
    EventCounters(registry)
    tracker_latency(registry)
    readings = Readings()
    depth = {f"d{i}.example": copies // destinations for i in range(destinations)}
    readings.gauge("queue_copies", "Copies.", lambda: dict(depth), label="destination")
    for name in ("a", "b", "c", "d", "e", "f"):
        readings.counter(name, "x", lambda: 1)
    registry.register(readings)
    began = time.perf_counter()
    generate_latest(registry)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--copies", type=int, default=100_000)
    parser.add_argument("--destinations", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        variants: list[tuple[str, Callable[[], float]]] = [
            ("emit, no observer", lambda: event_log_run(directory, args.events, False)),
            ("emit, EventCounters", lambda: event_log_run(directory, args.events, True)),
            ("answer, not measured", lambda: observe_run(args.events, False)),
            ("answer, histogram", lambda: observe_run(args.events, True)),
        ]
        for r in range(args.rounds):
            for name, run in variants[r % len(variants):] + variants[:r % len(variants)]:
                results.setdefault(name, []).append(run())
    scrape = statistics.median(scrape_run(args.copies, args.destinations) for _ in range(args.rounds))
    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"medians over {args.rounds} rounds of {args.events} events:")
    for base, other in (("emit, no observer", "emit, EventCounters"),
                        ("answer, not measured", "answer, histogram")):
        print(f"  {base:22} {med[base] * 1e6:7.2f} us")
        print(f"  {other:22} {med[other] * 1e6:7.2f} us  (+{(med[other] - med[base]) * 1e6:.2f} us, "
              f"ratio {med[other] / med[base]:.3f})")
    print(f"  scrape, {args.copies} copies over {args.destinations} destinations: {scrape * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
