"""The event log: whole lines, SparkPost field names, unique ids."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog, IdGenerator
from appliance.files import fsync_and_close
from tests.helpers import REPO


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


class _Failing:
    """A real unbuffered log file whose next writes go short (``keep`` bytes) or fail."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.keep: int | None = None
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        if self.keep is not None:
            return self.real.write(data[:self.keep])  # type: ignore[attr-defined, no-any-return]
        return self.real.write(data)  # type: ignore[attr-defined, no-any-return]

    def fileno(self) -> int:
        return self.real.fileno()  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


class IntegrityTests(SynchronousTestCase):
    """Only whole lines of strict JSON reach the log; what could not be written is counted."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.jsonl")
        self.log = EventLog(self.path, "n", fsync_interval=0, clock=Clock())
        self.log.startService()
        self.addCleanup(self.log.stopService)
        self.file = _Failing(self.log._file)
        self.log._file = self.file

    def lines(self) -> list[dict[str, object]]:
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertTrue(data == b"" or data.endswith(b"\n"), data)
        return [json.loads(line) for line in data.splitlines()]

    def test_non_finite_number_is_not_written(self) -> None:
        self.log.emit("injection", subject="before")
        self.log.emit("injection", rcpt_meta={"a": float("inf")})
        self.log.emit("injection", rcpt_meta={"a": float("nan")})
        self.log.emit("injection", subject="after")
        self.assertEqual([e["subject"] for e in self.lines()], ["before", "after"])
        self.assertEqual(self.log.lost, 2)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_a_waker_for_some_types_is_woken_only_by_them_or_a_loss(self) -> None:
        every: list[None] = []
        some: list[None] = []
        self.log.wake_on_write(lambda: every.append(None))
        self.log.wake_on_write(lambda: some.append(None), ("bounce", "list_unsubscribe"))
        for kind in ("injection", "delivery", "bounce", "click", "list_unsubscribe"):
            self.log.emit(kind)
        self.assertEqual((len(every), len(some)), (5, 2))
        self.file.error = OSError(errno.EIO, "I/O error")
        self.assertRaises(OSError, self.log.emit, "delivery")
        self.assertEqual((len(every), len(some)), (6, 3))  # a lost event wakes every follower

    def test_short_write_is_cut_off_and_next_line_whole(self) -> None:
        self.log.emit("click", n=1)
        self.file.keep = 10
        self.assertRaises(OSError, self.log.emit, "click", n=2)
        self.file.keep = None
        self.log.emit("click", n=3)
        self.assertEqual([e["n"] for e in self.lines()], [1, 3])
        self.assertEqual(self.log.lost, 1)

    def test_cut_line_that_cannot_be_removed_is_ended(self) -> None:
        self.log.emit("click", n=1)
        self.file.keep = 10
        self.patch(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(28, "full")))
        self.assertRaises(OSError, self.log.emit, "click", n=2)
        self.file.keep = None
        self.log.emit("click", n=3)
        with open(self.path, "rb") as f:
            raw = f.read().splitlines()
        self.assertEqual(len(raw), 3)
        self.assertEqual([json.loads(raw[0])["n"], json.loads(raw[2])["n"]], [1, 3])
        self.assertRaises(ValueError, json.loads, raw[1])
        self.assertEqual(self.log.lost, 1)

    def test_enospc_counts_and_the_log_goes_on(self) -> None:
        self.file.error = OSError(28, "No space left on device")
        self.assertRaises(OSError, self.log.emit, "click", n=1)
        self.file.error = None
        self.log.emit("click", n=2)
        self.assertEqual([e["n"] for e in self.lines()], [2])
        self.assertEqual(self.log.lost, 1)


class FileModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        old = os.umask(0o077)  # what twistd sets when it daemonizes
        self.addCleanup(os.umask, old)
        self.path = os.path.join(self.mktemp(), "events.jsonl")

    def mode(self) -> int:
        return os.stat(self.path).st_mode & 0o777

    def test_new_file_gets_the_mode_whatever_the_umask(self) -> None:
        log = EventLog(self.path, "n", fsync_interval=0, clock=Clock())
        log.open()
        log.close()
        self.assertEqual(self.mode(), 0o640)
        log = EventLog(self.path + "2", "n", fsync_interval=0, clock=Clock(), file_mode=0o604)
        log.open()
        log.close()
        self.assertEqual(os.stat(self.path + "2").st_mode & 0o777, 0o604)

    def test_existing_file_keeps_its_mode(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb"):
            pass
        os.chmod(self.path, 0o600)
        log = EventLog(self.path, "n", fsync_interval=0, clock=Clock())
        log.open()
        log.emit("click")
        log.close()
        self.assertEqual(self.mode(), 0o600)


# Writes events of 100 bytes or so into argv[1] until two could not be written; prints the count lost.
_FILL = """
import sys
from twisted.internet.task import Clock
from appliance.events import EventLog
log = EventLog(sys.argv[1], "n", fsync_interval=0, clock=Clock())
log.open()
n = 0
while log.lost < 2 and n < 1000:
    n += 1
    try:
        log.emit("click", n=n, pad="x" * 50)
    except OSError:
        pass
print(log.lost)
"""


class FileSizeLimitTests(SynchronousTestCase):
    def test_a_real_short_write_leaves_whole_lines(self) -> None:
        """A file size limit cuts a write short as a full disk does; no part of the line stays."""
        limit = 1000

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        path = os.path.abspath(os.path.join(self.mktemp(), "events.jsonl"))
        done = subprocess.run([sys.executable, "-c", _FILL, path], cwd=REPO, capture_output=True,
                              env={**os.environ, "PYTHONPATH": REPO}, preexec_fn=limit_file_size,
                              timeout=60, check=True)
        self.assertEqual(done.stdout.strip(), b"2")
        with open(path, "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(b"\n"))
        numbers = [json.loads(line)["n"] for line in data.splitlines()]
        self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
        self.assertLess(len(data), limit)
