"""
One attempt at one hop: a connection from connect to close, and what it tells the queue.

``DeliveryService`` (``queue``) decides which destination gets a session and
which hops it tries; for each hop it starts one ``_HopAttempt``, which is what
``DeliveryClient`` reports to. The attempt hands out the destination's ready
copies to its connection, keeps the destination's counters, and reports
everything else through ``AttemptOwner``, so it depends on that contract and
not on the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.delivery.outcome import Outcome, internal

if TYPE_CHECKING:
    from appliance.delivery.client import DeliveryClient
    from appliance.delivery.queue import Job, _Queue
    from appliance.delivery.routing import Hop
    from appliance.envelope import QueuedMessage

log = Logger()


@dataclass
class _HopResult:
    established: bool = False
    outcome: Outcome | None = None
    tls_failed: bool = False


@runtime_checkable
class AttemptOwner(Protocol):
    """
    What a hop attempt needs of whoever started it (``DeliveryService``).

    The attempt keeps its destination's counters itself; everything else it
    learns or reports goes through these methods, so the attempt depends on
    this contract rather than on the service's internals.
    """

    def delivering(self) -> bool:
        """Whether new transactions may start: false once a stop has begun."""
        ...

    def render(self, queued: QueuedMessage, index: int) -> bytes | defer.Deferred:
        """The copy for one recipient (a ``CopyRenderer``)."""
        ...

    def client_connected(self, client: DeliveryClient) -> None:
        """A connection is open: a stop that waits too long must be able to cut it off."""
        ...

    def client_closed(self, client: DeliveryClient | None) -> None:
        """The attempt is over; ``client`` is ``None`` if no connection was ever made."""
        ...

    def destination_reachable(self) -> None:
        """A session got through: its destination may now use more connections."""
        ...

    def connection_retiring(self) -> None:
        """A connection takes no more copies: a copy that is due may need another one."""
        ...

    def settle(self, job: Job, outcome: Outcome) -> None:
        """Record the outcome of one copy (event, journal, next attempt)."""
        ...

    def requeue(self, job: Job) -> None:
        """A copy handed out but never tried: it is due again now."""
        ...


class _HopAttempt:
    """One connection to one hop, from connect to close; what ``DeliveryClient`` reports to."""

    def __init__(self, owner: AttemptOwner, queue: _Queue, hop: Hop, max_messages: int,
                 clock: IReactorTime | None = None, reuse_time: float = 0.0) -> None:
        """``reuse_time``: how long the connection waits, idle, for the destination's next copy."""
        self.owner = owner
        self.queue = queue
        self.hop = hop
        self.max_messages = max_messages  # copies one connection carries at most
        self.clock = clock
        self.reuse_time = reuse_time
        self._idle_timer: IDelayedCall | None = None
        self.result = _HopResult()
        self.done: defer.Deferred = defer.Deferred()
        self.sent = 0
        self.client: DeliveryClient | None = None
        self.retiring = False  # takes no more copies: QUIT is sent, or about to be

    def connected(self, client: DeliveryClient) -> None:
        self.client = client
        self.owner.client_connected(client)

    def established(self) -> None:
        self.result.established = True
        self.queue.connected += 1
        self.queue.healthy = True
        self.owner.destination_reachable()

    def has_more(self) -> bool:
        return bool(self.queue.ready) and self.owner.delivering() and self.sent < self.max_messages

    def next_job(self) -> Job | None | defer.Deferred:
        """
        The next copy to send, or ``None``; a Deferred of either while the copy is being made.

        The renderer gives a copy at once, or a Deferred when its message must
        first be read or parsed (in a worker thread). The connection waits for
        it; meanwhile it counts as busy, so the destination's other copies are
        not left to it.
        """
        while self.has_more():
            job = self.queue.ready.popleft()
            try:
                data = self.owner.render(job.queued, job.index)
            except Exception:
                self._not_made(job, Failure())
                continue
            self.sent += 1
            self.queue.busy += 1
            if isinstance(data, defer.Deferred):
                return data.addCallbacks(self._made, self._not_made_later,
                                         callbackArgs=(job,), errbackArgs=(job,))
            job.data = data
            return job
        return None

    def _made(self, data: bytes, job: Job) -> Job | None:
        if self.done.called or not self.owner.delivering():
            # The connection closed (or the service stopped) while the copy was being made.
            self.give_back(job)
            return None
        job.data = data
        return job

    def give_back(self, job: Job) -> None:
        """A copy handed out but never tried: it waits for the next connection, like any that is due."""
        self._unsent()
        job.data = b""
        self.owner.requeue(job)

    def _not_made_later(self, failure: Failure, job: Job) -> Job | None | defer.Deferred:
        self._unsent()
        self._not_made(job, failure)
        if self.done.called:
            return None
        return self.next_job()

    def _unsent(self) -> None:
        self.sent -= 1
        self.queue.busy -= 1

    def _not_made(self, job: Job, failure: Failure) -> None:
        log.failure("could not make the copy for {rcpt}", failure, rcpt=job.address)
        self.owner.settle(job, internal(451, "4.3.0",
                                        f"could not make the copy: {failure.getErrorMessage()}"))

    def job_done(self, job: Job, outcome: Outcome) -> None:
        job.data = b""
        self.queue.busy -= 1
        self.owner.settle(job, outcome)

    def hop_failed(self, outcome: Outcome, tls_failed: bool) -> None:
        self.result.outcome = outcome
        self.result.tls_failed = tls_failed

    # -- between copies: an idle connection waits for its destination's next one --------

    def wait_for_work(self) -> bool:
        """
        Whether the connection, with nothing to send, stays open for the next copy.

        It joins its destination's idle connections, which are handed copies
        before any new connection is opened, until ``reuse_time`` runs out.
        """
        if (self.reuse_time <= 0 or self.clock is None or self.done.called
                or not self.owner.delivering() or self.sent >= self.max_messages):
            self._retire()
            return False
        self.queue.idle.append(self)
        self._idle_timer = self.clock.callLater(self.reuse_time, self.close_idle)
        return True

    def idle(self) -> bool:
        return self._idle_timer is not None

    def wake(self) -> None:
        """A copy is ready for the destination: the idle connection takes it."""
        self.stop_waiting()
        if self.client is not None:
            self.client.resume()

    def close_idle(self) -> None:
        """The reuse time ran out, the service stops, or the connection is wanted elsewhere: QUIT."""
        self.stop_waiting()
        self._retire()
        if self.client is not None:
            self.client.close_idle()

    def stop_waiting(self) -> None:
        """The connection leaves its destination's idle ones (taken, closing or closed)."""
        timer, self._idle_timer = self._idle_timer, None
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        try:
            self.queue.idle.remove(self)
        except ValueError:
            pass

    def _retire(self) -> None:
        """
        The connection ends once its QUIT is answered: its destination stops counting on it.

        Counted as a session that would take the next copy, it kept a copy
        that came meanwhile waiting for the QUIT's answer, or for as long as a
        server took not to give one.
        """
        if self.retiring or self.done.called:
            return
        self.retiring = True
        self.queue.closing += 1
        self.owner.connection_retiring()

    def closed(self) -> None:
        self.stop_waiting()
        if self.done.called:
            return
        if self.retiring:
            self.queue.closing -= 1
        self.owner.client_closed(self.client)
        if self.result.established:
            self.queue.connected -= 1
        self.done.callback(self.result)
