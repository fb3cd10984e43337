"""
The delivery queue as operators see it: how they name copies and what a listing shows.

Pure functions over the queue's jobs (``select``, ``view``), and
``OperatorActions``, the part of ``DeliveryService`` that acts on what they
select: flush, hold, release, delete. ``appliance.admin.queue`` answers with
what they describe.

An id names either a whole message, by the transmission id its ``250 ...
queued as ID`` reply gave, or one recipient's copy, by its ``message_id``,
as the events name them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from appliance.delivery.outcome import BOUNCE, Outcome

if TYPE_CHECKING:
    from appliance.config import DeliveryConfig
    from appliance.delivery.queue import Job, _Queue
    from appliance.envelope import QueuedMessage
    from appliance.spool import Spool

# SparkPost's class for a message failed by an administrative action (Momentum's
# "Admin Failure"): an operator deleted it from the queue.
ADMIN_FAILURE = "25"
DELETED = Outcome(BOUNCE, 554, "554 5.0.0 [internal] deleted from the queue by the operator")

# Where a copy is: waiting for its next attempt, due or being tried, or held by an operator.
WAITING, ACTIVE, HELD = "waiting", "active", "held"


class UnknownIds(LookupError):
    """Ids that name no queued copy."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(f"not found in the queue: {', '.join(ids)}")
        self.ids = tuple(ids)


@dataclass(frozen=True)
class CopyView:
    """One queued copy, as the listing and ``queue show`` give it."""

    message_id: str
    transmission_id: str
    recipient: str
    domain: str
    received_at: float
    attempts: int
    next_attempt: float | None  # None while held, due or being tried
    last_error: str
    held: bool
    state: str

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "transmission_id": self.transmission_id,
            "recipient": self.recipient,
            "domain": self.domain,
            "received_at": iso_time(self.received_at),
            "age": max(0, int(now - self.received_at)),
            "attempts": self.attempts,
            "next_attempt": None if self.next_attempt is None else iso_time(self.next_attempt),
            "last_error": self.last_error,
            "held": self.held,
            "state": self.state,
        }


def iso_time(ts: float) -> str:
    """A time as SparkPost's API writes one: UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def view(job: Job, state: str) -> CopyView:
    queued = job.queued
    copy = queued.states[job.index]
    return CopyView(
        message_id=queued.envelope.recipients[job.index].message_id,
        transmission_id=queued.envelope.transmission_id,
        recipient=job.address,
        domain=job.domain,
        received_at=queued.envelope.received_at,
        attempts=copy.attempts,
        next_attempt=copy.next_attempt if state == WAITING else None,
        last_error=copy.last_error,
        held=copy.held,
        state=state,
    )


def normal_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def select(jobs: Iterable[Job], ids: Sequence[str] = (), domain: str | None = None) -> list[Job]:
    """
    The jobs ``ids`` name (each a transmission id or a copy's message_id), or those of
    ``domain`` (the recipient's domain); every job when neither is given.

    Raises ``UnknownIds`` naming each id that matches no job: an operator who
    mistyped one id of several learns which, and nothing is done to the others.
    """
    jobs = list(jobs)
    if domain is not None:
        wanted = normal_domain(domain)
        jobs = [job for job in jobs if job.domain == wanted]
    if not ids:
        return jobs
    by_id: dict[str, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.queued.envelope.transmission_id, []).append(job)
        by_id.setdefault(job.queued.envelope.recipients[job.index].message_id, []).append(job)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise UnknownIds(unknown)
    chosen: dict[tuple[str, int], Job] = {}
    for i in ids:
        for job in by_id[i]:
            chosen[job.key] = job
    return list(chosen.values())


class OperatorActions:
    """
    ``DeliveryService``'s side for operators (``appliance.admin.queue``): list, flush, hold,
    release and delete, over the service's own schedule.
    """

    if TYPE_CHECKING:  # what DeliveryService holds and does
        config: DeliveryConfig
        spool: Spool
        running: Any
        _jobs: dict[tuple[str, int], Job]
        _timers: dict[tuple[str, int], Any]
        _held: dict[tuple[str, int], Job]
        _queues: dict[str, _Queue]
        _settling: set[defer.Deferred]

        def now(self) -> float: ...

        def _due(self, job: Job) -> None: ...

        def _schedule(self, job: Job, delay: float) -> None: ...

        def _settle(self, job: Job, outcome: Outcome, attempted: bool = True) -> defer.Deferred: ...

        def _details(self, queued: QueuedMessage) -> defer.Deferred | None: ...

        def _unreadable(self, failure: Any, job: Job) -> None: ...

    @property
    def queued_copies(self) -> int:
        return len(self._jobs)

    def full(self) -> bool:
        """Whether ``max_queued_copies`` are queued: injection answers 452 4.3.1 until some leave."""
        return len(self._jobs) >= self.config.max_queued_copies

    def listing(self, ids: Sequence[str] = (), domain: str | None = None) -> list[CopyView]:
        """The copies ``ids`` or ``domain`` name (all without either), oldest first."""
        views = [view(job, self._where(job)) for job in select(self._jobs.values(), ids, domain)]
        views.sort(key=lambda v: (v.received_at, v.transmission_id, v.recipient))
        return views

    def _where(self, job: Job) -> str:
        if job.queued.states[job.index].held:
            return HELD
        return WAITING if job.key in self._timers else ACTIVE

    def flush(self, ids: Sequence[str] = (), domain: str | None = None) -> list[CopyView]:
        """Try now each named copy that waits for its next attempt; held ones stay held."""
        jobs = select(self._jobs.values(), ids, domain)
        for job in jobs:
            timer = self._timers.get(job.key)
            if timer is not None and not job.queued.states[job.index].held:
                if timer.active():
                    timer.cancel()
                self._due(job)
        return self.listing_of(jobs)

    def hold(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred:
        """
        Stop trying the named copies until released; fires with their listing once journalled.

        A copy being tried when it is held finishes that attempt. Held copies keep
        their age: one released after ``max_queue_lifetime`` bounces at its next failure.
        """
        jobs = select(self._jobs.values(), ids, domain)
        changed = [job for job in jobs if not job.queued.states[job.index].held]
        for job in changed:
            job.queued.states[job.index].held = True
            timer = self._timers.pop(job.key, None)
            if timer is not None:
                if timer.active():
                    timer.cancel()
                self._held[job.key] = job
        for queue in self._queues.values():  # due ones leave their ready lists, in one pass each
            if any(j.queued.states[j.index].held for j in queue.ready):
                kept: deque[Job] = deque()
                for j in queue.ready:
                    if j.queued.states[j.index].held:
                        self._held[j.key] = j
                    else:
                        kept.append(j)
                queue.ready = kept
        return self._journal(changed).addCallback(lambda _: self.listing_of(jobs))

    def release(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred:
        """Let held copies be tried again, each at its next attempt time (now, if that has passed)."""
        jobs = select(self._jobs.values(), ids, domain)
        changed = [job for job in jobs if job.queued.states[job.index].held]
        now = self.now()
        for job in changed:
            state = job.queued.states[job.index]
            state.held = False
            if self._held.pop(job.key, None) is not None and self.running:
                self._schedule(job, max(0.0, state.next_attempt - now))
        return self._journal(changed).addCallback(lambda _: self.listing_of(jobs))

    def delete(self, ids: Sequence[str] = (), domain: str | None = None) -> defer.Deferred:
        """
        Bounce the named copies (``bounce_class`` 25, admin failure) and drop them from the spool.

        A copy being tried is deleted when that attempt ends, unless it was delivered.
        Fires with the listing of the copies as they were, once the deletions are journalled.
        """
        jobs = select(self._jobs.values(), ids, domain)
        before = self.listing_of(jobs)
        written = []
        for job in jobs:
            job.deleting = True
            timer = self._timers.pop(job.key, None)
            if timer is not None and timer.active():
                timer.cancel()
            if timer is not None or self._held.pop(job.key, None) is not None:
                written.append(self._delete_now(job))
        for queue in self._queues.values():
            if any(j.deleting for j in queue.ready):
                due = [j for j in queue.ready if j.deleting]
                queue.ready = deque(j for j in queue.ready if not j.deleting)
                written.extend(self._settle(j, DELETED, attempted=False) for j in due)
        waiting = defer.DeferredList(written, consumeErrors=True)
        return waiting.addCallback(lambda _: before)

    def _delete_now(self, job: Job) -> defer.Deferred:
        """A waiting copy's admin bounce, once its details (for the event) are in memory."""
        loading = self._details(job.queued)
        if loading is None:
            return self._settle(job, DELETED, attempted=False)
        loading.addCallbacks(lambda _: self._settle(job, DELETED, attempted=False),
                             self._unreadable, errbackArgs=(job,))
        return loading

    def listing_of(self, jobs: list[Job]) -> list[CopyView]:
        return [view(job, self._where(job)) for job in jobs]

    def _journal(self, jobs: list[Job]) -> defer.Deferred:
        """Each changed copy's state on disk, one write per message, before the operator hears."""
        by_message: dict[str, tuple[QueuedMessage, list[int]]] = {}
        for job in jobs:
            by_message.setdefault(job.queued.envelope.transmission_id, (job.queued, []))[1].append(job.index)
        writes = [self.spool.record_states(queued, indexes) for queued, indexes in by_message.values()]
        for d in writes:
            self._settling.add(d)
            d.addBoth(lambda result, d=d: (self._settling.discard(d), result)[1])
        return defer.gatherResults(writes, consumeErrors=True)

