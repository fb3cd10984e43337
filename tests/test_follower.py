"""The event log follower on real files in a temporary directory, with a test clock."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog
from appliance.follower import (
    Cursor,
    CursorError,
    Follower,
    LogReader,
    load_cursor,
    save_cursor,
)
from appliance.spool import run_synchronously


def line(n: int) -> bytes:
    return json.dumps({"type": "delivery", "event_id": str(n)}).encode() + b"\n"


class Recorder:
    """A consumer that keeps what it is given; ``answers`` decide what each call returns."""

    def __init__(self, directory: str) -> None:
        self.name = "recorder"
        self.cursor_path = os.path.join(directory, "recorder", "cursor")
        self.calls: list[list[bytes]] = []
        self.answers: list[Any] = []

    def consume(self, lines: Sequence[bytes]) -> Any:
        self.calls.append(list(lines))
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def ids(self) -> list[str]:
        return [json.loads(x)["event_id"] for call in self.calls for x in call]


class CursorTests(SynchronousTestCase):
    def test_round_trip_and_atomic_file(self) -> None:
        path = os.path.join(self.mktemp(), "c", "cursor")
        self.assertIsNone(load_cursor(path))
        save_cursor(path, Cursor(5, 77, 1234, "0123456789abcdef"))
        self.assertEqual(load_cursor(path).head, "0123456789abcdef")  # type: ignore[union-attr]
        self.assertEqual(load_cursor(path), Cursor(5, 77, 1234))
        save_cursor(path, Cursor(5, 78, 0))
        self.assertEqual(load_cursor(path), Cursor(5, 78, 0))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["cursor"])

    def test_broken_cursors(self) -> None:
        for data, what in ((b"", "not JSON"), (b"[1]", "not a JSON object"),
                           (b'{"version":9,"dev":1,"ino":2,"offset":3}', "unknown version"),
                           (b'{"version":1,"dev":1,"ino":2,"offset":-3}', "non-negative"),
                           (b'{"version":1,"dev":1,"ino":2,"offset":"3"}', "non-negative"),
                           (b'{"version":1,"dev":1,"ino":2,"offset":true}', "non-negative"),
                           (b'{"version":1,"dev":1,"ino":2,"offset":3}', "head")):
            with self.assertRaises(CursorError) as caught:
                Cursor.decode(data)
            self.assertIn(what, str(caught.exception))


class ReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "events.jsonl")

    def append(self, data: bytes, path: str | None = None) -> None:
        with open(path or self.path, "ab") as f:
            f.write(data)

    def test_only_whole_lines(self) -> None:
        self.append(line(1) + line(2)[:10])
        reader = LogReader(self.path, "t")
        self.addCleanup(reader.close)
        reader.start(Cursor(*self.identity(), 0), "c")
        chunk = reader.read()
        assert chunk is not None
        self.assertEqual(chunk.lines, [line(1)])
        self.assertIsNone(reader.read())  # the partial line waits
        self.append(line(2)[10:])
        chunk = reader.read()
        assert chunk is not None
        self.assertEqual((chunk.start, chunk.lines), (len(line(1)), [line(2)]))
        self.assertEqual(chunk.cursor_after(1).offset, len(line(1) + line(2)))

    def identity(self, path: str | None = None) -> tuple[int, int]:
        st = os.stat(path or self.path)
        return st.st_dev, st.st_ino

    def test_a_line_longer_than_a_read(self) -> None:
        long = json.dumps({"type": "x", "pad": "y" * 300}).encode() + b"\n"
        self.append(long + line(1))
        reader = LogReader(self.path, "t", max_bytes=64)
        self.addCleanup(reader.close)
        reader.start(None, "c")
        self.assertIsNone(reader.read())  # a new reader starts at the end
        reader.start(Cursor(*self.identity(), 0), "c")
        chunks = [reader.read(), reader.read()]
        self.assertEqual([c.lines if c else None for c in chunks], [[long], [line(1)]])

    def test_rename_rotation(self) -> None:
        """The old file is read to its end, including what was written after the rename."""
        self.append(line(1))
        reader = LogReader(self.path, "t")
        self.addCleanup(reader.close)
        reader.start(Cursor(*self.identity(), 0), "c")
        self.assertEqual(reader.read().lines, [line(1)])  # type: ignore[union-attr]
        old = self.path + ".1"
        os.rename(self.path, old)
        self.append(line(2), old)  # the writer has not reopened yet
        self.assertEqual(reader.read().lines, [line(2)])  # type: ignore[union-attr]
        self.assertIsNone(reader.read())
        self.append(line(3), old)
        self.append(line(4))  # reopened: the path names a new file
        self.assertEqual(reader.read().lines, [line(3)])  # type: ignore[union-attr]
        chunk = reader.read()
        assert chunk is not None
        self.assertEqual((chunk.lines, (chunk.dev, chunk.ino), chunk.start),
                         ([line(4)], self.identity(), 0))

    def test_truncation_reads_from_the_start(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.append(line(1) + line(2))
        reader = LogReader(self.path, "t")
        self.addCleanup(reader.close)
        reader.start(Cursor(*self.identity(), 0), "c")
        reader.read()
        with open(self.path, "wb") as f:  # what copytruncate does
            f.write(line(3))
        self.assertEqual(reader.read().lines, [line(3)])  # type: ignore[union-attr]
        self.assertTrue(any("copytruncate" in formatEvent(e) for e in logged))


class FollowerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "events.jsonl")
        self.clock = Clock()
        self.consumer = Recorder(self.directory)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def append(self, *numbers: int, path: str | None = None) -> None:
        with open(path or self.path, "ab") as f:
            f.write(b"".join(line(n) for n in numbers))

    def follower(self, poll_interval: float = 1.0) -> Follower:
        follower = Follower(self.path, self.consumer, self.clock, run=run_synchronously,
                            poll_interval=poll_interval)
        follower.startService()
        self.addCleanup(lambda: follower.running and follower.stopService())
        return follower

    def identity(self, path: str | None = None) -> tuple[int, int]:
        st = os.stat(path or self.path)
        return st.st_dev, st.st_ino

    def cursor(self) -> Cursor | None:
        return load_cursor(self.consumer.cursor_path)

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.logged
                if e.get("log_level") is not None and e["log_level"].name in ("error", "critical")]


class FollowerTests(FollowerTestCase):
    def test_a_new_consumer_starts_at_the_end(self) -> None:
        self.append(1, 2)
        follower = self.follower()
        self.assertEqual(self.consumer.calls, [])
        # The starting place is saved at once: a crash now must not skip what comes next.
        self.assertEqual(self.cursor(), Cursor(*self.identity(), 2 * len(line(1))))
        self.append(3)
        follower.wake()
        self.assertEqual(self.consumer.ids, ["3"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_no_log_yet(self) -> None:
        follower = self.follower()
        self.assertTrue(os.path.exists(self.path))
        self.assertEqual(self.cursor(), Cursor(*self.identity(), 0))
        self.append(1)
        follower.wake()
        self.assertEqual(self.consumer.ids, ["1"])

    def test_restart_repeats_what_was_not_durable(self) -> None:
        """Events after the durable cursor are read again; nothing before it is."""
        follower = self.follower()
        self.append(1)
        follower.wake()
        pending: defer.Deferred = defer.Deferred()
        self.consumer.answers = [pending]
        self.append(2, 3)
        follower.wake()
        self.assertEqual(self.consumer.ids, ["1", "2", "3"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), len(line(1))))
        # A crash: the consumer never said 2 and 3 were durable.
        follower.stopService()
        self.consumer.calls.clear()
        self.follower()
        self.assertEqual(self.consumer.ids, ["2", "3"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_the_cursor_waits_for_the_consumer(self) -> None:
        follower = self.follower()
        pending: defer.Deferred = defer.Deferred()
        self.consumer.answers = [pending]
        start = self.cursor()
        self.append(1)
        follower.wake()
        self.append(2)
        follower.wake()  # one round at a time
        self.assertEqual(self.consumer.ids, ["1"])
        self.assertEqual(self.cursor(), start)
        pending.callback(None)
        self.assertEqual(self.consumer.ids, ["1", "2"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_stop_waits_for_the_round_in_progress(self) -> None:
        follower = self.follower()
        pending: defer.Deferred = defer.Deferred()
        self.consumer.answers = [pending]
        self.append(1)
        follower.wake()
        stopped = follower.stopService()
        self.assertNoResult(stopped)
        pending.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.cursor(), Cursor(*self.identity(), len(line(1))))

    def test_a_failing_consumer_does_not_advance(self) -> None:
        follower = self.follower(poll_interval=5)
        start = self.cursor()
        self.consumer.answers = [OSError(28, "No space left on device")]
        self.append(1, 2)
        follower.wake()
        self.assertEqual(self.cursor(), start)
        [error] = self.errors()
        self.assertIn("could not take 2 event line(s)", error)
        [failure] = self.flushLoggedErrors(OSError)
        self.assertIn("No space left on device", str(failure.value))
        # Not again for every write: at the next poll.
        self.append(3)
        follower.wake()
        self.assertEqual(len(self.consumer.calls), 1)
        self.clock.advance(5)
        self.assertEqual(self.consumer.calls[1], [line(1), line(2), line(3)])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_a_failing_deferred_does_not_advance(self) -> None:
        follower = self.follower()
        start = self.cursor()
        pending: defer.Deferred = defer.Deferred()
        self.consumer.answers = [pending]
        self.append(1)
        follower.wake()
        pending.errback(OSError(5, "Input/output error"))
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.cursor(), start)
        self.clock.advance(1)
        self.assertEqual(self.consumer.ids, ["1", "1"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), len(line(1))))

    def test_a_consumer_that_takes_part(self) -> None:
        follower = self.follower()
        self.consumer.answers = [1]
        self.append(1, 2, 3)
        follower.wake()
        self.assertEqual(self.cursor(), Cursor(*self.identity(), len(line(1))))
        self.clock.advance(1)
        self.assertEqual(self.consumer.calls, [[line(1), line(2), line(3)], [line(2), line(3)]])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_after_a_write_the_file_is_read_once_to_its_end(self) -> None:
        follower = self.follower()
        reads: list[int] = []
        real = follower.reader._lines

        def counted() -> Any:
            reads.append(1)
            return real()

        self.patch(follower.reader, "_lines", counted)
        self.append(1, 2)
        follower.written()
        self.assertEqual((self.consumer.ids, len(reads)), (["1", "2"], 1))
        follower.reader.max_bytes = len(line(1))  # a read no longer reaches the end
        self.append(3, 4)
        follower.written()
        self.assertEqual(self.consumer.ids, ["1", "2", "3", "4"])  # read on until it did

    def test_after_writes_a_rotation_is_followed_at_once(self) -> None:
        follower = self.follower()
        self.append(1)
        follower.written()
        os.rename(self.path, self.path + ".1")
        self.append(2)  # the writer reopened
        follower.written()
        self.assertEqual(self.consumer.ids, ["1", "2"])

    def test_after_writes_a_truncation_is_seen_before_the_file_outgrows_the_cursor(self) -> None:
        """A write after copytruncate finds nothing at the cursor: the reader looks, starts over."""
        follower = self.follower()
        self.append(1, 2, 3)
        follower.written()
        with open(self.path, "wb"):  # what copytruncate does
            pass
        for n in range(4, 10):  # each write wakes the follower; together they outgrow the cursor
            self.append(n)
            follower.written()
        self.assertEqual(self.consumer.ids, [str(n) for n in range(1, 10)])
        self.assertTrue(any("copytruncate" in line for line in self.errors()))

    def test_the_poll_is_the_fallback(self) -> None:
        self.follower(poll_interval=2)
        self.append(1)
        self.clock.advance(1.9)
        self.assertEqual(self.consumer.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.consumer.ids, ["1"])


class BadCursorTests(FollowerTestCase):
    def test_corrupt_cursor(self) -> None:
        self.append(1, 2)
        os.makedirs(os.path.dirname(self.consumer.cursor_path))
        with open(self.consumer.cursor_path, "wb") as f:
            f.write(b'{"version":1,"dev":')
        self.follower()
        [error] = self.errors()
        self.assertIn(self.consumer.cursor_path, error)
        self.assertIn("not JSON", error)
        self.assertEqual(self.consumer.ids, ["1", "2"])  # repeats rather than skips
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_cursor_past_the_end(self) -> None:
        self.append(1, 2)
        save_cursor(self.consumer.cursor_path, Cursor(*self.identity(), 10_000))
        self.follower()
        [error] = self.errors()
        self.assertIn(self.consumer.cursor_path, error)
        self.assertIn("points past the end", error)
        self.assertEqual(self.consumer.ids, ["1", "2"])

    def saved_at_the_end(self) -> None:
        """The cursor a follower stopped at the end of the log leaves."""
        self.follower().stopService()

    def test_cursor_of_a_file_that_is_gone(self) -> None:
        self.append(1)
        self.saved_at_the_end()
        os.rename(self.path, self.mktemp())  # elsewhere, and kept, so its inode is not reused
        self.append(2)
        self.follower()
        [error] = self.errors()
        self.assertIn("neither", error)
        self.assertEqual(self.consumer.ids, ["2"])

    def test_cursor_of_a_reused_inode(self) -> None:
        """A file deleted and its inode given to a new log: the fingerprint tells them apart."""
        self.append(1)
        self.saved_at_the_end()
        saved = self.cursor()
        assert saved is not None
        with open(self.path, "r+b") as f:  # as if a new file held other events at that inode
            f.write(line(7))
        self.append(2)
        self.follower()
        [error] = self.errors()
        self.assertIn("inode reused", error)
        self.assertEqual(self.consumer.ids, ["7", "2"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))


class RotationTests(FollowerTestCase):
    def test_rotation_by_rename_mid_stream(self) -> None:
        """logrotate renames, the writer goes on in the old file until SIGHUP reopens it."""
        events = EventLog(self.path, "n", fsync_interval=0, clock=self.clock)
        events.startService()
        self.addCleanup(lambda: events.running and events.stopService())
        follower = self.follower()
        events.wake_on_write(follower.wake)
        events.write({"type": "delivery", "event_id": "1"})
        first = self.identity()
        os.rename(self.path, self.path + ".1")
        events.write({"type": "delivery", "event_id": "2"})
        events.reopen()
        events.write({"type": "delivery", "event_id": "3"})
        self.assertEqual(self.consumer.ids, ["1", "2", "3"])
        self.assertNotEqual(self.identity(), first)
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_restart_finds_the_rotated_file(self) -> None:
        self.append(1)
        follower = self.follower()
        self.append(2)
        pending: defer.Deferred = defer.Deferred()
        self.consumer.answers = [pending]
        follower.wake()
        follower.stopService()  # a crash: 2 was never durable
        self.assertNoResult(pending)
        os.rename(self.path, self.path + ".1")
        self.append(3, 4)
        self.append(9, path=os.path.join(self.directory, "events.jsonl.2"))  # an older file
        self.consumer.calls.clear()
        self.follower()
        self.assertEqual(self.consumer.ids, ["2", "3", "4"])
        self.assertEqual(self.cursor(), Cursor(*self.identity(), os.path.getsize(self.path)))

    def test_partial_line_at_the_end_of_a_rotated_file(self) -> None:
        follower = self.follower()
        self.append(1)
        with open(self.path, "ab") as f:
            f.write(b'{"type":"deliv')
        follower.wake()
        os.rename(self.path, self.path + ".1")
        self.append(2)
        follower.wake()
        self.assertEqual(self.consumer.ids, ["1", "2"])
        self.assertTrue(any("14 bytes that are not a whole line" in formatEvent(e)
                            for e in self.logged))


class LogrotateSnippetTests(SynchronousTestCase):
    def test_rotates_by_rename_and_reopens(self) -> None:
        """What the follower relies on: a rename, a reopen, and a rotated file it can still read."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "etc", "logrotate.d", "engage-appliance")
        with open(path) as f:
            lines = [x.split("#")[0].strip() for x in f]
        directives = {x.split()[0] for x in lines if x and x not in ("{", "}")}
        self.assertNotIn("copytruncate", directives)
        self.assertNotIn("create", directives)
        self.assertTrue({"nocreate", "delaycompress", "postrotate", "endscript"} <= directives)
        script = lines[lines.index("postrotate") + 1:lines.index("endscript")]
        self.assertIn("--signal=HUP", " ".join(script))


class ReadFailureTests(FollowerTestCase):
    def test_a_failed_read_waits_for_the_poll(self) -> None:
        follower = self.follower()
        self.append(1)

        def failing_pread(fd: int, n: int, offset: int) -> bytes:
            raise OSError(5, "Input/output error")

        real = os.pread
        self.patch(os, "pread", failing_pread)
        follower.wake()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.patch(os, "pread", real)
        follower.wake()  # not before the poll
        self.assertEqual(self.consumer.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.consumer.ids, ["1"])
