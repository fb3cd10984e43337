"""
The event log is the bus: every consumer reads it from a durable cursor of its own.

A consumer (a webhook today; a statistics store, a suppression list or a
broker later) has a ``name``, a ``cursor_path`` and ``consume(lines)``. A
``Follower`` hands it the log's whole lines in order and records how far it
got, in the cursor file, only once ``consume`` says those lines are durable on
its side. So a crash repeats the events between the last durable cursor and
the crash, and never skips one: consumers must take an event twice calmly.

The cursor names a file by identity (``st_dev``, ``st_ino``) and a byte offset
in it, so it survives rotation by rename: a file renamed to ``events.jsonl.1``
keeps its identity (a hash of the file's first bytes tells it from a later
file given the same inode number). While running, the reader keeps the file it reads open;
when the log's path names another file (the writer reopened it after a
SIGHUP), the old file is read to its end and the new one from offset 0. After
a restart, a cursor whose file is no longer at the path is looked for among
the rotated files beside it. Only lines ending in LF are handed on; a partial
last line waits for the rest.

A cursor that cannot be trusted (corrupt, past the end of its file, or naming
a file that is gone) is reported in the operational log and reading starts at
the start of the current file: repeating beats skipping. A consumer without a
cursor starts at the end of the current file, as a newly created SparkPost
webhook gets only events from then on.

``LogReader`` is the file logic, blocking and without a reactor; ``Follower``
is the thin service that runs it when the event log wakes it after a write,
or on a poll timer as the fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.files import write_atomically

log = Logger()

Runner = Callable[..., defer.Deferred]

CURSOR_VERSION = 1
HEAD_BYTES = 1024  # how much of a file's start its fingerprint covers


class CursorError(ValueError):
    """A cursor file whose content is not a cursor."""


def fingerprint(start: bytes) -> str:
    """A short hash of a file's first bytes, which never change in an append-only log; "" for none."""
    return hashlib.blake2b(start, digest_size=8).hexdigest() if start else ""


@dataclass(frozen=True)
class Cursor:
    """
    A position in the event log: the file by identity, and a byte offset in it.

    ``head`` fingerprints the file's first ``min(offset, HEAD_BYTES)`` bytes:
    an inode number is reused once its file is deleted, and a cursor must not
    take a new file for the old one and skip its first ``offset`` bytes.
    """

    dev: int
    ino: int
    offset: int
    head: str = field(default="", compare=False)

    def encode(self) -> bytes:
        return json.dumps({"version": CURSOR_VERSION, "dev": self.dev, "ino": self.ino,
                           "offset": self.offset, "head": self.head},
                          separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Cursor:
        try:
            fields = json.loads(data)
        except ValueError as e:
            raise CursorError(f"not JSON ({e})") from None
        if not isinstance(fields, dict):
            raise CursorError("not a JSON object")
        if fields.get("version") != CURSOR_VERSION:
            raise CursorError(f"unknown version {fields.get('version')!r}")
        values = [fields.get(k) for k in ("dev", "ino", "offset")]
        if not all(type(v) is int and v >= 0 for v in values):
            raise CursorError("dev, ino and offset must be non-negative integers")
        if not isinstance(fields.get("head"), str):
            raise CursorError("head must be a string")
        return cls(*values, head=fields["head"])


def load_cursor(path: str) -> Cursor | None:
    """The cursor stored at ``path``; ``None`` if there is none, ``CursorError`` if it is broken."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return Cursor.decode(data)


def save_cursor(path: str, cursor: Cursor) -> None:
    """Replace the cursor file durably: temporary file, fsync, rename, fsync of the directory."""
    write_atomically(path, cursor.encode())


class Consumer(Protocol):
    """What a ``Follower`` feeds. ``consume`` may return a Deferred."""

    name: str
    cursor_path: str

    def consume(self, lines: Sequence[bytes]) -> defer.Deferred | int | None:
        """
        Take ``lines`` (whole log lines, each ending in LF) and finish once they are durable.

        The result is how many lines, from the first, were taken: ``None`` for
        all of them. A failure, or a number short of ``len(lines)``, leaves the
        cursor before the first line not taken; it is offered again later.
        """


@dataclass(frozen=True)
class Chunk:
    """Whole lines read from one file, starting at byte ``start``."""

    dev: int
    ino: int
    start: int
    lines: list[bytes]

    def cursor_after(self, taken: int) -> Cursor:
        return Cursor(self.dev, self.ino, self.start + sum(len(line) for line in self.lines[:taken]))


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class LogReader:
    """
    Reads whole lines of the log at ``path`` from a cursor on, across rotation by rename.

    Blocking file calls and no reactor: ``Follower`` calls it, tests drive it
    on real files. ``what`` names the reader in the operational log.
    """

    def __init__(self, path: str, what: str, max_bytes: int = 1 << 20) -> None:
        self.path = path
        self.what = what
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._identity = (0, 0)
        self._pos = 0
        # Whether the last read reached the end of the file: no whole line is left until
        # the next write.
        self.drained = False

    @property
    def position(self) -> Cursor:
        return self.cursor(self._pos)

    def cursor(self, offset: int) -> Cursor:
        """A cursor at ``offset`` in the file being read, with its fingerprint."""
        assert self._fd is not None
        return Cursor(*self._identity, offset, self._head(self._fd, offset))

    @staticmethod
    def _head(fd: int, offset: int) -> str:
        return fingerprint(os.pread(fd, min(offset, HEAD_BYTES), 0))

    def _use(self, fd: int, pos: int) -> None:
        if self._fd is not None and self._fd != fd:
            os.close(self._fd)
        self._fd, self._identity, self._pos = fd, _identity(os.fstat(fd)), pos

    def _open_current(self) -> int:
        """The file at the path, created empty if the log was never written, so it has an identity."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)  # as EventLog's open(): umask

    def _rotated(self, identity: tuple[int, int]) -> str | None:
        """
        The rotated file beside the log that is ``identity``.

        ``events.jsonl.1`` as logrotate names it, or ``events.jsonl-20261202``
        with ``dateext``.
        """
        directory, base = os.path.split(os.path.abspath(self.path))
        for name in sorted(os.listdir(directory)):
            if not name.startswith(base) or name == base:
                continue
            full = os.path.join(directory, name)
            try:
                if _identity(os.stat(full)) == identity:
                    return full
            except OSError:
                continue
        return None

    def start(self, cursor: Cursor | None, cursor_path: str) -> Cursor:
        """Position the reader at ``cursor``, or where it is safe to start; returns that position."""
        current = self._open_current()
        if cursor is None:
            self._use(current, os.fstat(current).st_size)
            return self.position
        wanted = (cursor.dev, cursor.ino)
        fd, where = current, self.path
        if _identity(os.fstat(current)) != wanted:
            rotated = self._rotated(wanted)
            if rotated is not None:
                fd, where = os.open(rotated, os.O_RDONLY), rotated
        size = os.fstat(fd).st_size
        if _identity(os.fstat(fd)) != wanted or (
                cursor.offset <= size and self._head(fd, cursor.offset) != cursor.head):
            log.error("{what}: cursor {cursor_path} names a file that is neither {path} nor a "
                      "rotated file beside it (deleted, or its inode reused); reading from the "
                      "start of {path}, events between the cursor and the rotation may be "
                      "lost", what=self.what,
                      cursor_path=cursor_path, path=self.path)
            if fd != current:
                os.close(fd)
            self._use(current, 0)
            return self.position
        if cursor.offset > size:
            log.error("{what}: cursor {cursor_path} points past the end of {where} (offset "
                      "{offset}, size {size}); reading from the start of {path}", what=self.what,
                      cursor_path=cursor_path, where=where, offset=cursor.offset, size=size,
                      path=self.path)
            if fd != current:
                os.close(fd)
            self._use(current, 0)
            return self.position
        if fd != current:
            os.close(current)
            log.info("{what}: finishing rotated file {where} before {path}", what=self.what,
                     where=where, path=self.path)
        self._use(fd, cursor.offset)
        return self.position

    def start_over(self) -> Cursor:
        """Position the reader at the start of the current file: the safe place after a bad cursor."""
        self._use(self._open_current(), 0)
        return self.position

    def rewind(self, cursor: Cursor) -> None:
        """Go back to ``cursor``, a position in the file being read (lines not taken)."""
        if (cursor.dev, cursor.ino) != self._identity or cursor.offset > self._pos:
            raise ValueError(f"{cursor} is not behind the reader's position {self.position}")
        self._pos = cursor.offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _lines(self) -> Chunk | None:
        """The whole lines from the position on, at most about ``max_bytes`` (one long line whole)."""
        assert self._fd is not None
        data = os.pread(self._fd, self.max_bytes, self._pos)
        self.drained = len(data) < self.max_bytes
        end = data.rfind(b"\n")
        while end < 0 and len(data) >= self.max_bytes:  # one line longer than max_bytes
            more = os.pread(self._fd, self.max_bytes, self._pos + len(data))
            self.drained = len(more) < self.max_bytes
            if not more:
                break
            found = more.find(b"\n")
            data += more
            if found >= 0:
                end = len(data) - len(more) + found
        if end < 0:
            return None
        lines = [line + b"\n" for line in data[:end].split(b"\n")]
        chunk = Chunk(*self._identity, self._pos, lines)
        self._pos += end + 1
        return chunk

    def read(self) -> Chunk | None:
        """
        The next whole lines, or ``None`` if there are none yet.

        Finding none, it looks for a truncation or a rotation (two system calls).
        """
        if self._fd is None:
            raise ValueError("the reader was not started")
        for _ in range(3):  # the file read, then at most a switch after a rotation or truncation
            chunk = self._lines()
            if chunk is not None:
                return chunk
            size = os.fstat(self._fd).st_size
            if size < self._pos:
                log.error("{what}: {path} is shorter ({size} bytes) than what was read of it "
                          "({pos}); it was truncated (copytruncate?) and lines may be lost. "
                          "Reading it from its start", what=self.what, path=self.path, size=size,
                          pos=self._pos)
                self._pos = 0
                continue
            try:
                at_path = _identity(os.stat(self.path))
            except FileNotFoundError:
                return None  # renamed, and the writer has not reopened yet: it still writes here
            if at_path == self._identity:
                return None
            # The writer has reopened: the file being read is finished. What it wrote
            # before the reopen may have arrived after the read above.
            chunk = self._lines()
            if chunk is not None:
                return chunk
            left = os.fstat(self._fd).st_size - self._pos
            if left:
                log.warn("{what}: the rotated event log ends in {left} bytes that are not a whole "
                         "line; they are skipped", what=self.what, left=left)
            self._use(os.open(self.path, os.O_RDONLY), 0)
        return None


class Follower(Service):
    """
    Feeds one consumer the event log's lines and keeps its cursor.

    One round at a time: read what is there, ``consume`` it, save the cursor
    (in ``run``, a thread), then look again. ``wake`` starts a round (the
    event log calls it after each write); a poll on ``clock`` every
    ``poll_interval`` seconds is the fallback, and the only retry after a
    consumer failed, so a failing consumer is not called for every event.
    """

    def __init__(self, path: str, consumer: Consumer, clock: IReactorTime,
                 run: Runner = threads.deferToThread, poll_interval: float = 1.0,
                 max_bytes: int = 1 << 20) -> None:
        self.consumer = consumer
        self.name = f"follower:{consumer.name}"
        self.reader = LogReader(path, consumer.name, max_bytes)
        self.durable: Cursor | None = None  # what the cursor file says
        self._clock = clock
        self._run = run
        self._poll_interval = poll_interval
        self._poller: task.LoopingCall | None = None
        self._round: defer.Deferred | None = None
        self._held = False  # the consumer failed: wait for the poll

    def _start_reader(self) -> tuple[Cursor | None, Cursor]:
        """The stored cursor (``None`` if there is none or it is broken) and where reading starts."""
        path = self.consumer.cursor_path
        try:
            cursor = load_cursor(path)
        except (CursorError, OSError) as e:
            log.error("{what}: cursor {path} is unusable ({error}); reading from the start of "
                      "{log_path}", what=self.consumer.name, path=path, error=e,
                      log_path=self.reader.path)
            return None, self.reader.start_over()
        return cursor, self.reader.start(cursor, path)

    def startService(self) -> None:
        cursor, position = self._start_reader()
        if position != cursor:
            # A new consumer's start, or a safe place after a bad cursor, must survive a crash.
            save_cursor(self.consumer.cursor_path, position)
        self.durable = position
        self._held = False
        super().startService()
        if self._poll_interval > 0:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self._clock
            self._poller.start(self._poll_interval, now=False)
        self.wake()

    def stopService(self) -> defer.Deferred:
        """Stop reading; a round in progress finishes (its cursor is saved) first."""
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        done: defer.Deferred = defer.Deferred()
        if self._round is None:
            done.callback(None)
        else:
            self._round.addBoth(lambda _: done.callback(None))
        return done.addCallback(lambda _: self.reader.close())

    def _poll(self) -> None:
        self._held = False
        self.wake()

    def wake(self, after_write: bool = False) -> None:
        """
        There may be new lines: read them unless a round is running or the consumer failed.

        ``after_write`` (``written``): the event log has just written here, so a
        read that reached the end of the file took everything there is; the
        read that would find nothing, and the look for a rotation that comes
        with it (three system calls per event, each a chance to lose the GIL),
        are left out. A read that finds nothing still looks, as every read does.
        """
        while self.running and self._round is None and not self._held:
            try:
                chunk = self.reader.read()
            except OSError:
                self._broken(Failure())
                return
            if chunk is None:
                return
            d = defer.maybeDeferred(self.consumer.consume, chunk.lines)
            d.addCallbacks(self._consumed, self._failed, callbackArgs=(chunk,),
                           errbackArgs=(chunk,))
            d.addErrback(self._broken)
            finished: list[None] = []
            d.addBoth(finished.append)
            if finished:  # a consumer that finished at once: loop, not recurse, per chunk
                if after_write and self.reader.drained:
                    return  # read to the end just now: nothing more until the next write
                continue
            self._round = d
            d.addBoth(self._round_done)
            return

    def written(self) -> None:
        """The event log was just written to: read what it wrote."""
        self.wake(after_write=True)

    def _round_done(self, _: Any) -> None:
        self._round = None
        self.wake()

    def _consumed(self, taken: int | None, chunk: Chunk) -> defer.Deferred | None:
        count = len(chunk.lines) if taken is None else max(0, min(taken, len(chunk.lines)))
        cursor = self.reader.cursor(chunk.cursor_after(count).offset)
        if count < len(chunk.lines):
            self.reader.rewind(cursor)
            self._held = True
        if count == 0:
            return None
        d = self._run(save_cursor, self.consumer.cursor_path, cursor)

        def saved(_: Any) -> None:
            self.durable = cursor

        def not_saved(failure: Failure) -> None:
            # The consumer has the lines; only a restart would repeat them.
            log.failure("{what}: could not save cursor {path}", failure, what=self.consumer.name,
                        path=self.consumer.cursor_path)

        return d.addCallbacks(saved, not_saved)

    def _broken(self, failure: Failure) -> None:
        log.failure("{what}: following the event log failed; trying again in {delay:g}s",
                    failure, what=self.consumer.name, delay=self._poll_interval)
        self._held = True

    def _failed(self, failure: Failure, chunk: Chunk) -> None:
        log.failure("{what}: could not take {n} event line(s) from offset {offset}; trying "
                    "again in {delay:g}s", failure, what=self.consumer.name, n=len(chunk.lines),
                    offset=chunk.start, delay=self._poll_interval)
        self.reader.rewind(chunk.cursor_after(0))
        self._held = True
