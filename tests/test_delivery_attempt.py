"""One hop attempt against a recording owner: the attempt needs nothing of the service but AttemptOwner."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.delivery.attempt import AttemptOwner, _HopAttempt
from appliance.delivery.outcome import DELIVERY, Outcome
from appliance.delivery.queue import DeliveryService, Job, _Queue
from appliance.delivery.routing import Destination, Hop
from appliance.envelope import CopyState, QueuedMessage
from tests.test_spool import envelope


class RecordingOwner:
    """An ``AttemptOwner`` that records every call and renders what the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.running = True
        self.copies: dict[int, bytes | defer.Deferred | Exception] = {}

    def delivering(self) -> bool:
        return self.running

    def render(self, queued: QueuedMessage, index: int) -> bytes | defer.Deferred:
        copy = self.copies.get(index, b"copy %d" % index)
        if isinstance(copy, Exception):
            raise copy
        return copy

    def client_connected(self, client: Any) -> None:
        self.calls.append(("connected", client))

    def client_closed(self, client: Any) -> None:
        self.calls.append(("closed", client))

    def destination_reachable(self) -> None:
        self.calls.append(("reachable", None))

    def connection_retiring(self) -> None:
        self.calls.append(("retiring", None))

    def settle(self, job: Job, outcome: Outcome) -> None:
        self.calls.append(("settle", (job.index, outcome.code)))

    def requeue(self, job: Job) -> None:
        self.calls.append(("requeue", job.index))


class HopAttemptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.owner = RecordingOwner()
        self.queue = _Queue(Destination("x.test", "x.test"))
        queued = QueuedMessage(envelope(n=3), "/nonexistent", [CopyState() for _ in range(3)])
        self.jobs = [Job(queued, i) for i in range(3)]
        self.queue.ready.extend(self.jobs)
        self.assertIsInstance(self.owner, AttemptOwner)  # the fake keeps up with the contract
        self.attempt = _HopAttempt(self.owner, self.queue, Hop("mx.x.test", "192.0.2.1"), max_messages=2)

    def test_carries_at_most_max_messages(self) -> None:
        first = self.attempt.next_job()
        self.assertIs(first, self.jobs[0])
        self.assertEqual((self.jobs[0].data, self.queue.busy), (b"copy 0", 1))
        self.attempt.job_done(self.jobs[0], Outcome(DELIVERY, 250, "250 ok"))
        self.assertEqual((self.jobs[0].data, self.queue.busy), (b"", 0))
        self.assertIs(self.attempt.next_job(), self.jobs[1])
        self.assertFalse(self.attempt.has_more())  # two sent: the third waits for another connection
        self.assertEqual(self.owner.calls, [("settle", (0, 250))])

    def test_stops_when_the_owner_stops_delivering(self) -> None:
        self.owner.running = False
        self.assertFalse(self.attempt.has_more())
        self.assertIsNone(self.attempt.next_job())

    def test_a_copy_that_cannot_be_made_is_settled_and_the_next_one_sent(self) -> None:
        self.owner.copies[0] = OSError("gone")
        self.assertIs(self.attempt.next_job(), self.jobs[1])
        self.assertEqual(self.owner.calls, [("settle", (0, 451))])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_copy_made_after_the_close_is_given_back(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        self.owner.copies[0] = pending
        d = self.attempt.next_job()
        assert isinstance(d, defer.Deferred)
        self.assertEqual(self.queue.busy, 1)
        self.attempt.closed()
        pending.callback(b"late copy")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.queue.busy, self.attempt.sent, self.jobs[0].data), (0, 0, b""))
        self.assertEqual(self.owner.calls, [("closed", None), ("requeue", 0)])

    def test_established_and_closed(self) -> None:
        client: Any = object()
        self.attempt.connected(client)
        self.attempt.established()
        self.assertEqual(self.queue.connected, 1)
        self.assertTrue(self.queue.healthy)
        self.attempt.closed()
        self.attempt.closed()  # a second report of the close changes nothing
        self.assertEqual(self.queue.connected, 0)
        self.assertEqual(self.owner.calls, [("connected", client), ("reachable", None), ("closed", client)])
        self.assertTrue(self.successResultOf(self.attempt.done).established)

    def test_a_connection_at_its_cap_is_no_longer_counted_on(self) -> None:
        """Its QUIT is on its way: a copy that comes now must not wait for the answer."""
        self.attempt = _HopAttempt(self.owner, self.queue, Hop("mx.x.test", "192.0.2.1"), max_messages=2,
                                   clock=Clock(), reuse_time=5.0)  # below its cap it would wait, idle
        self.queue.sessions = 1
        self.attempt.connected(object())
        self.attempt.established()  # a healthy destination: up to ``limit`` sessions
        for _ in range(2):
            job = self.attempt.next_job()
            assert isinstance(job, Job)
            self.attempt.job_done(job, Outcome(DELIVERY, 250, "250 ok"))
        self.assertEqual(len(self.queue.ready), 1)
        self.assertFalse(self.queue.wants_session(limit=5))  # counted on to take the copy left
        self.assertFalse(self.attempt.wait_for_work())  # at its cap: it QUITs
        self.assertEqual((self.queue.closing, self.owner.calls[-1]), (1, ("retiring", None)))
        self.assertTrue(self.queue.wants_session(limit=5))  # the copy left gets a connection of its own
        self.assertFalse(self.attempt.wait_for_work())  # asked again: counted once
        self.assertEqual(self.queue.closing, 1)
        self.attempt.closed()
        self.assertEqual(self.queue.closing, 0)

    def test_the_service_provides_the_owner_methods(self) -> None:
        wanted = {"delivering", "render", "client_connected", "client_closed", "destination_reachable",
                  "connection_retiring", "settle", "requeue"}
        declared = {name for name in vars(AttemptOwner) if not name.startswith("_")}
        self.assertEqual(declared, wanted)
        # ``render`` is the renderer the service is given, an attribute of each instance.
        self.assertEqual({name for name in wanted if not callable(getattr(DeliveryService, name, None))},
                         {"render"})
