"""
Searching the event log and its rotated files, for ``engage-appliance events`` and the Events API.

Pure over files, no reactor: the command calls it directly, the admin
resource in a thread. The rotated files are those beside the log whose names
start with its name (``events.jsonl.1``, ``events.jsonl.2.gz``,
``events.jsonl-20261202``), read oldest first (by modification time, as
logrotate's numbering and date suffixes disagree on order), gzip ones through
``gzip``; the current file comes last. A line that is not a JSON object (a
cut last line, a damaged file) is skipped, never fatal: a search is a view.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

Event = dict[str, Any]


def log_files(path: str) -> list[str]:
    """The rotated files beside the log at ``path``, oldest first, then the log itself if present."""
    directory, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    rotated = []
    for name in names:
        if name.startswith(base) and name != base:
            full = os.path.join(directory, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if os.path.isfile(full):
                rotated.append((st.st_mtime, _age_rank(name[len(base):]), full))
    out = [full for _, _, full in sorted(rotated)]
    if os.path.isfile(path):
        out.append(path)
    return out


def _age_rank(suffix: str) -> int:
    """Among files with one modification time, ``.2`` is older than ``.1``: a larger rank first."""
    number = suffix.lstrip(".-").removesuffix(".gz")
    return -int(number) if number.isdigit() and len(number) < 8 else 0


def open_log_file(path: str) -> IO[bytes]:
    """The file for reading its lines; a ``.gz`` one decompressed."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def whole_lines(f: IO[bytes]) -> Iterator[bytes]:
    """Every line ending in LF; a last line without one is being written, and is left."""
    for line in f:
        if line.endswith(b"\n"):
            yield line


def parse(line: bytes) -> Event | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def event_time(event: Event) -> int:
    """The event's ``timestamp`` (epoch seconds, a string in the log) as an int; 0 if unreadable."""
    value = event.get("timestamp", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))  # "1796080927.25", written by another tool
        except (TypeError, ValueError, OverflowError):
            return 0


@dataclass(frozen=True)
class Filters:
    """What a search keeps: each given set is "any of"; the sets together are "all of"."""

    types: frozenset[str] = frozenset()
    campaigns: frozenset[str] = frozenset()
    recipients: frozenset[str] = frozenset()  # lower-cased, compared with rcpt_to
    message_ids: frozenset[str] = frozenset()
    transmission_ids: frozenset[str] = frozenset()
    since: float | None = None  # timestamp >= since
    until: float | None = None  # timestamp < until

    @classmethod
    def of(cls, types: Iterable[str] = (), campaigns: Iterable[str] = (),
           recipients: Iterable[str] = (), message_ids: Iterable[str] = (),
           transmission_ids: Iterable[str] = (), since: float | None = None,
           until: float | None = None) -> Filters:
        return cls(frozenset(types), frozenset(campaigns), frozenset(r.lower() for r in recipients),
                   frozenset(message_ids), frozenset(transmission_ids), since, until)

    def matches(self, event: Event) -> bool:
        if self.types and event.get("type") not in self.types:
            return False
        if self.campaigns and event.get("campaign_id") not in self.campaigns:
            return False
        if self.recipients and str(event.get("rcpt_to", "")).lower() not in self.recipients:
            return False
        if self.message_ids and event.get("message_id") not in self.message_ids:
            return False
        if self.transmission_ids and event.get("transmission_id") not in self.transmission_ids:
            return False
        if self.since is not None or self.until is not None:
            ts = event_time(event)
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        return True


def search(path: str, filters: Filters) -> Iterator[tuple[Event, bytes]]:
    """Every event of the log and its rotated files that ``filters`` keeps, in log order, with its line."""
    return search_files(log_files(path), filters)


def search_files(names: Iterable[str], filters: Filters) -> Iterator[tuple[Event, bytes]]:
    """Every event of the files ``names``, in that order, that ``filters`` keeps, with its line."""
    for name in names:
        try:
            f = open_log_file(name)
        except OSError:
            continue  # rotated away (or compressed) between the listing and the open
        with f:
            try:
                for line in whole_lines(f):
                    event = parse(line)
                    if event is not None and filters.matches(event):
                        yield event, line
            except (OSError, EOFError, gzip.BadGzipFile):
                continue  # a gzip file still being written by logrotate, or damaged


def page(path: str, filters: Filters, per_page: int,
         after: str | None) -> tuple[list[Event], int, str | None]:
    """
    One page of matching events, newest first (the log's order reversed, as SparkPost answers).

    ``after`` is the ``event_id`` the previous page ended with. Returns the
    events, how many match in all, and the ``event_id`` to continue after
    (``None`` on the last page). Raises ``KeyError`` if ``after`` matches no
    event. One pass, holding at most ``per_page`` events, however long the log.
    """
    newest: deque[Event] = deque(maxlen=per_page)
    total = before = 0
    reached = after is None
    for event, _ in search(path, filters):
        total += 1
        if after is not None and not reached:
            if event.get("event_id") == after:
                reached = True
                continue
            before += 1
            newest.append(event)
        elif after is None:
            before += 1
            newest.append(event)
    if not reached:
        raise KeyError(after)
    chunk = list(reversed(newest))
    more = before > len(chunk)
    return chunk, total, (str(chunk[-1].get("event_id")) if more and chunk else None)
