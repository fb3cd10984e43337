"""Operators' actions on the delivery queue: list, flush, hold, release, delete; the cap; slices."""

from __future__ import annotations

import json
import os
import smtplib

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.delivery import queue as delivery_queue
from appliance.delivery.operations import UnknownIds, select
from appliance.spool import REMOVE_DELAY
from tests.helpers import RunningAppliance, in_thread
from tests.memory import START, MemoryAppliance, sendmail

DEAD = ("127.0.0.1", 2599)  # the route for dead.test: nothing listens there
MESSAGE = b"From: sender@example.net\r\nSubject: queued\r\n\r\nHello.\r\n"


def inject(running: MemoryAppliance, recipients: list[str]) -> str:
    """One message; its transmission id, from the 250's 'queued as ID'."""
    replies = sendmail(running.smtp(), "sender@example.net", recipients, MESSAGE)
    final = [lines for code, lines in replies if code == 250 and b"queued as" in lines[-1]]
    assert final, replies
    return final[0][-1].rsplit(b" ", 1)[1].decode()


class QueueOperationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.running = self.start()

    def start(self) -> MemoryAppliance:
        running = MemoryAppliance(self.directory, delivery={
            "routes": {"dead.test": f"{DEAD[0]}:{DEAD[1]}"},
            "retry_initial": "10m", "retry_max": "1h", "max_queue_lifetime": "2h"})
        running.start()
        self.addCleanup(running.stop)
        return running

    @property
    def delivery(self) -> delivery_queue.DeliveryService:
        return self.running.appliance.delivery

    def events(self, type_: str) -> list[dict]:
        return [e for e in self.running.events() if e["type"] == type_]

    def test_listing_says_where_each_copy_is_and_why(self) -> None:
        tid = inject(self.running, ["a@dead.test", "b@dead.test"])
        other = inject(self.running, ["c@dead.test"])
        copies = self.delivery.listing()
        self.assertEqual([c.transmission_id for c in copies], [tid, tid, other])
        first = copies[0]
        self.assertEqual((first.recipient, first.domain, first.attempts, first.state, first.held),
                         ("a@dead.test", "dead.test", 1, "waiting", False))
        self.assertIn("refused", first.last_error.lower())
        self.assertAlmostEqual(first.next_attempt, START + 600, delta=2)
        as_json = first.to_json(first.received_at + 90)
        self.assertEqual(as_json["age"], 90)
        self.assertRegex(as_json["next_attempt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        # One copy by its message_id, a message by its transmission id, a domain.
        self.assertEqual([c.recipient for c in self.delivery.listing(ids=[first.message_id])],
                         ["a@dead.test"])
        self.assertEqual(len(self.delivery.listing(ids=[tid])), 2)
        self.assertEqual(len(self.delivery.listing(domain="DEAD.test.")), 3)
        self.assertEqual(self.delivery.listing(domain="example.test"), [])

    def test_unknown_id_is_named_and_nothing_is_done(self) -> None:
        tid = inject(self.running, ["a@dead.test"])
        e = self.assertRaises(UnknownIds, self.delivery.hold, ids=[tid, "404404"])
        self.assertEqual(e.ids, ("404404",))
        self.assertIn("not found", str(e))
        self.assertFalse(self.delivery.listing()[0].held)
        self.assertRaises(UnknownIds, self.delivery.delete, ids=["nope"])
        self.assertEqual(self.events("bounce"), [])

    def test_flush_tries_now_instead_of_after_the_back_off(self) -> None:
        inject(self.running, ["a@dead.test", "b@example.test"])
        self.running.servers[DEAD] = self.running.sink  # the operator fixed the destination
        self.running.advance(60)
        self.assertEqual(self.running.sink.messages[1:], [])  # only example.test's copy so far
        copies = self.delivery.flush(domain="dead.test")
        self.assertEqual([c.recipient for c in copies], ["a@dead.test"])
        self.running.settle()
        self.assertEqual(sorted(r for m in self.running.sink.messages for r in m.rcpt_to),
                         ["a@dead.test", "b@example.test"])
        self.assertEqual(self.delivery.listing(), [])
        self.running.advance(REMOVE_DELAY)  # finished entries leave active/ in batches
        self.assertEqual(self.running.spooled(), [])

    def test_hold_survives_a_restart_and_release_lets_it_go(self) -> None:
        tid = inject(self.running, ["a@dead.test", "b@dead.test"])
        held = self.successResultOf(self.delivery.hold(ids=[tid]))
        self.assertEqual([(c.held, c.state) for c in held], [(True, "held")] * 2)
        self.running.servers[DEAD] = self.running.sink
        self.running.advance(3600)
        self.assertEqual(self.running.sink.messages, [])  # held: not attempted
        self.assertEqual(len(self.events("delay")), 2)  # only the first attempts
        # A restart keeps the hold: it is in the copies' journal.
        self.running.stop()
        self.running = self.start()
        self.running.servers[DEAD] = self.running.sink
        self.running.advance(3600)
        self.assertEqual(self.running.sink.messages, [])
        self.assertEqual([c.state for c in self.delivery.listing()], ["held", "held"])
        one = self.delivery.listing()[0].message_id
        self.successResultOf(self.delivery.release(ids=[one]))
        self.running.settle()
        self.assertEqual([m.rcpt_to for m in self.running.sink.messages], [["a@dead.test"]])
        self.assertEqual([c.recipient for c in self.delivery.listing()], ["b@dead.test"])

    def test_a_held_copy_keeps_ageing(self) -> None:
        """Released after max_queue_lifetime, its next failure bounces it as expired."""
        self.running.appliance.injector.now = self.running.reactor.seconds  # one clock for ages
        inject(self.running, ["a@dead.test"])
        self.successResultOf(self.delivery.hold(domain="dead.test"))
        self.running.advance(3 * 3600)
        self.assertEqual(self.events("bounce"), [])
        self.successResultOf(self.delivery.release(domain="dead.test"))
        self.running.settle()
        [bounce] = self.events("bounce")
        self.assertIn("5.4.7", bounce["raw_reason"])
        self.assertEqual(self.running.spooled(), [])

    def test_delete_bounces_each_copy_as_an_admin_failure_and_frees_the_spool(self) -> None:
        tid = inject(self.running, ["a@dead.test", "b@dead.test"])
        keep = inject(self.running, ["c@dead.test"])
        self.assertEqual(len(self.running.spooled()), 2)
        deleting = self.delivery.delete(ids=[tid])
        self.running.advance(REMOVE_DELAY)  # the deleted entry leaves active/ with its batch
        deleted = self.successResultOf(deleting)
        self.assertEqual(sorted(c.recipient for c in deleted), ["a@dead.test", "b@dead.test"])
        bounces = self.events("bounce")
        self.assertEqual(sorted(b["rcpt_to"] for b in bounces), ["a@dead.test", "b@dead.test"])
        for b in bounces:
            self.assertEqual(b["bounce_class"], "25")
            self.assertEqual(b["transmission_id"], tid)
            self.assertIn("deleted from the queue", b["raw_reason"])
        self.assertEqual(self.running.spooled(), [keep])
        self.assertEqual([c.transmission_id for c in self.delivery.listing()], [keep])
        # Nothing of the deleted message comes back after a restart.
        self.running.stop()
        self.running = self.start()
        self.assertEqual([c.transmission_id for c in self.delivery.listing()], [keep])

    def test_delete_of_a_held_copy(self) -> None:
        tid = inject(self.running, ["a@dead.test"])
        self.successResultOf(self.delivery.hold(ids=[tid]))
        deleting = self.delivery.delete(domain="dead.test")
        self.running.advance(REMOVE_DELAY)  # the deleted entry leaves active/ with its batch
        self.successResultOf(deleting)
        self.assertEqual([b["bounce_class"] for b in self.events("bounce")], ["25"])
        self.assertEqual(self.running.spooled(), [])

    def test_waiting_copies_keep_their_details_on_disk(self) -> None:
        """Metadata, tags and tracking leave memory while copies wait, and come back when due."""
        api = b'X-MSYS-API: {"campaign_id": "winter", "metadata": {"tier": "gold"}, "tags": ["t1"]}\r\n'
        replies = sendmail(self.running.smtp(), "sender@example.net", ["a@dead.test", "b@dead.test"],
                           api + MESSAGE)
        self.assertEqual(replies[-2][0], 250)
        [queued] = {id(j.queued): j.queued for j in self.delivery._jobs.values()}.values()
        for recipient in queued.envelope.recipients:
            self.assertFalse(hasattr(recipient, "event_fields"))  # only address and message_id
        self.assertEqual([c.recipient for c in self.delivery.listing()], ["a@dead.test", "b@dead.test"])
        self.delivery.flush(domain="dead.test")
        self.running.settle()
        self.successResultOf(self.delivery.delete(ids=[self.delivery.listing()[0].message_id]))
        self.running.settle()
        for event in self.events("delay") + self.events("bounce"):
            self.assertEqual((event["campaign_id"], event["rcpt_meta"], event["rcpt_tags"]),
                             ("winter", {"tier": "gold"}, ["t1"]), event["type"])
        self.assertEqual(len(self.events("delay")), 4)  # two attempts of each copy
        self.assertEqual(len(self.events("bounce")), 1)

    def test_a_message_that_still_owes_events_keeps_its_details(self) -> None:
        """
        After a restart, recovery writes a message's owed injection events from its recipients'
        details while its copies may already have failed once: they must not leave memory then.
        """
        tid = inject(self.running, ["a@dead.test"])
        [queued] = {id(j.queued): j.queued for j in self.delivery._jobs.values()}.values()
        self.successResultOf(self.delivery._details(queued))  # back in memory
        self.delivery._resting.discard(tid)
        queued.announced = False  # as recovered, its events not yet written
        self.assertTrue(queued.owes_events)
        self.delivery._rest(queued)
        self.assertTrue(all(hasattr(r, "event_fields") for r in queued.envelope.recipients))
        queued.announced = True  # written: now its details may rest
        self.delivery._rest(queued)
        self.assertFalse(any(hasattr(r, "event_fields") for r in queued.envelope.recipients))

    def test_an_entry_that_cannot_be_read_back_keeps_its_copy_queued(self) -> None:
        tid = inject(self.running, ["a@dead.test"])
        path = os.path.join(self.running.config.spool.directory, "active", tid)
        with open(path, "rb") as f:
            original = f.read()
        with open(path, "wb") as f:
            f.write(original[:-5])  # the envelope's trailer is cut
        self.delivery.flush(ids=[tid])
        self.running.settle()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        [copy] = self.delivery.listing()
        self.assertEqual((copy.attempts, copy.state), (1, "waiting"))  # tried again later
        with open(path, "wb") as f:
            f.write(original)
        self.running.advance(600)
        self.assertEqual(len(self.events("delay")), 2)

    def test_hold_journal_line_is_read_back_by_the_spool(self) -> None:
        tid = inject(self.running, ["a@dead.test"])
        self.successResultOf(self.delivery.hold(ids=[tid]))
        journal = os.path.join(self.running.config.spool.directory, "journal", tid)
        with open(journal, "rb") as f:
            last = json.loads(f.read().splitlines()[-1])
        self.assertEqual((last["held"], last["attempts"]), (True, 1))
        self.assertIn("refused", last["error"].lower())


class SelectTests(SynchronousTestCase):
    def test_ids_name_each_job_once(self) -> None:
        class Envelope:
            def __init__(self, tid: str, mids: list[str]) -> None:
                self.transmission_id = tid
                self.recipients = [type("R", (), {"message_id": m})() for m in mids]

        class Queued:
            def __init__(self, tid: str, mids: list[str]) -> None:
                self.envelope = Envelope(tid, mids)

        one, two = Queued("1", ["m1", "m2"]), Queued("2", ["m3"])
        jobs = [delivery_queue.Job(one, 0), delivery_queue.Job(one, 1), delivery_queue.Job(two, 0)]
        self.assertEqual([j.key for j in select(jobs, ["1", "m1", "m3"])],
                         [("1", 0), ("1", 1), ("2", 0)])
        self.assertEqual(select(jobs), jobs)
        self.assertEqual(self.assertRaises(UnknownIds, select, jobs, ["m9", "1", "x"]).ids, ("m9", "x"))


class SlicedDelayTests(SynchronousTestCase):
    def test_many_copies_failed_together_are_settled_a_slice_per_turn(self) -> None:
        """A thousand delays in one pass stalled every client for a second: a slice per turn."""
        running = MemoryAppliance(self.mktemp(), smtp={"max_recipients": 1000},
                                  delivery={"routes": {"dead.test": f"{DEAD[0]}:{DEAD[1]}"}})
        running.start()
        self.addCleanup(running.stop)
        clock = task.Clock()  # delivery's timers, turned by hand
        clock.advance(START)
        running.appliance.delivery.clock = clock
        slice_ = delivery_queue.SETTLE_SLICE
        inject(running, [f"r{i}@dead.test" for i in range(2 * slice_ + 10)])
        clock.advance(0)  # the copies are due: one connection is tried, and refused
        running.settle()

        def delays() -> int:
            return sum(e["type"] == "delay" for e in running.events())

        def next_turn() -> None:
            """One call of the reactor's next turn (``Clock.advance`` would run them all)."""
            [call] = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
            clock.calls.remove(call)
            call.func(*call.args, **call.kw)

        self.assertEqual(delays(), slice_)
        next_turn()
        self.assertEqual(delays(), 2 * slice_)
        next_turn()
        self.assertEqual(delays(), 2 * slice_ + 10)
        self.assertEqual({c.state for c in running.appliance.delivery.listing()}, {"waiting"})


class QueueCapTests(TestCase):
    """``delivery.max_queued_copies``, through a real SMTP client on loopback."""

    @defer.inlineCallbacks
    def test_a_full_queue_answers_452_431_until_copies_leave(self) -> None:
        running = RunningAppliance(self.mktemp(), delivery={
            "routes": {"dead.test": "127.0.0.1:9"}, "max_queued_copies": 3, "retry_initial": "1h"})
        yield running.start()
        self.addCleanup(running.stop)

        def send(recipients: list[str]) -> dict:
            with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as client:
                try:
                    return client.sendmail("s@example.net", recipients, MESSAGE)
                except smtplib.SMTPRecipientsRefused as e:
                    return e.recipients

        refused = yield in_thread(send, ["a@dead.test", "b@dead.test", "c@dead.test"])
        self.assertEqual(refused, {})
        self.assertEqual(running.appliance.delivery.queued_copies, 3)
        refused = yield in_thread(send, ["d@dead.test"])
        self.assertEqual(refused, {"d@dead.test": (452, b"4.3.1 Queue full, try again later")})
        self.assertEqual(len(running.spooled()), 1)  # nothing of the refused message was kept
        # Once copies leave, mail is taken again.
        yield running.appliance.delivery.delete(domain="dead.test")
        refused = yield in_thread(send, ["d@dead.test"])
        self.assertEqual(refused, {})
