"""
Webhooks: the event log's events, batched and POSTed to HTTP receivers as SparkPost does.

Each ``[[webhooks]]`` table gets a queue directory, ``<spool>/webhooks/<name>/``::

    cursor                                        how far into the event log it has read
    0000000007.open                               events being collected, one line each
    0000000006.1767225600.<batch id>.batch        sealed: waiting to be posted
    0000000005-01.1767225000.<batch id>.batch     the second half of the first half of batch 5,
                                                  which the receiver refused as too large

A webhook reads the event log through a ``Follower`` (``appliance.follower``),
from its own cursor. Each event it wants is appended to the ``.open`` file as
the JSON line it will be in the batch (``{"msys": {"message_event": {...}}}``),
with one ``write``; once the lines of a round are written, the file is fsynced
(and any batch sealed meanwhile has been) before the cursor moves past them. So
a crash repeats events rather than losing them. A line that could be written
only in part (a full disk) is cut off again at once, and the cursor stops
before its event, which is offered again at the follower's next poll. A
batch is sealed when it has ``max_batch_size`` events, when the next event would
take its body past ``max_batch_bytes``, or ``batch_interval`` after its first
one: the file is fsynced, every line is checked (a broken one is dropped, so a
batch is always valid JSON) and it is renamed to its ``.batch`` name, which
carries the time it was sealed and its batch id. The rename is the whole
commit, so an event is in exactly one batch and a batch's body and id never
change: a receiver that sees the same ``X-MessageSystems-Batch-ID`` twice may
drop the second. Seals run in a thread, one at a time per webhook, so batches
are queued in the order they were sealed. At start-up every ``.open`` file left
by the last run is sealed. A webhook without a cursor (new, or a queue written
before cursors existed, which already holds every earlier event) starts at the
end of the event log.

One batch per webhook is in flight at a time, oldest first; its file is removed
after a ``2xx``. Anything else (another status, no connection, no answer within
``timeout``) puts the webhook into back-off, ``retry_initial`` doubling up to
``retry_max``; after a failed attempt, batches sealed more than
``retry_lifetime`` ago are dropped with an error in the operational log. A
``413`` is not a failure but an answer about size: the batch is split into two
halves, each a batch with its own id in the batch's place, and they are posted
at once; a single event refused with ``413`` is dropped with an error. Nothing
here runs inside the SMTP or HTTP request paths but the append.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, ssl, task, threads
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from appliance.config import WebhookConfig
from appliance.events import Event, encode_event
from appliance.eventtypes import event_class
from appliance.files import fsync_and_close, fsync_directory, fsync_path, write_synced
from appliance.follower import Follower
from appliance.reactors import Reactor
from appliance.retry import RetrySchedule

log = Logger()

Runner = Callable[..., defer.Deferred]

# -- SparkPost's envelope --------------------------------------------------------------

def envelope_line(event: Event) -> bytes:
    """The event as one batch element, ``{"msys": {"<class>": event}}``, LF-terminated."""
    return encode_event({"msys": {event_class(event["type"]): event}})


def batch_body(lines: bytes) -> tuple[bytes, int]:
    """The POST body for a batch file's lines, and its number of events."""
    items = lines.rstrip(b"\n").split(b"\n") if lines.strip() else []
    return b"[" + b",".join(items) + b"]", len(items)


# -- the queue directory ---------------------------------------------------------------

_OPEN_RE = re.compile(r"(\d{10})\.open")
_BATCH_RE = re.compile(r"(\d{10})(?:-([01]+))?\.(\d+)\.([0-9a-f-]{36})\.batch")
CURSOR = "cursor"  # the follower's; it writes it through cursor.tmp<pid>


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
            elif name == CURSOR:
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


# -- HTTP ------------------------------------------------------------------------------


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Prefix(Protocol):
    """Keeps the start of a response body for the log and discards the rest."""

    limit = 200

    def __init__(self, finished: defer.Deferred) -> None:
        self.finished = finished
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]

    def connectionLost(self, reason: Failure) -> None:
        # A body cut short does not change the status the receiver already gave.
        if not self.finished.called:  # not cancelled
            self.finished.callback(self.data)


def read_prefix(response: IResponse) -> defer.Deferred:
    """The first bytes of ``response``'s body; cancelling closes the connection."""

    def cancel(_: defer.Deferred) -> None:
        abort = getattr(protocol.transport, "abortConnection", None)
        if abort is not None:
            abort()

    d: defer.Deferred = defer.Deferred(cancel)
    protocol = _Prefix(d)
    response.deliverBody(protocol)
    return d


@implementer(IPolicyForHTTPS)
class TrustFile:
    """HTTPS that trusts only the certificates of one PEM file (a private CA, a self-signed receiver)."""

    def __init__(self, trust: ssl.IOpenSSLTrustRoot) -> None:
        self._trust = trust

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def _describe_failure(failure: Failure) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer in time"
    message = failure.getErrorMessage()
    reasons = getattr(failure.value, "reasons", None)  # ResponseNeverReceived and friends
    if reasons:
        message = "; ".join(r.getErrorMessage() for r in reasons)
    return f"{failure.type.__name__}: {message}" if message else failure.type.__name__


# -- the service -----------------------------------------------------------------------


class WebhookService(Service):
    """
    One webhook: collects its events into batches on disk and posts them.

    A ``Consumer`` of the event log: its follower hands ``consume`` the log's
    lines, and ``accept`` appends the line of each wanted event.
    ``clock``, ``agent`` and ``run`` are injected so tests drive time, HTTP
    and the file system calls that would block.
    """

    def __init__(self, config: WebhookConfig, directory: str, clock: Reactor,
                 agent: Any = None, run: Runner = threads.deferToThread,
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
        self.schedule = RetrySchedule(config.retry_initial, config.retry_max)
        self._clock = clock
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(clock, persistent=False)
            tls = {"contextFactory": TrustFile(trust)} if trust is not None else {}
            agent = Agent(clock, connectTimeout=config.timeout, pool=self._pool, **tls)
        self._agent = agent
        self._run = run
        self._fsync_interval = fsync_interval
        self._user_agent = user_agent
        self._target = config.target.encode("ascii")

        self.batches: list[Batch] = []  # sealed, oldest first
        self._seq = 0
        self._file: Any = None
        self._count = 0  # events in the open file
        self._size = 0  # its bytes: all whole lines
        self._torn = False  # it ends in part of a line that could not be cut off
        self._dirty = False
        self._sealing = defer.DeferredLock()  # one seal at a time, so batches queue in order
        self._seal_timer: Any = None
        self._syncer: task.LoopingCall | None = None
        self._inflight: defer.Deferred | None = None
        self._retry_timer: Any = None
        self.failures = 0  # failed attempts in a row
        self._io: set[defer.Deferred] = set()
        self._seals: list[defer.Deferred] | None = None  # seals begun by the running consume

    # -- life cycle

    def startService(self) -> None:
        self.batches, self._seq = self.queue.recover(self._clock.seconds())
        if self.batches:
            log.info("webhook {name}: {n} batch(es) from before the restart to post",
                     name=self.config.name, n=len(self.batches))
        self._open_next()
        if self._fsync_interval > 0:
            self._syncer = task.LoopingCall(self._sync)
            self._syncer.clock = self._clock
            self._syncer.start(self._fsync_interval, now=False)
        super().startService()
        self._kick()

    def stopService(self) -> defer.Deferred:
        """Stop posting; the open file stays behind, to be sealed at the next start."""
        super().stopService()
        for timer in (self._seal_timer, self._retry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._seal_timer = self._retry_timer = None
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._inflight is not None:
            self._inflight.cancel()
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
        self.batches.append(batch)
        self.batches.sort(key=lambda b: b.order)
        self._kick()
        return True

    def _seal_failed(self, failure: Failure, seq: int) -> bool:
        log.failure("webhook {name}: could not seal batch {seq}; it is sealed at the next start",
                    failure, name=self.config.name, seq=seq)
        return False

    # -- posting

    def _kick(self) -> None:
        if not self.running or self._inflight is not None or self._retry_timer is not None:
            return
        if not self.batches:
            return
        batch = self.batches[0]
        d = self._run(self.queue.read, batch)
        d.addCallback(self._post, batch)
        self._inflight = d
        d.addBoth(self._posted, batch)

    def _post(self, lines: bytes, batch: Batch) -> defer.Deferred:
        body, count = batch_body(lines)
        headers = Headers({
            b"Content-Type": [b"application/json"],
            b"User-Agent": [self._user_agent],
            b"X-MessageSystems-Batch-ID": [batch.batch_id.encode("ascii")],
        })
        if self.config.auth_token:
            headers.addRawHeader(b"X-MessageSystems-Webhook-Token",
                                 self.config.auth_token.encode("ascii"))
        d = self._agent.request(b"POST", self._target, headers, BytesProducer(body))

        def answered(response: IResponse) -> defer.Deferred:
            return read_prefix(response).addCallback(
                lambda prefix: (response.code, response.phrase, prefix, count))

        d.addCallback(answered)
        d.addTimeout(self.config.timeout, self._clock)
        return d

    def _posted(self, result: Any, batch: Batch) -> None:
        self._inflight = None
        if not self.running:
            return  # stopped mid-attempt: the batch is posted again after the next start
        if isinstance(result, Failure):
            if result.check(FileNotFoundError):
                self.batches.remove(batch)
                log.error("webhook {name}: batch file {path} has disappeared; its events are lost",
                          name=self.config.name, path=batch.path)
                self._kick()
                return
            self._failed(batch, _describe_failure(result))
            return
        code, phrase, prefix, count = result
        if 200 <= code < 300:
            if self.failures:
                log.info("webhook {name}: {target} accepts batches again after {n} failure(s)",
                         name=self.config.name, target=self.config.target, n=self.failures)
            self.failures = 0
            self.batches.remove(batch)
            self._remove(batch, "posted")
            self._kick()
            return
        text = prefix.decode("utf-8", "replace").strip().replace("\n", " ")
        why = f"HTTP {code} {phrase.decode('latin-1')}" + (f": {text}" if text else "")
        if code == 413:
            self._too_large(batch, count, why)
            return
        self._failed(batch, why)

    def _too_large(self, batch: Batch, count: int, why: str) -> None:
        """413: post the batch as two halves, at once; a batch of one event cannot be halved."""
        if count <= 1:
            self.batches.remove(batch)
            log.error("webhook {name}: dropping batch {batch_id}: {target} refuses its one event "
                      "as too large ({why})", name=self.config.name, batch_id=batch.batch_id,
                      target=self.config.target, why=why)
            self._remove(batch, "refused")
            self._kick()
            return
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        d = self._run(self.queue.split, batch, first, second)
        self._inflight = d

        def split(halves: tuple[Batch, Batch]) -> None:
            self._inflight = None
            if not self.running:
                return
            i = self.batches.index(batch)
            self.batches[i:i + 1] = halves
            log.warn("webhook {name}: {target} refuses batch {batch_id} of {count} events as too "
                     "large ({why}); posting it as two batches, {first} and {second}",
                     name=self.config.name, target=self.config.target, batch_id=batch.batch_id,
                     count=count, why=why, first=first, second=second)
            self._kick()

        def not_split(failure: Failure) -> None:
            self._inflight = None
            if not self.running:
                return
            log.failure("webhook {name}: could not split batch {batch_id}", failure,
                        name=self.config.name, batch_id=batch.batch_id)
            self._failed(batch, f"{why}; could not split it")

        d.addCallbacks(split, not_split)
        self._track(d)

    def _failed(self, batch: Batch, why: str) -> None:
        self.failures += 1
        now = self._clock.seconds()
        lifetime = self.config.retry_lifetime
        for old in [b for b in self.batches if now >= b.sealed_at + lifetime]:
            self._drop(old, why)
        if not self.batches:
            return
        head = self.batches[0]
        delay = min(self.schedule.delay(self.failures), head.sealed_at + lifetime - now)
        log.warn("webhook {name}: batch {batch_id} not accepted by {target} ({why}); "
                 "next attempt in {delay:g}s", name=self.config.name, batch_id=batch.batch_id,
                 target=self.config.target, why=why, delay=delay)
        self._retry_timer = self._clock.callLater(max(delay, 0.0), self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._kick()

    def _drop(self, batch: Batch, why: str) -> None:
        self.batches.remove(batch)
        log.error("webhook {name}: dropping batch {batch_id} (sealed at {sealed_at}): not accepted "
                  "by {target} within {hours:g} hours; last answer: {why}", name=self.config.name,
                  batch_id=batch.batch_id, sealed_at=batch.sealed_at, target=self.config.target,
                  hours=self.config.retry_lifetime / 3600, why=why)
        self._remove(batch, "dropped")

    def _remove(self, batch: Batch, what: str) -> None:
        d = self._run(self.queue.remove, batch)
        d.addErrback(lambda f: log.failure(
            "webhook {name}: could not remove {what} batch {batch_id}; it will be posted again "
            "after a restart", f, name=self.config.name, what=what, batch_id=batch.batch_id))
        self._track(d)


class Webhooks(MultiService):
    """
    Every configured webhook, each with its queue under ``root`` and its follower of the log.

    The followers are added after the webhooks, so they start once every
    queue is recovered and are stopped first.
    """

    name = "webhooks"

    def __init__(self, configs: tuple[WebhookConfig, ...], root: str, log_path: str,
                 clock: Reactor, run: Runner = threads.deferToThread, poll_interval: float = 1.0,
                 trust: Mapping[str, ssl.IOpenSSLTrustRoot] | None = None, **kwargs: Any) -> None:
        """``trust``: each webhook's ``tls_ca_file`` roots, by webhook name."""
        super().__init__()
        self.root = root
        self.webhooks: list[WebhookService] = []
        self.followers: list[Follower] = []
        for config in configs:
            svc = WebhookService(config, os.path.join(root, config.name), clock=clock, run=run,
                                 trust=(trust or {}).get(config.name), **kwargs)
            svc.setServiceParent(self)
            self.webhooks.append(svc)
        for svc in self.webhooks:
            follower = Follower(log_path, svc, clock, run=run, poll_interval=poll_interval)
            follower.setServiceParent(self)
            self.followers.append(follower)

    def wake(self) -> None:
        """The event log was written to: each follower reads it."""
        for follower in self.followers:
            follower.wake()

    def startService(self) -> None:
        if os.path.isdir(self.root):
            known = {svc.config.name for svc in self.webhooks}
            for name in sorted(set(os.listdir(self.root)) - known):
                left = os.path.join(self.root, name)
                if os.path.isdir(left) and set(os.listdir(left)) - {CURSOR}:
                    log.warn("{path} holds batches of a webhook that is no longer configured; "
                             "they are not posted", path=left)
        super().startService()
