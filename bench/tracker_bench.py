"""
Clicks per second and latency through the tracker, against a bare 302.

Three servers run side by side, each a single twisted.web process on loopback:

- baseline: a bare resource that answers every request with the same 302,
  served by the same ``Site`` as the tracker (no access log);
- stock: the same resource on a stock ``server.Site``, whose access log goes
  to a log file, as a plain twisted.web deployment runs;
- tracker: the appliance's tracker site, verifying a real signed click link
  and writing its ``click`` event to a real event log file (fsynced every
  second, as shipped) before answering. Its limits are the shipped ones
  except the per-link event limit, which is lifted: every request here is
  the same link from the same address, and the point is what a click that
  writes its event costs;
- processes: the same tracker with ``[tracker] processes = "auto"`` (one
  process per usable core; ``--processes N`` for another count): children
  answer beside it on their own sockets and send their events to it, and it
  writes them to its event log.

Nothing is cached between requests, so hitting one URL costs the tracker
what hitting many would. ``wrk`` (Debian package ``wrk``) drives each server
in turn, rotating the order every round so that drift on a shared machine
hits all alike; the medians over the rounds and the ratios are printed.

``--agents`` sends a ``User-Agent`` with each request, which the tracker
parses and classifies for the event's ``user_agent_parsed``: ``mix`` cycles
through the agents a mailing's opens and clicks come from, in about the
shares they come in (parsed once each, then cached, as in production);
``distinct`` makes every request's agent new (a browser build number that
counts up), so every hit pays a full parse: the worst case.

    python bench/tracker_bench.py [--rounds 5] [--duration 3] [--connections 16]
                                  [--agents none|mix|distinct] [--processes auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appliance.links import Keyring, LinkCodec, LinkData  # noqa: E402
from tests.ports import free_port  # noqa: E402

KEYRING = Keyring(((1, b"b" * 32),))
KINDS = ("baseline", "stock", "tracker", "processes")
# (share in percent, user agent): where a marketing mailing's opens and clicks come from.
AGENT_MIX = (
    (38, "Mozilla/5.0"),  # Apple Mail Privacy Protection's prefetch
    (22, "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"),
    (10, "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Mobile/15E148"),
    (8, "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17531; Pro)"),
    (7, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"),
    (5, "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/125.0.6422.165 Mobile Safari/537.36"),
    (4, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"),
    (3, "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"),
    (2, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) BingPreview/1.0b"),
    (1, "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.12.2"),
)


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(agents: str) -> str:
    """A wrk script that sends each request with a user agent of ``--agents``."""
    if agents == "mix":
        listed = [agent for share, agent in AGENT_MIX for _ in range(share)]
        # Spread out (a fixed stride through the list), not one agent's share in a row.
        spread = [listed[(i * 37) % len(listed)] for i in range(len(listed))]
        return ("local agents = {" + ", ".join(lua_string(a) for a in spread) + "}\n"
                "local i = 0\n"
                "request = function()\n"
                "  i = i + 1\n"
                "  return wrk.format(nil, nil, {[\"User-Agent\"] = agents[(i % #agents) + 1]})\n"
                "end\n")
    return ("local i = 0\n"
            "request = function()\n"
            "  i = i + 1\n"
            "  local agent = string.format(\"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/126.0.%d.%d Safari/537.36\", math.random(1, 1000000), i)\n"
            "  return wrk.format(nil, nil, {[\"User-Agent\"] = agent})\n"
            "end\n")
TARGET = "https://shop.example/products/42?utm_source=mail&utm_campaign=spring%20sale#reviews"


def click_token() -> str:
    return LinkCodec(KEYRING).encode(LinkData(
        "click", int(time.time()) + 86400, "00a1b2c3d4e5f6a7b8c9", "84813762132582711",
        "someone@example.com", "Spring sale", ("news", "spring"), {"user": "42", "plan": "gold"},
        "Hero image", TARGET))


# -- the servers (child processes) -------------------------------------------------


def lifted_event_limit() -> dict[str, object]:
    """The shipped limits without the per-link event limit; nothing where the tracker has no limits."""
    try:
        from appliance.tracker.limits import DEFAULT_LIMITS
    except ImportError:
        return {}
    import dataclasses

    return {"limits": dataclasses.replace(DEFAULT_LIMITS, event_rate_limit=2**31)}


def serve(kind: str, port: int, directory: str, processes: int) -> None:
    from twisted.internet import reactor
    from twisted.web import resource

    from appliance.events import EventLog
    from appliance.tracker import TrackerSite, make_site

    class Fixed302(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setResponseCode(302)
            request.setHeader(b"location", TARGET.encode())
            request.setHeader(b"cache-control", b"no-store")
            return b""

    if kind == "processes":
        from appliance.tracker.processes import TrackerProcesses, share

        limits = share(lifted_event_limit()["limits"], processes)
        events = EventLog(os.path.join(directory, "events-processes.jsonl"), "bench", clock=reactor,
                          process=0)
        events.startService()
        site = make_site(LinkCodec(KEYRING), events, reactor=reactor, limits=limits)
        pool = TrackerProcesses(site, f"tcp:{port}:interface=127.0.0.1:backlog=256", processes,
                                reactor=reactor, keyring=lambda: KEYRING, node_name="bench",
                                customer_id="1", trusted_proxies=(), limits=limits)
        pool.startService()
        reactor.addSystemEventTrigger("before", "shutdown", pool.stopService)

        def ready() -> None:
            if len(pool.children) < processes - 1 or not all(c.ready for c in pool.children.values()):
                reactor.callLater(0.05, ready)
                return
            print("ready", flush=True)

        ready()
        reactor.run()
        return
    if kind == "tracker":
        events = EventLog(os.path.join(directory, "events.jsonl"), "bench", clock=reactor)
        events.startService()
        site = make_site(LinkCodec(KEYRING), events, reactor=reactor, **lifted_event_limit())
    elif kind == "stock":
        from twisted.logger import globalLogBeginner, textFileLogObserver
        from twisted.web import server

        logfile = open(os.path.join(directory, "stock.log"), "a")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(logfile)], redirectStandardIO=False)
        site = server.Site(Fixed302())
    else:
        site = TrackerSite(Fixed302())
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=256)
    print("ready", flush=True)
    reactor.run()


# -- the driver --------------------------------------------------------------------


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/s, p50 and p99 in milliseconds, and the request count from ``wrk --latency``."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    count = int(re.search(r"(\d+) requests in", text).group(1))
    lat = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$",
                                                            text, re.M)}
    non3xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "count": count,
            "bad": int(non3xx.group(1)) if non3xx else 0}


def run_wrk(url: str, duration: int, connections: int, script: str | None = None) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script is not None:
        command += ["-s", script]
    out = subprocess.run([*command, url], check=True, capture_output=True, text=True).stdout
    return parse_wrk(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--agents", choices=("none", "mix", "distinct"), default="none",
                        help="send a User-Agent with each request (see above)")
    parser.add_argument("--processes", default="auto",
                        help='tracker processes for the "processes" server (default: auto)')
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from appliance.config.simple import usable_cores

    processes = usable_cores() if args.processes == "auto" else int(args.processes)
    if args.serve:
        serve(args.serve, args.port, args.directory, processes)
        return 0
    if processes < 2:
        print("the processes server needs 2 or more processes (one core here?)", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    directory = tempfile.mkdtemp(prefix="tracker-bench-")
    token = click_token()
    script = None
    if args.agents != "none":
        script = os.path.join(directory, "agents.lua")
        with open(script, "w") as f:
            f.write(wrk_script(args.agents))
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for kind in KINDS:
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port),
                                     "--directory", directory, "--processes", str(processes)],
                                    stdout=subprocess.PIPE, text=True)
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {kind} server did not start")
            servers[kind] = (proc, f"http://127.0.0.1:{port}/f/a/{token}")
        results: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for i in range(args.rounds):
            for kind in KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]:
                r = run_wrk(servers[kind][1], args.duration, args.connections, script)
                results[kind].append(r)
                print(f"round {i + 1} {kind:8} {r['rps']:9.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    def clicks_in(name: str) -> int:
        with open(os.path.join(directory, name), "rb") as f:
            return sum(1 for line in f if json.loads(line)["type"] == "click")

    clicks = clicks_in("events.jsonl")
    answered = sum(r["count"] for r in results["tracker"])
    clicks_processes = clicks_in("events-processes.jsonl")
    answered_processes = sum(r["count"] for r in results["processes"])
    bad = sum(r["bad"] for rs in results.values() for r in rs)
    shutil.rmtree(directory)

    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("rps", "p50", "p99")}
           for k, rs in results.items()}
    print(f"\nmedians of {args.rounds} rounds, {args.duration:g} s each, wrk -t1 -c{args.connections}, "
          f"user agents: {args.agents}:")
    print(f"{'':10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for kind in KINDS:
        m = med[kind]
        print(f"{kind:10}{m['rps']:10.0f}{m['p50']:10.2f}{m['p99']:10.2f}")
    for kind in ("tracker", "processes"):
        t = med[kind]
        for base in ("baseline", "stock"):
            b = med[base]
            print(f"{kind}/{base}: throughput {t['rps'] / b['rps']:.2f}, "
                  f"p50 x{t['p50'] / b['p50']:.2f}, p99 x{t['p99'] / b['p99']:.2f}")
    print(f"processes/tracker: throughput {med['processes']['rps'] / med['tracker']['rps']:.2f} "
          f"({processes} processes)")
    print("targets: tracker/baseline throughput >= 0.80, processes/baseline >= 1.20")
    print(f"click events written: {clicks} for {answered} answered tracker requests, "
          f"{clicks_processes} for {answered_processes} answered by the processes; "
          f"non-2xx/3xx responses: {bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
