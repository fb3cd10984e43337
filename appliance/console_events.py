"""
``engage-appliance events``: the event log and its rotated files, filtered, as a table or JSON lines.

The search is ``appliance.eventsearch``, the one the Events API answers with.
``--follow`` reads the current file with the follower's ``LogReader`` from
its start, so nothing written between the history and the follow is missed,
and keeps reading across a rotation by rename. Tracing a message is one
command: ``engage-appliance events --transmission-id ID`` with the ID of its
``250 ... queued as ID`` reply.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from appliance import eventsearch
from appliance.config import DEFAULT_CONFIG_PATH, parse_duration
from appliance.eventtypes import EVENT_TYPES
from appliance.follower import Cursor, LogReader

HEADINGS = ("time", "type", "campaign", "recipient", "message_id", "transmission_id")
WIDTHS = (20, 17, 17, 30, 20, 19)  # a transmission_id is up to 19 digits, a message_id 20 hex
COLUMNS = " ".join(f"{h:<{w}}" for h, w in zip(HEADINGS, WIDTHS, strict=True)) + " detail"


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "events", help="search the event log (and rotated files), or follow it",
        description="Print the events of the event log and its rotated files (gzip too), oldest "
                    "first, one line each; --json prints the log's lines as they are. Each filter "
                    "option may be given several times (any of them matches); different options "
                    "must all match. To trace a message, give the ID of its '250 ... queued as ID' "
                    "reply to --transmission-id.")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                   help="the appliance's configuration file (default: %(default)s)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="after the history, print events as they are written (across rotation)")
    p.add_argument("--type", "-t", action="append", default=[], metavar="TYPE",
                   help=f"an event type: {', '.join(EVENT_TYPES)}")
    p.add_argument("--campaign", action="append", default=[], metavar="C", help="a campaign_id")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDRESS",
                   help="a recipient address (any case)")
    p.add_argument("--message-id", action="append", default=[], metavar="ID",
                   help="a recipient copy's message_id")
    p.add_argument("--transmission-id", action="append", default=[], metavar="ID",
                   help="a message's transmission_id (the ID in '250 ... queued as ID')")
    p.add_argument("--since", metavar="AGE", help="only events of the last AGE (30m, 1h, 7d)")
    p.add_argument("--json", action="store_true", help="print the JSON lines as the log holds them")


def filters_of(options: argparse.Namespace, now: float) -> eventsearch.Filters:
    """The filters the options ask for; a ``ValueError`` names a bad one."""
    types = [t for given in options.type for t in given.split(",") if t]
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    since = None
    if options.since is not None:
        try:
            since = now - parse_duration(options.since)
        except ValueError:
            raise ValueError(f"--since: expected an age like 30m, 1h or 7d, got {options.since!r}") from None
    return eventsearch.Filters.of(types=types, campaigns=options.campaign, recipients=options.rcpt,
                                  message_ids=options.message_id,
                                  transmission_ids=options.transmission_id, since=since)


def row(event: dict[str, Any]) -> str:
    """One event as a line of the table."""
    ts = eventsearch.event_time(event)
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    kind = str(event.get("type", "?"))
    if kind in ("bounce", "delay", "policy_rejection"):
        detail = f"class {event.get('bounce_class', '?')}: {event.get('reason', '')}"
    elif kind in ("click", "link_unsubscribe"):
        detail = str(event.get("target_link_url", ""))
    elif kind == "injection":
        detail = f"subject {event.get('subject', '')!r}"
    elif kind == "delivery":
        detail = f"{event.get('ip_address', '')} after {event.get('num_retries', '0')} retr(ies)"
    else:
        detail = str(event.get("user_agent", ""))
    fields = (when, kind, event.get("campaign_id") or "-", event.get("rcpt_to") or "-",
              event.get("message_id") or "-", event.get("transmission_id") or "-")
    text = " ".join(f"{str(v):<{w}}" for v, w in zip(fields, WIDTHS, strict=True))
    return f"{text} {detail}".replace("\n", " ").rstrip()


def run(options: argparse.Namespace, log_path: str, out: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the history, then (``--follow``) what comes, until interrupted."""
    try:
        filters = filters_of(options, time.time())
    except ValueError as e:
        print(f"engage-appliance events: {e}", file=sys.stderr)
        return 2

    def show(event: dict[str, Any], line: bytes) -> None:
        out(line.decode("utf-8", "replace").rstrip("\n") if options.json else row(event))

    names = eventsearch.log_files(log_path)
    current = names[-1] if names and os.path.abspath(names[-1]) == os.path.abspath(log_path) else None
    rotated = names[:-1] if current else names
    reader = LogReader(log_path, "engage-appliance events")
    try:
        if not options.json:
            out(COLUMNS)
        for event, line in eventsearch.search_files(rotated, filters):
            show(event, line)
        if current is None:
            if not options.follow:
                return 0
            while not os.path.exists(log_path):  # never created here: the appliance sets its mode
                sleep(0.5)
        st = os.stat(log_path)
        reader.start(Cursor(st.st_dev, st.st_ino, 0), "(from the start)")
        while True:
            chunk = reader.read()
            if chunk is None:
                if not options.follow:
                    return 0
                sleep(0.5)
                continue
            for line in chunk.lines:
                event = eventsearch.parse(line)
                if event is not None and filters.matches(event):
                    show(event, line)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        reader.close()
