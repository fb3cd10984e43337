"""
``engage-appliance stats``: the statistics store's counts per campaign, read directly.

It opens the store read-only (no running appliance needed, and it never
changes the file); ``stats rebuild`` counts the event log and its rotated
files into a new store that replaces the old one.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from appliance.config import DEFAULT_CONFIG_PATH, Config, parse_duration
from appliance.stats import connect, rebuild
from appliance.stats.store import query_links, query_metrics

SHOWN = ("count_injected", "count_delivered", "count_bounce", "count_hard_bounce", "count_delayed",
         "count_unique_confirmed_opened", "count_nonprefetched_unique_confirmed_opened",
         "count_unique_clicked", "count_clicked")
HEADINGS = ("injected", "delivered", "bounced", "hard", "delayed", "opened", "opened*",
            "clicked", "clicks")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "stats", help="counts per campaign from the statistics store, or rebuild it",
        description="Counts per campaign over a period, read from the statistics store "
                    "(stats.database) without the appliance. 'opened' counts each recipient copy "
                    "opened (or clicked) once; 'opened*' leaves out opens classified as "
                    "prefetched; rates are of deliveries. 'stats rebuild' builds the store again "
                    "from the event log and its rotated files: run it with the appliance stopped "
                    "(a running one keeps counting into the store it opened until restarted).")
    p.add_argument("action", nargs="?", choices=["rebuild"], help="rebuild the store from the log")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                   help="the appliance's configuration file (default: %(default)s)")
    p.add_argument("--campaign", action="append", default=[], metavar="C",
                   help="only this campaign (repeatable); adds its clicks per link")
    p.add_argument("--since", default="7d", metavar="AGE",
                   help="the period, back from now (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")


def report(db: sqlite3.Connection, since: int, until: int, campaigns: list[str]) -> dict[str, Any]:
    names = list(SHOWN) + ["count_nonprefetched_rendered", "count_rendered"]
    return {
        "from": since, "to": until,
        "campaigns": query_metrics(db, names, since, until, campaigns, by_campaign=True),
        "total": query_metrics(db, names, since, until, campaigns)[0],
        "links": query_links(db, since, until, campaigns) if campaigns else [],
    }


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render(data: dict[str, Any]) -> str:
    """The report as text: a row per campaign, a total, and clicks per link."""
    start = time.strftime("%Y-%m-%d %H:%M", time.gmtime(data["from"]))
    end = time.strftime("%Y-%m-%d %H:%M", time.gmtime(data["to"]))
    out = [f"from {start} to {end} UTC (counted by the hour)", ""]
    width = max([len("campaign"), len("(all)")] + [len(r["campaign_id"]) for r in data["campaigns"]])
    out.append(f"{'campaign':<{width}} " + " ".join(f"{h:>9}" for h in HEADINGS)
               + f" {'open%':>6} {'click%':>6}")
    for r in [*data["campaigns"], {"campaign_id": "(all)", **data["total"]}]:
        delivered = r["count_delivered"]
        out.append(f"{r['campaign_id']:<{width}} " + " ".join(f"{r[n]:>9}" for n in SHOWN)
                   + f" {_rate(r['count_unique_confirmed_opened'], delivered):>6}"
                   f" {_rate(r['count_unique_clicked'], delivered):>6}")
    if data["links"]:
        out += ["", "clicks per link:", f"{'clicks':>7} {'unique':>7}  campaign / name / anchor text / url"]
        for link in data["links"]:
            anchor = f"\"{link['target_link_anchor']}\"" if link["target_link_anchor"] else "-"
            out.append(f"{link['count_clicked']:>7} {link['count_unique_clicked']:>7}  "
                       f"{link['campaign_id']} / {link['target_link_name'] or '-'} / {anchor} / "
                       f"{link['target_link_url']}")
    return "\n".join(out) + "\n"


def run(options: argparse.Namespace, config: Config, out: Callable[[str], None]) -> int:
    database = config.stats.database
    if options.action == "rebuild":
        counted, _ = rebuild(database, config.events.log_file)
        out(f"rebuilt {database} from {counted} event(s) of {config.events.log_file} and its "
            "rotated files")
        return 0
    try:
        span = parse_duration(options.since)
    except ValueError:
        print(f"engage-appliance stats: --since: expected an age like 1h or 7d, got {options.since!r}",
              file=sys.stderr)
        return 2
    if not os.path.exists(database):
        print(f"engage-appliance stats: no statistics store at {database} (the appliance makes it "
              "at start; 'engage-appliance stats rebuild' builds it from the event log)",
              file=sys.stderr)
        return 1
    until = int(time.time()) + 1
    try:
        db = connect(database, read_only=True)
        try:
            data = report(db, int(until - span), until, options.campaign)
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        print(f"engage-appliance stats: cannot read {database}: {e} (the appliance rebuilds a "
              "damaged store at start; or run 'engage-appliance stats rebuild')", file=sys.stderr)
        return 1
    out(json.dumps(data, indent=1) if options.json else render(data).rstrip("\n"))
    return 0
