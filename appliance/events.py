"""
The engagement event log: one JSON object per line, SparkPost's field names.

Operators ``tail -F`` this file and existing SparkPost/Momentum consumers read
it, so a line is only ever written whole (one ``write`` on an unbuffered file)
and field names follow SparkPost's, not ours.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import signal
import time
from collections.abc import Callable, Collection
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.files import fsync_and_close

log = Logger()

Event = dict[str, Any]


class IdGenerator:
    """
    Identifiers unique across nodes without coordination.

    ``message_id`` is 20 hex digits: 16 bits of the node name's hash, 44 bits
    of milliseconds, 20 bits of a per-process sequence that starts at random
    (two processes of one node rarely share a millisecond *and* a sequence).
    ``event_id`` and ``transmission_id`` are decimal, as SparkPost writes them.

    Given ``process`` (the appliance runs tracker processes beside it), the
    top ``PROCESS_BITS`` of the 20 are the process's index and the sequence
    keeps the rest: processes of one node then never make the same id, and
    each still makes 16,384 a millisecond before its sequence comes round.
    """

    PROCESS_BITS = 6
    MAX_PROCESSES = 1 << PROCESS_BITS

    def __init__(self, node_name: str, now: Callable[[], float] = time.time,
                 process: int | None = None) -> None:
        self._node = int.from_bytes(hashlib.blake2b(node_name.encode(), digest_size=2).digest())
        self._now = now
        self._seq = itertools.count(random.SystemRandom().randrange(1 << 20))
        if process is None:
            self._seq_mask, self._process = 0xFFFFF, 0
        else:
            if not 0 <= process < self.MAX_PROCESSES:
                raise ValueError(f"process index {process} is not from 0 to {self.MAX_PROCESSES - 1}")
            seq_bits = 20 - self.PROCESS_BITS
            self._seq_mask, self._process = (1 << seq_bits) - 1, process << seq_bits

    def _parts(self) -> tuple[int, int]:
        return (int(self._now() * 1000) & ((1 << 44) - 1),
                self._process | (next(self._seq) & self._seq_mask))

    def message_id(self) -> str:
        ms, seq = self._parts()
        return f"{self._node:04x}{ms:011x}{seq:05x}"

    def event_id(self) -> str:
        ms, seq = self._parts()
        return str((self._node << 64) | (ms << 20) | seq)

    def transmission_id(self) -> str:
        ms, seq = self._parts()
        return str((ms << 20) | seq)


def new_event(ids: IdGenerator, now: Callable[[], float], node_name: str, customer_id: str,
              type_: str, fields: dict[str, Any]) -> Event:
    """
    An event with the fields every SparkPost event carries, then ``fields``: the one
    shape for the event log and for the tracker processes that send it their events.
    """
    event: Event = {
        "type": type_,
        "event_id": ids.event_id(),
        "timestamp": str(int(now())),
        "node_name": node_name,
        "customer_id": customer_id,
    }
    event.update(fields)
    return event


# Strict JSON only: ``NaN`` and ``Infinity`` are Python's, and strict parsers
# (webhook receivers among them) refuse a whole batch for one of them.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

DEFAULT_FILE_MODE = 0o640


def encode_event(event: Event) -> bytes:
    """
    One log line: compact JSON, non-ASCII kept readable, LF-terminated.

    Raises ``ValueError`` (or ``TypeError``) for what strict JSON cannot
    hold: a non-finite number, a lone surrogate, a value of no JSON type.
    """
    return _ENCODER.encode(event).encode("utf-8") + b"\n"


def _describe(event: Event) -> str:
    """Which event was lost, for the operational log: its type and ids, never its whole text."""
    keys = ("type", "event_id", "message_id", "transmission_id")
    return " ".join(f"{k}={event[k]!r:.80}" for k in keys if k in event)


class EventLog(Service):
    """
    Appends events to the JSON-lines file and wakes its followers.

    The file is opened unbuffered in append mode so each event is one
    ``write(2)``; it is fsynced about once a second (on ``clock``) and at stop.
    Given ``run`` (the file pool), the periodic fsync runs there on a duplicate
    of the descriptor, so the reactor thread never waits for the disk; the one
    at stop or reopen is made in place, since the file closes right after it.
    Given ``sighup``, the reactor the appliance runs on, SIGHUP reopens the file
    for logrotate's ``postrotate``: the handler only asks that reactor's thread
    to do it, since a signal can interrupt a write half done.

    A new file is created with ``file_mode`` whatever the umask (twistd sets
    0077 when it daemonizes); an existing file keeps the mode it has, which
    the operator may have chosen. An event that cannot be encoded or written
    whole is counted in ``lost`` and logged; a line cut short by a full disk
    is removed again, or, when it cannot be, ended, so the next event starts
    on a line of its own.
    """

    name = "events"

    def __init__(
        self,
        path: str,
        node_name: str,
        customer_id: str = "1",
        fsync_interval: float = 1.0,
        *,
        clock: IReactorTime,
        now: Callable[[], float] = time.time,
        sighup: IReactorFromThreads | None = None,
        run: Callable[..., defer.Deferred] | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
        process: int | None = None,
    ) -> None:
        self.path = path
        self.file_mode = file_mode
        self.lost = 0  # events not written
        self.failing = False  # the last write failed; the next that succeeds clears it
        self.node_name = node_name
        self.customer_id = customer_id
        self.ids = IdGenerator(node_name, now, process)
        self._now = now
        self._fsync_interval = fsync_interval
        self._clock = clock
        self._sighup = sighup
        self._run = run
        self._previous_handler: Any = None
        self._file: Any = None
        self._dirty = False
        self._syncer: task.LoopingCall | None = None
        self._wakers: list[tuple[Callable[[], None], frozenset[str] | None]] = []
        self._observers: list[Callable[[Event], None]] = []
        self._end = 0  # the file's size as this log last left it
        self._cut = False  # a cut line could not be removed: end it before the next event

    def wake_on_write(self, wake: Callable[[], None], types: Collection[str] | None = None) -> None:
        """
        Call ``wake`` after each write (of an event of one of ``types``, if given), with no
        data: a follower then reads the file.

        Consumers read events only from the file (``appliance.follower``), so
        what they see is what the log holds, and a restart resumes from their
        cursors; this only saves them waiting for their poll. A consumer that
        acts on a few types of event says which: the others wait for its next
        read, and it is not woken twice for every message.
        """
        self._wakers.append((wake, frozenset(types) if types is not None else None))

    def observe(self, observer: Callable[[Event], None]) -> None:
        """
        Call ``observer`` with each event once it is written whole, on the writer's thread.

        For counters only (the admin listener's metrics): it must be cheap and must
        not keep the event. Everything else reads the file, as ``wake_on_write`` says.
        """
        self._observers.append(observer)

    def startService(self) -> None:
        self.open()
        if self._fsync_interval > 0:
            self._syncer = task.LoopingCall(self._sync_later)
            self._syncer.clock = self._clock
            self._syncer.start(self._fsync_interval, now=False)
        reactor = self._sighup
        if reactor is not None and hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(
                signal.SIGHUP, lambda *_: reactor.callFromThread(self.reopen))
        super().startService()

    def stopService(self) -> None:
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        self.close()
        return super().stopService()

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | os.O_EXCL, self.file_mode)
        except FileExistsError:
            fd = os.open(self.path, flags, self.file_mode)
        else:
            try:
                os.fchmod(fd, self.file_mode)  # the umask took bits away
            except OSError:
                os.close(fd)
                raise
        self._file = open(fd, "ab", buffering=0)
        self._end = os.fstat(fd).st_size
        self._cut = False

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def reopen(self) -> None:
        log.info("reopening event log {path}", path=self.path)
        self.close()
        self.open()

    def sync(self) -> None:
        if self._file is not None and self._dirty:
            os.fsync(self._file.fileno())
            self._dirty = False

    def _sync_later(self) -> defer.Deferred | None:
        """The periodic fsync; the loop waits for it, so two never overlap."""
        if self._run is None:
            self.sync()
            return None
        if self._file is None or not self._dirty:
            return None
        try:
            fd = os.dup(self._file.fileno())
        except OSError as e:  # not raised: that would stop the loop for good
            log.error("event log {path}: fsync failed: {error}", path=self.path, error=e)
            return None
        self._dirty = False

        def failed(failure: Failure) -> None:
            self._dirty = True
            log.failure("event log {path}: fsync failed", failure, path=self.path)

        return defer.maybeDeferred(self._run, fsync_and_close, fd).addErrback(failed)

    def make(self, type_: str, **fields: Any) -> Event:
        """An event with the fields every SparkPost event carries, then ``fields``."""
        return new_event(self.ids, self._now, self.node_name, self.customer_id, type_, fields)

    def write(self, event: Event) -> None:
        """
        Append one event; raises ``OSError`` if it could not be written whole.

        An event that is not strict JSON is logged and counted, not raised:
        the caller could do nothing better, and nothing of it is written.
        """
        if self._file is None:
            raise OSError(f"event log {self.path} is not open")
        try:
            line = encode_event(event)
        except (ValueError, TypeError, RecursionError) as e:
            self.lost += 1
            log.error("event log {path}: event not written, it is not strict JSON ({error}): "
                      "{event}", path=self.path, error=e, event=_describe(event))
            return
        data = b"\n" + line if self._cut else line
        try:
            written = self._file.write(data) or 0
        except OSError as e:
            self._lost(event, e)
            raise
        self._dirty = True
        if written < len(data):
            self._short(written, len(data) - len(line))
            error = OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
            self._lost(event, error)
            raise error
        self._cut = False
        self.failing = False
        self._end += written
        for observe in self._observers:
            try:
                observe(event)
            except Exception:
                log.failure("an event log observer failed")
        for wake, types in self._wakers:
            if types is None or event["type"] in types:
                try:
                    wake()
                except Exception:
                    log.failure("waking an event log follower failed")

    def _short(self, written: int, newline: int) -> None:
        """
        ``written`` bytes of a line (after ``newline`` bytes ending a cut one) reached the file.

        The part is cut off again if the file is as this log left it (not
        truncated or appended to by anyone else meanwhile); otherwise, or if
        truncating fails, the next event first ends the line.
        """
        if written == 0:
            return
        if newline and written <= newline:
            self._cut = False
            self._end += written
            return
        start = self._end + newline
        try:
            fd = self._file.fileno()
            if os.fstat(fd).st_size == self._end + written:
                os.ftruncate(fd, start)
                self._end, self._cut = start, False
                return
        except OSError as e:
            log.error("event log {path}: could not remove a cut line: {error}", path=self.path,
                      error=e)
        self._end += written
        self._cut = True

    def _lost(self, event: Event, error: OSError) -> None:
        self.lost += 1
        self.failing = True
        log.error("event log {path}: event lost ({lost} so far): {error}: {event}", path=self.path,
                  lost=self.lost, error=error, event=_describe(event))
        for wake, _ in self._wakers:
            try:
                wake()
            except Exception:
                log.failure("waking an event log follower failed")

    def emit(self, type_: str, **fields: Any) -> Event:
        event = self.make(type_, **fields)
        self.write(event)
        return event
