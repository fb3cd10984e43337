"""
What the suppression check costs at injection, and what keeping the list in memory costs.

Injection asks, for each recipient on the reactor thread, whether it is
suppressed. The appliance answers from two in-memory sets
(``appliance.suppression.SuppressionList``); the alternative would be a
SQLite lookup per recipient in the file pool. Measured here, with a list of
``--entries`` recipients (half of them in both scopes, as hard bounces are):

- check: one ``SuppressionList.suppressed`` call, a miss and a hit;
- baseline: ``settings.resolve`` for one recipient, which injection does for
  every recipient anyway: the check is priced against it;
- sqlite: one indexed SELECT for the same recipient on the same database,
  what each recipient would cost in the file pool (plus the thread hop);
- load: reading every entry into the sets, as the appliance does at start
  and when another process changed the database;
- memory: what the sets hold per entry (tracemalloc).

Each timing is the median of ``--rounds`` rounds; the ratios are against
the baseline of the same run.

    python bench/suppression_bench.py [--entries 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appliance.config import EngagementTrackerConfig, SmtpapiConfig  # noqa: E402
from appliance.settings import ContextSettings, MsysApi, resolve  # noqa: E402
from appliance.suppression import Change, SuppressionList, SuppressionStore  # noqa: E402


def per_call(statement: object, number: int, rounds: int) -> float:
    """Median seconds per call over ``rounds`` rounds of ``number`` calls."""
    timer = timeit.Timer(statement)  # type: ignore[arg-type]
    return statistics.median(timer.timeit(number) / number for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        store = SuppressionStore(os.path.join(directory, "suppression.sqlite3"))
        changes = []
        for i in range(args.entries):
            rcpt = f"recipient{i}@domain{i % 997}.example"
            changes.append(Change(rcpt, "non_transactional", "List Unsubscribe"))
            if i % 2:
                changes.append(Change(rcpt, "transactional", "Bounce Rule", "550 5.1.1 unknown user"))
        started = time.perf_counter()
        store.put(changes)
        write = time.perf_counter() - started

        loads = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            scopes = store.scopes()
            loads.append(time.perf_counter() - started)
        load = statistics.median(loads)

        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        suppressions = SuppressionList()
        suppressions.replace(*store.scopes())
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        held = sum(s.size_diff for s in after.compare_to(before, "filename"))
        del scopes

        hit, miss = "Recipient12345@Domain381.example", "nobody@nowhere.example"
        config, tracker = SmtpapiConfig(), EngagementTrackerConfig()
        header, context = MsysApi(), ContextSettings()
        number = 200_000
        baseline = per_call(lambda: resolve(config, tracker, header, context, 1e9), number, args.rounds)
        check_hit = per_call(lambda: suppressions.suppressed(hit, False), number, args.rounds)
        check_miss = per_call(lambda: suppressions.suppressed(miss, False), number, args.rounds)
        key = hit.lower()
        sqlite = per_call(lambda: store.get(key), 20_000, args.rounds)
        store.close()

    print(f"entries: {args.entries} recipients, {len(changes)} rows; written in one transaction in "
          f"{write:.2f} s")
    print(f"baseline  resolve() per recipient     {baseline * 1e6:8.3f} us")
    print(f"check     suppressed(), hit           {check_hit * 1e6:8.3f} us  "
          f"({check_hit / baseline:.3f} x baseline)")
    print(f"check     suppressed(), miss          {check_miss * 1e6:8.3f} us  "
          f"({check_miss / baseline:.3f} x baseline)")
    print(f"sqlite    one SELECT per recipient    {sqlite * 1e6:8.3f} us  "
          f"({sqlite / baseline:.1f} x baseline, {sqlite / check_hit:.0f} x the in-memory check; "
          f"the file pool's thread hop comes on top)")
    print(f"load      every entry into the sets   {load * 1000:8.1f} ms  "
          f"({load / len(changes) * 1e6:.2f} us per row)")
    print(f"memory    held by the sets            {held / 2**20:8.1f} MiB "
          f"({held / len(changes):.0f} bytes per row)")


if __name__ == "__main__":
    main()
