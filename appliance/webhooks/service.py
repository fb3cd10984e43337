"""
One webhook's service: collects the events it wants into batch files, seals them, has them posted.

A webhook reads the event log through a ``Follower`` (``appliance.follower``),
from its own cursor. Each event it wants is appended to the ``.open`` file as
the JSON line it will be in the batch (``appliance.webhooks.envelope``), with
one ``write``; once the lines of a round are written, the file is fsynced (and
any batch sealed meanwhile has been) before the cursor moves past them. So a
crash repeats events rather than losing them. A line that could be written
only in part (a full disk) is cut off again at once, and the cursor stops
before its event, which is offered again at the follower's next poll. A batch
is sealed when it has ``max_batch_size`` events, when the next event would
take its body past ``max_batch_bytes``, or ``batch_interval`` after its first
one (how a seal commits: ``appliance.webhooks.queue``). Seals run in a thread,
one at a time per webhook, so batches are queued in the order they were
sealed; posting them is ``appliance.webhooks.posting``.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, ssl, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from appliance.config import WebhookConfig
from appliance.events import Event
from appliance.files import fsync_and_close
from appliance.reactors import Reactor, Runner
from appliance.webhooks.envelope import envelope_line
from appliance.webhooks.http import TrustFile
from appliance.webhooks.posting import Poster
from appliance.webhooks.queue import CURSOR, Batch, QueueDirectory

# One namespace for the whole package: operators and tests filter the log on it.
log = Logger(namespace="appliance.webhooks")


class WebhookService(Service):
    """
    One webhook: collects its events into batches on disk; its ``Poster`` posts them.

    A ``Consumer`` of the event log: its follower hands ``consume`` the log's
    lines, and ``accept`` appends the line of each wanted event.
    ``clock``, ``agent`` and ``run`` are injected so tests drive time, HTTP
    and the file system calls that would block.
    """

    def __init__(self, config: WebhookConfig, directory: str, clock: Reactor,
                 agent: IAgent | None = None, run: Runner = threads.deferToThread,
                 fsync_interval: float = 1.0, user_agent: bytes = b"engage-appliance",
                 trust: ssl.IOpenSSLTrustRoot | None = None) -> None:
        """``trust``: the roots of ``config.tls_ca_file``, as the builder loaded them."""
        if config.tls_ca_file and trust is None and agent is None:
            raise ValueError(f"{config.tls_ca_file} is set, but its trust roots were not given "
                             "(appliance.build loads them)")
        self.config = config
        self.name = f"webhook:{config.name}"
        self.queue = QueueDirectory(directory)
        self.cursor_path = os.path.join(directory, CURSOR)
        self._clock = clock
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(clock, persistent=False)
            tls = {"contextFactory": TrustFile(trust)} if trust is not None else {}
            agent = Agent(clock, connectTimeout=config.timeout, pool=self._pool, **tls)
        self._run = run
        self._fsync_interval = fsync_interval
        self.poster = Poster(config, self.queue, clock, agent, run, self._track, user_agent)

        self._seq = 0
        self._file: Any = None
        self._count = 0  # events in the open file
        self._size = 0  # its bytes: all whole lines
        self._torn = False  # it ends in part of a line that could not be cut off
        self._dirty = False
        self._sealing = defer.DeferredLock()  # one seal at a time, so batches queue in order
        self._seal_timer: Any = None
        self._syncer: task.LoopingCall | None = None
        self._io: set[defer.Deferred] = set()
        self._seals: list[defer.Deferred] | None = None  # seals begun by the running consume

    @property
    def batches(self) -> list[Batch]:
        """The sealed batches, oldest first."""
        return self.poster.batches

    @property
    def failures(self) -> int:
        """Failed attempts to post in a row."""
        return self.poster.failures

    # -- life cycle

    def startService(self) -> None:
        batches, self._seq = self.queue.recover(self._clock.seconds())
        if batches:
            log.info("webhook {name}: {n} batch(es) from before the restart to post",
                     name=self.config.name, n=len(batches))
        self._open_next()
        if self._fsync_interval > 0:
            self._syncer = task.LoopingCall(self._sync)
            self._syncer.clock = self._clock
            self._syncer.start(self._fsync_interval, now=False)
        super().startService()
        self.poster.start(batches)

    def stopService(self) -> defer.Deferred:
        """Stop posting; the open file stays behind, to be sealed at the next start."""
        super().stopService()
        self.poster.stop()
        if self._seal_timer is not None and self._seal_timer.active():
            self._seal_timer.cancel()
        self._seal_timer = None
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError:
                log.failure("webhook {name}: could not sync its open batch", name=self.config.name)
            self._file.close()
            self._file = None
        d = defer.DeferredList(list(self._io), consumeErrors=True)
        if self._pool is not None:
            d.addCallback(lambda _: self._pool.closeCachedConnections())
        return d

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        """Remember file work in a thread, so a stop can wait for it."""
        self._io.add(d)

        def done(result: Any) -> Any:
            self._io.discard(d)
            return result

        return d.addBoth(done)

    # -- collecting

    def consume(self, lines: Sequence[bytes]) -> defer.Deferred:
        """
        Queue the events of the log's ``lines``; fires with how many were taken, once durable.

        The events wanted are written at once; the result waits for the fsync
        of the open file and for any seal begun meanwhile, so the follower's
        cursor never passes an event that a crash could still lose. A write
        that fails ends the round before its event.
        """
        if not self.running:
            log.error("webhook {name}: {n} event(s) arrived while stopped; not queued",
                      name=self.config.name, n=len(lines))
            return defer.fail(RuntimeError(f"webhook {self.config.name} is not running"))
        taken = len(lines)
        seals: list[defer.Deferred] = []
        self._seals = seals
        try:
            for i, line in enumerate(lines):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    log.warn("webhook {name}: skipping a line of the event log that is not an "
                             "event: {line!r}", name=self.config.name, line=line[:80])
                    continue
                if not self.accept(event):
                    taken = i
                    break
        finally:
            self._seals = None
        d = defer.gatherResults([*seals, self._flush()], consumeErrors=True)

        def durable(outcomes: list[bool]) -> int:
            if not all(outcomes):
                raise OSError(errno.EIO, "the queued events could not be made durable")
            return taken

        return d.addCallback(durable)

    def accept(self, event: Event) -> bool:
        """Append the event's line if it is wanted: nothing that waits. False if it could not be."""
        if event.get("type") not in self.config.events:
            return True
        if not self.running:
            log.error("webhook {name}: event {event_id} arrived while stopped; not queued",
                      name=self.config.name, event_id=event.get("event_id"))
            return False
        line = envelope_line(event)
        if self._torn or (self._count and (
                self._count >= self.config.max_batch_size  # an earlier seal failed
                or self._size + len(line) + 1 > self.config.max_batch_bytes)):  # +1: "[" "]" less an LF
            self.seal()
        try:
            if self._torn:
                raise OSError(errno.EIO, "the batch file ends in a cut line and could not be sealed")
            if self._file is None:  # a seal could not open the next file; try again
                self._open_next()
            written = self._file.write(line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")
        except OSError as e:
            log.error("webhook {name}: could not queue event {event_id}: {error}",
                      name=self.config.name, event_id=event.get("event_id"), error=e)
            self._cut_back()
            return False
        self._size += len(line)
        self._dirty = True
        self._count += 1
        if self._count >= self.config.max_batch_size:
            self.seal()
        elif self._count == 1:
            self._arm_seal_timer()
        return True

    def _cut_back(self) -> None:
        """Take out what a failed write left of its line, so the next line starts on its own."""
        if self._file is None or self._torn:
            return
        try:
            os.ftruncate(self._file.fileno(), self._size)
        except OSError as e:
            log.error("webhook {name}: could not cut a partly written event out of batch file "
                      "{seq} ({error}); sealing it now, without that event", name=self.config.name,
                      seq=self._seq, error=e)
            self._torn = True
            self.seal()

    def _open_next(self) -> None:
        path = self.queue.open_path(self._seq)
        self._file = open(path, "ab", buffering=0)
        self._count = 0
        self._size = 0
        self._torn = False
        self._dirty = False

    def _sync(self) -> None:
        self._flush()

    def _flush(self) -> defer.Deferred:
        """Fsync the open file if it has unsynced lines; fires with whether it worked."""
        if self._file is None or not self._dirty:
            return defer.succeed(True)
        try:
            fd = os.dup(self._file.fileno())
        except OSError as e:  # not raised: that would stop the loop for good
            log.error("webhook {name}: fsync failed: {error}", name=self.config.name, error=e)
            return defer.succeed(False)
        self._dirty = False
        d = self._run(fsync_and_close, fd)

        def failed(failure: Failure) -> bool:
            self._dirty = True
            log.failure("webhook {name}: fsync failed", failure, name=self.config.name)
            return False

        return self._track(d.addCallbacks(lambda _: True, failed))

    def _arm_seal_timer(self) -> None:
        if self._seal_timer is None or not self._seal_timer.active():
            self._seal_timer = self._clock.callLater(self.config.batch_interval, self._seal_due)

    def _seal_due(self) -> None:
        self._seal_timer = None
        try:
            self.seal()
        except Exception:
            # Whatever went wrong, the batch must not wait for max_batch_size events.
            log.failure("webhook {name}: could not seal its batch; trying again in {delay:g}s",
                        name=self.config.name, delay=self.config.batch_interval)
            self._arm_seal_timer()

    def seal(self) -> None:
        """End the batch being collected (if it has events) and queue it for posting."""
        if self._seal_timer is not None and self._seal_timer.active():
            self._seal_timer.cancel()
        self._seal_timer = None
        if self._file is None or (self._count == 0 and not self._torn):
            return
        seq = self._seq
        try:
            fd = os.dup(self._file.fileno())
        except OSError as e:  # EMFILE: the events stay in the open file until the next try
            log.error("webhook {name}: could not seal batch file {seq} ({error}); trying again in "
                      "{delay:g}s", name=self.config.name, seq=seq, error=e,
                      delay=self.config.batch_interval)
            self._arm_seal_timer()
            return
        try:
            self._file.close()
        except OSError as e:  # the descriptor is closed even so; the seal syncs through fd
            log.error("webhook {name}: closing batch file {seq} failed: {error}",
                      name=self.config.name, seq=seq, error=e)
        self._file = None
        self._seq += 1
        try:
            self._open_next()
        except OSError:
            log.failure("webhook {name}: could not open its next batch file", name=self.config.name)
        sealed_at, batch_id = int(self._clock.seconds()), str(uuid.uuid4())
        outcome: defer.Deferred = defer.Deferred()  # whether its lines are on disk

        def sealing() -> defer.Deferred:
            # _sealed runs before the lock is released, so the next seal's batch comes after.
            d = self._run(self.queue.seal, seq, fd, sealed_at, batch_id)
            d.addCallbacks(self._sealed, self._seal_failed, errbackArgs=(seq,))

            def finished(result: Any) -> Any:
                outcome.callback(result is True)
                return result if isinstance(result, Failure) else None

            return d.addBoth(finished)

        if self._seals is not None:
            self._seals.append(outcome)
        self._track(self._sealing.run(sealing))

    def _sealed(self, batch: Batch | None) -> bool:
        if batch is None:  # nothing in it survived the check
            return True
        self.poster.add(batch)
        return True

    def _seal_failed(self, failure: Failure, seq: int) -> bool:
        log.failure("webhook {name}: could not seal batch {seq}; it is sealed at the next start",
                    failure, name=self.config.name, seq=seq)
        return False
