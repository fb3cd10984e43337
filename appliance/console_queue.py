"""
``engage-appliance queue``: the delivery queue of the running appliance, like Postfix's
``mailq``, ``postqueue -f`` and ``postsuper -h/-H/-d``.

Every subcommand asks the appliance's admin API (``/api/v1/queue``) over
HTTP with Basic authentication, user ``admin`` and the token file's contents
as the password: the appliance owns its spool, and this command never reads
or edits it behind its back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from appliance.admin.client import AdminClient, AdminError
from appliance.config import DEFAULT_CONFIG_PATH, AdminConfig, ConfigError, read_toml
from appliance.config.admin import read_admin
from appliance.config.tables import Table


class UsageError(ValueError):
    """Arguments that do not say what to act on."""



def admin_config(path: str) -> AdminConfig:
    """
    ``[admin]`` of the configuration file, checked as the appliance checks it.

    Only that table is read: the command needs nothing else, and works with a
    file that holds only it.
    """
    problems: list[tuple[str, str]] = []
    admin = read_admin(Table(read_toml(path).get("admin", {}), "admin", problems))
    if problems:
        raise ConfigError(problems, path)
    return admin


def ask(client: AdminClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The ``results`` of one request to the admin API."""
    answer = client.get(path) if method == "GET" else client.post(path, body)
    return answer["results"]


# -- what it prints -----------------------------------------------------------------------


def relative(seconds: float) -> str:
    """A duration as mailq-style short text: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def _next(copy: dict[str, Any], now: float) -> str:
    if copy["held"]:
        return "held"
    if copy["next_attempt"] is None:
        return "now"
    wait = _epoch(copy["next_attempt"]) - now
    return f"in {relative(wait)}" if wait >= 1 else "now"


def table(copies: list[dict[str, Any]], now: float) -> str:
    """One line per copy, its last error under it; a summary line last."""
    if not copies:
        return "the queue is empty\n"
    rows = [("TRANSMISSION", "MESSAGE ID", "AGE", "TRIES", "NEXT", "RECIPIENT")]
    errors = []
    for c in copies:
        rows.append((c["transmission_id"], c["message_id"], relative(c["age"]), str(c["attempts"]),
                     _next(c, now), c["recipient"]))
        errors.append(c["last_error"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                     + "  " + row[-1])
        if n and errors[n - 1]:
            lines.append(f"    ({' '.join(errors[n - 1].split())})")
    messages = len({c["transmission_id"] for c in copies})
    held = sum(c["held"] for c in copies)
    lines.append(f"-- {len(copies)} cop{'y' if len(copies) == 1 else 'ies'} of {messages} "
                 f"message{'' if messages == 1 else 's'}" + (f", {held} held" if held else ""))
    return "\n".join(lines) + "\n"


def details(copies: list[dict[str, Any]], now: float) -> str:
    """Every field of each copy, one per line."""
    blocks = []
    for c in copies:
        received = f"{c['received_at']} ({relative(c['age'])} ago)"
        nxt = c["next_attempt"] or "-"
        if c["next_attempt"]:
            nxt += f" ({_next(c, now)})"
        blocks.append("\n".join([
            f"message_id:      {c['message_id']}",
            f"transmission_id: {c['transmission_id']}",
            f"recipient:       {c['recipient']}",
            f"domain:          {c['domain']}",
            f"received:        {received}",
            f"attempts:        {c['attempts']}",
            f"next attempt:    {nxt}",
            f"state:           {c['state']}" + (" (held)" if c["held"] and c["state"] != "held" else ""),
            f"last error:      {c['last_error'] or '-'}",
        ]))
    return "\n\n".join(blocks) + "\n"


# -- the subcommands ----------------------------------------------------------------------

PAST = {"flush": "flushed (to be tried now)", "hold": "held", "release": "released",
        "delete": "deleted"}


def add_parser(commands: Any) -> None:
    """``queue`` and its actions, under the top parser's subcommands."""
    queue = commands.add_parser(
        "queue", help="list the delivery queue; flush, hold, release or delete copies",
        description="The running appliance's delivery queue, through its admin API. An ID is a "
                    "transmission id (as in '250 ... queued as ID': every copy of that message) "
                    "or one copy's message_id.")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every queued copy, oldest first (like mailq)",
                                 description="Every queued copy: its ids, age, attempts, next "
                                             "attempt and last error, oldest first.")
    listing.add_argument("--domain", metavar="D", help="only copies for this recipient domain")
    listing.add_argument("--json", action="store_true", help="the API's JSON as it is")
    show = actions.add_parser("show", help="every detail of the copies an ID names")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="the API's JSON as it is")
    texts = {
        "flush": "try the copies now instead of at their next attempt (like postqueue -f)",
        "hold": "stop trying the copies until released (like postsuper -h); they keep ageing",
        "release": "try held copies again (like postsuper -H)",
        "delete": "bounce the copies as an admin failure (class 25) and remove them (like postsuper -d)",
    }
    subs = [listing, show]
    for name, text in texts.items():
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("ids", nargs="*", metavar="ID")
        sub.add_argument("--domain", metavar="D", help="every copy for this recipient domain")
        if name in ("flush", "release"):
            sub.add_argument("--all", action="store_true", help="every copy in the queue")
        sub.add_argument("--json", action="store_true", help="the API's JSON as it is")
        subs.append(sub)
    for sub in subs:
        sub.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                         help="the appliance's configuration file (default: %(default)s)")


def selection(options: argparse.Namespace) -> dict[str, Any]:
    """The action's body: ids, a domain or all; a usage error unless exactly one is given."""
    chosen = [bool(options.ids), options.domain is not None, getattr(options, "all", False)]
    if sum(chosen) != 1:
        forms = "ID ..., --domain D" + (" or --all" if hasattr(options, "all") else "")
        raise UsageError(f"queue {options.action}: give one of {forms}")
    if options.ids:
        return {"ids": options.ids}
    if options.domain is not None:
        return {"domain": options.domain}
    return {"all": True}


def run(options: argparse.Namespace, client: AdminClient, out: TextIO, now: float) -> int:
    """One queue subcommand against ``client``; the exit status."""
    if options.action == "list":
        query = f"?{urlencode({'domain': options.domain})}" if options.domain else ""
        copies = ask(client, "GET", f"/api/v1/queue{query}")
        out.write(json.dumps(copies, indent=1) + "\n" if options.json else table(copies, now))
        return 0
    if options.action == "show":
        copies = ask(client, "GET", f"/api/v1/queue/{quote(options.id, safe='')}")
        out.write(json.dumps(copies, indent=1) + "\n" if options.json else details(copies, now))
        return 0
    result = ask(client, "POST", f"/api/v1/queue/{options.action}", selection(options))
    if options.json:
        out.write(json.dumps(result, indent=1) + "\n")
        return 0
    count = result["count"]
    out.write(f"{PAST[options.action]}: {count} cop{'y' if count == 1 else 'ies'}\n")
    if result["copies"] and options.action != "delete":
        out.write(table(result["copies"], now))
    return 0


def main(options: argparse.Namespace, prog: str, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """``engage-appliance queue ...``: 0 done, 1 refused or unreachable, 2 a usage or configuration error."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if options.action not in ("list", "show"):
            selection(options)  # before anything is asked
        # A delete of many copies journals each before the answer: a minute, not the default.
        client = AdminClient.from_config(admin_config(options.config), timeout=60.0)
        return run(options, client, out, time.time())
    except (ConfigError, UsageError) as e:
        print(f"{prog}: {e}", file=err)
        return 2
    except AdminError as e:
        print(f"{prog}: {e}", file=err)
        return 1
