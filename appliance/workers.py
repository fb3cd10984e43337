"""
Worker threads for the reactor's blocking calls, with results handed back in batches.

The appliance sends several calls per message to threads: creating and
committing its spool file, preparing it for tracking, taking it out of the
spool. Twisted's ``ThreadPool`` with ``deferToThreadPool`` costs about 50 us
of CPU a call on this kind of machine, most of it waking threads: each call
goes through a coordinator, and each result wakes the reactor on its own.
Here a call is one put on a ``queue.SimpleQueue`` that idle threads wait
on, and results go to a deque that the reactor empties: a result wakes the
reactor only if no wake-up is on its way already, so results that finish
together cost one. Measured with no-op calls, eight at a time: 50-65 us a
call through Twisted's pool, 13-15 us here.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

_STOP = object()  # put once per thread: each thread ends when it takes one


class WorkerPool:
    """
    ``threads`` threads that run calls for the reactor; ``run`` gives each call's Deferred.

    Calls start in the order they are made; their Deferreds fire on the
    reactor thread in the order the calls end. Calls made before ``start``
    wait for it; ``stop`` lets every call made before it end, then joins the
    threads (a pool stopped before it started runs none). A call made after
    ``stop`` is not run (its Deferred never fires), as with Twisted's
    ``ThreadPool``, and a warning says so. The threads are daemons: a process
    that ends without stopping its pools (killed, or a test) is not held up.
    """

    def __init__(self, reactor: IReactorFromThreads, threads: int, name: str) -> None:
        self.reactor = reactor
        self.size = threads
        self.name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ended: collections.deque[tuple[defer.Deferred, bool, Any]] = collections.deque()
        self._wake_due = False  # a hand-back is on its way to the reactor
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._count_lock = threading.Lock()
        self._unfinished = 0

    @property
    def unfinished(self) -> int:
        """Calls made and not yet ended: running, or waiting for a thread."""
        return self._unfinished

    def start(self) -> None:
        for i in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """End every call made so far, then the threads; blocks until they have ended."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._calls.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """``f(*args, **kwargs)`` in a thread; its result or failure, on the reactor thread."""
        d: defer.Deferred = defer.Deferred()
        if self._stopped:
            log.warn("{pool} is stopped: {call!r} is not run", pool=self.name, call=f)
            return d
        with self._count_lock:
            self._unfinished += 1
        self._calls.put((d, f, args, kwargs))
        return d

    def _work(self) -> None:
        take, ended = self._calls.get, self._ended
        while True:
            call = take()
            if call is _STOP:
                return
            d, f, args, kwargs = call
            try:
                ended.append((d, True, f(*args, **kwargs)))
            except BaseException:
                ended.append((d, False, Failure()))
            finally:
                with self._count_lock:
                    self._unfinished -= 1
            # Appended first, then looked at: a hand-back that is already due takes it.
            if not self._wake_due:
                self._wake_due = True
                try:
                    self.reactor.callFromThread(self._hand_back)
                except BaseException:
                    # The reactor could not be woken (its waker closing at shutdown): the
                    # next call to end tries again, and hands back this result with its own.
                    self._wake_due = False
                    log.failure("{pool} could not hand results back to the reactor", pool=self.name)

    def _hand_back(self) -> None:
        """On the reactor thread: fire the Deferreds of every call that has ended."""
        self._wake_due = False  # before emptying: a call that ends from now on wakes anew
        ended = self._ended
        while ended:
            d, ok, result = ended.popleft()
            try:
                if ok:
                    d.callback(result)
                else:
                    d.errback(result)
            except Exception:  # a Deferred its caller fired already: the others still go
                log.failure("{pool} could not fire a call's Deferred", pool=self.name)
