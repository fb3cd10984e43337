"""
``engage-appliance suppressions``: list, add, remove and import suppressed recipients.

It opens the suppression database the configuration names
(``[suppression] database``) itself, the appliance running or not: a
running appliance sees each change within ``[suppression] check_interval``,
as SQLite's ``data_version`` tells it another process committed, and
reloads its in-memory list. ``import`` takes SparkPost's CSV export.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from appliance.suppression.store import (
    MANUALLY_ADDED,
    SOURCES,
    TYPES,
    Change,
    Entry,
    SuppressionError,
    SuppressionStore,
    iso,
    normalize,
    read_csv,
)

PROG = "engage-appliance suppressions"
BOTH = "both"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=(
        "The suppression list: recipients who get no copy. A running appliance sees changes "
        "made here within [suppression] check_interval."))
    top.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                     help="the appliance's configuration file (default: %(default)s)")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the entries, newest change first")
    listing.add_argument("--type", choices=TYPES, help="only this scope")
    listing.add_argument("--source", choices=SOURCES, help="only entries from this source")
    listing.add_argument("--recipient", help="only this recipient's entries")
    listing.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    add = actions.add_parser("add", help="suppress a recipient")
    add.add_argument("recipient")
    add.add_argument("--type", choices=(*TYPES, BOTH), default=BOTH,
                     help="the scope: transactional, non_transactional or both (default: both)")
    add.add_argument("--description", default="", help="why, shown with the entry")
    remove = actions.add_parser("remove", help="stop suppressing a recipient")
    remove.add_argument("recipient")
    remove.add_argument("--type", choices=TYPES, help="only this scope (default: both)")
    imports = actions.add_parser("import", help="add the entries of a SparkPost suppression CSV")
    imports.add_argument("csv", metavar="CSV",
                         help="columns recipient, type (or transactional and non_transactional), "
                              "description; - for standard input")
    return top


def format_entry(entry: Entry) -> str:
    return "\t".join((entry.recipient, entry.type, entry.source, iso(entry.updated), entry.description))


def run(args: argparse.Namespace, store: SuppressionStore, say: Callable[[str], object],
        complain: Callable[[str], object]) -> int:
    """One action against an open store; the exit status."""
    if args.action == "list":
        if args.recipient:
            entries = [e for e in store.get(normalize(args.recipient))
                       if args.type is None or e.type == args.type]
        else:
            entries, _ = store.search(types=[args.type] if args.type else [],
                                      sources=[args.source] if args.source else [],
                                      limit=args.limit or -1)
        for entry in entries:
            if args.source is None or entry.source == args.source:
                say(format_entry(entry))
        return 0
    if args.action == "add":
        recipient = normalize(args.recipient)
        kinds = TYPES if args.type == BOTH else (args.type,)
        store.put([Change(recipient, kind, MANUALLY_ADDED, args.description) for kind in kinds])
        say(f"suppressed {recipient} ({', '.join(kinds)})")
        return 0
    if args.action == "remove":
        recipient = normalize(args.recipient)
        if not store.remove(recipient, args.type):
            complain(f"{recipient} is not on the suppression list")
            return 1
        say(f"removed {recipient}" + (f" ({args.type})" if args.type else ""))
        return 0
    # import
    try:
        if args.csv == "-":
            text = sys.stdin.read()
        else:
            with open(args.csv, encoding="utf-8-sig", newline="") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        complain(f"cannot read {args.csv}: {e}")
        return 1
    changes, problems = read_csv(text)
    for problem in problems:
        complain(f"{args.csv}: {problem}")
    if problems:
        complain("nothing imported: correct the lines above and import again")
        return 1
    store.put(changes)
    say(f"imported {len(changes)} entr{'y' if len(changes) == 1 else 'ies'} from {args.csv}")
    return 0


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        store = SuppressionStore(config.suppression.database)
    except SuppressionError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    try:
        return run(args, store, print, lambda text: print(text, file=sys.stderr))
    except SuppressionError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
