"""
The suppression list in the running appliance: the scopes in memory, kept current.

Injection asks ``SuppressionList.suppressed`` for each recipient on the
reactor thread, so the answer comes from two in-memory sets (a lookup
costs a set membership test), loaded from the database at start. They are
kept current by what writes the database: the event log's follower (the
appliance's own unsubscribes and hard bounces), the admin API, and, for
writers in other processes (``engage-appliance suppressions``), a check of
SQLite's ``data_version`` every ``check_interval`` seconds that reloads the
sets when another process has committed. Every database call runs in the
file pool. A new list (no cursor yet) reads the current event log file from
its start, so an appliance upgraded in place suppresses what its log already
holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.follower import Cursor, Follower, save_cursor
from appliance.reactors import Runner
from appliance.suppression.store import TRANSACTIONAL, Change, SuppressionStore, changes_in

log = Logger()


class SuppressionList:
    """Who is suppressed, by scope, in memory; what injection asks."""

    def __init__(self) -> None:
        self.transactional: set[str] = set()
        self.non_transactional: set[str] = set()
        # Bumped by every change made here, so a reload read before it is not applied after it.
        self.generation = 0

    def __len__(self) -> int:
        return len(self.transactional) + len(self.non_transactional)

    def suppressed(self, address: str, transactional: bool) -> str | None:
        """The scope that stops a copy to ``address`` (``transactional`` or not), or ``None``."""
        if transactional:
            return "transactional" if address.lower() in self.transactional else None
        return "non_transactional" if address.lower() in self.non_transactional else None

    def replace(self, transactional: set[str], non_transactional: set[str]) -> None:
        self.transactional, self.non_transactional = transactional, non_transactional
        self.generation += 1

    def add(self, changes: Sequence[Change]) -> None:
        for change in changes:
            (self.transactional if change.type == TRANSACTIONAL else self.non_transactional).add(
                change.recipient)
        self.generation += 1

    def discard(self, recipient: str, kind: str | None) -> None:
        if kind in (None, TRANSACTIONAL):
            self.transactional.discard(recipient)
        if kind in (None, "non_transactional"):
            self.non_transactional.discard(recipient)
        self.generation += 1


class SuppressionConsumer:
    """What the follower feeds: the event log's unsubscribes and hard bounces, into the database."""

    name = "suppression"

    def __init__(self, service: SuppressionService, cursor_path: str) -> None:
        self.service = service
        self.cursor_path = cursor_path

    def consume(self, lines: Sequence[bytes]) -> defer.Deferred | None:
        changes = changes_in(lines)
        if not changes:
            return None
        self.service.cursor_owed = True
        return self.service.put(changes)


class SuppressionService(MultiService):
    """
    The database, the in-memory list, the follower that feeds them and the change check.

    Started before the SMTP listeners, so no message is injected before the
    list is loaded; the load at start blocks, once, before anything is served.
    """

    name = "suppression"

    def __init__(self, path: str, log_path: str, clock: IReactorTime, run: Runner,
                 check_interval: float = 1.0, poll_interval: float = 1.0,
                 now: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.path = path
        self.log_path = log_path
        self.list = SuppressionList()
        self.store: SuppressionStore | None = None
        self._clock = clock
        self._run = run
        self._now = now
        self._version: int | None = None
        self._checking = False
        self._check_done: defer.Deferred | None = None  # a check under way, which a stop waits for
        self._check = task.LoopingCall(self.check)
        self._check.clock = clock
        self._check_interval = check_interval
        # The follower is woken by every event written; its cursor is saved after each batch
        # that changed the list, and otherwise at most once per poll interval: two fsyncs
        # per batch of deliveries' events only competed with the spool's commits, and a
        # batch read again after a crash, with nothing to change, changes nothing.
        self.cursor_owed = False
        self._cursor_saved_at = float("-inf")
        self._cursor_interval = poll_interval
        self.follower = Follower(log_path, SuppressionConsumer(self, path + ".cursor"), clock,
                                 run=self._run_for_follower,
                                 poll_interval=poll_interval)
        self.follower.setServiceParent(self)

    def _run_for_follower(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if f is save_cursor:
            now = self._clock.seconds()
            if not self.cursor_owed and now - self._cursor_saved_at < self._cursor_interval:
                return defer.succeed(None)
            self.cursor_owed, self._cursor_saved_at = False, now
        return self._run(f, *args)

    def startService(self) -> None:
        cursor_path = self.follower.consumer.cursor_path
        if not os.path.exists(cursor_path) and os.path.exists(self.log_path):
            # A new list learns from the event log as it stands (a follower without a cursor
            # would start at its end): the unsubscribes and hard bounces of the current file.
            st = os.stat(self.log_path)
            save_cursor(cursor_path, Cursor(st.st_dev, st.st_ino, 0))
        self.store = SuppressionStore(self.path)
        self._version = self.store.data_version()
        started = time.monotonic()
        self.list.replace(*self.store.scopes())
        log.info("suppression list {path}: {count} entries loaded in {ms:.0f} ms", path=self.path,
                 count=len(self.list), ms=(time.monotonic() - started) * 1000)
        super().startService()
        self._check.start(self._check_interval, now=False)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._check.running:
            self._check.stop()
        yield defer.maybeDeferred(super().stopService)
        if self._check_done is not None:  # it reads the store: close it after
            yield self._check_done
        if self.store is not None:
            store, self.store = self.store, None
            yield self._run(store.close)

    def wake(self) -> None:
        """
        An event that may suppress was written: the follower reads to it.

        A full look (``Follower.wake``), not ``written``'s shortcut: the list is
        woken only by such events, so the log may have been rotated since its
        last read, and the event is then in the new file.
        """
        self.follower.wake()

    # -- changes made by others --------------------------------------------------------------------

    def check(self) -> defer.Deferred | None:
        """Reload the scopes if another process has changed the database since the last look."""
        if self._checking or self.store is None:
            return None
        self._checking = True
        store = self.store
        generation = self.list.generation

        def looked(version: int) -> defer.Deferred | None:
            if version == self._version:
                return None
            return self._run(store.scopes).addCallback(loaded, version)

        def loaded(scopes: tuple[set[str], set[str]], version: int) -> None:
            if self.list.generation != generation:
                return  # changed here meanwhile: the next check loads again
            self.list.replace(*scopes)
            self._version = version
            log.info("suppression list changed by another process: {count} entries", count=len(self.list))

        def failed(failure: Failure) -> None:
            log.failure("could not check the suppression list {path}", failure, path=self.path)

        def done(_: Any) -> None:
            self._checking = False
            self._check_done = None

        d = self._run(store.data_version).addCallback(looked)
        self._check_done = d.addErrback(failed).addBoth(done)
        return self._check_done

    # -- changes made here --------------------------------------------------------------------------

    def put(self, changes: Sequence[Change]) -> defer.Deferred:
        """Write entries (in the file pool), then suppress them in memory."""
        store = self._need_store()
        return self._run(store.put, list(changes), self._now()).addCallback(
            lambda n: (self.list.add(changes), n)[1])

    def remove(self, recipient: str, kind: str | None = None) -> defer.Deferred:
        """Delete a recipient's entries; fires with how many there were."""
        store = self._need_store()

        def removed(n: int) -> int:
            self.list.discard(recipient, kind)
            return n

        return self._run(store.remove, recipient, kind).addCallback(removed)

    def get(self, recipient: str) -> defer.Deferred:
        return self._run(self._need_store().get, recipient)

    def search(self, **criteria: Any) -> defer.Deferred:
        return self._run(lambda: self._need_store().search(**criteria))

    def _need_store(self) -> SuppressionStore:
        if self.store is None:
            raise RuntimeError("the suppression list is not open")
        return self.store
