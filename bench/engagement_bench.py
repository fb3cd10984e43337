"""
What ``user_agent_parsed`` and ``geo_ip`` add to each tracker hit, in process.

The baseline is the tracker's own work for one hit, measured in the same run:
``Tracker.events_for`` with an engagement that adds nothing. Against it:

- the same with the appliance's ``Engagement``, agents from a realistic mix
  (parsed once, then from the cache), with and without a MaxMind database
  and Apple's prefetch networks (a synthetic list the size of Apple's);
- a parse that misses the cache (a user agent never seen before);
- the prefetch networks lookup and the MaxMind lookup on their own.

Each figure is the median of ``--rounds`` rounds of ``--hits`` calls, in
microseconds per call, with its ratio to the baseline.

    python bench/engagement_bench.py [--rounds 7] [--hits 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmdb_writer import MMDBWriter  # noqa: E402
from netaddr import IPSet  # noqa: E402

from appliance.engagement import Engagement  # noqa: E402
from appliance.engagement.agents import parse_agent, resolver_name  # noqa: E402
from appliance.engagement.geo import open_geoip  # noqa: E402
from appliance.engagement.networks import parse_networks  # noqa: E402
from appliance.links import Keyring, LinkCodec, LinkData  # noqa: E402
from appliance.tracker import Client, Tracker  # noqa: E402
from bench.tracker_bench import AGENT_MIX  # noqa: E402

CODEC = LinkCodec(Keyring(((1, b"b" * 32),)))
LINK = LinkData("click", 4_102_444_800, "00a1b2c3d4e5f6a7b8c9", "84813762132582711", "someone@example.com",
                "Spring sale", ("news", "spring"), {"user": "42"}, "Hero image", "https://shop.example/p",
                issued=1_700_000_000)


class Events:
    def make(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, **fields}


class Nothing(Engagement):
    """An engagement that adds nothing: the tracker's own work."""

    def open_fields(self, user_agent: str, ip_address: str) -> dict[str, Any]:
        return {}

    def click_fields(self, user_agent: str, ip_address: str, token: bytes, **kw: Any) -> dict[str, Any]:
        return {}


def relay_networks(count: int) -> str:
    rng = random.Random(5)
    lines = []
    for _ in range(count):
        a = rng.randrange(2**32) & ~31
        lines.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/27,US,US-CA,Los Angeles,")
    return "\n".join(lines)


def geo_database(directory: str) -> str:
    path = os.path.join(directory, "City.mmdb")
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City")
    rng = random.Random(7)
    for n in range(2000):
        writer.insert_network(IPSet([f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{n % 256}.0/24"]), {
            "country": {"iso_code": "US"}, "subdivisions": [{"iso_code": "MD"}],
            "city": {"names": {"en": "Columbia"}}, "postal": {"code": "21046"},
            "location": {"latitude": 39.1749, "longitude": -76.8375}})
    writer.to_db_file(path)
    return path


def per_call(cases: dict[str, Callable[[int], object]], hits: int, rounds: int) -> dict[str, float]:
    """
    Median microseconds per call of each case, over ``rounds`` rounds of ``hits`` calls;
    the cases take turns within each round, so drift on a shared machine hits all alike.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            start = time.perf_counter()
            for i in range(hits):
                f(i)
            times[name].append((time.perf_counter() - start) / hits * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hits", type=int, default=20000)
    args = parser.parse_args()
    agents = [agent for share, agent in AGENT_MIX for _ in range(share)]
    clients = [Client(f"198.51.{n % 200}.{n % 250}", agents[(n * 37) % len(agents)]) for n in range(1000)]
    token = CODEC.encode(LINK).encode()
    with tempfile.TemporaryDirectory() as directory:
        geo = open_geoip(geo_database(directory))
        networks = parse_networks(relay_networks(250_000))
        trackers = {
            "baseline (no engagement)": Tracker(CODEC, Events(), engagement=Nothing()),  # type: ignore[arg-type]
            "user_agent_parsed (mix)": Tracker(CODEC, Events(), engagement=Engagement()),  # type: ignore[arg-type]
            "+ networks + geo_ip": Tracker(CODEC, Events(), engagement=Engagement(  # type: ignore[arg-type]
                networks, geo, click_prefetch_seconds=10)),
        }
        opens = LINK._replace(kind="open")
        cases: dict[str, Callable[[int], object]] = {}
        for name, tracker in trackers.items():
            cases[name + ", click"] = lambda i, t=tracker: t.events_for(LINK, clients[i % 1000], token)
            cases[name + ", open"] = lambda i, t=tracker: t.events_for(opens, clients[i % 1000], token)
        cases["prefetch networks lookup"] = lambda i: clients[i % 1000].ip_address in networks
        cases["geo_ip lookup (cached)"] = lambda i: geo.lookup(clients[i % 1000].ip_address)
        results = per_call(cases, args.hits, args.rounds)
        fresh = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                 "Chrome/126.0.{}.{}")
        counter = iter(range(10**9))
        results.update(per_call({"parse, cache miss": lambda i: parse_agent(fresh.format(next(counter), i))},
                                max(args.hits // 20, 100), args.rounds))
        geo.close()
    print(f"ua-parser resolver: {resolver_name()}; medians of {args.rounds} rounds, µs per call")
    base = {kind: results[f"baseline (no engagement), {kind}"] for kind in ("click", "open")}
    for name, us in results.items():
        kind = name.rsplit(", ", 1)[-1]
        ratio = f"  x{us / base[kind]:.2f} of the baseline {kind}" if kind in base else ""
        print(f"{name:45}{us:9.2f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
