"""
The suppression list: its database, the events that fill it, its CSV, and the running service.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog
from appliance.eventtypes import EVENT_TYPES
from appliance.spool import run_synchronously
from appliance.suppression import (
    NON_TRANSACTIONAL,
    SUPPRESSING_TYPES,
    TRANSACTIONAL,
    Change,
    SuppressionError,
    SuppressionList,
    SuppressionService,
    SuppressionStore,
    changes_for,
    changes_in,
    normalize,
    read_csv,
)

START = 1767225600.0


def event(kind: str, rcpt: str = "Ann@Example.TEST", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "rcpt_to": rcpt.lower(), "raw_rcpt_to": rcpt, **fields}


class RulesTests(SynchronousTestCase):
    """Which events suppress whom, in which scope: SparkPost's rules."""

    def test_unsubscribes_suppress_non_transactional_mail(self) -> None:
        self.assertEqual(changes_for(event("list_unsubscribe")),
                         [Change("ann@example.test", NON_TRANSACTIONAL, "List Unsubscribe")])
        self.assertEqual(changes_for(event("link_unsubscribe")),
                         [Change("ann@example.test", NON_TRANSACTIONAL, "Unsubscribe Link")])

    def test_hard_bounces_suppress_both(self) -> None:
        for bounce_class in ("10", "30", "90"):
            reason = "550 5.1.1 no such user"
            self.assertEqual(changes_for(event("bounce", bounce_class=bounce_class, raw_reason=reason)), [
                Change("ann@example.test", TRANSACTIONAL, "Bounce Rule", reason),
                Change("ann@example.test", NON_TRANSACTIONAL, "Bounce Rule", reason)])

    def test_other_events_suppress_nobody(self) -> None:
        for e in (event("bounce", bounce_class="21"), event("bounce", bounce_class="50"),
                  event("delay", bounce_class="10"), event("click"), event("open"), event("delivery"),
                  event("policy_rejection", bounce_class="10"), event("list_unsubscribe", rcpt=""),
                  {"type": "list_unsubscribe"}, event("list_unsubscribe", rcpt="not an address")):
            self.assertEqual(changes_for(e), [], e)

    def test_only_the_suppressing_types_ever_suppress(self) -> None:
        """The event log wakes the list only for SUPPRESSING_TYPES: no other type may matter."""
        for kind in EVENT_TYPES:
            worst = event(kind, bounce_class="10", raw_reason="550 5.1.1 no such user")
            self.assertEqual(bool(changes_for(worst)), kind in SUPPRESSING_TYPES, kind)
        self.assertLessEqual(SUPPRESSING_TYPES, set(EVENT_TYPES))

    def test_log_lines(self) -> None:
        lines = [json.dumps(event("open")).encode() + b"\n", b"not json\n", b"[1]\n",
                 json.dumps(event("list_unsubscribe", "b@example.test")).encode() + b"\n",
                 b'{"type":"bounce","broken\n',
                 json.dumps(event("bounce", "c@example.test", bounce_class="10")).encode() + b"\n"]
        self.assertEqual([(c.recipient, c.type) for c in changes_in(lines)], [
            ("b@example.test", NON_TRANSACTIONAL), ("c@example.test", TRANSACTIONAL),
            ("c@example.test", NON_TRANSACTIONAL)])

    def test_recipients_are_keyed_lower_case(self) -> None:
        self.assertEqual(normalize("  Ann@Example.TEST "), "ann@example.test")
        for bad in ("", "ann", "a b@example.test", "a@b@c", "a\n@example.test", "x" * 320 + "@e.test"):
            self.assertRaises(SuppressionError, normalize, bad)


class CsvTests(SynchronousTestCase):
    """SparkPost's CSV, in its current and its older form."""

    def test_type_column(self) -> None:
        changes, problems = read_csv("recipient,type,description\r\n"
                                     "Ann@Example.test,transactional,asked\r\n"
                                     "bob@example.test,non_transactional,\r\n")
        self.assertEqual(problems, [])
        self.assertEqual(changes, [Change("ann@example.test", TRANSACTIONAL, "Manually Added", "asked"),
                                   Change("bob@example.test", NON_TRANSACTIONAL, "Manually Added", "")])

    def test_boolean_columns(self) -> None:
        changes, problems = read_csv("\ufeffRecipient,Transactional,Non_Transactional,Description\n"
                                     "ann@example.test,true,true,both\n"
                                     "bob@example.test,false,true,\n")
        self.assertEqual(problems, [])
        self.assertEqual([(c.recipient, c.type) for c in changes], [
            ("ann@example.test", TRANSACTIONAL), ("ann@example.test", NON_TRANSACTIONAL),
            ("bob@example.test", NON_TRANSACTIONAL)])

    def test_every_bad_line_is_named(self) -> None:
        changes, problems = read_csv("recipient,type\n"
                                     "ann@example.test,transactional\n"
                                     "nobody,transactional\n"
                                     "bob@example.test,sometimes\n")
        self.assertEqual(len(changes), 1)
        self.assertEqual(problems, ["line 3: not an email address: 'nobody'",
                                    "line 4: Type must be one of: 'transactional', 'non_transactional'"])
        _, problems = read_csv("recipient,transactional,non_transactional\nann@example.test,false,no\n"
                               "bob@example.test,perhaps,true\n")
        self.assertEqual(problems, ["line 2: Must supply a suppression type",
                                    "line 3: transactional must be true or false, got 'perhaps'"])

    def test_a_header_without_the_columns(self) -> None:
        self.assertEqual(read_csv("email_address,kind\nann@example.test,transactional\n"),
                         ([], ["line 1: the header must name a 'recipient' column"]))
        self.assertEqual(read_csv("recipient,description\nann@example.test,x\n"),
                         ([], ["line 1: the header must name a 'type' column (or 'transactional' "
                               "and 'non_transactional')"]))


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "suppression.sqlite3")
        self.store = SuppressionStore(self.path)
        self.addCleanup(self.store.close)

    def test_put_get_remove(self) -> None:
        self.store.put([Change("ann@example.test", TRANSACTIONAL, "Manually Added", "first")], now=100)
        self.store.put([Change("ann@example.test", TRANSACTIONAL, "Bounce Rule", "again"),
                        Change("ann@example.test", NON_TRANSACTIONAL, "Bounce Rule", "again")], now=200)
        [n, t] = self.store.get("ann@example.test")
        self.assertEqual((t.type, t.source, t.description, t.created, t.updated),
                         (TRANSACTIONAL, "Bounce Rule", "again", 100, 200))
        self.assertEqual((n.type, n.created), (NON_TRANSACTIONAL, 200))
        self.assertEqual(t.to_json(), {
            "recipient": "ann@example.test", "type": "transactional", "transactional": True,
            "source": "Bounce Rule", "description": "again", "created": "1970-01-01T00:01:40+00:00",
            "updated": "1970-01-01T00:03:20+00:00"})
        self.assertEqual(self.store.scopes(), ({"ann@example.test"}, {"ann@example.test"}))
        self.assertEqual(self.store.remove("ann@example.test", TRANSACTIONAL), 1)
        self.assertEqual(self.store.scopes(), (set(), {"ann@example.test"}))
        self.assertEqual(self.store.remove("ann@example.test"), 1)
        self.assertEqual(self.store.remove("ann@example.test"), 0)
        self.assertEqual(self.store.get("ann@example.test"), [])

    def test_search(self) -> None:
        self.store.put([Change(f"r{i}@{'a' if i % 2 else 'b'}.test", TYPES_BY[i % 2], "Manually Added",
                               f"note {i}") for i in range(10)], now=1000)
        self.store.put([Change("late@a.test", TRANSACTIONAL, "List Unsubscribe", "Late one")], now=2000)
        entries, total = self.store.search(limit=3)
        self.assertEqual((total, [e.recipient for e in entries][0], len(entries)), (11, "late@a.test", 3))
        _, total = self.store.search(types=[TRANSACTIONAL])
        self.assertEqual(total, 6)
        entries, total = self.store.search(sources=["List Unsubscribe"])
        self.assertEqual([e.recipient for e in entries], ["late@a.test"])
        self.assertEqual(self.store.search(description="LATE")[1], 1)
        self.assertEqual(self.store.search(domain="b.test")[1], 5)
        self.assertEqual(self.store.search(domain="_.test")[1], 0)  # LIKE's wildcards are literal
        self.assertEqual(self.store.search(since=1500)[1], 1)
        self.assertEqual(self.store.search(until=1500)[1], 10)
        page2, _ = self.store.search(limit=5, offset=5)
        page1, _ = self.store.search(limit=5)
        self.assertEqual(len({e.recipient for e in page1 + page2}), 10)

    def test_another_process_is_seen_by_data_version(self) -> None:
        before = self.store.data_version()
        self.store.put([Change("ann@example.test", TRANSACTIONAL, "Manually Added")])
        self.assertEqual(self.store.data_version(), before)  # its own commits do not count
        other = SuppressionStore(self.path)
        other.put([Change("bob@example.test", TRANSACTIONAL, "Manually Added")])
        other.close()
        self.assertNotEqual(self.store.data_version(), before)
        self.assertEqual(self.store.scopes()[0], {"ann@example.test", "bob@example.test"})

    def test_an_unusable_database_is_a_clear_error(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        with open(os.path.join(path, "x.sqlite3"), "wb") as f:
            f.write(b"this is not a database" * 100)
        e = self.assertRaises(SuppressionError, SuppressionStore, os.path.join(path, "x.sqlite3"))
        self.assertIn("cannot open the suppression database", str(e))

    def test_a_failed_write_leaves_nothing_half_done(self) -> None:
        self.store.put([Change("ann@example.test", TRANSACTIONAL, "Manually Added")])
        self.assertRaises(sqlite3.IntegrityError, self.store.put, [
            Change("bob@example.test", TRANSACTIONAL, "Manually Added"),
            Change("carl@example.test", "sometimes", "Manually Added")])
        self.assertEqual(self.store.scopes(), ({"ann@example.test"}, set()))


TYPES_BY = (TRANSACTIONAL, NON_TRANSACTIONAL)


class ListTests(SynchronousTestCase):
    def test_scopes(self) -> None:
        suppressions = SuppressionList()
        suppressions.add([Change("ann@example.test", NON_TRANSACTIONAL, "x"),
                          Change("bob@example.test", TRANSACTIONAL, "x")])
        self.assertEqual(suppressions.suppressed("Ann@Example.TEST", False), NON_TRANSACTIONAL)
        self.assertIsNone(suppressions.suppressed("ann@example.test", True))
        self.assertEqual(suppressions.suppressed("bob@example.test", True), TRANSACTIONAL)
        self.assertIsNone(suppressions.suppressed("bob@example.test", False))
        suppressions.discard("ann@example.test", None)
        self.assertIsNone(suppressions.suppressed("ann@example.test", False))


class ServiceTests(SynchronousTestCase):
    """The service as the appliance runs it: fed by its follower, aware of other processes."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.clock = Clock()
        self.clock.advance(START)
        self.log_path = os.path.join(self.root, "events.jsonl")
        self.db = os.path.join(self.root, "suppression.sqlite3")
        self.events = EventLog(self.log_path, "n", fsync_interval=0, clock=self.clock)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        self.service: SuppressionService | None = None
        self.events.wake_on_write(lambda: self.service is not None and self.service.wake())

    def start(self) -> SuppressionService:
        svc = self.service = SuppressionService(self.db, self.log_path, self.clock, run_synchronously,
                                                check_interval=1.0, now=self.clock.seconds)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc

    def test_a_bounce_in_a_rotated_log_suppresses_at_once(self) -> None:
        """Woken only by suppressing events, the list still finds one written after a rotation."""
        events = EventLog(os.path.join(self.root, "rotated.jsonl"), "n", fsync_interval=0, clock=self.clock)
        events.startService()
        self.addCleanup(events.stopService)
        svc = SuppressionService(self.db, events.path, self.clock, run_synchronously, now=self.clock.seconds)
        events.wake_on_write(svc.wake, SUPPRESSING_TYPES)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        events.write(events.make("delivery", rcpt_to="x@example.test"))  # left for the next read
        os.rename(events.path, events.path + ".1")  # logrotate, then the SIGHUP's reopen
        events.reopen()
        events.write(events.make("bounce", rcpt_to="bob@example.test", bounce_class="10",
                                 raw_reason="550 5.1.1 unknown"))
        self.assertEqual(svc.list.suppressed("bob@example.test", True), TRANSACTIONAL)  # no poll needed

    def test_events_suppress_and_survive_a_restart(self) -> None:
        svc = self.start()
        self.events.write(self.events.make("list_unsubscribe", rcpt_to="ann@example.test"))
        self.events.write(self.events.make("bounce", rcpt_to="bob@example.test", bounce_class="10",
                                           raw_reason="550 5.1.1 unknown"))
        self.events.write(self.events.make("bounce", rcpt_to="carl@example.test", bounce_class="21"))
        self.assertEqual(svc.list.suppressed("ann@example.test", False), NON_TRANSACTIONAL)
        self.assertIsNone(svc.list.suppressed("ann@example.test", True))
        self.assertEqual(svc.list.suppressed("bob@example.test", True), TRANSACTIONAL)
        self.assertIsNone(svc.list.suppressed("carl@example.test", False))
        self.successResultOf(svc.stopService())

        again = self.start()
        self.assertEqual(again.list.suppressed("ann@example.test", False), NON_TRANSACTIONAL)
        self.assertEqual(again.list.suppressed("bob@example.test", False), NON_TRANSACTIONAL)
        [_, bob_t] = self.successResultOf(again.get("bob@example.test"))
        self.assertEqual((bob_t.source, bob_t.description, bob_t.created),
                         ("Bounce Rule", "550 5.1.1 unknown", START))
        # Events written while it was stopped are read from its cursor on.
        self.successResultOf(again.stopService())
        self.events.write(self.events.make("link_unsubscribe", rcpt_to="dora@example.test"))
        third = self.start()
        self.assertEqual(third.list.suppressed("dora@example.test", False), NON_TRANSACTIONAL)

    def test_cursor_saved_after_each_change_and_else_once_per_interval(self) -> None:
        svc = self.start()
        cursor = svc.follower.consumer.cursor_path

        def saved() -> bytes:
            with open(cursor, "rb") as f:
                return f.read()

        self.events.write(self.events.make("delivery", rcpt_to="ann@example.test"))
        first = saved()  # the first batch's save
        self.events.write(self.events.make("delivery", rcpt_to="bob@example.test"))
        self.assertEqual(saved(), first)  # nothing changed: no fsyncs for it within the interval
        self.events.write(self.events.make("link_unsubscribe", rcpt_to="carl@example.test"))
        after_change = saved()
        self.assertNotEqual(after_change, first)  # a change: saved at once
        self.events.write(self.events.make("delivery", rcpt_to="dora@example.test"))
        self.assertEqual(saved(), after_change)
        self.clock.advance(1.0)
        self.events.write(self.events.make("delivery", rcpt_to="ed@example.test"))
        self.assertNotEqual(saved(), after_change)  # the interval is over: saved again
        # A restart reads again only what was not saved, and it changes nothing.
        self.successResultOf(svc.stopService())
        again = self.start()
        self.assertEqual(again.list.suppressed("carl@example.test", False), NON_TRANSACTIONAL)
        self.assertIsNone(again.list.suppressed("dora@example.test", False))

    def test_a_new_list_learns_from_the_log_as_it_stands(self) -> None:
        self.events.write(self.events.make("link_unsubscribe", rcpt_to="ann@example.test"))
        svc = self.start()
        self.assertEqual(svc.list.suppressed("ann@example.test", False), NON_TRANSACTIONAL)
        self.successResultOf(svc.stopService())
        other = SuppressionStore(self.db)
        other.remove("ann@example.test")
        other.close()
        again = self.start()  # from its cursor: the old event is not taken again
        self.assertIsNone(again.list.suppressed("ann@example.test", False))

    def test_changes_by_another_process_arrive_within_the_interval(self) -> None:
        svc = self.start()
        other = SuppressionStore(self.db)
        other.put([Change("ann@example.test", TRANSACTIONAL, "Manually Added")])
        self.assertIsNone(svc.list.suppressed("ann@example.test", True))
        self.clock.advance(1.0)
        self.assertEqual(svc.list.suppressed("ann@example.test", True), TRANSACTIONAL)
        other.remove("ann@example.test")
        other.close()
        self.clock.advance(1.0)
        self.assertIsNone(svc.list.suppressed("ann@example.test", True))

    def test_changes_made_here_arrive_at_once(self) -> None:
        svc = self.start()
        self.successResultOf(svc.put([Change("ann@example.test", NON_TRANSACTIONAL, "Manually Added")]))
        self.assertEqual(svc.list.suppressed("ann@example.test", False), NON_TRANSACTIONAL)
        self.assertEqual(self.successResultOf(svc.remove("ann@example.test", TRANSACTIONAL)), 0)
        self.assertEqual(svc.list.suppressed("ann@example.test", False), NON_TRANSACTIONAL)
        self.assertEqual(self.successResultOf(svc.remove("ann@example.test")), 1)
        self.assertIsNone(svc.list.suppressed("ann@example.test", False))

    def test_a_stop_waits_for_a_check_under_way_before_closing_the_store(self) -> None:
        """A check reads the store in the file pool: closing it first failed that read."""
        calls: list[str] = []
        held: list[tuple[Any, defer.Deferred]] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> Any:
            name = getattr(f, "__name__", "")
            calls.append(name)
            if name == "data_version" and svc.running and not held:
                d: defer.Deferred = defer.Deferred()
                held.append((lambda: run_synchronously(f, *args, **kwargs), d))
                return d
            return run_synchronously(f, *args, **kwargs)

        svc = SuppressionService(self.db, self.log_path, self.clock, later, now=self.clock.seconds)
        svc.startService()
        self.clock.advance(1.0)  # a check starts; its read waits in the pool
        [(read, d)] = held
        stopped = svc.stopService()
        self.assertNoResult(stopped)
        self.assertNotIn("close", calls)
        read().chainDeferred(d)  # the read runs on an open store
        self.successResultOf(stopped)
        self.assertEqual(calls[-1], "close")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_reload_read_before_a_change_here_is_not_applied(self) -> None:
        """A change made while a reload is under way wins: the next check loads again."""
        pending: list[Any] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(f, "__name__", "") == "scopes" and not pending:
                d = run_synchronously(f, *args, **kwargs)
                held: defer.Deferred = defer.Deferred()
                pending.append((d, held))
                return held
            return run_synchronously(f, *args, **kwargs)

        svc = SuppressionService(self.db, self.log_path, self.clock, later, now=self.clock.seconds)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        other = SuppressionStore(self.db)
        other.put([Change("ann@example.test", TRANSACTIONAL, "Manually Added")])
        other.close()
        self.clock.advance(1.0)  # the reload is read, held before it is applied
        self.successResultOf(svc.put([Change("bob@example.test", TRANSACTIONAL, "Manually Added")]))
        [(d, held)] = pending
        d.chainDeferred(held)
        self.assertIsNone(svc.list.suppressed("ann@example.test", True))  # not applied over bob
        self.assertEqual(svc.list.suppressed("bob@example.test", True), TRANSACTIONAL)
        self.clock.advance(1.0)
        self.assertEqual(svc.list.suppressed("ann@example.test", True), TRANSACTIONAL)
        self.assertEqual(svc.list.suppressed("bob@example.test", True), TRANSACTIONAL)
