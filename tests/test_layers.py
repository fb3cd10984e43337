"""
What each part of the appliance may import.

The table below is the architecture in one place: a part (a module or a
package directly under ``appliance/``) may import only the parts listed for
it. The pure core (parsing, rewriting, tokens, DKIM, the event contract) holds
no reactor and imports no Twisted but its logger, so it is tested and timed
without one; only ``tap`` picks the global reactor, and everything below it is
handed one. A new import that crosses these lines fails here, by name, and the
table is where the decision to allow it is made and reviewed.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

import appliance

ROOT = os.path.dirname(os.path.abspath(appliance.__file__))

# The pure core: plain functions and classes over bytes and settings.
PURE = {"bounces", "config", "copywork", "dkim", "engagement", "envelope", "eventtypes", "files", "headers",
        "links", "retry", "rewrite", "settings"}

# What each part may import at run time (imports under ``if TYPE_CHECKING:`` are
# annotations only and may also name the parts in TYPE_ONLY).
MAY_IMPORT: dict[str, set[str]] = {
    "bounces": set(),
    "files": set(),
    "headers": set(),
    "retry": set(),
    "reactors": set(),
    # Worker threads for blocking calls, their results handed back to the reactor in batches.
    "workers": set(),
    "sighup": set(),  # one SIGHUP handler for every part that re-reads something
    # Who opened and clicked: user agents, prefetch networks, MaxMind, the machine rules.
    "engagement": set(),
    "events": {"files"},
    "eventtypes": {"bounces"},
    "config": {"dkim", "eventtypes", "headers"},
    "dkim": {"files", "headers"},
    "links": {"files"},
    "settings": {"config", "headers"},
    "policy": {"settings"},
    "rewrite": {"headers", "links", "settings"},
    # The copies' CPU work as plain functions, run in a thread or in a helper process alike.
    "copywork": {"dkim", "links", "rewrite", "settings"},
    # Helper processes run copywork's jobs; the owner's side is a Twisted service.
    "helpers": {"copywork"},
    "groupcommit": {"files", "reactors"},
    # Spare files: empty files made ahead in the spool's incoming/.
    "spares": {"files", "reactors"},
    # A spool entry's envelope and its on-disk form: plain data, each copy's settings.
    "envelope": {"settings"},
    # One message being received, until its commit: its file, its fsync, its name in active/.
    "spoolwriter": {"envelope", "files"},
    "spool": {"envelope", "files", "groupcommit", "reactors", "spares", "spoolwriter"},
    "follower": {"files", "reactors"},
    # Reading the event log and its rotated files for a search: plain files, no other part.
    "eventsearch": set(),
    # The statistics store follows the event log (follower) and reads rotated files to rebuild.
    "stats": {"eventsearch", "files", "follower", "reactors"},
    "tls": {"files"},
    "users": {"files", "reactors"},
    "tracker": {"config", "engagement", "events", "eventtypes", "links", "reactors"},
    # The suppression list: its database, and its own follower of the event log.
    "suppression": {"follower", "reactors"},
    "delivery": {"bounces", "config", "copywork", "dkim", "envelope", "events", "eventtypes", "files",
                 "links", "reactors", "retry", "rewrite", "settings", "spool"},
    "webhooks": {"config", "events", "eventtypes", "files", "follower", "reactors", "retry"},
    "injection": {"config", "envelope", "events", "eventtypes", "files", "headers", "policy",
                  "reactors", "settings", "spool", "spoolwriter"},
    "smtp": {"config", "reactors", "tls"},
    # admin: the token file is made with the link keys, and read the same way; suppression:
    # the database is opened once, so a bad path fails before twistd forks.
    # engagement: the prefetch networks and MaxMind database are opened once, at start.
    "build": {"admin", "config", "dkim", "engagement", "links", "policy", "reactors", "suppression", "tls",
              "users"},
    # admin: health, metrics and the admin listener; spoollock: one appliance per spool.
    # engagement: the prefetch networks are re-read on SIGHUP.
    "service": {"admin", "build", "config", "delivery", "engagement", "events", "files", "helpers",
                "injection", "links", "policy", "reactors", "sighup", "smtp", "spares", "spool", "spoollock",
                "stats",
                "suppression", "tracker", "users", "webhooks", "workers"},
    # The admin listener's resources: they read what the services hand them. config: the
    # client reads [admin]; files: the token file is written atomically; suppression: the
    # list's entries, errors and scopes are its own.
    # eventsearch, stats: the Events and Metrics APIs answer from the same code as the commands.
    "admin": {"config", "eventsearch", "eventtypes", "files", "reactors", "stats", "suppression"},
    # One appliance per spool: an flock, nothing else.
    "spoollock": set(),
    "tap": {"build", "config", "reactors", "service"},
    # The operator's command: it reads the configuration and the queues, never the service tree.
    "console": {"build", "config", "console_check", "console_events", "console_queue", "console_stats",
                "console_suppressions", "dkim", "eventtypes", "links", "preview", "tls", "users",
                "webhooks"},
    # ``engage-appliance events``: the log search, and the follower's reader for --follow.
    "console_events": {"config", "eventsearch", "eventtypes", "follower"},
    # ``engage-appliance stats``: the store, read-only, or rebuilt from the log.
    "console_stats": {"config", "stats"},
    # engage-appliance check: the build's own loaders, making no file.
    "console_check": {"build", "config"},
    # The message preview: the injection path's pure parts (X-MSYS-API, policy answer,
    # resolution, rewrite) run on one message, and events' id generator for ids of the
    # real shape (their length is in every token).
    "preview": {"config", "events", "headers", "links", "policy", "rewrite", "settings"},
    # engage-appliance suppressions: it opens the suppression database itself.
    "console_suppressions": {"config", "suppression"},
    # ``console queue``: it asks the running appliance's admin API (appliance.admin.client).
    "console_queue": {"admin", "config"},
}
TYPE_ONLY: dict[str, set[str]] = {
    "eventtypes": {"envelope", "links", "settings"},
    "injection": {"delivery", "rewrite", "smtp"},
    "smtp": {"injection"},
    "delivery": {"helpers"},  # CopyMaker is handed a HelperPool
    "spoolwriter": {"spares", "spool"},  # the Spool it writes into, and the spare it is given
}

# Modules that are programs of their own, run in a child process: like ``tap``, each
# picks the global reactor of its process. A tracker process answers hits beside the
# appliance (``[tracker] processes``).
PROGRAMS = {"appliance.tracker.child"}

# The Twisted a pure part may use: logging only.
PURE_TWISTED = {"twisted.logger"}


def modules() -> Iterator[tuple[str, str, ast.Module]]:
    """(part, module name, tree) for every module of the package."""
    for directory, _, files in os.walk(ROOT):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            part = module.split(".")[1] if "." in module else ""
            with open(path, encoding="utf-8") as f:
                yield part, module, ast.parse(f.read(), path)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def imports(tree: ast.Module) -> Iterator[tuple[str, bool]]:
    """Every absolute module name imported, and whether only for annotations."""
    typing_only = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "appliance":
                for alias in node.names:
                    yield f"appliance.{alias.name}", id(node) in typing_only
            else:
                for alias in node.names:
                    yield f"{node.module}.{alias.name}", id(node) in typing_only
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in typing_only


def part_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "appliance" and len(parts) > 1 else None


class LayerTests(SynchronousTestCase):
    def test_every_part_is_in_the_table(self) -> None:
        found = {part for part, _, _ in modules() if part}
        self.assertEqual(found - set(MAY_IMPORT), set(), "a new part needs its line in MAY_IMPORT")
        self.assertEqual(set(MAY_IMPORT) - found, set(), "MAY_IMPORT names a part that is gone")

    def test_parts_import_only_what_the_table_allows(self) -> None:
        wrong = []
        for part, module, tree in modules():
            allowed = MAY_IMPORT.get(part, set())
            for name, typing_only in imports(tree):
                other = part_of(name)
                if other is None or other == part or not part:
                    continue
                if other in allowed or (typing_only and other in TYPE_ONLY.get(part, set())):
                    continue
                wrong.append(f"{module} imports {name}")
        self.assertEqual(wrong, [])

    def test_the_pure_core_holds_no_reactor(self) -> None:
        wrong = []
        for part, module, tree in modules():
            if part not in PURE:
                continue
            for name, _ in imports(tree):
                if name.startswith("twisted") and not any(
                        name == ok or name.startswith(ok + ".") for ok in PURE_TWISTED):
                    wrong.append(f"{module} imports {name}")
        self.assertEqual(wrong, [])

    def test_only_tap_picks_the_global_reactor(self) -> None:
        wrong = [module for part, module, tree in modules() if part != "tap" and module not in PROGRAMS
                 for name, _ in imports(tree) if name == "twisted.internet.reactor"]
        self.assertEqual(wrong, [])

    def test_run_time_imports_have_no_cycle(self) -> None:
        """The parts form layers: following run-time imports never leads back to the start."""
        graph = MAY_IMPORT

        def reaches(start: str, goal: str, seen: set[str]) -> bool:
            for nxt in graph.get(start, ()):
                if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                    return True
            return False

        self.assertEqual([p for p in graph if reaches(p, p, set())], [])

    def test_the_checks_can_fail(self) -> None:
        """The import reader sees the forms the checks depend on."""
        tree = ast.parse("from typing import TYPE_CHECKING\n"
                         "from twisted.internet import reactor\n"
                         "from appliance import spool\n"
                         "if TYPE_CHECKING:\n    from appliance.smtp import Session\n")
        self.assertEqual(sorted(imports(tree)), [
            ("appliance.smtp.Session", True), ("appliance.spool", False),
            ("twisted.internet.reactor", False), ("typing.TYPE_CHECKING", False)])
