"""
The statistics store: counts of the event log in SQLite, so a metrics query never reads the log.

Blocking SQLite calls and no reactor: ``StatsService`` runs them in the file
pool, the commands call them directly.

Layout. ``hourly`` holds one row per hour and campaign with a column per
counter; ``links`` one row per hour, campaign and link (name, URL and anchor
text) with its clicks. A query sums the rows of its window: over a million
events that is a few thousand rows, not a million lines. So a window is
widened to whole hours: from the start of the hour ``from`` falls in to the
end of the hour ``to`` falls in (``to`` on the hour ends there).

Unique counts. SparkPost counts a unique open or click at the first
occurrence per recipient copy (``message_id``). ``firsts`` records, per copy
and kind, that its first occurrence was seen; that first occurrence is counted
in the hour it happened. A window's unique count is the number of copies
whose first occurrence falls in it, additive across hours.

Crash safety. Each batch of log lines is applied in one transaction that
also stores the follower's cursor (the log position after the batch) in
``meta``. The store, not the follower's cursor file, is what counts: at
start the service writes the store's cursor to the cursor file, so a batch
is never counted twice, and a batch whose commit a crash lost is counted
once, later.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from appliance import eventsearch
from appliance.follower import Cursor, fingerprint

log = Logger()

SCHEMA_VERSION = 1

# Every counter of ``hourly``; a metric is one of them, or a difference of two.
COUNTERS = ("injected", "policy_rejection", "delivered", "delivered_first", "delayed", "bounce",
            "hard_bounce", "soft_bounce", "block_bounce", "admin_bounce", "undetermined_bounce",
            "rendered", "unique_rendered", "initial_rendered", "unique_confirmed_opened",
            "clicked", "unique_clicked", "prefetched_rendered", "prefetched_clicked",
            "nonprefetched_unique_confirmed_opened")

# SparkPost's metric names, each the sum of a counter (or a counter less another).
METRICS: dict[str, tuple[str, str | None]] = {
    **{f"count_{c}": (c, None) for c in COUNTERS
       if c not in ("prefetched_rendered", "prefetched_clicked")},
    "count_nonprefetched_rendered": ("rendered", "prefetched_rendered"),
    "count_nonprefetched_clicked": ("clicked", "prefetched_clicked"),
}

# Bounce categories by bounce_class, as SparkPost groups them.
_BOUNCE_CATEGORY = {
    **dict.fromkeys((10, 30, 90), "hard_bounce"),
    **dict.fromkeys(range(50, 55), "block_bounce"),
    25: "admin_bounce",
    **dict.fromkeys((20, 21, 22, 23, 24, 40, 60, 70, 100), "soft_bounce"),
    1: "undetermined_bounce",
}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly (
    hour INTEGER NOT NULL, campaign TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)},
    PRIMARY KEY (hour, campaign)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily (
    day INTEGER NOT NULL, campaign TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)},
    PRIMARY KEY (day, campaign)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS links (
    hour INTEGER NOT NULL, campaign TEXT NOT NULL, link_name TEXT NOT NULL,
    link_url TEXT NOT NULL, anchor TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
    unique_clicked INTEGER NOT NULL DEFAULT 0, prefetched_clicked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, campaign, link_name, link_url, anchor)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firsts (
    message_id TEXT NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (message_id, kind)) WITHOUT ROWID;
"""

_HOURLY_UPSERT = (
    f"INSERT INTO hourly (hour, campaign, {', '.join(COUNTERS)}) "
    f"VALUES (?, ?, {', '.join('?' for _ in COUNTERS)}) ON CONFLICT (hour, campaign) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS))
_DAILY_UPSERT = _HOURLY_UPSERT.replace("hourly (hour,", "daily (day,").replace("(hour, campaign)",
                                                                               "(day, campaign)")
_LINKS_UPSERT = (
    "INSERT INTO links VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (hour, campaign, link_name, link_url, anchor) DO UPDATE SET "
    "clicked = clicked + excluded.clicked, unique_clicked = unique_clicked + excluded.unique_clicked, "
    "prefetched_clicked = prefetched_clicked + excluded.prefetched_clicked")


class StoreError(Exception):
    """The database is not a statistics store this code can use (corrupt, foreign, newer)."""


def connect(path: str, read_only: bool = False) -> sqlite3.Connection:
    """A connection; read-only ones (commands, queries) never create or change the file."""
    if read_only:
        db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=5.0,
                             check_same_thread=False)
    else:
        db = sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)
    return db


DAY = 86400


def _hour(ts: int) -> int:
    return ts - ts % 3600


def _prefetched(event: dict[str, Any]) -> bool:
    parsed = event.get("user_agent_parsed")
    return isinstance(parsed, dict) and parsed.get("is_prefetched") is True


@dataclass
class Tally:
    """One batch's counts, summed in memory before the few upserts that store them."""

    hourly: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    links: dict[tuple[int, str, str, str, str], list[int]] = field(default_factory=dict)
    skipped: int = 0

    def daily(self) -> dict[tuple[int, str], list[int]]:
        """The hourly rows summed by day (UTC)."""
        days: dict[tuple[int, str], list[int]] = {}
        for (hour, campaign), row in self.hourly.items():
            key = (hour - hour % DAY, campaign)
            total = days.get(key)
            days[key] = list(row) if total is None else [a + b for a, b in zip(total, row, strict=True)]
        return days

    def add(self, hour: int, campaign: str, *names: str) -> None:
        row = self.hourly.get((hour, campaign))
        if row is None:
            row = self.hourly[(hour, campaign)] = [0] * len(COUNTERS)
        for name in names:
            row[_INDEX[name]] += 1


_INDEX = {name: i for i, name in enumerate(COUNTERS)}


class StatsStore:
    """The store in one SQLite file; one writer (the service or ``stats rebuild``) at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open (creating if missing) and check; ``StoreError`` if the file is not usable."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = connect(self.path)
        try:
            # WAL with synchronous=NORMAL: a commit writes no fsync (checkpoints do, now
            # and then), and a crash or power loss loses whole transactions at most, each
            # with its cursor, so the counts and the cursor still agree: the lost batches
            # are counted again from the log. The spool's fsyncs keep the disk to themselves.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StoreError("integrity check failed")
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
            elif version[0] != SCHEMA_VERSION:
                raise StoreError(f"schema version {version[0]!r}, expected {SCHEMA_VERSION}")
            columns = {row[1] for row in db.execute("PRAGMA table_info(hourly)")}
            if not set(COUNTERS) <= columns:
                raise StoreError("the hourly table lacks counters")
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(str(e)) from None
        except StoreError:
            db.close()
            raise
        self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def cursor(self) -> bytes | None:
        """The encoded follower cursor the counts agree with; ``None`` for a new store."""
        assert self.db is not None
        row = self.db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        return bytes(row[0]) if row is not None else None

    def apply(self, lines: Iterable[bytes], cursor: bytes | None) -> int:
        """Count ``lines`` and store ``cursor`` with them, in one transaction; returns the events counted."""
        assert self.db is not None
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            tally = Tally()
            counted = 0
            for line in lines:
                event = eventsearch.parse(line)
                if event is None:
                    tally.skipped += 1
                    continue
                counted += self._count(db, event, tally)
            db.executemany(_HOURLY_UPSERT, [(hour, campaign, *row)
                                            for (hour, campaign), row in tally.hourly.items()])
            db.executemany(_DAILY_UPSERT, [(day, campaign, *row)
                                           for (day, campaign), row in tally.daily().items()])
            db.executemany(_LINKS_UPSERT, [(*key, *row) for key, row in tally.links.items()])
            if cursor is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if tally.skipped:
            log.warn("statistics: {n} event log line(s) were not JSON objects and were not counted",
                     n=tally.skipped)
        return counted

    @staticmethod
    def _first(db: sqlite3.Connection, message_id: str, kind: str) -> bool:
        """Whether this is the copy's first occurrence of ``kind`` (and record it)."""
        if not message_id:
            return True  # no copy to tell occurrences apart by: each is its own
        cur = db.execute("INSERT OR IGNORE INTO firsts VALUES (?, ?)", (message_id, kind))
        return cur.rowcount == 1

    def _count(self, db: sqlite3.Connection, event: dict[str, Any], tally: Tally) -> int:
        kind = event.get("type")
        hour = _hour(eventsearch.event_time(event))
        campaign = str(event.get("campaign_id") or "")
        message_id = str(event.get("message_id") or "")
        if kind == "injection":
            tally.add(hour, campaign, "injected")
        elif kind == "policy_rejection":
            tally.add(hour, campaign, "policy_rejection")
        elif kind == "delivery":
            first = str(event.get("num_retries", "0")) == "0"
            tally.add(hour, campaign, "delivered", *(("delivered_first",) if first else ()))
        elif kind == "delay":
            tally.add(hour, campaign, "delayed")
        elif kind == "bounce":
            try:
                category = _BOUNCE_CATEGORY.get(int(event.get("bounce_class", 1)), "undetermined_bounce")
            except (TypeError, ValueError):
                category = "undetermined_bounce"
            tally.add(hour, campaign, "bounce", category)
        elif kind in ("open", "initial_open", "click"):
            self._engagement(db, event, kind, hour, campaign, message_id, tally)
        else:
            return 0
        return 1

    def _engagement(self, db: sqlite3.Connection, event: dict[str, Any], kind: str, hour: int,
                    campaign: str, message_id: str, tally: Tally) -> None:
        prefetched = _prefetched(event)
        names = []
        if kind == "open":
            names.append("rendered")
            if prefetched:
                names.append("prefetched_rendered")
            if self._first(db, message_id, "rendered"):
                names.append("unique_rendered")
        elif kind == "initial_open":
            names.append("initial_rendered")
        else:
            names.append("clicked")
            if prefetched:
                names.append("prefetched_clicked")
            unique = self._first(db, message_id, "clicked")
            if unique:
                names.append("unique_clicked")
            self._link(db, event, hour, campaign, message_id, prefetched, tally)
        # An open, or a click that implies one: the copy was opened.
        if self._first(db, message_id, "opened"):
            names.append("unique_confirmed_opened")
        if not prefetched and self._first(db, message_id, "opened_nonprefetched"):
            names.append("nonprefetched_unique_confirmed_opened")
        tally.add(hour, campaign, *names)

    def _link(self, db: sqlite3.Connection, event: dict[str, Any], hour: int, campaign: str,
              message_id: str, prefetched: bool, tally: Tally) -> None:
        name = str(event.get("target_link_name") or "")
        url = str(event.get("target_link_url") or "")
        anchor = str(event.get("target_link_anchor") or "")
        key = (hour, campaign, name, url, anchor)
        row = tally.links.setdefault(key, [0, 0, 0])
        row[0] += 1
        row[1] += self._first(db, message_id, f"link\0{name}\0{url}")
        row[2] += prefetched


def rebuild(path: str, log_path: str) -> tuple[int, bytes | None]:
    """
    Count the log and its rotated files (gzip too) into a new store at ``path``, replacing any.

    Built beside it and renamed over it, so a reader sees the old store or the
    new one. Returns the events counted and the cursor stored: the end of the
    last whole line of the current log, where following resumes.
    """
    temporary = f"{path}.rebuild"
    for leftover in (temporary, f"{temporary}-wal", f"{temporary}-shm", f"{temporary}-journal"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    store = StatsStore(temporary)
    store.open()
    counted = 0
    cursor: bytes | None = None
    try:
        current = os.path.abspath(log_path)
        for name in eventsearch.log_files(log_path):
            if os.path.abspath(name) == current:
                counted_here, cursor = _count_current(store, name)
                counted += counted_here
                continue
            try:
                f = eventsearch.open_log_file(name)
            except OSError:
                continue
            with f:
                try:
                    for batch in _batches(eventsearch.whole_lines(f)):
                        counted += store.apply(batch, None)
                except (OSError, EOFError) as e:
                    log.warn("statistics: {name} could not be read to its end ({error}); "
                             "counted what could be", name=name, error=e)
        if cursor is not None:
            store.apply((), cursor)
    finally:
        store.close()
    for stale in (f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        if os.path.exists(stale):
            os.unlink(stale)  # the old file's: replayed into the new one, it would corrupt it
    os.replace(temporary, path)
    return counted, cursor


def _count_current(store: StatsStore, name: str) -> tuple[int, bytes]:
    """Count the current log's whole lines; the cursor after them."""
    counted = 0
    with open(name, "rb") as f:
        st = os.fstat(f.fileno())
        offset = 0
        for batch in _batches(eventsearch.whole_lines(f)):
            offset += sum(len(line) for line in batch)
            counted += store.apply(batch, None)
        head = os.pread(f.fileno(), min(offset, 1024), 0)
    return counted, Cursor(st.st_dev, st.st_ino, offset, fingerprint(head)).encode()


def _batches(lines: Iterable[bytes], size: int = 5000) -> Iterable[list[bytes]]:
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- queries ------------------------------------------------------------------------------


def metric_sql(names: Sequence[str]) -> str:
    """The SELECT list summing each metric in ``names`` (all from ``METRICS``)."""
    parts = []
    for name in names:
        plus, minus = METRICS[name]
        parts.append(f"COALESCE(SUM({plus}), 0)" + (f" - COALESCE(SUM({minus}), 0)" if minus else ""))
    return ", ".join(parts)


def _spans(since: int, until: int) -> list[tuple[str, str, int, int]]:
    """
    The window as (table, key column, start, end) ranges: whole days from ``daily``, the rest by the hour.

    ``[since, until)`` is widened to whole hours; a month is then some 30 daily
    rows per campaign and at most 46 hourly ones, whatever the traffic.
    """
    start, end = _hour(since), _hour(until - 1) + 3600
    first_day, last_day = -(-start // DAY) * DAY, end - end % DAY
    if first_day >= last_day:
        return [("hourly", "hour", start, end)]
    return [("hourly", "hour", start, first_day), ("daily", "day", first_day, last_day),
            ("hourly", "hour", last_day, end)]


def query_metrics(db: sqlite3.Connection, names: Sequence[str], since: int, until: int,
                  campaigns: Sequence[str] = (), by_campaign: bool = False) -> list[dict[str, Any]]:
    """
    The metrics ``names`` over ``[since, until)`` (widened to whole hours): one row, or one per campaign.

    ``by_campaign`` leaves out copies without a campaign, as SparkPost's campaign report does.
    """
    columns = sorted({c for name in names for c in METRICS[name] if c})
    parts, args = [], []
    for table, key, start, end in _spans(since, until):
        if start >= end:
            continue
        where = [f"{key} >= ?", f"{key} < ?"]
        args += [start, end]
        if campaigns:
            where.append(f"campaign IN ({', '.join('?' for _ in campaigns)})")
            args += list(campaigns)
        if by_campaign:
            where.append("campaign != ''")
        parts.append(f"SELECT campaign, {', '.join(columns)} FROM {table} WHERE {' AND '.join(where)}")
    rows = " UNION ALL ".join(parts)
    if by_campaign:
        sql = f"SELECT campaign, {metric_sql(names)} FROM ({rows}) GROUP BY campaign ORDER BY campaign"
        return [{"campaign_id": row[0], **dict(zip(names, row[1:], strict=True))}
                for row in db.execute(sql, args)]
    row = db.execute(f"SELECT {metric_sql(names)} FROM ({rows})", args).fetchone()
    return [dict(zip(names, row, strict=True))]


def query_links(db: sqlite3.Connection, since: int, until: int,
                campaigns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Clicks per link (campaign, name, URL, anchor text) over the window, most clicked first."""
    where = ["hour >= ?", "hour < ?"]
    args: list[Any] = [_hour(since), until]
    if campaigns:
        where.append(f"campaign IN ({', '.join('?' for _ in campaigns)})")
        args += list(campaigns)
    sql = ("SELECT campaign, link_name, link_url, anchor, SUM(clicked), SUM(unique_clicked), "
           f"SUM(prefetched_clicked) FROM links WHERE {' AND '.join(where)} "
           "GROUP BY campaign, link_name, link_url, anchor ORDER BY SUM(clicked) DESC, link_url")
    keys = ("campaign_id", "target_link_name", "target_link_url", "target_link_anchor",
            "count_clicked", "count_unique_clicked", "count_prefetched_clicked")
    return [dict(zip(keys, row, strict=True)) for row in db.execute(sql, args)]
