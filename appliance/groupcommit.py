"""
Group commit: one directory fsync shared by every change made in the directory before it began.

The spool's commits and removals rename entries into and out of ``active/``;
each must be durable before its reply or its next step, but an fsync per
entry would make concurrent transactions queue behind each other's disk
flushes. ``DirectorySync`` lets them share one.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from appliance.files import fsync_directory


class DirectorySync:
    """
    Group commit for one directory: one fsync covers every entry changed in it before it began.

    Called on the reactor thread once a create or rename in ``path`` has
    returned, ``sync()`` fires after an fsync of ``path`` that began after
    the call has finished, and never before. Callers arriving while one runs
    share the next, so concurrent transactions pay for one directory fsync,
    not one each. ``run`` runs the fsync (in a thread in the appliance).
    """

    def __init__(self, path: str, run: Callable[..., Deferred],
                 fsync: Callable[[str], None] = fsync_directory) -> None:
        self.path = path
        self.run = run
        self.fsync = fsync
        self._running = False
        self._next: list[Deferred] = []

    def sync(self) -> Deferred:
        d: Deferred = Deferred()
        self._next.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        waiters, self._next = self._next, []
        self._running = True
        maybeDeferred(self.run, self.fsync, self.path).addBoth(self._done, waiters)

    def _done(self, result: object, waiters: list[Deferred]) -> None:
        self._running = False
        if self._next:
            self._start()
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
