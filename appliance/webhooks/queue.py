"""
One webhook's queue directory, ``<spool>/webhooks/<name>/``: its batch files, seals and splits.

::

    cursor                                        how far into the event log it has read
    last-answer                                   the last attempt to post: when, which batch, the
                                                  answer (for ``engage-appliance webhooks list``)
    0000000007.open                               events being collected, one line each
    0000000006.1767225600.<batch id>.batch        sealed: waiting to be posted
    0000000005-01.1767225000.<batch id>.batch     the second half of the first half of batch 5,
                                                  which the receiver refused as too large

Events are appended to the ``.open`` file, one JSON line each (see
``appliance.webhooks.envelope``). Sealing fsyncs the file, checks every line
(a broken one is dropped, so a batch is always valid JSON) and renames it to
its ``.batch`` name, which carries the time it was sealed and its batch id.
The rename is the whole commit, so an event is in exactly one batch and a
batch's body and id never change: a receiver that sees the same
``X-MessageSystems-Batch-ID`` twice may drop the second. A batch the receiver
refuses as too large is split into two halves, each a batch with its own id
in the batch's place. At start-up every ``.open`` file left by the last run is
sealed, and what a split cut short by a crash is resolved.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from appliance.files import fsync_and_close, fsync_directory, fsync_path, write_synced

# One namespace for the whole package: operators and tests filter the log on it.
log = Logger(namespace="appliance.webhooks")

_OPEN_RE = re.compile(r"(\d{10})\.open")
_BATCH_RE = re.compile(r"(\d{10})(?:-([01]+))?\.(\d+)\.([0-9a-f-]{36})\.batch")
CURSOR = "cursor"  # the follower's; it writes it through cursor.tmp<pid>
LAST_ANSWER = "last-answer"  # written through last-answer.tmp


@dataclass(frozen=True)
class Batch:
    seq: int
    sealed_at: int
    batch_id: str
    path: str
    # Where a split put it: "" for a whole batch, "0"/"1" for its halves, "01"
    # for the second half of the first half, ... Sorted as strings, the parts
    # of one batch are in the order of their events.
    part: str = ""

    @property
    def order(self) -> tuple[int, str]:
        return self.seq, self.part


def _valid_lines(data: bytes) -> tuple[bytes, int]:
    """
    The complete JSON lines of ``data``, and how many lines were not.

    Only the tail can be damaged (a line cut short, or zeros where a power
    loss left the file longer than what reached the disk), but every line is
    checked: a batch must be valid JSON or it would be refused for hours.
    """
    *complete, tail = data.split(b"\n")
    kept: list[bytes] = []
    bad = 1 if tail.strip(b"\0") else 0
    for line in complete:
        try:
            if isinstance(json.loads(line), dict):
                kept.append(line + b"\n")
                continue
        except ValueError:
            pass
        bad += 1 if line.strip(b"\0") else 0
    return b"".join(kept), bad


def _unfinished_splits(found: dict[tuple[int, str], Batch]) -> list[Batch]:
    """What a crash in the middle of ``QueueDirectory.split`` left that must go."""
    doomed: list[Batch] = []
    for (seq, part), batch in found.items():
        if (seq, part + "0") in found and (seq, part + "1") in found:
            doomed.append(batch)  # split; only the removal was left to do
    gone = {b.order for b in doomed}
    for (seq, part), batch in found.items():
        ancestors = [(seq, part[:i]) for i in range(len(part))]
        if any(a in found and a not in gone for a in ancestors):
            doomed.append(batch)  # a half whose batch still stands
    return doomed


class QueueDirectory:
    """The files of one webhook's queue; blocking calls, meant to run in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open_path(self, seq: int) -> str:
        return os.path.join(self.path, f"{seq:010d}.open")

    def batch_path(self, seq: int, sealed_at: int, batch_id: str, part: str = "") -> str:
        suffix = f"-{part}" if part else ""
        return os.path.join(self.path, f"{seq:010d}{suffix}.{sealed_at}.{batch_id}.batch")

    def recover(self, now: float) -> tuple[list[Batch], int]:
        """
        The sealed batches, oldest first, and the next sequence number.

        ``.open`` files a previous run left are sealed now, keeping only their
        complete lines; an ``.open`` file whose batch already exists was
        sealed just before a crash and is removed, and so is what a split
        cut short by a crash left (see ``split``).
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        found: dict[tuple[int, str], Batch] = {}
        opened: list[int] = []
        highest = -1
        for name in os.listdir(self.path):
            full = os.path.join(self.path, name)
            if m := _BATCH_RE.fullmatch(name):
                seq = int(m.group(1))
                batch = Batch(seq, int(m.group(3)), m.group(4), full, m.group(2) or "")
                found[batch.order] = batch
                highest = max(highest, seq)
            elif m := _OPEN_RE.fullmatch(name):
                opened.append(int(m.group(1)))
                highest = max(highest, int(m.group(1)))
            elif name.endswith(".tmp"):
                os.unlink(full)
            elif name.startswith(CURSOR + ".tmp"):
                os.unlink(full)  # a save cut short; the follower is not running yet
            elif name in (CURSOR, LAST_ANSWER):
                continue
            else:
                log.warn("webhook queue {path}: ignoring unexpected file {name}",
                         path=self.path, name=name)
        for batch in _unfinished_splits(found):
            os.unlink(batch.path)
            del found[batch.order]
        sealed = {seq for seq, _ in found}
        for seq in sorted(opened):
            path = self.open_path(seq)
            if seq in sealed:
                os.unlink(path)
                continue
            fsync_path(path)
            batch = self._seal_file(seq, int(now), str(uuid.uuid4()), "from before the restart ")
            if batch is not None:
                found[batch.order] = batch
        fsync_directory(self.path)
        return [found[k] for k in sorted(found)], highest + 1

    def _seal_file(self, seq: int, sealed_at: int, batch_id: str, when: str = "") -> Batch | None:
        """
        Rename the synced ``.open`` file of ``seq`` to its batch, keeping only its valid lines.

        None if it has none (the file is removed). A receiver refuses a body
        that is not JSON every time, so no broken line may reach a batch.
        """
        path = self.open_path(seq)
        with open(path, "rb") as f:
            data = f.read()
        lines, bad = _valid_lines(data)
        if bad:
            log.warn("webhook queue {path}: {bad} incomplete event line(s) in {name} {when}"
                     "were dropped", path=self.path, bad=bad, name=os.path.basename(path), when=when)
        if not lines:
            os.unlink(path)
            return None
        final = self.batch_path(seq, sealed_at, batch_id)
        if lines != data:
            self._write_synced(path[: -len(".open")] + ".tmp", lines, final)
            os.unlink(path)
        else:
            os.rename(path, final)
        return Batch(seq, sealed_at, batch_id, final)

    @staticmethod
    def _write_synced(tmp: str, data: bytes, final: str) -> None:
        write_synced(tmp, data)
        os.rename(tmp, final)

    def seal(self, seq: int, fd: int, sealed_at: int, batch_id: str) -> Batch | None:
        """Make the ``.open`` file of ``seq`` (written through ``fd``) a batch; closes ``fd``."""
        fsync_and_close(fd)
        batch = self._seal_file(seq, sealed_at, batch_id)
        fsync_directory(self.path)
        return batch

    def split(self, batch: Batch, first_id: str, second_id: str) -> tuple[Batch, Batch]:
        """
        Replace a batch of two or more events by its two halves, in order.

        The halves are written and renamed into place before the batch is
        removed; a crash in between leaves the batch and one or both halves,
        which ``recover`` resolves (both halves: they stand; one: the batch
        stands).
        """
        lines = self.read(batch).splitlines(keepends=True)
        middle = len(lines) // 2
        halves = []
        for digit, chunk, batch_id in (("0", lines[:middle], first_id), ("1", lines[middle:], second_id)):
            part = batch.part + digit
            final = self.batch_path(batch.seq, batch.sealed_at, batch_id, part)
            self._write_synced(final[: -len(".batch")] + ".tmp", b"".join(chunk), final)
            halves.append(Batch(batch.seq, batch.sealed_at, batch_id, final, part))
        fsync_directory(self.path)
        os.unlink(batch.path)
        fsync_directory(self.path)
        return halves[0], halves[1]

    @staticmethod
    def read(batch: Batch) -> bytes:
        with open(batch.path, "rb") as f:
            return f.read()

    @staticmethod
    def remove(batch: Batch) -> None:
        os.unlink(batch.path)

    def write_last_answer(self, record: dict[str, Any]) -> None:
        """Replace the record of the last attempt; a crash leaves the old one or the new one."""
        final = os.path.join(self.path, LAST_ANSWER)
        tmp = final + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False)
        os.rename(tmp, final)

    def last_answer(self) -> dict[str, Any] | None:
        """The record of the last attempt to post, or None if there is none (yet)."""
        try:
            with open(os.path.join(self.path, LAST_ANSWER), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def status(self) -> QueueStatus:
        """
        What waits in the directory, read without changing anything: for another process
        (``engage-appliance webhooks list``) while the appliance runs.
        """
        status = QueueStatus()
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return status
        for name in names:
            batch, collecting = _BATCH_RE.fullmatch(name), _OPEN_RE.fullmatch(name)
            if not (batch or collecting):
                continue
            try:
                with open(os.path.join(self.path, name), "rb") as f:
                    lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
            except FileNotFoundError:  # posted or sealed meanwhile
                continue
            if collecting:
                status.collecting += lines
                continue
            assert batch is not None
            status.batches += 1
            status.events += lines
            sealed_at = int(batch.group(3))
            if status.oldest is None or sealed_at < status.oldest:
                status.oldest = sealed_at
        return status


@dataclass
class QueueStatus:
    """How much of a webhook's queue waits: sealed batches and their events, and the open file's."""

    batches: int = 0
    events: int = 0
    oldest: int | None = None  # when the oldest waiting batch was sealed
    collecting: int = 0  # events in the batch not sealed yet
