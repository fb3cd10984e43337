"""
The statistics store: what a metrics query costs over a million events, and what following costs mail.

Queries: a million made-up events (``tests/eventgen.py``, 50 campaigns over 30
days) are counted into a store; then the deliverability query with every
metric, for the whole period and per campaign, is timed against
baselines measured in the same run: a plain ``SELECT count(*)`` of the tables
the query reads (daily and hourly rows), and of a table holding one row per event (what a query that
scanned the events would at least cost). Medians of ``--repeat`` runs.

Message path: two appliances (``bench/smtp_bench.py``'s setup), one with the
statistics follower and one with ``[stats] enabled = false``, driven in
alternating rounds (the order swapped each round, each appliance left to
finish its deliveries before the next) by the same client; medians and their ratio, of throughput and (less
sensitive to other load on the machine) of each appliance process's CPU
time per message, its deliveries and statistics included.

    .venv/bin/python bench/stats_bench.py [--events 1000000] [--repeat 30]
        [--messages 400] [--concurrency 8] [--rounds 5] [--skip-queries] [--skip-mail]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from smtp_bench import appliance_config, drive  # noqa: E402

from appliance.stats import METRICS, StatsStore, connect  # noqa: E402
from appliance.stats.store import query_metrics  # noqa: E402
from tests import eventgen  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402


def timed(f: Callable[[], object], repeat: int) -> float:
    """The median of ``repeat`` runs of ``f``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def queries(events: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stats.sqlite3")
        store = StatsStore(path)
        store.open()
        span = 30 * 86400
        start = time.perf_counter()
        batch: list[bytes] = []
        for line in eventgen.lines(events, campaigns=50, span=span):
            batch.append(line)
            if len(batch) == 10000:
                store.apply(batch, b"bench")
                batch = []
        if batch:
            store.apply(batch, b"bench")
        counted = time.perf_counter() - start
        assert store.db is not None
        store.db.execute("CREATE TABLE raw (event_id INTEGER PRIMARY KEY, payload TEXT)")
        store.db.execute("BEGIN")
        store.db.executemany("INSERT INTO raw VALUES (?, '')", ((i,) for i in range(events)))
        store.db.execute("COMMIT")
        store.close()
        db = connect(path, read_only=True)
        names = list(METRICS)
        rows = db.execute("SELECT count(*) FROM hourly").fetchone()[0]
        since, until = eventgen.START, eventgen.START + span + 3600
        whole = timed(lambda: query_metrics(db, names, since, until), repeat)
        by_campaign = timed(lambda: query_metrics(db, names, since, until, by_campaign=True), repeat)
        count_hourly = timed(lambda: db.execute("SELECT count(*) FROM hourly").fetchone(), repeat)
        count_daily = timed(lambda: db.execute("SELECT count(*) FROM daily").fetchone(), repeat)
        count_raw = timed(lambda: db.execute("SELECT count(*) FROM raw").fetchone(), repeat)
        [totals] = query_metrics(db, ["count_injected", "count_unique_confirmed_opened"], since, until)
        db.close()
    print(f"{events} events counted in {counted:.1f} s ({events / counted:,.0f} events/s) into "
          f"{rows} hourly rows; {totals}")
    print(f"medians of {repeat} runs, {len(names)} metrics over 30 days:")
    print(f"  deliverability             {whole:7.2f} ms")
    print(f"  deliverability/campaign    {by_campaign:7.2f} ms")
    print(f"  baseline count(*) daily    {count_daily:7.2f} ms   (query / baseline "
          f"{whole / count_daily:.1f})")
    print(f"  baseline count(*) hourly   {count_hourly:7.2f} ms   (query / baseline "
          f"{whole / count_hourly:.1f})")
    print(f"  baseline count(*) of {events} event rows {count_raw:7.2f} ms   (query / baseline "
          f"{whole / count_raw:.2f})")


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU time so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quiet(log_path: str, still: float = 1.5, longest: float = 30.0) -> None:
    """Wait until the appliance has delivered what it took (its event log stopped growing)."""
    deadline = time.monotonic() + longest
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            return
        time.sleep(0.1)


def mail(messages: int, concurrency: int, rounds: int) -> None:
    env = {**os.environ, "PYTHONPATH": REPO}
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    with tempfile.TemporaryDirectory() as tmp:
        sink_port = free_port()
        procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "bare_smtp.py"),
                                   str(sink_port)], env=env)]
        ports = {}
        for name, enabled in (("with stats", "true"), ("without stats", "false")):
            directory = os.path.join(tmp, name.replace(" ", "_"))
            os.makedirs(directory)
            port = free_port()
            config = appliance_config(directory, port, sink_port)
            with open(config) as f:
                text = f.read()
            with open(config, "w") as f:
                f.write(text.replace("enabled = true ", f"enabled = {enabled} "))
            procs.append(subprocess.Popen([twistd, "-l", os.path.join(directory, "twistd.log"), "-n",
                                           "--pidfile=", "engage-appliance", "-c", config],
                                          env=env, cwd=directory))
            ports[name] = port
        try:
            wait_for_port(sink_port, procs[0])
            for proc, port in zip(procs[1:], ports.values(), strict=True):
                wait_for_port(port, proc)
                asyncio.run(drive(port, 40, 4))  # warm-up
            results: dict[str, list[float]] = {name: [] for name in ports}
            cpu: dict[str, list[float]] = {name: [] for name in ports}
            pids = {name: proc.pid for name, proc in zip(ports, procs[1:], strict=True)}
            for i in range(rounds):
                order = list(ports) if i % 2 == 0 else list(reversed(ports))
                for name in order:
                    before = cpu_seconds(pids[name])
                    results[name].append(asyncio.run(drive(ports[name], messages, concurrency)))
                    quiet(os.path.join(tmp, name.replace(" ", "_"), "var", "log", "events.jsonl"))
                    cpu[name].append((cpu_seconds(pids[name]) - before) * 1000 / messages)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
        counted = os.path.exists(os.path.join(tmp, "with_stats", "var", "stats.sqlite3"))
    base = statistics.median(results["without stats"])
    base_cpu = statistics.median(cpu["without stats"])
    print(f"{messages} messages, {concurrency} connections, {rounds} rounds (medians); store "
          f"written: {counted}")
    for name, values in results.items():
        median = statistics.median(values)
        cpu_median = statistics.median(cpu[name])
        print(f"  {name:<14} {median:8.1f} msg/s   ratio {median / base:5.3f}   "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
        print(f"  {'':<14} {cpu_median:8.3f} ms of appliance CPU per message (until its deliveries "
              f"are done)   ratio {cpu_median / base_cpu:5.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-queries", action="store_true")
    parser.add_argument("--skip-mail", action="store_true")
    args = parser.parse_args()
    if not args.skip_queries:
        queries(args.events, args.repeat)
    if not args.skip_mail:
        mail(args.messages, args.concurrency, args.rounds)


if __name__ == "__main__":
    main()
