"""The event log: whole lines, SparkPost field names, unique ids."""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog, IdGenerator
from appliance.files import fsync_and_close


class IdTests(SynchronousTestCase):
    def test_message_ids_unique_and_shaped(self) -> None:
        ids = IdGenerator("node-a", now=lambda: 1700000000.0)
        seen = {ids.message_id() for _ in range(10000)}
        self.assertEqual(len(seen), 10000)
        for m in list(seen)[:50]:
            self.assertRegex(m, r"^[0-9a-f]{20}$")

    def test_nodes_differ(self) -> None:
        a = IdGenerator("node-a", now=lambda: 1.0)
        b = IdGenerator("node-b", now=lambda: 1.0)
        self.assertNotEqual(a.message_id()[:4], b.message_id()[:4])
        self.assertNotEqual(a.event_id(), b.event_id())
        self.assertTrue(a.transmission_id().isdigit())


class EventLogTests(SynchronousTestCase):
    def test_lines_written_whole_and_synced(self) -> None:
        path = os.path.join(self.mktemp(), "events.jsonl")
        clock = Clock()
        log = EventLog(path, "node-a", clock=clock, now=lambda: 1234.5)
        woken: list[None] = []
        log.wake_on_write(lambda: woken.append(None))
        log.startService()
        log.emit("injection", rcpt_to="a@b.test", subject="Grüße\nzwei")
        log.emit("delivery", rcpt_to="a@b.test")
        clock.advance(1)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        self.assertEqual(lines[-1], b"")
        first = json.loads(lines[0])
        self.assertEqual(first["type"], "injection")
        self.assertEqual(first["timestamp"], "1234")
        self.assertEqual(first["node_name"], "node-a")
        self.assertEqual(first["subject"], "Grüße\nzwei")
        self.assertIn("Grüße".encode(), lines[0])
        self.assertEqual(len(woken), 2)  # once per write, and with no data: followers read the file
        log.stopService()
        self.assertRaises(OSError, log.emit, "delivery")

    def test_reopen_follows_rotation(self) -> None:
        path = os.path.join(self.mktemp(), "events.jsonl")
        log = EventLog(path, "n", fsync_interval=0, clock=Clock())
        log.startService()
        log.emit("injection")
        os.rename(path, path + ".1")
        log.reopen()
        log.emit("delivery")
        log.stopService()
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["type"], "delivery")


class PeriodicSyncTests(SynchronousTestCase):
    """Given a file pool, the once-a-second fsync runs there, never on the reactor thread."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.clock = Clock()
        self.jobs: list[tuple[object, tuple[object, ...], Deferred]] = []

        def run(f: object, *args: object) -> Deferred:
            d: Deferred = Deferred()
            self.jobs.append((f, args, d))
            return d

        self.log = EventLog(self.path, "node-a", clock=self.clock, run=run)
        self.log.startService()
        self.addCleanup(self.log.stopService)

    def test_fsync_of_a_duplicate_goes_to_the_pool(self) -> None:
        self.log.emit("open")
        self.clock.advance(1)
        [(f, (fd,), d)] = self.jobs
        self.assertIs(f, fsync_and_close)
        self.assertNotEqual(fd, self.log._file.fileno())
        f(fd)  # what the pool thread does: the duplicate is fsynced and closed
        self.assertRaises(OSError, os.fstat, fd)
        d.callback(None)
        self.clock.advance(1)
        self.assertEqual(len(self.jobs), 1, "nothing new was written: no second fsync")

    def test_no_overlap_and_a_failure_is_retried(self) -> None:
        self.log.emit("open")
        self.clock.advance(1)
        self.log.emit("click")
        self.clock.advance(1)
        self.assertEqual(len(self.jobs), 1, "the loop waits for the fsync under way")
        f, (fd,), d = self.jobs[0]
        os.close(fd)
        d.errback(OSError("EIO"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.jobs), 2, "a failed fsync leaves the file to be synced again")
        os.close(self.jobs[1][1][0])
        self.jobs[1][2].callback(None)
