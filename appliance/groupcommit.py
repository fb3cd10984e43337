"""
Group commit: one directory fsync shared by every change made in the directory before it began.

The spool's commits and removals rename entries into and out of ``active/``;
each must be durable before its reply or its next step, but an fsync per
entry would make concurrent transactions queue behind each other's disk
flushes. ``ThreadedDirectorySync`` lets them share one, in the file-pool
thread that made the change: no hop back to the reactor and out again
between a rename and its fsync. ``DelayedBatch`` does the same for work
that may wait a moment: many entries' work in one file-pool call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from appliance.files import fsync_directory

if TYPE_CHECKING:
    from appliance.reactors import Runner

T = TypeVar("T")


class ThreadedDirectorySync:
    """
    Group commit for one directory, called in the file-pool thread that changed it.

    The thread that renamed an entry makes the rename durable itself, with no
    hop back to the reactor and out again: ``sync()`` returns once an fsync of
    ``path`` that began after the call has succeeded. A thread arriving while
    another's fsync runs waits for it to end, then shares the next one with
    every thread that arrived meanwhile. A failed fsync covers nobody: each
    waiter it would have covered tries its own, and raises if that fails.
    """

    def __init__(self, path: str, fsync: Callable[[str], None] = fsync_directory) -> None:
        self.path = path
        self.fsync = fsync
        self._changed = threading.Condition()
        self._asked = 0  # tickets given out, one per call
        self._covered = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False

    def sync(self) -> None:
        with self._changed:
            self._asked += 1
            ticket = self._asked
            while self._running and self._covered < ticket:
                self._changed.wait()
            if self._covered >= ticket:
                return
            self._running = True
            covers = self._asked  # everyone who asked before this fsync began
        succeeded = False
        try:
            self.fsync(self.path)
            succeeded = True
        finally:
            with self._changed:
                self._running = False
                if succeeded:
                    self._covered = max(self._covered, covers)
                self._changed.notify_all()


class DelayedBatch(Generic[T]):
    """
    Work for many spool entries, done in one file-pool call a while after the first asked.

    The spool's "events written" marks and the fsync of ``active/`` after
    entries left it; like a directory fsync, one call serves every entry
    that asked before it.

    ``add`` gives each entry a Deferred that fires once the call has ended (or
    fails with it); ``flush`` makes the call now (a stop does not wait).
    """

    def __init__(self, clock: IReactorTime, delay: float, run: Runner,
                 work: Callable[[list[T]], Any]) -> None:
        self.clock, self.delay, self.run, self.work = clock, delay, run, work
        self.waiting: list[tuple[T, defer.Deferred]] = []
        self._due: IDelayedCall | None = None

    def add(self, queued: T) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((queued, d))
        if self._due is None:
            self._due = self.clock.callLater(self.delay, self.flush)
        return d

    def flush(self) -> None:
        if self._due is not None:
            if self._due.active():
                self._due.cancel()
            self._due = None
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        done = self.run(self.work, [queued for queued, _ in batch])

        def tell(result: Any) -> None:
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)

        done.addBoth(tell)
