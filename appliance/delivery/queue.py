"""
The delivery queue: which copy is tried when, over which connection, and what is written after.

Every copy the spool says is not final is a ``Job``. A job waits on a timer
(its next attempt), then joins the ready list of its *destination* (a route,
the smarthost, or a recipient domain). Each destination opens sessions, up to
its concurrency limit and within the total limit; a session resolves the
destination into hops, tries them in order until one holds an SMTP session,
and then carries ready jobs of its destination one after another, ``RSET`` in
between, until none is left. It then stays open, idle, for
``connection_reuse_time`` (Postfix's connection cache): the destination's next
copy goes to an idle connection before any new one is opened, and an idle
connection still counts toward both limits. Each connection to a hop is a ``_HopAttempt``
(``attempt``); this module decides when and where one is made.

A destination that has not yet shown itself reachable gets one session at a
time: a dead domain costs one failing connection per retry round, not one
per copy, and when no hop can be reached every copy waiting for it is
deferred together, with the reason of the last hop.

Every outcome is written as an event *before* the spool's journal records
it, so a crash can repeat an attempt but never lose one; a copy leaves the
spool only once its final event is written.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.config import DeliveryConfig
from appliance.delivery.attempt import _HopAttempt
from appliance.delivery.client import ClientFactory, DeliveryClient
from appliance.delivery.operations import ADMIN_FAILURE, DELETED, OperatorActions
from appliance.delivery.outcome import (
    BOUNCE,
    DELAY,
    DELIVERY,
    Outcome,
    internal,
)
from appliance.delivery.routing import Destination, Hop, HopFinder, NoHops, Router
from appliance.envelope import QueuedMessage
from appliance.events import EventLog
from appliance.eventtypes import delivery_event
from appliance.reactors import Reactor
from appliance.retry import RetrySchedule
from appliance.spool import Spool

log = Logger()

# A copy at once, or a Deferred of it while its message is read or parsed elsewhere.
CopyRenderer = Callable[[QueuedMessage, int], bytes | defer.Deferred]

# Copies given one outcome together (a destination that cannot be reached) are settled this
# many per turn of the reactor: each writes an event and queues a journal line, and a
# thousand at once would hold up every connection for most of a second.
SETTLE_SLICE = 100


class Job:
    """One recipient's copy while it is not final."""

    __slots__ = ("queued", "index", "data", "destination", "deleting")

    def __init__(self, queued: QueuedMessage, index: int) -> None:
        self.queued = queued
        self.index = index
        self.data = b""  # the rendered copy, only while it is being sent
        self.destination: Destination | None = None
        self.deleting = False  # an operator deleted it while it was being tried

    @property
    def key(self) -> tuple[str, int]:
        return self.queued.envelope.transmission_id, self.index

    @property
    def mail_from(self) -> str:
        return self.queued.envelope.mail_from

    @property
    def address(self) -> str:
        return self.queued.envelope.recipients[self.index].address

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


class _Brief:
    """
    What stays in memory of a recipient while every live copy of its message waits:
    enough to list and route the copy. Its details (metadata, tags, tracking
    settings) are read back from the spool entry when a copy is due.
    """

    __slots__ = ("address", "message_id")

    def __init__(self, address: str, message_id: str) -> None:
        self.address = address
        self.message_id = message_id


class _Queue:
    """The jobs of one destination that are due, and its sessions."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.ready: deque[Job] = deque()
        self.sessions = 0  # resolving, connecting or connected
        self.connected = 0  # sessions past EHLO (and STARTTLS and AUTH)
        self.busy = 0  # sessions in the middle of a transaction
        self.closing = 0  # sessions whose connection takes no more copies (``_HopAttempt._retire``)
        self.healthy = False  # a session got through since the last failure
        self.idle: list[_HopAttempt] = []  # connections waiting for a copy, the last to wait last

    def wants_session(self, limit: int) -> bool:
        allowed = limit if self.healthy else 1
        idle = self.sessions - self.busy - self.closing
        return bool(self.ready) and self.sessions < allowed and len(self.ready) > idle


class DeliveryService(OperatorActions, Service):
    name = "delivery"
    stop_grace = 10.0  # seconds a stop waits for transactions in flight before cutting them off

    def __init__(
        self,
        config: DeliveryConfig,
        spool: Spool,
        events: EventLog,
        render: CopyRenderer,
        router: Router,
        helo_name: str,
        reactor: Reactor,
        clock: IReactorTime | None = None,
        resolver: Any = None,
        rng: Any = None,
        mx_port: int = 25,
        on_message_done: Callable[[str], None] | None = None,
        trust: ssl.IOpenSSLTrustRoot | None = None,
    ) -> None:
        """``trust``: the roots of ``config.tls_ca_file``, as the builder loaded them."""
        self.config = config
        self.spool = spool
        self.events = events
        self.render = render
        self.router = router
        self.on_message_done = on_message_done  # called with its transmission_id: every copy is final
        self.helo_name = helo_name.encode("idna")
        self.reactor = reactor  # connectTCP
        self.clock = clock or reactor  # callLater, seconds: timers, timeouts, queue times
        self.hop_finder = HopFinder(config, resolver, rng, mx_port, reactor=reactor)
        self._jobs: dict[tuple[str, int], Job] = {}
        self._timers: dict[tuple[str, int], Any] = {}
        self._queues: dict[str, _Queue] = {}
        self._connections = 0
        self._sessions: set[defer.Deferred] = set()
        self._settling: set[defer.Deferred] = set()
        self._clients: set[DeliveryClient | None] = set()  # connected, for a stop to cut off
        self._plain_tls = ssl.CertificateOptions()
        # What a checked certificate is checked against, read once by the builder. Checked
        # are every server's with tls_verify, and the smarthost's whenever it gets credentials.
        if config.tls_ca_file and trust is None:
            raise ValueError(f"delivery.tls_ca_file {config.tls_ca_file} is set, but its trust roots "
                             "were not given (appliance.build loads them)")
        self._trust: Any = None
        if config.tls_verify or config.smarthost_username:
            self._trust = trust or ssl.platformTrust()
        self._pump_call: Any = None  # a _pump() due once the current call stack has unwound
        self._reclaimed: set[_HopAttempt] = set()  # idle connections closing for other destinations
        # Copies given one outcome together, settled SETTLE_SLICE per turn (``_fail_ready``).
        self._failing: deque[tuple[Job, Outcome]] = deque()
        self._fail_call: Any = None
        self._held: dict[tuple[str, int], Job] = {}  # held copies with no attempt under way
        # Messages whose recipients' details are on disk only (``_rest``), and reads of them back.
        self._resting: set[str] = set()
        self._loading: dict[str, list[defer.Deferred]] = {}

    def now(self) -> float:
        return self.clock.seconds()

    # -- the schedule ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        recovered = 0
        for queued in self.spool.recover():
            recovered += 1
            self.enqueue(queued)
        if recovered:
            log.info("picked up {n} spooled message(s) from before the restart", n=recovered)

    def stopService(self) -> defer.Deferred:
        """Stop starting anything; wait for transactions in flight, cut them off after ``stop_grace``."""
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        if self._fail_call is not None and self._fail_call.active():
            self._fail_call.cancel()  # the copies not settled yet are tried again after a restart
        self._fail_call = None
        for queue in self._queues.values():
            for attempt in list(queue.idle):
                attempt.close_idle()  # nothing more will come for them: QUIT now

        def cut_off() -> None:
            for client in list(self._clients):
                if client is not None and client.transport is not None:
                    client.transport.abortConnection()

        timer = self.clock.callLater(self.stop_grace, cut_off)
        waiting = defer.DeferredList(list(self._sessions), consumeErrors=True)
        waiting.addCallback(lambda _: self.spool.stop_batching())  # removals made durable now
        waiting.addCallback(lambda _: defer.DeferredList(list(self._settling), consumeErrors=True))
        waiting.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return waiting

    def enqueue(self, queued: QueuedMessage) -> None:
        """Schedule every copy of ``queued`` that is not final (and not scheduled already)."""
        for index, state in enumerate(queued.states):
            job = Job(queued, index)
            if state.done or job.key in self._jobs:
                continue
            self._jobs[job.key] = job
            if state.held:  # a held copy waits for its release, with no timer
                self._held[job.key] = job
            else:
                self._schedule(job, max(0.0, state.next_attempt - self.now()))

    def depth_by_destination(self) -> dict[str, int]:
        """
        Copies not yet final, by destination (a route, the smarthost, or a recipient domain).

        Read only, for the admin listener's metrics; a copy waiting for its next
        attempt counts towards the destination it will join.
        """
        depth: dict[str, int] = {}
        keys: dict[str, str] = {}  # by recipient domain: one routing decision per domain
        for job in self._jobs.values():
            if job.destination is not None:
                key = job.destination.key
            else:
                domain = job.domain
                key = keys.get(domain) or keys.setdefault(domain, self.router.destination(domain).key)
            depth[key] = depth.get(key, 0) + 1
        return depth

    def _schedule(self, job: Job, delay: float) -> None:
        self._timers[job.key] = self.clock.callLater(delay, self._due, job)

    def _due(self, job: Job) -> None:
        self._timers.pop(job.key, None)
        loading = self._details(job.queued)
        if loading is None:
            self._ready(job)
        else:
            loading.addCallbacks(lambda _: self._ready(job), self._unreadable, errbackArgs=(job,))

    def _ready(self, job: Job) -> None:
        """A due copy (its details in memory) joins its destination's ready list."""
        if job.deleting:
            self._settle(job, DELETED, attempted=False)
            return
        if job.queued.states[job.index].held:
            self._held[job.key] = job  # held while it was being tried: it waits for its release
            return
        problem = self.router.undeliverable(job.domain)
        if problem:  # refused at RCPT nowadays, but the spool may hold older mail
            self._settle(job, internal(550, "5.1.2", problem))
            return
        destination = self.router.destination(job.domain)
        job.destination = destination
        queue = self._queues.get(destination.key)
        if queue is None:
            queue = self._queues[destination.key] = _Queue(destination)
        queue.ready.append(job)
        if queue.idle:
            # The connection that waited least goes on; the others run out their reuse time.
            queue.idle[-1].wake()
        self._pump()

    def _pump(self) -> None:
        """Open sessions where jobs wait, fairly across destinations, within both limits."""
        if not self.running:
            return
        limit = self.config.max_connections_per_destination
        opened = True
        while opened and self._connections < self.config.max_connections:
            opened = False
            for queue in list(self._queues.values()):
                if self._connections >= self.config.max_connections:
                    break
                if queue.wants_session(limit):
                    self._open_session(queue)
                    opened = True
        if self._connections >= self.config.max_connections:
            self._reclaim_idle(limit)

    def _reclaim_idle(self, limit: int) -> None:
        """
        At the total limit, close idle connections of destinations with nothing waiting, one
        for each destination that waits for a connection: an idle connection must not keep
        another destination's copies waiting for its reuse time.
        """
        wanting = sum(1 for q in self._queues.values() if q.wants_session(limit))
        self._reclaimed = {a for a in self._reclaimed if not a.done.called}
        for queue in list(self._queues.values()):
            if queue.ready:
                continue
            for attempt in list(queue.idle):
                if len(self._reclaimed) >= wanting:
                    return
                self._reclaimed.add(attempt)
                attempt.close_idle()

    def _open_session(self, queue: _Queue) -> None:
        queue.sessions += 1
        self._connections += 1
        try:
            d = self._session(queue)
        except Exception:
            d = defer.fail()  # counted above, so it must end like any other session
        self._sessions.add(d)
        d.addErrback(self._session_crashed, queue)
        d.addBoth(self._session_ended, queue, d)

    def _session_crashed(self, failure: Failure, queue: _Queue) -> None:
        """A session that raised (a bug, a CA file gone bad) defers what waits, as a failed hop would."""
        key = queue.destination.key
        log.failure("delivery session for {key} crashed", failure, key=key)
        queue.healthy = False  # one session at a time until one gets through again
        if queue.connected:
            return  # other connections to this destination work: they take the waiting copies
        self._fail_ready(queue, internal(451, "4.3.0", f"delivery to {key} failed: "
                                         f"{failure.type.__name__}: {failure.getErrorMessage()}"))

    def _session_ended(self, _: object, queue: _Queue, d: defer.Deferred) -> None:
        self._sessions.discard(d)
        queue.sessions -= 1
        self._connections -= 1
        if not queue.ready and not queue.sessions:
            self._queues.pop(queue.destination.key, None)
        # Not ``_pump()`` here: a session that ends at once (it failed before it could
        # wait for anything) would open the next one inside this call, and so on down.
        self._pump_soon()

    def _pump_soon(self) -> None:
        if self.running and self._pump_call is None and any(q.ready for q in self._queues.values()):
            self._pump_call = self.clock.callLater(0, self._pump_later)

    def _pump_later(self) -> None:
        self._pump_call = None
        self._pump()

    # -- what a hop attempt reports (AttemptOwner) ---------------------------------

    def delivering(self) -> bool:
        return bool(self.running)

    def client_connected(self, client: DeliveryClient) -> None:
        self._clients.add(client)

    def client_closed(self, client: DeliveryClient | None) -> None:
        self._clients.discard(client)

    def destination_reachable(self) -> None:
        self._pump()

    def connection_retiring(self) -> None:
        # Soon, not now: a connection retires from inside _pump too (``_reclaim_idle``).
        self._pump_soon()

    def settle(self, job: Job, outcome: Outcome) -> None:
        self._settle(job, outcome)

    def requeue(self, job: Job) -> None:
        self._due(job)

    # -- one session: resolve, then try each hop until one takes mail ------------

    @defer.inlineCallbacks
    def _session(self, queue: _Queue) -> Any:
        try:
            hops = yield self.hop_finder.hops(queue.destination)
        except NoHops as e:
            queue.healthy = False
            self._fail_ready(queue, e.outcome)
            return
        last: Outcome | None = None
        auth = self._uses_auth(queue.destination)
        for hop in hops:
            if not self.running or not queue.ready:
                return
            result = yield self._connect(queue, hop, tls=self.config.tls != "none")
            if result.tls_failed and self.config.tls == "opportunistic" and not result.established:
                if auth:
                    # Without TLS the password would cross the wire in the clear, to whoever
                    # stripped STARTTLS from the server's answer: the copies wait instead.
                    result.outcome = _no_plaintext_auth(result.outcome)
                else:
                    log.info("TLS with {hop} failed; trying it again without TLS", hop=str(hop))
                    result = yield self._connect(queue, hop, tls=False)
            if result.established:
                return
            last = result.outcome
            if last is not None:
                log.info("{hop}: {reason}", hop=str(hop), reason=last.raw_reason)
        if last is None:
            return  # stopped, or nothing left to send
        if queue.connected:
            return  # other connections to this destination work: they take the waiting copies
        queue.healthy = False
        if len(hops) > 1:
            last = Outcome(DELAY, last.code, f"{last.raw_reason} (and {len(hops) - 1} other "
                           f"address(es) of {queue.destination.domain} failed too)",
                           last.ip_address, last.tls, last.sending_ip)
        self._fail_ready(queue, last.with_kind(DELAY))

    def _uses_auth(self, destination: Destination) -> bool:
        return destination.smarthost and bool(self.config.smarthost_username)

    def _connect(self, queue: _Queue, hop: Hop, tls: bool) -> defer.Deferred:
        attempt = _HopAttempt(self, queue, hop, self.config.max_messages_per_connection,
                              self.clock, self.config.connection_reuse_time)
        # Credentials go only on a connection that is to start TLS, and that one must:
        # AUTH before (or without) STARTTLS would show the password to the network.
        auth = tls and self._uses_auth(queue.destination)
        factory = ClientFactory(
            attempt,
            identity=self.helo_name,
            context=self._tls_context(hop, verify=auth) if tls else None,
            clock=self.clock,
            command_timeout=self.config.command_timeout,
            data_timeout=self.config.data_timeout,
            username=self.config.smarthost_username.encode() if auth else None,
            password=self.config.smarthost_password.encode() if auth else None,
            require_tls=tls and (self.config.tls == "required" or auth),
        )
        self.reactor.connectTCP(hop.address, hop.port, factory, timeout=self.config.connect_timeout)
        return attempt.done

    def _tls_context(self, hop: Hop, verify: bool = False) -> Any:
        """
        Unverified TLS (Postfix's ``may``) unless ``delivery.tls_verify`` asks for a checked name.

        A connection that is to carry the smarthost's credentials always checks the
        certificate and name (``verify``): a man in the middle need not strip STARTTLS,
        he can answer it with a certificate of his own and read the password.
        """
        if not (self.config.tls_verify or verify):
            return self._plain_tls
        return ssl.optionsForClientTLS(hop.name, trustRoot=self._trust)

    def _fail_ready(self, queue: _Queue, outcome: Outcome) -> None:
        """
        Give every copy waiting for ``queue`` the same outcome (the destination is down or gone).

        They leave the destination's ready list at once (no new session is opened for
        them) and are settled in slices, so the reactor serves others in between.
        """
        self._failing.extend((job, outcome) for job in queue.ready)
        queue.ready.clear()
        if self._fail_call is None:
            self._fail_some()

    def _fail_some(self) -> None:
        """One slice: each copy's event, then one journal write per message for all of them."""
        self._fail_call = None
        concluded: dict[str, tuple[QueuedMessage, list[int]]] = {}
        for _ in range(min(SETTLE_SLICE, len(self._failing))):
            job, outcome = self._failing.popleft()
            self._conclude(job, outcome, rest=False)
            tid = job.queued.envelope.transmission_id
            concluded.setdefault(tid, (job.queued, []))[1].append(job.index)
        for tid, (queued, indexes) in concluded.items():
            self._journalling(defer.maybeDeferred(self.spool.record_states, queued, indexes), tid)
            self._rest(queued)
        if self._failing and self.running:
            self._fail_call = self.clock.callLater(0, self._fail_some)

    # -- outcomes -------------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        return RetrySchedule(self.config.retry_initial, self.config.retry_max).delay(attempts)

    def _settle(self, job: Job, outcome: Outcome, attempted: bool = True) -> defer.Deferred:
        """
        Write the outcome's event, then journal it, then schedule the next attempt if any.

        ``attempted``: false for an operator's deletion of a copy not being tried.
        """
        final = self._conclude(job, outcome, attempted)
        d = defer.maybeDeferred(self.spool.record, job.queued, job.index, done=final)
        return self._journalling(d, job.queued.envelope.recipients[job.index].message_id)

    def _journalling(self, d: defer.Deferred, what: str) -> defer.Deferred:
        """A journal write a stop waits for; its failure is logged (the copy is tried again)."""
        self._settling.add(d)
        d.addErrback(lambda f: log.failure("could not journal the outcome of {what}", f, what=what))
        d.addBoth(lambda _: self._settling.discard(d))
        return d

    def _conclude(self, job: Job, outcome: Outcome, attempted: bool = True, rest: bool = True) -> bool:
        """
        The outcome's event and the copy's new state and schedule; whether it is final.

        ``rest``: if the copy now waits, see whether its message's details can leave memory.
        """
        queued, index = job.queued, job.index
        state = queued.states[index]
        if job.deleting and outcome.kind != DELIVERY:
            outcome = DELETED
        if attempted:
            state.attempts += 1
        now = self.now()
        queue_time = max(0.0, now - queued.envelope.received_at)
        if outcome.kind == DELAY and queue_time >= self.config.max_queue_lifetime:
            outcome = Outcome(BOUNCE, 554, f"554 5.4.7 [internal] message expired after "
                              f"{_duration(queue_time)} in the queue; last error: {outcome.raw_reason}",
                              outcome.ip_address, outcome.tls, outcome.sending_ip)
        recipient = queued.envelope.recipients[index]
        kind, fields = delivery_event(queued.envelope, recipient, outcome, job.domain, queue_time,
                                      max(1, state.attempts))
        if outcome is DELETED:
            fields["bounce_class"] = ADMIN_FAILURE
        final = outcome.final
        if not final:
            state.next_attempt = now + self._backoff(state.attempts)
            state.last_error = outcome.raw_reason
        try:
            self.events.emit(kind, **fields)
        except Exception:
            # Sending the copy again to get its event written would be worse than a missing
            # line: the outcome stands, and the event goes to the operational log instead.
            # (Whatever the error: raised from here it would leave the copy unscheduled and,
            # from a connection's end, the connection counted for ever.)
            log.failure("could not write the {kind} event of {message_id}: {event}",
                        kind=outcome.kind, message_id=recipient.message_id, event=fields)
        if final:
            state.done = True  # journalled by the caller
            self._jobs.pop(job.key, None)
            if self.on_message_done is not None and all(
                    s.done for i, s in enumerate(queued.states) if i != index):
                try:
                    self.on_message_done(queued.envelope.transmission_id)
                except Exception:
                    log.failure("after the last copy of {tid}", tid=queued.envelope.transmission_id)
        elif state.held:
            self._held[job.key] = job
        elif self.running:
            self._schedule(job, state.next_attempt - now)
        if not final and rest:
            self._rest(queued)
        return final

    # -- what waits stays on disk ----------------------------------------------------------

    def _rest(self, queued: QueuedMessage) -> None:
        """
        Once every live copy of ``queued`` waits (for a timer or a release), its recipients'
        details leave memory: only what the listing and routing need stays (``_Brief``).
        """
        tid = queued.envelope.transmission_id
        if tid in self._resting or tid in self._loading:
            return
        if queued.owes_events:
            # Recovery is still writing its events (a restart), from these very details.
            return
        for index, state in enumerate(queued.states):
            key = (tid, index)
            if not state.done and key not in self._timers and key not in self._held:
                return  # a copy is due or being tried: it needs its details
        queued.envelope.recipients = [_Brief(r.address, r.message_id)  # type: ignore[misc]
                                      for r in queued.envelope.recipients]
        self._resting.add(tid)

    def _details(self, queued: QueuedMessage) -> defer.Deferred | None:
        """``None`` if the recipients' details are in memory; else a Deferred of their return."""
        tid = queued.envelope.transmission_id
        if tid not in self._resting:
            return None
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._loading.get(tid)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._loading[tid] = [waiter]
        d = defer.maybeDeferred(self.spool.run, self.spool.read_envelope, queued)
        d.addBoth(self._loaded, queued)
        return waiter

    def _loaded(self, result: Any, queued: QueuedMessage) -> None:
        tid = queued.envelope.transmission_id
        waiters = self._loading.pop(tid, [])
        if not isinstance(result, Failure):
            queued.envelope.recipients = result.recipients
            self._resting.discard(tid)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def _unreadable(self, failure: Failure, job: Job) -> None:
        """The entry could not be read back: the copy waits a retry interval, as a failed attempt would."""
        log.failure("could not read spool entry {tid} back for its copy to {rcpt}; trying again later",
                    failure, tid=job.queued.envelope.transmission_id, rcpt=job.address)
        if self.running and job.key in self._jobs:
            self._schedule(job, self.config.retry_initial)


def _no_plaintext_auth(outcome: Outcome | None) -> Outcome | None:
    """A failed TLS set-up with the smarthost, told as the reason the copies wait."""
    if outcome is None:
        return None
    return Outcome(outcome.kind, outcome.code, f"{outcome.raw_reason} (not tried without TLS: "
                   "the smarthost AUTH credentials are only sent over TLS)",
                   outcome.ip_address, outcome.tls, outcome.sending_ip)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.0f}s"


def message_from_spool(spool: Spool) -> CopyRenderer:
    """The copy renderer used while no rewriting is configured: the spooled text itself."""

    def render(queued: QueuedMessage, index: int) -> bytes:
        return spool.read_message(queued)

    return render
