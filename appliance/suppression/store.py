"""
The suppression list on disk: one SQLite database, SparkPost's entries and scopes.

An entry is a recipient and a scope (``type``): ``transactional`` stops
transactional copies, ``non_transactional`` the others, and a recipient may
have both. Unsubscribes (``list_unsubscribe``, ``link_unsubscribe``) suppress
non-transactional mail; hard bounces (classes 10, 30, 90) both, as SparkPost
does. Everything here blocks: the appliance calls it in its file pool, the
operator's command directly. Writers in other processes are seen through
SQLite's ``data_version``, which changes only when another connection commits.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

TRANSACTIONAL = "transactional"
NON_TRANSACTIONAL = "non_transactional"
TYPES = (TRANSACTIONAL, NON_TRANSACTIONAL)
# SparkPost's sources; the appliance writes the first four, an operator "Manually Added".
LIST_UNSUBSCRIBE = "List Unsubscribe"
UNSUBSCRIBE_LINK = "Unsubscribe Link"
BOUNCE_RULE = "Bounce Rule"
MANUALLY_ADDED = "Manually Added"
SOURCES = (LIST_UNSUBSCRIBE, UNSUBSCRIBE_LINK, BOUNCE_RULE, "Spam Complaint", "Compliance",
           MANUALLY_ADDED)
# The hard bounces SparkPost suppresses: 10 Invalid Recipient, 30 Generic Bounce: No RCPT,
# 90 Unsubscribe (the receiver says the recipient asked to stop).
HARD_BOUNCE_CLASSES = frozenset({"10", "30", "90"})
MAX_RECIPIENT = 320  # RFC 5321 §4.5.3.1: 64 for the local part, 255 for the domain, and "@"
MAX_DESCRIPTION = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    recipient TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('transactional', 'non_transactional')),
    source TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (recipient, type)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppressions_updated ON suppressions (updated);
"""


class SuppressionError(ValueError):
    """A recipient, scope or file that cannot be taken, with what is wrong with it."""


class Change(NamedTuple):
    """One entry to write: who, which scope, why."""

    recipient: str
    type: str
    source: str
    description: str = ""


def iso(ts: float) -> str:
    """SparkPost's form of ``created`` and ``updated``: 2015-01-01T01:01:01+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Entry:
    recipient: str
    type: str
    source: str
    description: str
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        """An entry as SparkPost's API shows it (with the deprecated boolean of its type)."""
        return {"recipient": self.recipient, "type": self.type, self.type: True,
                "source": self.source, "description": self.description,
                "created": iso(self.created), "updated": iso(self.updated)}


_ADDRESS = re.compile(r"[^\s@\x00-\x1f\x7f]+@[^\s@\x00-\x1f\x7f]+")


def normalize(recipient: str) -> str:
    """The recipient as the list keys it (lower-cased, as ``rcpt_to``), or ``SuppressionError``."""
    address = recipient.strip().lower()
    if not _ADDRESS.fullmatch(address) or len(address.encode("utf-8", "replace")) > MAX_RECIPIENT:
        raise SuppressionError(f"not an email address: {recipient[:80]!r}")
    return address


def check_type(kind: str) -> str:
    if kind not in TYPES:
        raise SuppressionError("Type must be one of: 'transactional', 'non_transactional'")
    return kind


# -- what the event log asks for -------------------------------------------------------------


# The only types of event that ever suppress anyone (``changes_for``).
SUPPRESSING_TYPES = frozenset({"list_unsubscribe", "link_unsubscribe", "bounce"})


def changes_for(event: dict[str, Any]) -> list[Change]:
    """The entries one event makes: unsubscribes and hard bounces, as SparkPost suppresses them."""
    kind = event.get("type")
    rcpt = event.get("rcpt_to")
    if not isinstance(rcpt, str) or not rcpt:
        return []
    try:
        rcpt = normalize(rcpt)
    except SuppressionError:
        return []
    if kind == "list_unsubscribe":
        return [Change(rcpt, NON_TRANSACTIONAL, LIST_UNSUBSCRIBE)]
    if kind == "link_unsubscribe":
        return [Change(rcpt, NON_TRANSACTIONAL, UNSUBSCRIBE_LINK)]
    if kind == "bounce" and str(event.get("bounce_class")) in HARD_BOUNCE_CLASSES:
        reason = str(event.get("raw_reason") or event.get("reason") or "")[:MAX_DESCRIPTION]
        return [Change(rcpt, TRANSACTIONAL, BOUNCE_RULE, reason),
                Change(rcpt, NON_TRANSACTIONAL, BOUNCE_RULE, reason)]
    return []


def changes_in(lines: Iterable[bytes]) -> list[Change]:
    """The entries a run of event log lines makes; a line that is not an event is passed over."""
    out: list[Change] = []
    for line in lines:
        # Most events suppress nobody: only these types are parsed.
        if b'"bounce"' not in line and b'_unsubscribe"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.extend(changes_for(event))
    return out


# -- SparkPost's CSV ----------------------------------------------------------------------------


def read_csv(text: str) -> tuple[list[Change], list[str]]:
    """
    The entries of a CSV file in SparkPost's form, and the problems of its other lines.

    Columns by header: ``recipient`` (or ``email``), then either ``type``
    (``transactional`` or ``non_transactional``) or the older
    ``transactional`` and ``non_transactional`` (true/false), and an
    optional ``description``.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    names = [n.strip().lower() for n in reader.fieldnames or []]
    reader.fieldnames = names
    if not ({"recipient", "email"} & set(names)):
        return [], ["line 1: the header must name a 'recipient' column"]
    if not ({"type", "transactional", "non_transactional"} & set(names)):
        return [], ["line 1: the header must name a 'type' column (or 'transactional' and "
                    "'non_transactional')"]
    changes: list[Change] = []
    problems: list[str] = []
    for row in reader:
        line = reader.line_num
        try:
            rcpt = normalize(row.get("recipient") or row.get("email") or "")
            description = (row.get("description") or "").strip()[:MAX_DESCRIPTION]
            if row.get("type"):
                kinds = [check_type(row["type"].strip().lower())]
            else:
                kinds = [k for k in TYPES if _truth(row.get(k) or "", k)]
                if not kinds:
                    raise SuppressionError("Must supply a suppression type")
        except SuppressionError as e:
            problems.append(f"line {line}: {e}")
            continue
        changes.extend(Change(rcpt, kind, MANUALLY_ADDED, description) for kind in kinds)
    return changes, problems


def _truth(value: str, column: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("", "false", "0", "no"):
        return False
    raise SuppressionError(f"{column} must be true or false, got {value[:20]!r}")


# -- the database -------------------------------------------------------------------------------


class SuppressionStore:
    """
    The database, opened once; safe to call from several threads (one at a time).

    WAL mode, so the operator's command writes while the appliance reads;
    a writer waits up to ``busy_timeout`` seconds for another.
    """

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        self.path = path
        try:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise SuppressionError(f"{path}: cannot open the suppression database: {e}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection (another process) commits."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def put(self, changes: Sequence[Change], now: float | None = None) -> int:
        """Insert or update entries in one transaction; an entry's ``created`` stays. How many."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO suppressions (recipient, type, source, description, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (recipient, type) DO UPDATE SET"
                    " source = excluded.source, description = excluded.description,"
                    " updated = excluded.updated",
                    [(c.recipient, c.type, c.source, c.description, now, now) for c in changes])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(changes)

    def remove(self, recipient: str, kind: str | None = None) -> int:
        """Delete a recipient's entries (of one scope, or both); how many there were."""
        with self._lock:
            if kind is None:
                cur = self._db.execute("DELETE FROM suppressions WHERE recipient = ?", (recipient,))
            else:
                cur = self._db.execute("DELETE FROM suppressions WHERE recipient = ? AND type = ?",
                                       (recipient, kind))
            return int(cur.rowcount)

    def get(self, recipient: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT recipient, type, source, description, created, updated FROM suppressions"
                " WHERE recipient = ? ORDER BY type", (recipient,)).fetchall()
        return [Entry(*row) for row in rows]

    def search(self, types: Sequence[str] = (), sources: Sequence[str] = (), description: str = "",
               since: float | None = None, until: float | None = None, domain: str = "",
               limit: int = 1000, offset: int = 0) -> tuple[list[Entry], int]:
        """A page of the entries that match (newest update first), and how many match in all."""
        where, args = ["1"], []  # type: list[str], list[Any]
        if types:
            where.append(f"type IN ({','.join('?' * len(types))})")
            args += list(types)
        if sources:
            where.append(f"source IN ({','.join('?' * len(sources))})")
            args += list(sources)
        if description:
            where.append("instr(lower(description), ?) > 0")
            args.append(description.lower())
        if domain:
            where.append("recipient LIKE ? ESCAPE '\\'")
            args.append("%@" + domain.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
        if since is not None:
            where.append("updated >= ?")
            args.append(since)
        if until is not None:
            where.append("updated <= ?")
            args.append(until)
        condition = " AND ".join(where)
        with self._lock:
            total = int(self._db.execute(f"SELECT count(*) FROM suppressions WHERE {condition}",
                                         args).fetchone()[0])
            rows = self._db.execute(
                "SELECT recipient, type, source, description, created, updated FROM suppressions"
                f" WHERE {condition} ORDER BY updated DESC, recipient, type LIMIT ? OFFSET ?",
                [*args, limit, offset]).fetchall()
        return [Entry(*row) for row in rows], total

    def scopes(self) -> tuple[set[str], set[str]]:
        """Every suppressed recipient: those of the transactional scope, and the other's."""
        transactional: set[str] = set()
        other: set[str] = set()
        with self._lock:
            for recipient, kind in self._db.execute("SELECT recipient, type FROM suppressions"):
                (transactional if kind == TRANSACTIONAL else other).add(recipient)
        return transactional, other

    def __iter__(self) -> Iterator[Entry]:
        entries, _ = self.search(limit=-1)
        return iter(entries)


def check_database(path: str) -> None:
    """Open (creating if need be) and close the database: what start-up checks before it forks."""
    try:
        SuppressionStore(path).close()
    except OSError as e:
        raise SuppressionError(f"{path}: cannot create the suppression database: {e.strerror}") from None
