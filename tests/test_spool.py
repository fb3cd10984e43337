"""The spool's commit protocol and journal, on real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from appliance import spool as spool_module
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
