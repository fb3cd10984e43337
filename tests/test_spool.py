"""The spool's commit protocol and journal, on real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance import spool as spool_module
from appliance.files import fsync_directory
from appliance.groupcommit import DirectorySync
from appliance.settings import Tracking
from appliance.spool import Envelope, Recipient, Spool, run_synchronously


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
        """The paths fsynced from now on, in order (Linux: read back through /proc)."""
        calls: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            calls.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), self.spool.directory))
            real(fd)

        self.patch(os, "fsync", fsync)
        return calls

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
        """Nothing of a message below SPILL_AT is written on the reactor thread; the commit does it."""
        w = self.spool.writer("5")
        w.write(b"Subject: x\r\n\r\n")
        w.write(b"body\r\n")
        self.assertEqual(os.listdir(self.spool.incoming), [])
        queued = self.successResultOf(w.commit(envelope("5")))
        self.assertEqual(self.spool.read_message(queued), b"Subject: x\r\n\r\nbody\r\n")

    def test_large_message_spills_to_its_file_while_it_arrives(self) -> None:
        w = self.spool.writer("6")
        chunk = b"x" * 1000 + b"\r\n"
        for _ in range(spool_module.SPILL_AT // len(chunk) + 2):
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
            f.seek(-spool_module.TRAILER_SIZE - 3, os.SEEK_END)
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
        self.assertEqual(json.loads(data)["schema"], spool_module.ENVELOPE_SCHEMA)
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
        raw["schema"] = spool_module.ENVELOPE_SCHEMA + 1
        with open(os.path.join(path, "envelope.json"), "w") as f:
            json.dump(raw, f)
        self.assertRaises(spool_module.NewerEnvelope, Envelope.from_json, json.dumps(raw).encode())
        self.assertEqual(list(self.spool.recover()), [])
        self.assertEqual(os.listdir(self.spool.active), ["1234567890123"])
        self.assertFalse([n for n in os.listdir(self.spool.directory) if n.startswith("corrupt-")])


class HeldRunner:
    """
    A file pool the test drives: ``fsync_directory`` calls wait for ``release``,
    everything else runs at once. ``log`` is the order things happened in.
    """

    def __init__(self) -> None:
        self.log: list[str] = []
        self.held: list[tuple[defer.Deferred, Any, tuple[Any, ...]]] = []

    def run(self, f: Any, *args: Any) -> defer.Deferred:
        if f is fsync_directory:
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, f, args))
            self.log.append(f"fsync started {os.path.basename(args[0])}")
            return d
        return defer.maybeDeferred(f, *args)

    def release(self) -> None:
        """Finish the oldest fsync under way."""
        d, f, args = self.held.pop(0)
        f(*args)
        self.log.append(f"fsync done {os.path.basename(args[0])}")
        d.callback(None)


class GroupCommitTests(SynchronousTestCase):
    """One directory fsync covers every entry renamed before it began; nothing answers before it."""

    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.spool = Spool(self.mktemp(), run=self.runner.run)
        self.spool.prepare()

    def begin(self, tid: str) -> defer.Deferred:
        w = self.spool.writer(tid)
        w.write(b"hello")
        d = w.commit(envelope(tid))
        d.addCallback(lambda q: self.runner.log.append(f"committed {tid}") or q)
        return d

    def test_commit_answers_only_after_the_directory_fsync(self) -> None:
        d = self.begin("1")
        self.assertEqual(os.listdir(self.spool.active), ["1"])  # renamed...
        self.assertNoResult(d)  # ...but not yet durable: no answer
        self.runner.release()
        self.successResultOf(d)
        self.assertEqual(self.runner.log, ["fsync started active", "fsync done active", "committed 1"])

    def test_concurrent_commits_share_one_fsync(self) -> None:
        first = self.begin("1")  # its fsync starts at once
        second, third = self.begin("2"), self.begin("3")  # renamed while it runs
        self.assertEqual(len(self.runner.held), 1)
        self.runner.release()
        self.successResultOf(first)
        # The fsync under way may have begun before their renames: they wait for the next,
        # which both share.
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.assertEqual(len(self.runner.held), 1)
        self.runner.release()
        self.successResultOf(second)
        self.successResultOf(third)
        # (The next fsync starts as soon as one ends, before the first is answered.)
        self.assertEqual(self.runner.log, [
            "fsync started active", "fsync done active", "fsync started active", "committed 1",
            "fsync done active", "committed 2", "committed 3"])

    def test_failed_directory_fsync_fails_every_commit_it_covered(self) -> None:
        first, second = self.begin("1"), self.begin("2")
        d, _, _ = self.runner.held.pop(0)
        d.errback(OSError(errno.EIO, "Input/output error"))
        self.failureResultOf(first, OSError)
        self.runner.release()  # the next fsync is the second commit's own
        self.successResultOf(second)

    def test_an_entry_leaving_shares_active_fsyncs_with_commits(self) -> None:
        runner = self.runner
        first = self.begin("1")
        runner.release()
        queued = self.successResultOf(first)
        journalled = self.spool.record(queued, 0, done=True)
        runner.release()  # the new journal's name, in journal/
        self.successResultOf(journalled)
        second = self.begin("2")  # an fsync of active/ under way
        removal = self.spool.record(queued, 1, done=True)
        trash = os.path.join(self.spool.incoming, "1.removed")
        self.assertEqual(sorted(os.listdir(self.spool.active)), ["2"])  # renamed out...
        self.assertTrue(os.path.exists(trash))  # ...but kept until that is on disk
        runner.release()
        self.successResultOf(second)
        self.assertNoResult(removal)  # it left after that fsync began: the next one is its
        self.assertTrue(os.path.exists(trash))
        runner.release()
        self.successResultOf(removal)
        self.assertEqual(os.listdir(self.spool.incoming), [])

    def test_new_journals_share_their_directory_fsync(self) -> None:
        runner = self.runner
        a, b = self.begin("1"), self.begin("2")
        runner.release()
        runner.release()
        qa, qb = self.successResultOf(a), self.successResultOf(b)
        runner.log.clear()
        ra, rb = self.spool.record(qa, 0, done=False), self.spool.record(qb, 0, done=False)
        self.assertEqual(runner.log, ["fsync started journal"])
        runner.release()
        self.successResultOf(ra)
        self.assertNoResult(rb)  # its journal was created while that fsync ran
        runner.release()
        self.successResultOf(rb)
        self.assertTrue(qa.journal_durable and qb.journal_durable)
        self.successResultOf(self.spool.record(qa, 1, done=False))
        self.assertEqual(runner.held, [])  # a journal already durable needs no directory fsync


class DirectorySyncTests(SynchronousTestCase):
    def test_never_fires_before_its_fsync(self) -> None:
        started: list[defer.Deferred] = []

        def run(f: Any, path: str) -> defer.Deferred:
            started.append(defer.Deferred())
            return started[-1]

        sync = DirectorySync("/nowhere", run)
        waiting = [sync.sync() for _ in range(3)]
        self.assertEqual(len(started), 1)
        for d in waiting:
            self.assertNoResult(d)
        started[0].callback(None)
        # The first began the fsync; the two that came while it ran need one of their own.
        self.successResultOf(waiting[0])
        self.assertNoResult(waiting[1])
        self.assertEqual(len(started), 2)
        started[1].callback(None)
        self.successResultOf(waiting[1])
        self.successResultOf(waiting[2])


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
