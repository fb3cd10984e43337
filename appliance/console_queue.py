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
import base64
import http.client
import json
import sys
import time
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, read_toml

ADMIN_USER = "admin"
DEFAULT_ADMIN_ENDPOINT = "tcp:8025:interface=127.0.0.1"
DEFAULT_TOKEN_FILE = "var/admin.token"
TIMEOUT = 60.0  # seconds for the appliance to answer: a delete of many copies journals each


class UsageError(ValueError):
    """Arguments that do not say what to act on."""


class AdminError(Exception):
    """The admin API could not be asked, or refused; the message says which and why."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# -- where the admin API is ---------------------------------------------------------------


def admin_settings(path: str) -> tuple[str, str]:
    """
    ``[admin] endpoint`` and ``token_file`` from the configuration file, with their defaults.

    Only these two keys of ``[admin]`` are read here; the appliance checks the
    whole table when it starts.
    """
    raw = read_toml(path)
    admin = raw.get("admin", {})
    if not isinstance(admin, dict):
        raise ConfigError([("admin", "expected a table")], path)
    endpoint = admin.get("endpoint", DEFAULT_ADMIN_ENDPOINT)
    token_file = admin.get("token_file", DEFAULT_TOKEN_FILE)
    problems = [(f"admin.{key}", "expected a string") for key, value in
                (("endpoint", endpoint), ("token_file", token_file)) if not isinstance(value, str)]
    if problems:
        raise ConfigError(problems, path)
    return endpoint, token_file


def address_of(endpoint: str) -> tuple[str, int]:
    """Where to connect for a listening endpoint such as ``tcp:8025:interface=127.0.0.1``."""
    kind, _, rest = endpoint.partition(":")
    parts = rest.replace("\\:", "\0").split(":") if rest else []
    if kind != "tcp" or not parts or not parts[0].isdigit():
        raise ConfigError([("admin.endpoint", f"this command can reach a tcp:PORT endpoint, "
                                              f"not {endpoint!r}")])
    port, host = int(parts[0]), "127.0.0.1"
    for option in parts[1:]:
        name, _, value = option.partition("=")
        if name == "interface":
            host = value.replace("\0", ":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise AdminError(f"cannot read the admin token file {path}: {e.strerror} (it is created "
                         "when the appliance first starts; this command must run as its user)") from None
    if not token:
        raise AdminError(f"the admin token file {path} is empty")
    return token


class AdminClient:
    """The admin API's queue resource, asked over HTTP with the token."""

    def __init__(self, host: str, port: int, token: str, timeout: float = TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        credentials = base64.b64encode(f"{ADMIN_USER}:{token}".encode()).decode()
        self.authorization = f"Basic {credentials}"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The ``results`` of the answer; an ``AdminError`` with the API's message otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": self.authorization, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        where = f"{self.host}:{self.port}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError as e:
            raise AdminError(f"cannot reach the appliance's admin API at {where} ({e}); "
                             "is the appliance running?") from None
        finally:
            connection.close()
        if response.status == 401:
            raise AdminError(f"the admin API at {where} refused the token (401): is it the "
                             "token file of this appliance?", 401)
        try:
            answer = json.loads(raw)
        except ValueError:
            raise AdminError(f"the admin API at {where} answered {response.status} "
                             f"with something that is not JSON", response.status) from None
        if response.status != 200:
            messages = "; ".join(str(e.get("message", e)) for e in answer.get("errors", [])
                                 if isinstance(e, dict)) or f"HTTP {response.status}"
            raise AdminError(messages, response.status)
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
        copies = client.request("GET", f"/api/v1/queue{query}")
        out.write(json.dumps(copies, indent=1) + "\n" if options.json else table(copies, now))
        return 0
    if options.action == "show":
        copies = client.request("GET", f"/api/v1/queue/{quote(options.id, safe='')}")
        out.write(json.dumps(copies, indent=1) + "\n" if options.json else details(copies, now))
        return 0
    result = client.request("POST", f"/api/v1/queue/{options.action}", selection(options))
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
        endpoint, token_file = admin_settings(options.config)
        host, port = address_of(endpoint)
        client = AdminClient(host, port, read_token(token_file))
        return run(options, client, out, time.time())
    except (ConfigError, UsageError) as e:
        print(f"{prog}: {e}", file=err)
        return 2
    except AdminError as e:
        print(f"{prog}: {e}", file=err)
        return 1
