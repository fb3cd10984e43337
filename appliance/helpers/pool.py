"""
The owner's side of the helper processes (``[appliance] helpers``).

Each helper is a child started with the reactor's ``spawnProcess`` (a fork
followed at once by an exec of a fresh interpreter: nothing of the owner's
threads or state is copied), and speaks length-prefixed pickles of plain
values over its stdin and stdout (``frames``). Why not a
``ProcessPoolExecutor``: it breaks whole on one death, failing every job of
every worker without saying whose job killed it, and its children are not
the reactor's to watch. Here the reactor hears of each child's end
(``processEnded``) and each child answers its jobs in the order it got them,
so the job it died on is the oldest unanswered one: that job alone counts a
kill; the others are sent again as they were.

The prepared form of a message stays in the helper that made it (a
``PreparedCache``); what comes back to the owner is only what its injection
event needs (``PreparedFacts``), and its copies are sent to that helper:
the owner keeps an estimate of each helper's cache. A helper that lacks
the message (it was evicted, or the helper died) answers ``Missing`` and
the owner sends the message along, read again from the spool. So a message
is parsed once, crosses once, and its N copies are rendered where it is;
the owner never unpickles a prepared form, which would cost it about as
much as rendering a copy.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import appliance
from appliance.copywork import Kit, KitSettings, PreparedCache
from appliance.helpers.frames import FrameReader, frame

log = Logger()

# Jobs sent ahead to one helper: it starts the next as soon as it answers one, without
# waiting for a busy reactor to hear the answer. Kept small: a dead helper's jobs wait.
WINDOW = 4
# A job on which helpers ended this many times fails: its copy is deferred (a delay event).
MAX_KILLS = 2
# How long a stop waits for helpers to finish what they were sent before killing them.
STOP_TIMEOUT = 10.0
# Where the ``appliance`` package was imported from: the helper imports the same one.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(appliance.__file__)))


class ProcessReactor(Protocol):
    def spawnProcess(self, processProtocol: Any, executable: str, args: list[str],  # noqa: N802
                     env: dict[str, str] | None = None, path: str | None = None) -> Any: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,  # noqa: N802
                  **kwargs: Any) -> IDelayedCall: ...


class HelperCrashed(Exception):
    """A job on which helper processes ended ``MAX_KILLS`` times: it is not tried again."""


class HelperJobFailed(Exception):
    """An exception a job raised in a helper, by its type's name and message."""


@dataclass
class _Job:
    number: int
    name: str
    args: tuple
    done: defer.Deferred
    key: str = ""  # a prepare or copy job's message, which a helper may hold
    message: bytes | None = None  # a copy job's message, once it had to be read again
    source: Callable[[], defer.Deferred] | None = None  # reads it again (copy jobs)
    max_links: int = 0
    kills: int = 0
    ends: list[str] = field(default_factory=list)  # how the helpers it was on ended


class _Helper(ProcessProtocol):
    def __init__(self, pool: HelperPool, link_keys: tuple, cache: PreparedCache) -> None:
        self.pool = pool
        self.link_keys = link_keys  # the keys it was last given
        self.cache = cache  # the owner's mirror of what it holds
        self.in_flight: deque[_Job] = deque()
        self.answered = 0
        self.pid: int | None = None  # kept: the transport forgets it when the process ends
        self.ended: defer.Deferred = defer.Deferred()
        self._reader = FrameReader()
        self._errors = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        for number, ok, value in self._reader.feed(data):
            job = self.in_flight.popleft()
            assert job.number == number, "a helper answers its jobs in order"
            self.answered += 1
            self.pool._answered(self, job, ok, value)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        *lines, self._errors = (self._errors + data).split(b"\n")
        for line in lines:
            log.info("helper {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.pool._ended(self, reason)
        self.ended.callback(None)


class _Waiting:
    """
    Jobs not yet sent anywhere: copies and signatures before preparations.

    A helper keeps a message's prepared form for a while only (its cache).
    Queued behind every preparation that came meanwhile, the copies of a
    busy appliance found their message gone and had it prepared again: in a
    relay run of 1,200 messages, 1,170 copies were sent with their message.
    A copy finishes a message; a preparation starts one. But not for ever:
    a new message is neither announced nor delivered until it is prepared,
    so after ``PASS_OVER`` copies the waiting preparation goes next.
    """

    PASS_OVER = WINDOW

    def __init__(self) -> None:
        self._first: deque[_Job] = deque()
        self._then: deque[_Job] = deque()
        self._passed_over = 0  # copies sent while a preparation waited, since the last one went

    def _lane(self, job: _Job) -> deque[_Job]:
        return self._then if job.name == "prepare" else self._first

    def append(self, job: _Job) -> None:
        self._lane(job).append(job)

    def put_back(self, jobs: list[_Job]) -> None:
        """At the front again, in their order (each in its lane)."""
        for job in reversed(jobs):
            self._lane(job).appendleft(job)

    def heads(self) -> list[_Job]:
        """The job due next, then the other kind's first: it may go where the first cannot."""
        lanes = [self._first, self._then]
        if self._passed_over >= self.PASS_OVER:
            lanes.reverse()
        return [lane[0] for lane in lanes if lane]

    def take(self, job: _Job) -> None:
        """Take ``job``, one of ``heads()``, out to be sent."""
        lane = self._lane(job)
        assert lane[0] is job
        lane.popleft()
        if lane is self._then:
            self._passed_over = 0
        elif self._then:
            self._passed_over += 1

    def __len__(self) -> int:
        return len(self._first) + len(self._then)


class HelperPool(Service):
    """
    ``count`` helper processes that run ``copywork`` jobs; ``submit`` gives a job's Deferred.

    While no helper runs (between a helper that failed to start and its
    replacement, or once stopping), jobs run in the owner's threads through
    ``run``, as with ``helpers = 0``; except a job that already ended a helper:
    it waits for one, so it can never end the owner.
    """

    name = "helpers"

    def __init__(self, count: int, reactor: ProcessReactor, run: Callable[..., defer.Deferred],
                 codec: Any, signer: Any = None, max_size: int | None = None,
                 cache_entries: int = 64, cache_bytes: int = 64 * 1024 * 1024,
                 command: list[str] | None = None) -> None:
        self.count = count
        self.reactor = reactor
        self.run = run
        self.codec = codec
        self.signer = signer
        self.max_size = max_size
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.command = command or [sys.executable, "-m", "appliance.helpers.child"]
        self.helpers: list[_Helper] = []
        self.started = 0  # helpers started, replacements included
        # For /metrics, by kind: jobs sent to helpers, jobs run in the owner's threads; and
        # jobs that failed, by why.
        self.jobs_sent: Counter[str] = Counter()
        self.jobs_in_owner: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._waiting = _Waiting()
        self._numbers = 0
        self._stopping = False
        self._failed_starts = 0
        self._respawn: IDelayedCall | None = None
        self._fetching: dict[str, list[_Job]] = {}  # copy jobs whose message is being read, by message
        self._local = Kit.local(codec, signer, max_size)

    # -- the jobs -------------------------------------------------------------------------

    def prepare(self, key: str, message: bytes, max_links: int,
                recipients: list[tuple[Any, Any]]) -> defer.Deferred:
        """The message prepared and kept in a helper: its ``PreparedFacts`` for these recipients."""
        return self.submit("prepare", (key, message, max_links, recipients), key=key,
                           message=message)

    def copy(self, key: str, max_links: int, identity: Any, tracking: Any,
             source: Callable[[], defer.Deferred]) -> defer.Deferred:
        """
        A tracked copy rendered, given its List-Unsubscribe fields and signed, where its
        message is held; ``source`` reads the message again for a helper that lacks it.
        """
        return self.submit("copy", (identity, tracking), key=key, source=source, max_links=max_links)

    def sign(self, copy: bytes) -> defer.Deferred:
        return self.submit("sign", (copy,))

    def submit(self, name: str, args: tuple, key: str = "", message: bytes | None = None,
               source: Callable[[], defer.Deferred] | None = None, max_links: int = 0) -> defer.Deferred:
        self._numbers += 1
        job = _Job(self._numbers, name, args, defer.Deferred(), key, message, source, max_links)
        self._waiting.append(job)
        self._dispatch()
        return job.done

    def _dispatch(self) -> None:
        held: list[_Job] = []  # jobs that ended a helper, waiting for one to start
        try:
            while self._waiting:
                for job in self._waiting.heads():
                    helper = None if self._stopping else self._pick(job)
                    if helper is not None or not self.helpers or self._stopping:
                        break
                else:
                    # The helpers that could take either job have their windows full (a copy
                    # waits for the one holding its message): the next answer dispatches again.
                    return
                self._waiting.take(job)
                if helper is not None and self._needs_message(helper, job):
                    self._fetch(job)
                elif helper is not None:
                    self._send(helper, job)
                elif not job.kills:
                    self._run_here(job)
                elif self._stopping:
                    self._crashed(job)
                else:
                    held.append(job)
        finally:
            self._waiting.put_back(held)

    def _pick(self, job: _Job) -> _Helper | None:
        if job.name == "copy":  # where its message is, even if that one is busy: a parse costs more
            for helper in self.helpers:
                if job.key in helper.cache:
                    return helper if len(helper.in_flight) < WINDOW else None
        free = [h for h in self.helpers if len(h.in_flight) < WINDOW]
        return min(free, key=lambda h: len(h.in_flight)) if free else None

    @staticmethod
    def _needs_message(helper: _Helper | None, job: _Job) -> bool:
        return job.name == "copy" and job.message is None and (helper is None or job.key not in helper.cache)

    def _fetch(self, job: _Job) -> None:
        """Read a copy job's message again, once for all its copies waiting; queued again once read."""
        assert job.source is not None
        waiting = self._fetching.get(job.key)
        if waiting is not None:
            waiting.append(job)
            return
        waiting = self._fetching[job.key] = [job]

        def read(message: bytes) -> None:
            del self._fetching[job.key]
            for each in waiting:
                each.message = message
            self._waiting.put_back(waiting)
            self._dispatch()

        def failed(failure: Failure) -> None:
            del self._fetching[job.key]
            for each in waiting:
                each.done.errback(failure)

        defer.maybeDeferred(job.source).addCallbacks(read, failed)

    def _send(self, helper: _Helper, job: _Job) -> None:
        keys = self.codec.keyring.keys
        if helper.link_keys is not keys:  # re-read on SIGHUP since this helper last heard
            helper.link_keys = keys
            helper.transport.write(frame(("link_keys", keys)))
        args = job.args
        if job.name == "copy":
            if job.key in helper.cache:
                helper.cache.use(job.key)
                args = (job.key, None, job.max_links, *args)
            else:
                assert job.message is not None
                helper.cache.put(job.key, _estimate(job.message))
                args = (job.key, job.message, job.max_links, *args)
        elif job.name == "prepare":
            assert job.message is not None
            helper.cache.put(job.key, _estimate(job.message))
        helper.in_flight.append(job)
        self.jobs_sent[job.name] += 1
        helper.transport.write(frame(("job", job.number, job.name, args)))

    def _run_here(self, job: _Job) -> None:
        if self._needs_message(None, job):
            self._fetch(job)  # the owner keeps no prepared form: it prepares again
            return
        args = (job.key, job.message, job.max_links, *job.args) if job.name == "copy" else job.args
        self.jobs_in_owner[job.name] += 1
        d = self.run(self._local.run, job.name, args)
        d.chainDeferred(job.done)

    def _answered(self, helper: _Helper, job: _Job, ok: bool, value: Any) -> None:
        self._failed_starts = 0
        if not ok and value[0] == "Missing" and job.name == "copy" and job.message is None:
            helper.cache.discard(job.key)  # the estimate was wrong: it is sent with its message
            self._waiting.put_back([job])
            self._dispatch()
            return
        self._dispatch()
        if ok:
            job.done.callback(value)
            return
        kind, message, trace = value
        self.failures["failed"] += 1
        log.error("a helper's job {name} failed:\n{trace}", name=job.name, trace=trace)
        job.done.errback(HelperJobFailed(f"{kind}: {message}"))

    def _crashed(self, job: _Job) -> None:
        self.failures["crashed"] += 1
        log.error("helper processes ended {n} times while making one {name} job ({how}); it is not "
                  "tried again", n=len(job.ends), name=job.name, how=", ".join(job.ends) or "stopping")
        job.done.errback(HelperCrashed(
            f"helper processes ended {len(job.ends)} times on it ({', '.join(job.ends)})"))

    @property
    def restarts(self) -> int:
        """Helpers started to replace one that ended."""
        return max(0, self.started - self.count)

    @property
    def waiting(self) -> int:
        """Jobs not yet sent anywhere: their helpers' windows are full, or their message is being read."""
        return len(self._waiting) + sum(len(jobs) for jobs in self._fetching.values())

    # -- the processes -----------------------------------------------------------------------

    def _ended(self, helper: _Helper, reason: Failure) -> None:
        self.helpers.remove(helper)
        value = reason.value
        signal = getattr(value, "signal", None)
        how = f"signal {signal}" if signal else f"exit code {getattr(value, 'exitCode', 0)}"
        jobs = list(helper.in_flight)
        helper.in_flight.clear()
        if not self._stopping or jobs:
            log.warn("helper {pid} ended ({how}) with {n} job(s) unanswered",
                     pid=helper.pid, how=how, n=len(jobs))
        # A helper that ended by itself before answering anything could not start (a broken
        # install, say): its jobs are not to blame, and it is replaced after a pause.
        could_not_start = not signal and helper.answered == 0
        crashed = None
        if jobs and not could_not_start:
            culprit = jobs[0]
            culprit.kills += 1
            culprit.ends.append(how)
            if culprit.kills >= MAX_KILLS:
                crashed = jobs.pop(0)
        self._waiting.put_back(jobs)
        if not self._stopping:
            if could_not_start and not isinstance(value, error.ProcessDone):
                self._failed_starts += 1
                delay = min(30.0, 0.5 * 2 ** self._failed_starts)
                log.error("helper {pid} could not start ({how}); another in {delay:.0f} s, the "
                          "owner's threads work meanwhile", pid=helper.pid, how=how, delay=delay)
                self._respawn = self.reactor.callLater(delay, self._replace)
            else:
                self._spawn()
        self._dispatch()
        if crashed is not None:  # last: its callbacks find the pool whole again
            self._crashed(crashed)

    def _replace(self) -> None:
        self._respawn = None
        if not self._stopping:
            self._spawn()
            self._dispatch()

    def _spawn(self) -> None:
        keys = self.codec.keyring.keys
        helper = _Helper(self, keys, PreparedCache(self.cache_entries, self.cache_bytes))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SOURCE_ROOT, env.get("PYTHONPATH", "")) if p)
        process = self.reactor.spawnProcess(helper, self.command[0], [*self.command, str(os.getpid())],
                                            env=env)
        helper.pid = process.pid
        self.started += 1
        settings = KitSettings.of(self.codec, self.signer, self.max_size, self.cache_entries,
                                  self.cache_bytes)
        helper.transport.write(frame(("settings", settings)))
        self.helpers.append(helper)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._stopping = False
        for _ in range(self.count):
            self._spawn()

    @defer.inlineCallbacks
    def stopService(self) -> Any:  # noqa: N802
        """Each helper answers what it was sent, sees its stdin close and ends."""
        super().stopService()
        self._stopping = True
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None
        helpers = list(self.helpers)
        for helper in helpers:
            helper.transport.closeStdin()
        late = self.reactor.callLater(STOP_TIMEOUT, self._kill, helpers)
        yield defer.DeferredList([h.ended for h in helpers])
        if late.active():
            late.cancel()
        self._dispatch()

    @staticmethod
    def _kill(helpers: list[_Helper]) -> None:
        for helper in helpers:
            try:
                helper.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass


def _estimate(message: bytes) -> int:
    """About what a message's prepared form takes in a helper (``footprint`` there knows)."""
    return 4 * len(message)
