"""
The statistics store as a service: a follower of the event log that counts into SQLite.

Counting is in ``store`` (plain SQLite, no reactor); this is the thin layer
that runs it in the file pool, one transaction per batch of lines the
``Follower`` hands over, on the follower's one-second poll. The store keeps
the log position it agrees with in the same transaction; at start that
position is written to the follower's cursor file, so the two never disagree
after a crash (see ``store``), and the follower's own save after each batch
is left out.

A store that is missing, corrupt or of another schema is rebuilt from the log
and its rotated files at start, in the file pool, with a line in the
operational log; the follower starts once that is done. The appliance never
waits for the statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from appliance.files import write_atomically
from appliance.follower import Cursor, Follower, save_cursor
from appliance.reactors import Runner
from appliance.stats.store import COUNTERS, METRICS, StatsStore, StoreError, connect, rebuild

__all__ = ["COUNTERS", "METRICS", "StatsService", "StatsStore", "StoreError", "connect", "open_or_rebuild",
           "rebuild"]

log = Logger()


def open_or_rebuild(store: StatsStore, log_path: str) -> bytes | None:
    """
    Open the store, rebuilding it from the log if it is missing, unusable or never caught up.

    Blocking; returns the cursor the counts agree with.
    """
    why = None
    if not os.path.exists(store.path):
        why = "it does not exist"
    else:
        try:
            store.open()
        except StoreError as e:
            why = f"it is unusable ({e})"
        else:
            cursor = store.cursor()
            if cursor is not None:
                return cursor
            store.close()
            why = "it holds no position in the event log"
    # A first start makes the store (info); one that was there and is not usable is news (warn).
    say = log.info if why == "it does not exist" else log.warn
    say("statistics: rebuilding {path} from {log_path} and its rotated files: {why}",
        path=store.path, log_path=log_path, why=why)
    for name in (store.path, f"{store.path}-journal", f"{store.path}-wal", f"{store.path}-shm"):
        if name != store.path and os.path.exists(name):
            os.unlink(name)  # a journal of the old file must not be replayed into the new one
    counted, cursor = rebuild(store.path, log_path)
    log.info("statistics: {path} rebuilt from {n} event(s)", path=store.path, n=counted)
    store.open()
    return cursor


class _Consumer:
    """What the follower feeds: each batch counted with the log position after it."""

    name = "stats"

    def __init__(self, store: StatsStore, cursor_path: str, run: Runner,
                 position: Callable[[], Cursor]) -> None:
        self.store = store
        self.cursor_path = cursor_path
        self._run = run
        self._position = position

    def consume(self, lines: Sequence[bytes]) -> defer.Deferred:
        # The follower has just read ``lines``: its position is the end of the batch.
        cursor = self._position().encode()
        return self._run(self.store.apply, lines, cursor).addCallback(lambda _: None)


class StatsService(Service):
    """Counts the event log into the store at ``database``, on the follower's poll or when woken."""

    name = "stats"

    def __init__(self, database: str, log_path: str, clock: IReactorTime,
                 run: Runner = threads.deferToThread, poll_interval: float = 1.0) -> None:
        self.store = StatsStore(database)
        self.log_path = log_path
        self.cursor_path = f"{database}.cursor"
        self._clock = clock
        self._run = run
        self._poll_interval = poll_interval
        self.follower: Follower | None = None
        self._starting: defer.Deferred | None = None

    def _prepare(self) -> None:
        """Blocking: the store open and caught up to a cursor, and that cursor the follower's."""
        cursor = open_or_rebuild(self.store, self.log_path)
        if cursor is not None:
            write_atomically(self.cursor_path, cursor)
        elif os.path.exists(self.cursor_path):
            os.unlink(self.cursor_path)

    def _save_cursor(self, f: Callable[..., object], *args: object) -> defer.Deferred:
        """
        What the follower runs after each batch: its cursor file save, left out.

        The store saved the same cursor with the batch's counts, and writes it to
        the file at start; two more fsyncs a batch would only compete with the spool's.
        """
        if f is save_cursor:
            return defer.succeed(None)
        return self._run(f, *args)

    def startService(self) -> None:
        super().startService()
        self._starting = defer.maybeDeferred(self._run, self._prepare)
        self._starting.addCallbacks(self._follow, self._not_started)

    def _follow(self, _: object) -> None:
        self._starting = None
        if not self.running:
            return
        consumer = _Consumer(self.store, self.cursor_path, self._run,
                             lambda: follower.reader.position)
        follower = Follower(self.log_path, consumer, self._clock, run=self._save_cursor,
                            poll_interval=self._poll_interval)
        self.follower = follower
        follower.startService()

    def _not_started(self, failure: object) -> None:
        self._starting = None
        log.failure("statistics: the store {path} could not be opened or rebuilt; statistics "
                    "are not kept until the next start", failure, path=self.store.path)  # type: ignore[arg-type]

    def wake(self) -> None:
        if self.follower is not None:
            self.follower.wake()

    @defer.inlineCallbacks
    def stopService(self) -> defer.Deferred:  # type: ignore[override]
        super().stopService()
        if self._starting is not None:
            yield self._starting
        if self.follower is not None and self.follower.running:
            yield self.follower.stopService()
        self.follower = None
        self.store.close()
