"""The spool's commit protocol and journal, on real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import zlib
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance import envelope as envelope_module
from appliance import spares as spares_module
from appliance import spool as spool_module
from appliance import spoolwriter as spoolwriter_module
from appliance.envelope import Envelope, Recipient
from appliance.files import fsync_directory
from appliance.groupcommit import ThreadedDirectorySync
from appliance.settings import Tracking
from appliance.spool import REMOVE_BATCH, REMOVE_DELAY, Spool, run_synchronously


def envelope(tid: str = "1", n: int = 2) -> Envelope:
    return Envelope(transmission_id=tid, mail_from="a@b.test",
                    recipients=[Recipient(f"r{i}@x.test", f"{i:020x}", {"rcpt_to": f"r{i}@x.test"})
                                for i in range(n)],
                    received_at=1000.0, client_address="127.0.0.1", listener="default",
                    message_size=5)


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = Spool(self.mktemp(), run=run_synchronously)
        self.spool.prepare()

    def commit(self, tid: str = "1", n: int = 2) -> object:
        w = self.spool.writer(tid)
        w.write(b"hello")
        return self.successResultOf(w.commit(envelope(tid, n)))

    def test_commit_moves_into_active(self) -> None:
        queued = self.commit()
        self.assertEqual(os.listdir(self.spool.incoming), [])
        self.assertEqual(os.listdir(self.spool.active), ["1"])
        self.assertTrue(os.path.isfile(queued.path))  # message and envelope in one file
        self.assertEqual(self.spool.read_message(queued), b"hello")
        [recovered] = list(self.spool.recover())
        self.assertEqual(recovered.envelope, queued.envelope)

    def record_fsyncs(self) -> list[str]:
        return record_fsyncs(self, self.spool)

    def test_commit_fsyncs_its_file_then_active(self) -> None:
        calls = self.record_fsyncs()
        self.commit("9")
        self.assertEqual(calls, [os.path.join("incoming", "9"), "active"])

    def test_new_journal_fsyncs_its_directory(self) -> None:
        queued = self.commit()
        calls = self.record_fsyncs()
        self.successResultOf(self.spool.record(queued, 0, done=False))
        self.successResultOf(self.spool.record(queued, 0, done=False))
        journal = os.path.join("journal", "1")
        self.assertEqual(calls, [journal, "journal", journal])

    def test_last_copy_waits_for_another_copys_journal_write(self) -> None:
        """Copy 0's append (journal write, fsync) and copy 1's final removal in two threads."""
        queued = self.commit()
        in_append, release = threading.Event(), threading.Event()
        real = os.fsync

        def slow_fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") == os.path.abspath(queued.journal_path):
                in_append.set()  # copy 0 is between its journal write and its fsync
                release.wait(10)
            real(fd)

        self.patch(os, "fsync", slow_fsync)
        errors: list[BaseException] = []

        def run(f: Any, *args: Any) -> None:
            try:
                f(*args)
            except BaseException as e:  # noqa: BLE001 - the test reports any failure
                errors.append(e)

        queued.states[0].attempts = 1  # copy 0 deferred: it journals
        a = threading.Thread(target=run, args=(self.spool._append, queued, b'{"i":0}\n'))
        a.start()
        self.assertTrue(in_append.wait(10))
        queued.states[0].done = queued.states[1].done = True  # then both become final
        b = threading.Thread(target=run, args=(self.spool._append, queued, b'{"i":1}\n'))
        b.start()
        b.join(0.2)
        self.assertTrue(os.path.exists(queued.path))  # the removal waits its turn
        release.set()
        a.join(10)
        b.join(10)
        self.assertEqual(errors, [])
        self.assertFalse(os.path.exists(queued.path))

    def test_small_message_touches_the_disk_only_at_commit(self) -> None:
        """Nothing of a message below SPILL_AT is written as it arrives; the commit writes it all."""
        w = self.spool.writer("5")
        w.write(b"Subject: x\r\n\r\n")
        w.write(b"body\r\n")
        # Created early through the spool's runner (the file pool), and still empty.
        self.assertEqual(os.path.getsize(os.path.join(self.spool.incoming, "5")), 0)
        queued = self.successResultOf(w.commit(envelope("5")))
        self.assertEqual(self.spool.read_message(queued), b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(os.listdir(self.spool.incoming), [])

    def test_large_message_spills_to_its_file_while_it_arrives(self) -> None:
        w = self.spool.writer("6")
        chunk = b"x" * 1000 + b"\r\n"
        for _ in range(spoolwriter_module.SPILL_AT // len(chunk) + 2):
            w.write(chunk)
        message = os.path.join(self.spool.incoming, "6")
        self.assertTrue(os.path.exists(message))  # spilled: memory holds no more than SPILL_AT
        w.write(b"last\r\n")
        queued = self.successResultOf(w.commit(envelope("6")))
        data = self.spool.read_message(queued)
        self.assertEqual(len(data), w.size)
        self.assertTrue(data.startswith(chunk) and data.endswith(chunk + b"last\r\n"))

    def test_missing_incoming_directory_fails_at_once(self) -> None:
        os.rmdir(self.spool.incoming)
        self.assertRaises(FileNotFoundError, self.spool.writer, "7")

    def test_abort_leaves_nothing(self) -> None:
        w = self.spool.writer("2")
        w.write(b"partial")
        w.abort()
        self.assertEqual(os.listdir(self.spool.incoming), [])
        self.assertEqual(list(self.spool.recover()), [])

    def test_unacknowledged_entries_dropped_at_start(self) -> None:
        w = self.spool.writer("3")
        w.write(b"never acknowledged")
        Spool(self.spool.directory, run=run_synchronously).prepare()
        self.assertEqual(os.listdir(self.spool.incoming), [])

    def test_failed_commit_discards(self) -> None:
        w = self.spool.writer("4")
        w.write(b"x")
        os.rmdir(self.spool.active)  # rename target gone: the commit must fail cleanly
        f = self.failureResultOf(w.commit(envelope("4")), OSError)
        self.assertTrue(f)
        self.assertEqual(os.listdir(self.spool.incoming), [])

    def test_journal_survives_restart(self) -> None:
        queued = self.commit()
        queued.states[0].attempts = 1
        queued.states[1].attempts = 2
        queued.states[1].next_attempt = 5000.0
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.successResultOf(self.spool.record(queued, 1, done=False))
        [again] = list(Spool(self.spool.directory, run=run_synchronously).recover())
        self.assertTrue(again.states[0].done)
        self.assertFalse(again.states[1].done)
        self.assertEqual((again.states[1].attempts, again.states[1].next_attempt), (2, 5000.0))

    def test_removed_when_every_copy_final(self) -> None:
        queued = self.commit()
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.assertTrue(os.path.exists(queued.path))
        self.successResultOf(self.spool.record(queued, 1, done=True))
        self.assertFalse(os.path.exists(queued.path))

    def test_failed_removal_journals_the_last_copy_final(self) -> None:
        """The entry cannot leave active/: its last copy's done line goes to disk instead."""
        queued = self.commit()
        self.successResultOf(self.spool.record(queued, 0, done=True))
        real = os.rename

        def rename(src: str, dst: str) -> None:
            if src == queued.path:
                raise OSError(errno.EIO, "Input/output error", src)
            real(src, dst)

        self.patch(spool_module.os, "rename", rename)
        fsyncs = self.record_fsyncs()
        self.successResultOf(self.spool.record(queued, 1, done=True))
        self.assertEqual(fsyncs, [os.path.join("journal", "1")])
        # Still there, but final on disk: nothing is delivered again after a restart, even
        # while the removal keeps failing...
        self.assertEqual(list(Spool(self.spool.directory, run=run_synchronously).recover()), [])
        self.assertTrue(os.path.exists(queued.path))
        # ...and once it works, the entry goes.
        self.patch(spool_module.os, "rename", real)
        self.assertEqual(list(Spool(self.spool.directory, run=run_synchronously).recover()), [])
        self.assertEqual(os.listdir(self.spool.active), [])

    def test_torn_journal_line_ignored(self) -> None:
        queued = self.commit()
        with open(queued.journal_path, "wb") as f:
            f.write(b'{"i":0,"done":true,"attempts":1,"next":0}\n{"i":1,"do')
        [again] = list(self.spool.recover())
        self.assertEqual([s.done for s in again.states], [True, False])

    def test_unreadable_envelope_moved_aside(self) -> None:
        queued = self.commit()
        with open(queued.path, "r+b") as f:
            f.seek(-envelope_module.TRAILER_SIZE - 3, os.SEEK_END)
            f.write(b"{no")
        self.assertEqual(list(self.spool.recover()), [])
        self.assertIn("corrupt-1", os.listdir(self.spool.directory))


FIXTURES = os.path.join(os.path.dirname(__file__), "data")


class EnvelopeSchemaTests(SynchronousTestCase):
    """envelope.json carries its format's version; every earlier version stays readable."""

    def setUp(self) -> None:
        self.spool = Spool(self.mktemp(), run=run_synchronously)
        self.spool.prepare()

    def install(self, fixture: str, tid: str) -> str:
        """A spool entry as another version of the appliance left it in active/."""
        path = os.path.join(self.spool.active, tid)
        shutil.copytree(os.path.join(FIXTURES, fixture), path,
                        ignore=shutil.ignore_patterns("*.py"))
        return path

    def test_reads_what_e4ad139_left_in_the_spool(self) -> None:
        """Envelope schema 1 and its journal, written by that commit's SpoolWriter and Spool.record."""
        self.install("spool-e4ad139", "1234567890123")
        [queued] = list(self.spool.recover())
        env = queued.envelope
        self.assertEqual((env.transmission_id, env.mail_from, env.received_at, env.client_address,
                          env.auth_user, env.listener, env.message_size),
                         ("1234567890123", "sender@example.test", 1767225600.25, "127.0.0.1", "ann",
                          "default", 53))
        ann, bob = env.recipients
        self.assertEqual((ann.address, ann.message_id), ("Ann@Example.test", "0a1b000000000000001f"))
        self.assertEqual(ann.tracking, Tracking(
            open_tracking=True, click_tracking=True, campaign_id="spring",
            metadata={"plan": "gold", "n": [1, 2]}, tags=("a", "b"), open_tracking_scheme="https",
            click_tracking_scheme="https", tracking_domain="t.example.test", expiry=1800000000,
            initial_open=False, include_metadata=True))
        self.assertEqual(ann.event_fields, {
            "message_id": "0a1b000000000000001f", "transmission_id": "1234567890123",
            "campaign_id": "spring", "rcpt_to": "ann@example.test", "raw_rcpt_to": "Ann@Example.test",
            "rcpt_meta": {"plan": "gold", "n": [1, 2]}, "rcpt_tags": ["a", "b"]})
        self.assertEqual(bob.tracking, Tracking(campaign_id="spring", tracking_domain="t.example.test",
                                                expiry=1800000000))
        self.assertFalse(bob.tracking.enabled)
        # The journal: copy 0 delivered, copy 1 waiting for its second attempt.
        self.assertEqual([(s.done, s.attempts, s.next_attempt) for s in queued.states],
                         [(True, 1, 0.0), (False, 1, 1767225900.25)])
        # Its last copy is journalled and the entry removed as any other.
        queued.states[1].attempts = 2
        self.successResultOf(self.spool.record(queued, 1, done=True))
        self.assertEqual(os.listdir(self.spool.active), [])

    def test_written_with_the_current_schema_and_read_back(self) -> None:
        self.install("spool-e4ad139", "1234567890123")
        [queued] = list(self.spool.recover())
        data = queued.envelope.to_json()
        self.assertEqual(json.loads(data)["schema"], envelope_module.ENVELOPE_SCHEMA)
        self.assertEqual(Envelope.from_json(data), queued.envelope)

    def test_empty_tracking_of_schema_1_is_the_default_record(self) -> None:
        raw = {"transmission_id": "1", "mail_from": "a@b.test", "received_at": 1.0,
               "recipients": [{"address": "r@x.test", "message_id": "m", "event_fields": {},
                               "tracking": {}}]}
        [rcpt] = Envelope.from_json(json.dumps(raw).encode()).recipients
        self.assertEqual(rcpt.tracking, Tracking())

    def test_schema_3_subject_and_sender_come_from_the_events_owed(self) -> None:
        """Entries queued before schema 4 still give their delivery events the subject and sender."""
        raw = {"schema": 3, "transmission_id": "1", "mail_from": "a@b.test", "received_at": 1.0,
               "recipients": [], "announce": {"subject": "Hi", "friendly_from": "f@b.test", "injection": [],
                                              "rejected": [], "prepare": False}}
        envelope = Envelope.from_json(json.dumps(raw).encode())
        self.assertEqual((envelope.subject, envelope.friendly_from), ("Hi", "f@b.test"))
        del raw["announce"]
        envelope = Envelope.from_json(json.dumps(raw).encode())
        self.assertEqual((envelope.subject, envelope.friendly_from), ("", ""))
        # Schema 4 has them itself, and writes them back as they are.
        written = Envelope("1", "a@b.test", [], 1.0, subject="S", friendly_from="f@b.test")
        self.assertEqual(Envelope.from_json(written.to_json()), written)

    def test_newer_schema_is_left_in_place(self) -> None:
        """A downgrade must neither deliver an envelope it cannot read nor call it corrupt."""
        path = self.install("spool-e4ad139", "1234567890123")
        with open(os.path.join(path, "envelope.json"), "rb") as f:
            raw = json.loads(f.read())
        raw["schema"] = envelope_module.ENVELOPE_SCHEMA + 1
        with open(os.path.join(path, "envelope.json"), "w") as f:
            json.dump(raw, f)
        self.assertRaises(envelope_module.NewerEnvelope, Envelope.from_json, json.dumps(raw).encode())
        self.assertEqual(list(self.spool.recover()), [])
        self.assertEqual(os.listdir(self.spool.active), ["1234567890123"])
        self.assertFalse([n for n in os.listdir(self.spool.directory) if n.startswith("corrupt-")])


class HeldFsync:
    """A directory fsync the test drives: each call waits for ``release``; ``log`` is the order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.started = threading.Semaphore(0)
        self._gates: list[tuple[threading.Event, list[BaseException]]] = []
        self._lock = threading.Lock()

    def __call__(self, path: str) -> None:
        gate: threading.Event = threading.Event()
        error: list[BaseException] = []
        with self._lock:
            self._gates.append((gate, error))
            self.log.append("fsync started")
        self.started.release()
        if not gate.wait(10):
            raise AssertionError("fsync never released")
        if error:
            self.log.append("fsync failed")
            raise error[0]
        fsync_directory(path)
        self.log.append("fsync done")

    def wait_started(self) -> None:
        if not self.started.acquire(timeout=10):
            raise AssertionError("no fsync started")

    def release(self, error: BaseException | None = None) -> None:
        """Finish the oldest fsync under way (failing with ``error``)."""
        wait_until(lambda: bool(self._gates))
        with self._lock:
            gate, errors = self._gates.pop(0)
        if error is not None:
            errors.append(error)
        gate.set()


class Threads:
    """A file pool of one new thread per call; its Deferreds fire in that thread."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def run(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()

        def work() -> None:
            try:
                result = f(*args)
            except BaseException:  # noqa: BLE001 - handed to the Deferred
                d.errback(Failure())
            else:
                d.callback(result)

        self.start(work)
        return d

    def call(self, f: Any, log: list[str], name: str) -> None:
        """``f()`` in a thread that logs ``name`` when it returns, or "name raised"."""
        def work() -> None:
            try:
                f()
            except OSError:
                log.append(f"{name} raised")
            else:
                log.append(name)

        self.start(work)

    def start(self, work: Any) -> None:
        thread = threading.Thread(target=work)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)


def wait_until(condition: Any) -> None:
    """Wait for another thread to get somewhere observable (not a timing assertion)."""
    for _ in range(10000):
        if condition():
            return
        threading.Event().wait(0.001)
    raise AssertionError("never happened")


class ThreadedDirectorySyncTests(SynchronousTestCase):
    """Group commit in the file pool: nobody returns before an fsync that began after its call."""

    def setUp(self) -> None:
        self.fsync = HeldFsync()
        self.sync = ThreadedDirectorySync(self.mktemp(), self.fsync)
        os.mkdir(self.sync.path)
        self.threads = Threads()
        self.addCleanup(self.threads.join)

    def call(self, name: str) -> None:
        self.threads.call(self.sync.sync, self.fsync.log, name)

    def test_never_returns_before_its_fsync(self) -> None:
        self.call("a")
        self.fsync.wait_started()
        self.assertEqual(self.fsync.log, ["fsync started"])
        self.fsync.release()
        self.threads.join()
        self.assertEqual(self.fsync.log, ["fsync started", "fsync done", "a"])

    def test_callers_during_an_fsync_share_the_next(self) -> None:
        self.call("a")
        self.fsync.wait_started()
        self.call("b")
        self.call("c")
        wait_until(lambda: self.sync._asked == 3)  # both asked while a's fsync ran
        self.fsync.release()
        self.fsync.wait_started()  # one more fsync, for both of them
        wait_until(lambda: "a" in self.fsync.log)
        self.assertNotIn("b", self.fsync.log)  # that fsync may have begun before their renames
        self.assertNotIn("c", self.fsync.log)
        self.fsync.release()
        self.threads.join()
        self.assertEqual(self.fsync.log.count("fsync started"), 2)
        self.assertEqual(sorted(self.fsync.log[-2:]), ["b", "c"])
        self.assertEqual(self.fsync.log[-3], "fsync done")

    def test_failed_fsync_covers_nobody(self) -> None:
        self.call("a")
        self.fsync.wait_started()
        self.call("b")
        wait_until(lambda: self.sync._asked == 2)
        self.fsync.release(OSError(errno.EIO, "Input/output error"))
        self.fsync.wait_started()  # b tries its own
        self.fsync.release()
        self.threads.join()
        self.assertEqual(self.fsync.log, ["fsync started", "fsync failed", "a raised",
                                          "fsync started", "fsync done", "b"])


class GroupCommitTests(SynchronousTestCase):
    """The spool's commits and removals wait for active/'s fsync, shared, in the file pool."""

    def setUp(self) -> None:
        self.threads = Threads()
        self.addCleanup(self.threads.join)
        self.spool = Spool(self.mktemp(), run=self.threads.run)
        self.spool.prepare()
        self.fsync = HeldFsync()
        self.spool.active_sync.fsync = self.fsync

    def begin(self, tid: str) -> defer.Deferred:
        w = self.spool.writer(tid)
        w.write(b"hello")
        d = w.commit(envelope(tid))
        d.addCallback(lambda q: self.fsync.log.append(f"committed {tid}") or q)
        return d

    def test_commit_answers_only_after_the_directory_fsync(self) -> None:
        d = self.begin("1")
        self.fsync.wait_started()
        self.assertEqual(os.listdir(self.spool.active), ["1"])  # renamed...
        self.assertNoResult(d)  # ...but not yet durable: no answer
        self.fsync.release()
        self.threads.join()
        self.successResultOf(d)
        self.assertEqual(self.fsync.log, ["fsync started", "fsync done", "committed 1"])

    def test_failed_directory_fsync_fails_the_commit(self) -> None:
        d = self.begin("1")
        self.fsync.wait_started()
        self.fsync.release(OSError(errno.EIO, "Input/output error"))
        self.threads.join()
        self.failureResultOf(d, OSError)  # no 250
        self.assertNotIn("committed 1", self.fsync.log)

    def test_an_entry_leaving_is_deleted_only_after_the_fsync(self) -> None:
        first = self.begin("1")
        self.fsync.wait_started()
        self.fsync.release()
        self.threads.join()
        queued = self.successResultOf(first)
        queued.states[0].done = True
        removal = self.spool.record(queued, 1, done=True)
        self.fsync.wait_started()
        trash = os.path.join(self.spool.incoming, "1.removed")
        self.assertEqual(os.listdir(self.spool.active), [])  # renamed out...
        self.assertTrue(os.path.exists(trash))  # ...but kept until that is on disk
        self.assertNoResult(removal)
        self.fsync.release()
        self.threads.join()
        self.successResultOf(removal)
        self.assertEqual(os.listdir(self.spool.incoming), [])


class OwedEventsTests(SynchronousTestCase):
    """The spool keeps what events a committed message owes until they are marked written."""

    def setUp(self) -> None:
        self.spool = Spool(self.mktemp(), run=run_synchronously)
        self.spool.prepare()

    def commit_owing(self) -> Any:
        env = envelope("1")
        env.announce = {"friendly_from": "a@b.test", "subject": "s", "prepare": False,
                        "injection": ["11", "12"], "rejected": []}
        w = self.spool.writer("1")
        w.write(b"hello")
        return self.successResultOf(w.commit(env))

    def recovered(self) -> tuple[list[Any], list[Any]]:
        spool = Spool(self.spool.directory, run=run_synchronously)
        owed: list[Any] = []
        spool.on_owed = owed.append
        return list(spool.recover()), owed

    def test_recovery_hands_over_what_is_still_owed(self) -> None:
        self.commit_owing()
        [queued], [owed] = self.recovered()
        self.assertIs(owed, queued)
        self.assertEqual(queued.envelope.announce["injection"], ["11", "12"])

    def test_marked_written_is_not_owed_after_a_restart(self) -> None:
        queued = self.commit_owing()
        fsyncs: list[int] = []
        self.patch(os, "fsync", fsyncs.append)
        self.successResultOf(self.spool.announced(queued))
        self.assertEqual(fsyncs, [])  # the mark has no fsync of its own
        [again], owed = self.recovered()
        self.assertEqual(owed, [])
        self.assertTrue(again.announced)

    def test_mark_after_the_last_copy_left_writes_nothing(self) -> None:
        queued = self.commit_owing()
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.successResultOf(self.spool.record(queued, 1, done=True))
        self.successResultOf(self.spool.announced(queued))
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.journal)), ([], []))

    def test_journal_left_by_a_removal_cut_short_is_dropped(self) -> None:
        queued = self.commit_owing()
        self.successResultOf(self.spool.record(queued, 0, done=False))
        os.unlink(queued.path)  # the entry left active/; a crash came before its journal went
        self.assertEqual(self.recovered(), ([], []))
        self.assertEqual(os.listdir(self.spool.journal), [])


class DelayedMarksTests(SynchronousTestCase):
    """Given a clock, "events written" marks wait, go together, and skip entries already gone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[list[str]] = []

        def run(f: Any, *args: Any) -> defer.Deferred:
            if f == self.spool._mark_announced:
                self.calls.append([q.envelope.transmission_id for q in args[0]])
            return run_synchronously(f, *args)

        self.spool = Spool(self.mktemp(), run=run, clock=self.clock, mark_delay=1.0)
        self.spool.prepare()

    def commit(self, tid: str) -> Any:
        w = self.spool.writer(tid)
        w.write(b"hello")
        env = envelope(tid, 1)
        env.announce = {"friendly_from": "", "subject": "", "prepare": False,
                        "injection": [f"{tid}1"], "rejected": []}
        return self.successResultOf(w.commit(env))

    def recovered_owed(self) -> list[str]:
        spool = Spool(self.spool.directory, run=run_synchronously)
        owed: list[Any] = []
        spool.on_owed = owed.append
        list(spool.recover())
        return [q.envelope.transmission_id for q in owed]

    def test_marks_are_written_together_after_the_delay(self) -> None:
        a, b = self.commit("1"), self.commit("2")
        marked = [self.spool.announced(a), self.spool.announced(b)]
        self.assertEqual(self.calls, [])
        self.assertNoResult(marked[0])
        self.assertEqual(self.recovered_owed(), ["1", "2"])  # owed until the marks are on file
        self.clock.advance(1.0)
        self.assertEqual(self.calls, [["1", "2"]])  # one file-pool call for both
        for d in marked:
            self.successResultOf(d)
        self.assertEqual(self.recovered_owed(), [])

    def test_an_entry_delivered_meanwhile_gets_no_journal(self) -> None:
        queued = self.commit("1")
        marked = self.spool.announced(queued)
        removed = self.spool.record(queued, 0, done=True)
        self.clock.advance(1.0)
        self.successResultOf(removed)
        self.successResultOf(marked)
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.journal)), ([], []))

    def test_write_marks_does_not_wait_for_the_delay(self) -> None:
        marked = self.spool.announced(self.commit("1"))
        self.spool.write_marks()
        self.successResultOf(marked)
        self.assertEqual(self.recovered_owed(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CommittedTextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = Spool(self.mktemp(), run=run_synchronously)
        self.spool.prepare()

    def test_committed_text_is_read_without_the_disk(self) -> None:
        w = self.spool.writer("1")
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        queued = self.successResultOf(w.commit(envelope("1")))
        with open(queued.path, "wb") as f:  # were it read back, this is what would come
            f.write(b"changed")
        self.assertEqual(self.spool.read_message(queued), b"Subject: x\r\n\r\nbody\r\n")
        queued.text = None  # dropped once prepared: from disk again
        self.assertEqual(self.spool.read_message(queued), b"changed")

    def test_missing_incoming_is_noticed_again_after_a_failed_commit(self) -> None:
        w = self.spool.writer("1")  # incoming/ looked at here, once
        w.write(b"hello")
        shutil.rmtree(self.spool.incoming)
        self.failureResultOf(w.commit(envelope("1")), FileNotFoundError)
        self.assertRaises(FileNotFoundError, self.spool.writer, "2")  # at DATA, not after it
        os.mkdir(self.spool.incoming)
        self.spool.writer("3").abort()

    def test_entry_that_never_had_a_journal_is_removed_without_looking_for_one(self) -> None:
        w = self.spool.writer("1")
        w.write(b"hello")
        queued = self.successResultOf(w.commit(envelope("1", 1)))
        unlinked: list[str] = []
        real = os.unlink
        self.patch(spool_module.os, "unlink", lambda p: (unlinked.append(os.path.basename(p)), real(p)))
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.assertEqual(unlinked, ["1.removed"])
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.incoming)), ([], []))

    def test_a_journal_written_is_removed_with_its_entry(self) -> None:
        w = self.spool.writer("1")
        w.write(b"hello")
        queued = self.successResultOf(w.commit(envelope("1", 2)))
        self.successResultOf(self.spool.announced(queued))
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.successResultOf(self.spool.record(queued, 1, done=True))
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.journal)), ([], []))


class HeldJobs:
    """A runner that holds each job until the test runs it, as a busy file pool would."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run(self, index: int = 0) -> None:
        f, args, d = self.jobs.pop(index)
        try:
            result = f(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class EarlyCreationTests(SynchronousTestCase):
    """The entry's file is created in the file pool at DATA, so the commit need not wait for it."""

    def setUp(self) -> None:
        self.jobs = HeldJobs()
        self.spool = Spool(self.mktemp(), run=self.jobs)
        self.spool.prepare()

    def incoming(self) -> list[str]:
        return sorted(os.listdir(self.spool.incoming))

    def commit(self, w: spoolwriter_module.SpoolWriter) -> Any:
        d = w.commit(envelope(w.transmission_id))
        self.jobs.run(len(self.jobs.jobs) - 1)
        return self.successResultOf(d)

    def test_file_is_created_by_the_file_pool_and_used_by_the_commit(self) -> None:
        fds = open_fds()
        w = self.spool.writer("1")
        w.write(b"hello\r\n")
        self.assertEqual(self.incoming(), [])  # nothing on the reactor thread
        self.jobs.run()
        self.assertEqual(self.incoming(), ["1"])
        created = os.stat(os.path.join(self.spool.incoming, "1")).st_ino
        queued = self.commit(w)
        self.assertEqual(os.stat(queued.path).st_ino, created)  # the same file, not a second one
        self.assertEqual(self.spool.read_message(queued), b"hello\r\n")
        self.assertEqual((self.incoming(), os.listdir(self.spool.active)), ([], ["1"]))
        self.assertEqual(open_fds(), fds)

    def test_commit_before_the_creation_creates_the_file_itself(self) -> None:
        w = self.spool.writer("1")
        w.write(b"hello\r\n")
        queued = self.commit(w)  # the pool ran the commit before the creation
        self.jobs.run()  # the creation, late: it must not make a second file
        self.assertEqual(self.incoming(), [])
        queued.text = None
        self.assertEqual(self.spool.read_message(queued), b"hello\r\n")

    def test_abort_before_the_creation_leaves_nothing(self) -> None:
        fds = open_fds()
        w = self.spool.writer("1")
        w.abort()
        self.jobs.run()  # the creation: it must not make the file now
        self.jobs.run()  # the abort's removal
        self.assertEqual(self.incoming(), [])
        self.assertEqual(open_fds(), fds)

    def test_abort_after_the_creation_removes_the_file_and_closes_it(self) -> None:
        fds = open_fds()
        w = self.spool.writer("1")
        self.jobs.run()
        self.assertEqual(self.incoming(), ["1"])
        w.abort()
        self.assertEqual(self.incoming(), ["1"])  # not on the reactor thread: in the file pool
        self.jobs.run()
        self.assertEqual(self.incoming(), [])
        self.assertEqual(open_fds(), fds)

    def test_abort_never_waits_for_a_creation_under_way(self) -> None:
        """The reactor thread takes no lock a file-pool thread may hold over a slow disk."""
        w = self.spool.writer("1")
        entered, release = threading.Event(), threading.Event()
        real = spoolwriter_module._create_new

        def slow(path: str) -> int:
            entered.set()
            release.wait(10)
            return real(path)

        self.patch(spoolwriter_module, "_create_new", slow)
        creating = threading.Thread(target=self.jobs.run)
        creating.start()
        self.assertTrue(entered.wait(10))
        w.abort()  # returns while the creation waits on the disk
        release.set()
        creating.join(10)
        self.jobs.run()
        self.assertEqual(self.incoming(), [])

    def test_failed_creation_is_tried_again_by_the_commit(self) -> None:
        real, calls = spoolwriter_module._create_new, []

        def failing_once(path: str) -> int:
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path)

        self.patch(spoolwriter_module, "_create_new", failing_once)
        w = self.spool.writer("1")
        w.write(b"hello\r\n")
        self.jobs.run()  # fails quietly: the commit is the one to report a failure
        self.assertEqual(self.incoming(), [])
        queued = self.commit(w)
        self.assertEqual(len(calls), 2)
        queued.text = None
        self.assertEqual(self.spool.read_message(queued), b"hello\r\n")

    def test_creation_that_keeps_failing_fails_the_commit_and_leaves_nothing(self) -> None:
        def failing(path: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spoolwriter_module, "_create_new", failing)
        w = self.spool.writer("1")
        w.write(b"hello\r\n")
        self.jobs.run()
        d = w.commit(envelope("1"))
        self.jobs.run()
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ENOSPC)
        self.assertEqual((self.incoming(), os.listdir(self.spool.active)), ([], []))

    def test_spill_writes_to_the_file_created_early(self) -> None:
        w = self.spool.writer("1")
        self.jobs.run()
        created = os.stat(os.path.join(self.spool.incoming, "1")).st_ino
        chunk = b"x" * 1000 + b"\r\n"
        for _ in range(spoolwriter_module.SPILL_AT // len(chunk) + 2):
            w.write(chunk)
        self.assertGreater(os.path.getsize(os.path.join(self.spool.incoming, "1")), 0)
        queued = self.commit(w)
        self.assertEqual(os.stat(queued.path).st_ino, created)
        self.assertEqual(len(self.spool.read_message(queued)), w.size)


class SpareFileTests(SynchronousTestCase):
    """Spare files made ahead in batches: a transaction's file is neither a job of its own nor late."""

    def setUp(self) -> None:
        self.jobs = HeldJobs()
        self.spool = Spool(self.mktemp(), run=self.jobs, spares=4)
        self.spool.prepare()
        self.fds = open_fds()

    def incoming(self) -> list[str]:
        return sorted(os.listdir(self.spool.incoming))

    def test_spares_are_made_in_one_job_and_each_transaction_takes_one(self) -> None:
        first = self.spool.writer("1")  # none ready yet: this one's file is created early
        self.assertEqual(len(self.jobs.jobs), 2)  # its creation, and one batch of spares
        self.jobs.run(1)
        spares = self.incoming()
        self.assertEqual(len(spares), 4)
        self.assertTrue(all(name.startswith(spares_module.SPARE_PREFIX) for name in spares))
        self.jobs.run()
        self.assertEqual(open_fds(), self.fds + 5)  # four spares and the first one's file
        writers = [self.spool.writer("2")]
        self.assertEqual(self.jobs.jobs, [])  # taken from the spares: no job
        writers.append(self.spool.writer("3"))  # down to half: one batch tops them up
        writers.append(self.spool.writer("4"))
        self.assertEqual(len(self.jobs.jobs), 1)
        self.jobs.run()
        self.assertEqual(len(self.spool.spares), 3)  # the two it was asked for, after "4" took one
        for w in [first, *writers]:
            text = b"text of " + w.transmission_id.encode() + b"\r\n"
            w.write(text)
            d = w.commit(envelope(w.transmission_id))
            while self.jobs.jobs:  # the commit, and the removal of its spare's name
                self.jobs.run()
            queued = self.successResultOf(d)
            queued.text = None
            self.assertEqual(self.spool.read_message(queued), text)
        self.assertEqual(sorted(os.listdir(self.spool.active)), ["1", "2", "3", "4"])
        self.assertEqual(len(self.incoming()), 3)  # the spares not taken
        self.spool.spares.close()
        self.assertEqual(len(self.incoming()), 3)  # closed and removed in the file pool
        self.jobs.run()
        self.assertEqual((self.incoming(), open_fds()), ([], self.fds))

    def test_an_aborted_transaction_removes_its_spare(self) -> None:
        self.spool.writer("1")
        self.jobs.run(1)  # the spares
        self.jobs.run()
        w = self.spool.writer("2")
        taken = w.path
        w.abort()
        self.jobs.run()
        self.assertNotIn(os.path.basename(taken), self.incoming())
        self.assertEqual(len(self.incoming()), 3 + 1)  # the others, and the first one's file

    def test_spares_made_after_a_stop_are_dropped(self) -> None:
        self.spool.writer("1")
        self.spool.spares.close()
        self.jobs.run(1)  # the batch ends after the stop
        self.jobs.run()
        self.assertEqual(self.incoming(), ["1"])
        self.assertEqual(open_fds(), self.fds + 1)
        self.spool.writer("2")
        self.assertEqual(len(self.jobs.jobs), 1)  # its own creation; no spares any more

    def test_a_failed_batch_is_logged_once_and_transactions_go_on(self) -> None:
        self.patch(spares_module.os, "open", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        self.spool.writer("1")
        self.jobs.run(1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(list(self.spool.spares._ready), [])
        self.spool.writer("2")  # its own creation, and no batch: spares are paused
        self.assertEqual([job[0] for job in self.jobs.jobs][-1].__name__, "_create")
        self.assertEqual(len(self.jobs.jobs), 2)
        self.patch(spares_module.time, "monotonic", lambda: 1e12)  # the pause is over
        self.spool.writer("3")
        self.assertEqual([job[0] for job in self.jobs.jobs][-1], spares_module._create)

    def ready(self) -> None:
        """Spares made, and the first transaction's file created (then aborted)."""
        self.spool.writer("0").abort()
        while self.jobs.jobs:
            self.jobs.run()
        self.assertEqual(len(self.spool.spares), 4)
        self.fds = open_fds()

    def test_an_aborted_transaction_closes_its_spare(self) -> None:
        self.ready()
        self.spool.writer("1").abort()
        self.jobs.run()
        self.assertEqual((len(self.incoming()), open_fds()), (3, self.fds - 1))

    def test_a_spilled_message_goes_on_in_its_spare(self) -> None:
        self.ready()
        self.patch(spoolwriter_module, "SPILL_AT", 10)
        w = self.spool.writer("1")
        spare = w.path
        text = b"x" * 50 + b"\r\n"
        w.write(text)  # past SPILL_AT: written out to the spare now, not to a file of its own
        self.assertEqual(os.fstat(w._file.fileno()).st_ino, os.stat(spare).st_ino)
        self.assertEqual(self.jobs.jobs, [])
        d = w.commit(envelope("1"))
        self.jobs.run()
        queued = self.successResultOf(d)
        self.assertEqual(self.spool.read_message(queued), text)
        self.assertEqual(open_fds(), self.fds - 1)

    def test_a_refused_transaction_takes_no_spare(self) -> None:
        self.ready()
        self.spool._usable = False
        os.rename(self.spool.incoming, self.spool.incoming + ".away")
        self.assertRaises(FileNotFoundError, self.spool.writer, "1")
        self.assertEqual((len(self.spool.spares), open_fds()), (4, self.fds))
        os.rename(self.spool.incoming + ".away", self.spool.incoming)

    def test_a_new_incoming_directory_costs_one_transaction_at_most(self) -> None:
        """incoming/ removed and made again: a spare made in the old one is never renamed."""
        self.ready()
        shutil.rmtree(self.spool.incoming)
        os.mkdir(self.spool.incoming)
        w = self.spool.writer("1")
        w.write(b"text\r\n")
        d = w.commit(envelope("1"))
        self.jobs.run()
        self.failureResultOf(d, FileNotFoundError)
        self.assertEqual(len(self.spool.spares), 0)  # the others are dropped with it
        while self.jobs.jobs:
            self.jobs.run()
        self.assertEqual(open_fds(), self.fds - 4)
        w = self.spool.writer("2")  # a file of its own, in the new incoming/
        w.write(b"text\r\n")
        d = w.commit(envelope("2"))
        while self.jobs.jobs:
            self.jobs.run(len(self.jobs.jobs) - 1)
        self.assertEqual(self.successResultOf(d).path, os.path.join(self.spool.active, "2"))

    def test_a_copied_incoming_directory_is_no_place_for_a_message(self) -> None:
        """incoming/ swapped for a copy: the spare's name is another, empty file now."""
        self.ready()
        w = self.spool.writer("1")
        copy = self.spool.incoming + ".copy"
        shutil.copytree(self.spool.incoming, copy)
        shutil.rmtree(self.spool.incoming)
        os.rename(copy, self.spool.incoming)
        w.write(b"text\r\n")
        d = w.commit(envelope("1"))
        self.jobs.run()
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ESTALE)
        self.assertEqual(os.listdir(self.spool.active), [])  # no empty entry acknowledged
        self.flushLoggedErrors()

    def test_leftover_spares_are_removed_at_start_without_a_word(self) -> None:
        self.spool.writer("1")
        self.jobs.run(1)
        self.jobs.run()
        messages: list[str] = []
        self.patch(spool_module.log, "info", lambda fmt, **kw: messages.append(fmt.format(**kw)))
        fresh = Spool(self.spool.directory, run=self.jobs)
        fresh.prepare()
        self.assertEqual(self.incoming(), [])
        self.assertEqual(messages, ["discarding unacknowledged spool entry 1"])
        self.spool.spares.close()


class BatchedRemovalTests(SynchronousTestCase):
    """Given a clock, finished entries leave active/ at once, and one later fsync covers them all."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[list[str]] = []
        self.fsyncs: list[str] = []

        def run(f: Any, *args: Any) -> defer.Deferred:
            if f == self.spool._sync_removed:
                self.calls.append([q.envelope.transmission_id for q in args[0]])
            return run_synchronously(f, *args)

        self.spool = Spool(self.mktemp(), run=run, clock=self.clock)
        self.spool.prepare()
        self.spool.active_sync.fsync = self.fsync
        self.spool.incoming_sync.fsync = self.fsync

    def fsync(self, path: str) -> None:
        self.fsyncs.append(path)

    def commit(self, tid: str, n: int = 1) -> Any:
        w = self.spool.writer(tid)
        w.write(b"hello")
        return self.successResultOf(w.commit(envelope(tid, n)))

    def recovered(self) -> list[str]:
        fresh = Spool(self.spool.directory, run=run_synchronously)
        fresh.prepare()  # as a start does: incoming/ emptied
        return [q.envelope.transmission_id for q in fresh.recover()]

    def test_finished_entries_share_one_fsync_after_the_delay(self) -> None:
        a, b = self.commit("1"), self.commit("2")
        self.fsyncs.clear()
        removed = [self.spool.record(a, 0, done=True), self.spool.record(b, 0, done=True)]
        # Out of active/ at once (a kill now sends neither again), not yet durably so.
        self.assertEqual(os.listdir(self.spool.active), [])
        self.assertEqual(self.fsyncs, [])
        self.assertNoResult(removed[0])
        self.clock.advance(REMOVE_DELAY)
        self.assertEqual(self.calls, [["1", "2"]])  # one file-pool call
        # One fsync of each directory for both: active/ for their leaving, incoming/ for the
        # commits' renames out of it, before anything is deleted.
        self.assertEqual(self.fsyncs, [self.spool.active, self.spool.incoming])
        for d in removed:
            self.successResultOf(d)
        self.assertEqual((os.listdir(self.spool.incoming), os.listdir(self.spool.journal)), ([], []))

    def test_a_kill_within_the_delay_does_not_send_a_final_copy_again(self) -> None:
        queued = self.commit("1")
        self.spool.record(queued, 0, done=True)
        self.assertEqual(self.recovered(), [])  # the process gone before the fsync: the rename holds
        self.assertEqual(os.listdir(self.spool.incoming), [])  # and the start-up emptied incoming/

    def test_a_copy_not_yet_the_last_is_journalled_at_once(self) -> None:
        queued = self.commit("1", n=2)
        self.successResultOf(self.spool.record(queued, 0, done=True))
        self.assertEqual(self.calls, [])
        self.assertEqual(os.listdir(self.spool.journal), ["1"])
        removed = self.spool.record(queued, 1, done=True)
        self.clock.advance(REMOVE_DELAY)
        self.successResultOf(removed)
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.journal)), ([], []))

    def test_a_full_batch_does_not_wait(self) -> None:
        entries = [self.commit(str(i)) for i in range(REMOVE_BATCH)]
        removed = [self.spool.record(q, 0, done=True) for q in entries]
        self.assertEqual(len(self.calls), 1)
        for d in removed:
            self.successResultOf(d)
        self.assertEqual(os.listdir(self.spool.incoming), [])

    def test_a_stop_syncs_at_once_from_then_on(self) -> None:
        a, b = self.commit("1"), self.commit("2")
        first = self.spool.record(a, 0, done=True)
        self.spool.stop_batching()
        self.successResultOf(first)
        self.successResultOf(self.spool.record(b, 0, done=True))
        self.assertEqual(self.calls, [["1"]])  # "2" went the direct way
        self.assertEqual((os.listdir(self.spool.active), os.listdir(self.spool.incoming)), ([], []))

    def test_an_entry_that_cannot_leave_is_journalled_final_instead(self) -> None:
        a, b = self.commit("1"), self.commit("2")
        real_rename = os.rename

        def rename(src: str, dst: str) -> None:
            if src == a.path:
                raise PermissionError(13, "Permission denied", src)
            real_rename(src, dst)

        self.patch(os, "rename", rename)
        removed = [self.spool.record(a, 0, done=True), self.spool.record(b, 0, done=True)]
        self.successResultOf(removed[0])  # its journal line is on disk: final, no batch to wait for
        self.clock.advance(REMOVE_DELAY)
        self.successResultOf(removed[1])
        self.assertEqual(self.calls, [["2"]])
        self.assertEqual(os.listdir(self.spool.active), ["1"])
        self.assertEqual(os.listdir(self.spool.journal), ["1"])
        self.patch(os, "rename", real_rename)
        self.assertEqual(self.recovered(), [])  # final: never sent again, and removed at start-up
        self.assertEqual(os.listdir(self.spool.active), [])

    def test_a_failed_fsync_is_logged_once_and_deletes_nothing(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        a, b = self.commit("1"), self.commit("2")

        def failing(path: str) -> None:
            raise OSError(5, "Input/output error", path)

        self.spool.active_sync.fsync = failing
        removed = [self.spool.record(a, 0, done=True), self.spool.record(b, 0, done=True)]
        self.clock.advance(REMOVE_DELAY)
        for d in removed:  # final all the same: nothing for delivery to retry or report
            self.successResultOf(d)
        errors = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("after 2 finished entries", errors[0])
        # Out of active/ but not known to be durably so: their text stays until the next start.
        self.assertEqual(os.listdir(self.spool.active), [])
        self.assertEqual(sorted(os.listdir(self.spool.incoming)), ["1.removed", "2.removed"])

    def test_the_start_makes_the_last_runs_removals_durable_before_deleting(self) -> None:
        queued = self.commit("1")
        self.spool.record(queued, 0, done=True)  # renamed out; killed before the batch's fsync
        order: list[str] = []
        real_fsync, real_remove = spool_module.fsync_directory, spool_module._remove_path
        self.patch(spool_module, "fsync_directory", lambda path: (order.append(f"fsync {path}"),
                                                                  real_fsync(path)))
        self.patch(spool_module, "_remove_path", lambda path: (order.append(f"remove {path}"),
                                                               real_remove(path)))
        Spool(self.spool.directory, run=run_synchronously).prepare()
        self.assertEqual(order, [f"fsync {self.spool.active}",
                                 f"remove {os.path.join(self.spool.incoming, '1.removed')}",
                                 f"fsync {self.spool.incoming}"])


def record_fsyncs(case: SynchronousTestCase, spool: Spool) -> list[str]:
    """The paths fsynced from now on, relative to ``spool``'s directory (Linux: through /proc)."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), spool.directory))
        real(fd)

    case.patch(os, "fsync", fsync)
    return calls


class CommitInSpareTests(SynchronousTestCase):
    """
    A message received into a spare is on disk, and acknowledged, once its file is.

    The spare's name was made durable before it was handed out; the entry's
    link into active/ that follows is made durable later, and only then does
    the spare's name go. A kill before the link leaves the message in
    incoming/ alone, and the next start takes it from there if, and only if,
    its text is whole.
    """

    def setUp(self) -> None:
        self.jobs = HeldJobs()
        self.spool = Spool(self.mktemp(), run=self.jobs, spares=4)
        self.spool.prepare()
        self.addCleanup(lambda: self.spool.spares.close() and None)
        self.addCleanup(self.drain)

    def drain(self) -> None:
        while self.jobs.jobs:
            self.jobs.run()

    def ready(self) -> None:
        self.spool.writer("0").abort()
        self.drain()
        self.assertEqual(len(self.spool.spares), 4)

    def commit(self, tid: str, text: bytes = b"hello\r\n") -> Any:
        w = self.spool.writer(tid)
        w.write(text)
        d = w.commit(envelope(tid))
        self.drain()
        return w, self.successResultOf(d)

    def test_the_spares_names_are_on_disk_before_one_is_handed_out(self) -> None:
        synced: list[str] = []
        real = spares_module.fsync_directory
        self.patch(spares_module, "fsync_directory",
                   lambda path: (synced.append(f"{path}: {len(os.listdir(path))} files"), real(path)))
        self.spool.writer("0").abort()
        self.jobs.run(1)  # the batch of spares
        self.assertEqual(synced, [f"{self.spool.incoming}: 4 files"])  # after they were made
        self.assertEqual(len(self.spool.spares), 4)

    def test_a_batch_whose_names_cannot_be_made_durable_is_not_used(self) -> None:
        def failing(path: str) -> None:
            raise OSError(errno.EIO, "Input/output error", path)

        fds = open_fds()
        self.patch(spares_module, "fsync_directory", failing)
        self.spool.writer("0").abort()
        self.drain()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((len(self.spool.spares), os.listdir(self.spool.incoming)), (0, []))
        self.assertEqual(open_fds(), fds)

    def test_the_commit_fsyncs_only_its_file(self) -> None:
        self.ready()
        fsyncs = record_fsyncs(self, self.spool)
        synced: list[str] = []
        self.spool.active_sync.fsync = synced.append
        w, queued = self.committed_only("1")
        self.assertEqual(fsyncs, [os.path.relpath(w.path, self.spool.directory)])  # the spare, as written
        self.assertEqual(synced, [])  # no fsync of active/ before the reply
        self.assertEqual(queued.path, os.path.join(self.spool.active, "1"))  # linked there
        self.assertEqual(os.stat(queued.path).st_ino, os.stat(w.path).st_ino)  # the spare's name stays
        self.assertEqual(queued.envelope.text_crc32, zlib.crc32(b"hello\r\n"))
        # Then, apart: one fsync of active/ covers the entry's name, and the spare's goes.
        self.drain()
        self.assertEqual(synced, [self.spool.active])
        self.assertFalse(os.path.exists(w.path))
        self.assertIsNone(queued.spare)
        [recovered] = Spool(self.spool.directory, run=run_synchronously).recover()
        self.assertEqual(recovered.envelope.text_crc32, zlib.crc32(b"hello\r\n"))

    def test_a_spilled_message_still_waits_for_active(self) -> None:
        """Its text was written as it came, with no checksum: the rename is what commits it."""
        self.ready()
        self.patch(spoolwriter_module, "SPILL_AT", 10)
        synced: list[str] = []
        self.spool.active_sync.fsync = synced.append
        _, queued = self.commit("1", b"x" * 50 + b"\r\n")
        self.assertEqual(synced, [self.spool.active])
        self.assertIsNone(queued.envelope.text_crc32)

    def killed_before_the_link(self, tid: str, text: bytes = b"hello\r\n") -> str:
        """Commit ``tid`` into a spare, then undo its link, as a kill before it would leave it."""
        self.ready()
        w, queued = self.commit(tid, text)
        os.rename(queued.path, w.path)
        return w.path

    def start(self) -> tuple[list[str], list[str], list[Any]]:
        fresh = Spool(self.spool.directory, run=run_synchronously)
        fresh.prepare()
        recovered = list(fresh.recover())
        return os.listdir(self.spool.incoming), os.listdir(self.spool.active), recovered

    def test_the_start_takes_a_committed_spare_into_active(self) -> None:
        self.killed_before_the_link("1")
        self.spool.spares.close()
        self.drain()
        logged: list[str] = []
        self.patch(spool_module.log, "info", lambda fmt, **kw: logged.append(fmt.format(**kw)))
        incoming, active, [queued] = self.start()
        self.assertEqual((incoming, active), ([], ["1"]))
        self.assertEqual(Spool(self.spool.directory).read_message(queued), b"hello\r\n")
        self.assertEqual([r.address for r in queued.envelope.recipients], ["r0@x.test", "r1@x.test"])
        self.assertEqual(logged, ["spool entry 1 was committed but not yet linked into active/; linked"])

    def test_the_link_is_made_durable_before_anything_is_deleted(self) -> None:
        self.killed_before_the_link("1")
        order: list[str] = []
        real_fsync, real_remove, real_link = spool_module.fsync_directory, spool_module._remove_path, os.link
        self.patch(spool_module, "fsync_directory", lambda path: (order.append(f"fsync {path}"),
                                                                  real_fsync(path)))
        self.patch(spool_module, "_remove_path", lambda path: (order.append("remove"), real_remove(path)))
        self.patch(os, "link", lambda src, dst: (order.append(f"link {os.path.basename(dst)}"),
                                                 real_link(src, dst)))
        Spool(self.spool.directory, run=run_synchronously).prepare()
        self.assertEqual(order[:2], ["link 1", f"fsync {self.spool.active}"])
        self.assertEqual(order[-1], f"fsync {self.spool.incoming}")
        self.assertEqual(set(order[2:-1]), {"remove"})  # its spare's name, and the other spares

    def committed_only(self, tid: str, n: int = 2) -> tuple[Any, Any]:
        """Commit ``tid`` into a spare and run that job alone: the job removing its spare's name waits."""
        w = self.spool.writer(tid)
        w.write(b"hello\r\n")
        d = w.commit(envelope(tid, n))
        self.jobs.run(-1)
        return w, self.successResultOf(d)

    def test_a_kill_before_the_spare_name_goes_costs_nothing(self) -> None:
        """Both names at the start: the entry is recovered once, and the spare's name dropped."""
        self.ready()
        w, queued = self.committed_only("1")
        self.assertTrue(os.path.exists(w.path))
        incoming, active, [recovered] = self.start()
        self.assertEqual((incoming, active), ([], ["1"]))
        self.assertEqual(os.stat(recovered.path).st_ino, os.stat(queued.path).st_ino)

    def record_order(self) -> list[str]:
        """Renames, unlinks and directory fsyncs, in order, from now on."""
        order: list[str] = []
        real_unlink, real_rename = spool_module._unlink, os.rename
        self.patch(spool_module, "_unlink", lambda path: (order.append(f"unlink {os.path.basename(path)}"),
                                                          real_unlink(path)))
        self.patch(os, "rename", lambda src, dst: (
            order.append(f"rename {os.path.basename(src)} to {os.path.basename(dst)}"),
            real_rename(src, dst)))
        self.spool.active_sync.fsync = lambda path: order.append("fsync active")
        self.spool.incoming_sync.fsync = lambda path: order.append("fsync incoming")
        return order

    def test_the_spare_name_goes_after_the_fsync_covering_the_link(self) -> None:
        self.ready()
        w, _ = self.committed_only("1")
        order = self.record_order()
        self.drain()
        self.assertEqual(order, ["fsync active", f"unlink {os.path.basename(w.path)}"])

    def test_a_spare_kept_at_a_start_keeps_its_journal(self) -> None:
        """A spare that cannot be linked stays, and so does what its journal says of its copies."""
        path = self.killed_before_the_link("1")
        journal = os.path.join(self.spool.journal, "1")
        with open(journal, "wb") as f:
            f.write(b'{"i":0,"done":true,"attempts":1}\n')
        real_link = os.link

        def failing(src: str, dst: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted", dst)

        self.patch(os, "link", failing)
        self.assertEqual(self.start(), ([os.path.basename(path)], [], []))
        self.assertTrue(os.path.exists(journal))
        self.patch(os, "link", real_link)
        incoming, active, [queued] = self.start()
        self.assertEqual((incoming, active), ([], ["1"]))
        self.assertEqual([s.done for s in queued.states], [True, False])

    def rewrite_envelope(self, path: str, old: bytes, new: bytes) -> None:
        """Replace ``old`` with ``new`` in the envelope of the file at ``path``, its trailer kept right."""
        with open(path, "rb") as f:
            data = f.read()
        size = envelope_module.TRAILER_SIZE
        length = int(data[-11:-1])
        text, raw = data[:-size - length], data[-size - length:-size]
        self.assertIn(old, raw)
        raw = raw.replace(old, new)
        with open(path, "wb") as f:
            f.write(text + raw + b"\nenvelope %010d\n" % len(raw))

    def test_an_envelope_naming_no_plain_entry_is_dropped(self) -> None:
        for tid in (b'"../1"', b'"a/b"', b'"."', b'""', b"5", b"null", b'"a\\u0000b"'):
            path = self.killed_before_the_link("1")
            self.rewrite_envelope(path, b'"transmission_id":"1"', b'"transmission_id":' + tid)
            self.spool.spares.close()  # the start below removes them; new ones for the next round
            self.drain()
            self.assertEqual(self.start(), ([], [], []), tid)
            self.spool.spares.reopen()

    def test_a_spare_with_a_text_not_whole_is_dropped(self) -> None:
        """A power loss before the fsync: the envelope made it to disk, part of the text did not."""
        path = self.killed_before_the_link("1", b"hello, world\r\n")
        with open(path, "r+b") as f:
            f.write(b"\0\0\0\0")
        incoming, active, recovered = self.start()
        self.assertEqual((incoming, active, recovered), ([], [], []))

    def test_a_spare_without_a_checksum_is_dropped(self) -> None:
        """Spilled, or written by a version before it: the rename was its commit, and never came."""
        path = self.killed_before_the_link("1")
        self.rewrite_envelope(path, b',"text_crc32":%d' % zlib.crc32(b"hello\r\n"), b"")
        self.assertEqual(self.start(), ([], [], []))

    def test_only_a_spare_is_taken(self) -> None:
        """incoming/ also holds entries on their way out (``.removed``): never taken back."""
        path = self.killed_before_the_link("1")
        os.rename(path, os.path.join(self.spool.incoming, "1.removed"))
        self.assertEqual(self.start(), ([], [], []))

    def test_an_entry_already_in_active_wins(self) -> None:
        path = self.killed_before_the_link("1")
        entry = os.path.join(self.spool.active, "1")
        shutil.copy(path, entry)
        with open(entry, "r+b") as f:
            f.write(b"HELLO")  # were the spare taken, active/1 would read "hello" again
        incoming, active, [queued] = self.start()
        self.assertEqual((incoming, active), ([], ["1"]))
        self.assertEqual(Spool(self.spool.directory).read_message(queued), b"HELLO\r\n")

    def test_a_spare_from_a_newer_version_is_left_in_place(self) -> None:
        path = self.killed_before_the_link("1")
        with open(path, "rb") as f:
            data = f.read()
        newer = b'"schema":%d' % (envelope_module.ENVELOPE_SCHEMA + 1)
        with open(path, "wb") as f:
            f.write(data.replace(b'"schema":%d' % envelope_module.ENVELOPE_SCHEMA, newer))
        incoming, active, recovered = self.start()
        self.assertEqual((incoming, active, recovered), ([os.path.basename(path)], [], []))
        self.flushLoggedErrors()

    def test_an_entry_leaving_before_its_spare_name_went_takes_the_name_with_it(self) -> None:
        """The name goes before the fsyncs that let the entry's journal and text be deleted."""
        self.ready()
        w, queued = self.committed_only("1", n=1)
        order = self.record_order()
        removed = self.spool.record(queued, 0, done=True)
        self.jobs.run(-1)
        self.successResultOf(removed)
        # The spare's name before the rename: a kill between them leaves the entry in active/,
        # as any kill before a removal does, and no name a start would link back.
        self.assertEqual(order, [f"unlink {os.path.basename(w.path)}", "rename 1 to 1.removed",
                                 "fsync active", "fsync incoming", "unlink 1.removed"])
        self.drain()  # the spare name's own job finds nothing left to do
        self.assertEqual(order[-1], "unlink 1.removed")
        self.assertNotIn(os.path.basename(w.path), os.listdir(self.spool.incoming))


class BatchedSpareNameTests(SynchronousTestCase):
    """As the appliance runs: given a clock, the spare names of many commits go after one fsync."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = Spool(self.mktemp(), run=run_synchronously, clock=self.clock, spares=4)
        self.spool.prepare()
        self.addCleanup(self.spool.spares.close)
        self.synced: list[str] = []
        self.spool.active_sync.fsync = self.synced.append
        self.spool.writer("0").abort()  # the spares are made

    def commit(self, tid: str) -> tuple[str, Any]:
        w = self.spool.writer(tid)
        self.assertTrue(os.path.basename(w.path).startswith(spares_module.SPARE_PREFIX))
        w.write(b"hello\r\n")
        return w.path, self.successResultOf(w.commit(envelope(tid)))

    def test_the_names_wait_for_one_fsync_after_the_delay(self) -> None:
        (a, _), (b, _) = self.commit("1"), self.commit("2")
        self.assertEqual(self.synced, [])
        self.assertTrue(os.path.exists(a) and os.path.exists(b))
        self.clock.advance(REMOVE_DELAY)
        self.assertEqual(self.synced, [self.spool.active])
        self.assertFalse(os.path.exists(a) or os.path.exists(b))

    def test_a_stop_removes_them_at_once(self) -> None:
        path, queued = self.commit("1")
        self.spool.stop_batching()
        self.assertEqual(self.synced, [self.spool.active])
        self.assertFalse(os.path.exists(path))
        self.assertIsNone(queued.spare)
        path, queued = self.commit("2")  # after the stop: at once
        self.assertFalse(os.path.exists(path))
