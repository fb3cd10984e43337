"""Webhooks on a test clock with a fake HTTP agent: batching, envelopes, retries, restarts."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from appliance.config import EVENT_TYPES, WebhookConfig
from appliance.events import EventLog, encode_event
from appliance.follower import Cursor, load_cursor
from appliance.spool import run_synchronously
from appliance.webhooks import (
    QueueDirectory,
    RetrySchedule,
    Webhooks,
    WebhookService,
    batch_body,
    envelope_line,
    event_class,
)

START = 1_700_000_000.0
BATCH_FILE = r"^\d{10}\.\d+\.[0-9a-f-]{36}\.batch$"


class Request:
    def __init__(self, method: bytes, uri: bytes, headers: Headers, body: bytes) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body
        self.cancelled = False

        def cancel(_: defer.Deferred) -> None:
            self.cancelled = True

        self.deferred: defer.Deferred = defer.Deferred(cancel)

    def header(self, name: bytes) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0].decode() if values else None

    @property
    def batch_id(self) -> str | None:
        return self.header(b"X-MessageSystems-Batch-ID")

    @property
    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.body)

    def answer(self, code: int, body: bytes = b"") -> None:
        self.deferred.callback(FakeResponse(code, body))

    def fail(self, exception: Exception) -> None:
        self.deferred.errback(Failure(exception))


class FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.phrase = b"OK" if code < 300 else b"Internal Server Error"
        self.body = body
        self.length = len(body)

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        for i in range(0, len(self.body), 7):
            protocol.dataReceived(self.body[i:i + 7])
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records each request and leaves its answer to the test."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> defer.Deferred:
        consumer = StringTransport()
        bodyProducer.startProducing(consumer)
        self.length_matches = bodyProducer.length == len(consumer.value())
        request = Request(method, uri, headers or Headers(), consumer.value())
        self.requests.append(request)
        return request.deferred

    @property
    def last(self) -> Request:
        return self.requests[-1]


def config(**changes: Any) -> WebhookConfig:
    return replace(WebhookConfig(name="hook", target="http://127.0.0.1:9/events"), **changes)


def event(type_: str = "injection", n: int = 0) -> dict[str, Any]:
    return {"type": type_, "event_id": str(1000 + n), "timestamp": "1700000000",
            "rcpt_to": f"r{n}@example.test", "subject": "Grüße"}


class EnvelopeTests(SynchronousTestCase):
    def test_classes_follow_sparkpost(self) -> None:
        classes = {t: event_class(t) for t in EVENT_TYPES}
        self.assertEqual(classes, {
            "injection": "message_event", "policy_rejection": "message_event",
            "delivery": "message_event", "delay": "message_event", "bounce": "message_event",
            "open": "track_event", "initial_open": "track_event", "click": "track_event",
            "link_unsubscribe": "unsubscribe_event", "list_unsubscribe": "unsubscribe_event",
        })
        self.assertEqual(event_class("out_of_band"), "message_event")

    def test_line_and_body(self) -> None:
        lines = envelope_line(event("click", 1)) + envelope_line(event("delivery", 2))
        self.assertEqual(lines.count(b"\n"), 2)
        self.assertIn("Grüße".encode(), lines)
        body, count = batch_body(lines)
        self.assertEqual(count, 2)
        self.assertEqual(json.loads(body), [
            {"msys": {"track_event": event("click", 1)}},
            {"msys": {"message_event": event("delivery", 2)}},
        ])
        self.assertEqual(batch_body(b""), (b"[]", 0))

    def test_retry_schedule(self) -> None:
        schedule = RetrySchedule(30, 1800)
        self.assertEqual([schedule.delay(n) for n in range(1, 9)],
                         [30, 60, 120, 240, 480, 960, 1800, 1800])


class ServiceTestCase(SynchronousTestCase):
    """A webhook fed as the appliance feeds it: events written to the log, read by its follower."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.directory = os.path.join(self.root, "hook")
        self.clock = Clock()
        self.clock.advance(START)
        self.agent = FakeAgent()
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.log_path = os.path.join(self.root, "events.jsonl")
        self.events = EventLog(self.log_path, "n", fsync_interval=0, clock=self.clock)
        self.events.startService()
        self.addCleanup(self.events.stopService)
        self.hooks: Webhooks | None = None
        self.events.wake_on_write(lambda: self.hooks is not None and self.hooks.wake())

    def webhooks(self, *configs: WebhookConfig, run: Any = run_synchronously,
                 fsync_interval: float = 1.0) -> Webhooks:
        """Started webhooks, woken by the test's event log."""
        hooks = self.hooks = Webhooks(configs, self.root, self.log_path, clock=self.clock,
                                      agent=self.agent, run=run, fsync_interval=fsync_interval)
        hooks.startService()
        self.addCleanup(lambda: hooks.running and hooks.stopService())
        return hooks

    def service(self, start: bool = True, **changes: Any) -> WebhookService:
        if not start:
            return WebhookService(config(**changes), self.directory, clock=self.clock,
                                  agent=self.agent, run=run_synchronously, fsync_interval=1.0)
        return self.webhooks(config(**changes)).webhooks[0]

    def emit(self, event: dict[str, Any]) -> None:
        self.events.write(event)

    def stop(self) -> None:
        assert self.hooks is not None
        self.successResultOf(self.hooks.stopService())

    def files(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def batch_files(self) -> list[str]:
        return [f for f in self.files() if f.endswith(".batch")]

    def messages(self, level: str) -> list[str]:
        return [formatEvent(e) for e in self.logged
                if e.get("log_level") is not None and e["log_level"].name == level
                and e.get("log_namespace") == "appliance.webhooks"]


class BatchingTests(ServiceTestCase):
    def test_batches_by_size(self) -> None:
        """max_batch_size events seal a batch at once; one batch is in flight at a time."""
        self.service(max_batch_size=3)
        for n in range(7):
            self.emit(event("delivery", n))
        self.assertEqual(len(self.agent.requests), 1)
        first = self.agent.last
        self.assertEqual([e["msys"]["message_event"]["event_id"] for e in first.events],
                         ["1000", "1001", "1002"])
        self.assertEqual(len(self.batch_files()), 2)
        first.answer(200)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual([e["msys"]["message_event"]["rcpt_to"] for e in self.agent.last.events],
                         ["r3@example.test", "r4@example.test", "r5@example.test"])
        self.assertNotEqual(self.agent.last.batch_id, first.batch_id)
        self.agent.last.answer(204)
        self.assertEqual(self.batch_files(), [])
        # The seventh event waits for the interval.
        self.assertEqual(len(self.agent.requests), 2)
        self.clock.advance(30)
        self.assertEqual([e["msys"]["message_event"]["event_id"] for e in self.agent.last.events],
                         ["1006"])

    def test_batches_by_time(self) -> None:
        """A batch is sealed batch_interval after its first event, however few it has."""
        self.service()
        self.emit(event("open", 1))
        self.clock.advance(20)
        self.emit(event("click", 2))
        self.clock.advance(9.9)
        self.assertEqual(self.agent.requests, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.agent.last.events, [{"msys": {"track_event": event("open", 1)}},
                                                  {"msys": {"track_event": event("click", 2)}}])
        # The next batch's clock starts at its own first event.
        self.clock.advance(100)
        self.emit(event("bounce", 3))
        self.clock.advance(29)
        self.assertEqual(len(self.agent.requests), 1)

    def test_request_shape(self) -> None:
        svc = self.service(auth_token="s3cret-token")
        self.emit(event("link_unsubscribe", 1))
        svc.seal()
        request = self.agent.last
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.uri, b"http://127.0.0.1:9/events")
        self.assertEqual(request.header(b"Content-Type"), "application/json")
        self.assertEqual(request.header(b"X-MessageSystems-Webhook-Token"), "s3cret-token")
        self.assertTrue(self.agent.length_matches)
        [name] = self.batch_files()
        self.assertRegex(name, BATCH_FILE)
        self.assertEqual(request.batch_id, name.split(".")[2])
        self.assertEqual(request.events, [{"msys": {"unsubscribe_event": event("link_unsubscribe", 1)}}])

    def test_no_token_no_header(self) -> None:
        svc = self.service()
        self.emit(event())
        svc.seal()
        self.assertIsNone(self.agent.last.header(b"X-MessageSystems-Webhook-Token"))

    def test_filter_by_type(self) -> None:
        self.service(events=frozenset({"click", "bounce"}))
        for n, type_ in enumerate(("injection", "open", "click", "delivery", "bounce")):
            self.emit(event(type_, n))
        self.clock.advance(30)
        self.assertEqual([list(e["msys"].values())[0]["type"] for e in self.agent.last.events],
                         ["click", "bounce"])

    def test_filtered_out_events_post_nothing(self) -> None:
        self.service(events=frozenset({"click"}))
        self.emit(event("injection"))
        self.clock.advance(60)
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(self.batch_files(), [])

    def test_open_file_synced_and_appended_whole(self) -> None:
        self.service()
        self.emit(event("delivery", 1))
        [open_file] = [f for f in self.files() if f.endswith(".open")]
        with open(os.path.join(self.directory, open_file), "rb") as f:
            self.assertEqual(f.read(), envelope_line(event("delivery", 1)))
        self.clock.advance(1)  # the fsync timer runs without error
        self.assertEqual(self.messages("error"), [])

    def test_event_while_stopped_is_logged(self) -> None:
        svc = self.service(start=False)
        self.failureResultOf(svc.consume([encode_event(event())]), RuntimeError)
        self.assertIn("arrived while stopped", self.messages("error")[0])


class RetryTests(ServiceTestCase):
    def test_failure_backs_off_and_resends_the_same_batch(self) -> None:
        svc = self.service()
        self.emit(event("delivery", 1))
        svc.seal()
        first = self.agent.last
        first.answer(500, b"database\ndown")
        self.assertEqual(svc.failures, 1)
        self.assertIn("HTTP 500 Internal Server Error: database down", self.messages("warn")[0])
        self.clock.advance(29.9)
        self.assertEqual(len(self.agent.requests), 1)
        # Batches sealed meanwhile wait behind the failing one.
        self.emit(event("delivery", 2))
        svc.seal()
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(0.1)
        second = self.agent.last
        self.assertEqual((second.batch_id, second.body), (first.batch_id, first.body))
        second.fail(ConnectionRefusedError("refused"))
        self.clock.advance(59.9)
        self.assertEqual(len(self.agent.requests), 2)
        self.clock.advance(0.1)
        self.assertEqual(self.agent.last.batch_id, first.batch_id)
        self.agent.last.answer(200)
        self.assertEqual(svc.failures, 0)
        # The next batch goes at once, and a later failure starts over at retry_initial.
        self.assertEqual(len(self.agent.requests), 4)
        self.assertNotEqual(self.agent.last.batch_id, first.batch_id)
        self.agent.last.answer(404)
        self.clock.advance(30)
        self.assertEqual(len(self.agent.requests), 5)

    def test_no_answer_in_time_is_a_failure(self) -> None:
        svc = self.service(timeout=10.0)
        self.emit(event())
        svc.seal()
        first = self.agent.last
        self.clock.advance(10)
        self.assertTrue(first.cancelled)
        self.assertIn("no answer in time", self.messages("warn")[0])
        self.clock.advance(30)
        self.assertEqual(self.agent.last.batch_id, first.batch_id)
        self.assertEqual(len(self.agent.requests), 2)

    def test_redirect_is_a_failure(self) -> None:
        svc = self.service()
        self.emit(event())
        svc.seal()
        self.agent.last.answer(302)
        self.assertEqual(svc.failures, 1)
        self.assertEqual(len(self.batch_files()), 1)

    def test_dropped_after_the_retry_lifetime(self) -> None:
        """Failing for 4 hours from its seal drops a batch, with an error; younger ones stay."""
        svc = self.service(retry_lifetime=4 * 3600.0)
        self.emit(event("delivery", 1))
        svc.seal()
        old = self.agent.last.batch_id
        attempts_at = []
        for second in range(4 * 3600 + 1):
            if second == 3600:
                self.emit(event("delivery", 2))
                svc.seal()
            if not self.agent.last.deferred.called:
                attempts_at.append(second)
                self.assertEqual(self.agent.last.batch_id, old)
                self.agent.last.answer(503)
            self.clock.advance(1)
        self.assertEqual(attempts_at, [0, 30, 90, 210, 450, 930, 1890, 3690, 5490, 7290, 9090,
                                       10890, 12690, 14400])
        # The last attempt was at the deadline itself, and then the batch was dropped.
        self.assertEqual([b.batch_id for b in svc.batches], [self.batch_files()[0].split(".")[2]])
        self.assertNotEqual(svc.batches[0].batch_id, old)
        [dropped] = self.messages("error")
        self.assertIn(f"dropping batch {old}", dropped)
        self.assertIn("within 4 hours; last answer: HTTP 503", dropped)
        # The younger batch is tried next, when the back-off says (the clock is at 4 h + 1 s).
        self.clock.advance(1798)
        self.assertEqual(len(self.agent.requests), len(attempts_at))
        self.clock.advance(1)
        self.assertNotEqual(self.agent.last.batch_id, old)
        self.assertEqual(len(self.agent.requests), len(attempts_at) + 1)

    def test_drop_without_later_batches_stops_retrying(self) -> None:
        svc = self.service(retry_lifetime=60.0)
        self.emit(event())
        svc.seal()
        for _ in range(3):
            self.agent.last.answer(500)
            self.clock.advance(30)
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(svc.batches, [])
        self.assertEqual(self.batch_files(), [])
        self.clock.advance(3600)
        self.assertEqual(len(self.agent.requests), 3)


class RestartTests(ServiceTestCase):
    def test_collected_events_survive_a_restart(self) -> None:
        """Events not yet sealed are sealed at the next start and posted, in order."""
        self.service()
        self.emit(event("injection", 1))
        self.emit(event("delivery", 2))
        self.stop()
        self.assertEqual(self.agent.requests, [])
        self.assertEqual([f for f in self.files() if f.endswith(".open")], ["0000000000.open"])

        self.service()
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual([list(e["msys"].values())[0]["event_id"] for e in self.agent.last.events],
                         ["1001", "1002"])
        self.agent.last.answer(200)
        self.assertEqual(self.batch_files(), [])
        # New events go to a new file after the recovered one.
        self.emit(event("open", 3))
        self.assertIn("0000000001.open", self.files())

    def test_unposted_batch_keeps_its_id_across_a_restart(self) -> None:
        svc = self.service()
        self.emit(event())
        svc.seal()
        first = self.agent.last
        self.stop()  # the POST in flight is abandoned
        self.assertTrue(first.cancelled)
        self.service()
        self.assertEqual((self.agent.last.batch_id, self.agent.last.body),
                         (first.batch_id, first.body))

    def test_old_batches_are_posted_to_a_working_target(self) -> None:
        """Being down longer than the retry lifetime loses nothing if the target answers."""
        svc = self.service()
        self.emit(event())
        svc.seal()
        self.stop()
        self.clock.advance(24 * 3600)
        self.service()
        self.agent.requests[-1].answer(200)
        self.assertEqual(self.batch_files(), [])
        self.assertEqual(self.messages("error"), [])

    def test_torn_tail_is_dropped(self) -> None:
        os.makedirs(self.directory)
        good = envelope_line(event("delivery", 1))
        with open(os.path.join(self.directory, "0000000004.open"), "wb") as f:
            f.write(good + b'{"msys":{"message_event":{"type":"deliv' + b"\n" + b"\0" * 20)
        self.service()
        self.assertEqual(self.agent.last.events, [json.loads(good)])
        self.assertIn("1 incomplete event line(s)", self.messages("warn")[0])
        self.assertRegex(self.batch_files()[0], r"^0000000004\.")
        self.assertIn("0000000005.open", self.files())
        self.assertNotIn("0000000004.tmp", self.files())

    def test_empty_open_files_are_removed(self) -> None:
        os.makedirs(self.directory)
        open(os.path.join(self.directory, "0000000002.open"), "wb").close()
        with open(os.path.join(self.directory, "0000000003.open"), "wb") as f:
            f.write(b"\0\0\0")
        self.service()
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(self.files(), ["0000000004.open", "cursor"])

    def test_open_file_of_a_sealed_batch_is_not_posted_twice(self) -> None:
        """A crash between writing a cleaned batch and removing its .open file."""
        os.makedirs(self.directory)
        line = envelope_line(event())
        batch_id = "00000000-0000-4000-8000-000000000000"
        batch = QueueDirectory(self.directory).batch_path(7, int(START), batch_id)
        for path in (batch, os.path.join(self.directory, "0000000007.open")):
            with open(path, "wb") as f:
                f.write(line)
        with open(os.path.join(self.directory, "0000000007.tmp"), "wb") as f:
            f.write(line)
        self.service()
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.agent.last.batch_id, batch_id)
        self.assertEqual(self.files(), [os.path.basename(batch), "0000000008.open", "cursor"])

    def test_batches_are_posted_oldest_first(self) -> None:
        q = QueueDirectory(self.directory)
        os.makedirs(self.directory)
        for seq, n in ((12, 2), (3, 1)):
            with open(q.batch_path(seq, int(START), f"{seq:08d}-0000-4000-8000-000000000000"), "wb") as f:
                f.write(envelope_line(event("delivery", n)))
        self.service()
        self.assertEqual(self.agent.last.events[0]["msys"]["message_event"]["event_id"], "1001")
        self.agent.last.answer(200)
        self.assertEqual(self.agent.last.events[0]["msys"]["message_event"]["event_id"], "1002")


class WebhooksTests(ServiceTestCase):
    def test_each_webhook_has_its_queue_and_filter(self) -> None:
        root = os.path.dirname(self.directory)
        os.makedirs(os.path.join(root, "gone"))
        with open(os.path.join(root, "gone", "0000000001.open"), "wb") as f:
            f.write(envelope_line(event()))

        self.webhooks(config(name="a", events=frozenset({"open"})),
                      config(name="b", target="https://127.0.0.1:9/b"))
        for type_ in ("injection", "open"):
            self.emit(event(type_))
        self.clock.advance(30)
        posted = {r.uri: [list(e["msys"].values())[0]["type"] for e in r.events]
                  for r in self.agent.requests}
        self.assertEqual(posted, {b"http://127.0.0.1:9/events": ["open"],
                                  b"https://127.0.0.1:9/b": ["injection", "open"]})
        self.assertTrue(os.path.isdir(os.path.join(root, "a")))
        self.assertTrue(any("no longer configured" in m and "gone" in m
                            for m in self.messages("warn")))


class ShortWrites:
    """A batch file whose next write stores only ``cut`` bytes: a disk that just filled up."""

    def __init__(self, file: Any, cut: int, raises: bool = False) -> None:
        self.file = file
        self.cut = cut
        self.raises = raises

    def write(self, data: bytes) -> int:
        if self.cut:
            written = self.file.write(data[:self.cut])
            self.cut = 0
            if self.raises:
                raise OSError(errno.ENOSPC, "No space left on device")
            return written
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def event_ids(request: Request) -> list[str]:
    return [list(e["msys"].values())[0]["event_id"] for e in request.events]


def failing_ftruncate(fd: int, length: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


class DiskFullTests(ServiceTestCase):
    def test_short_write_is_cut_back(self) -> None:
        """A line written in part is taken out again: the batch stays valid JSON."""
        svc = self.service()
        self.emit(event("delivery", 1))
        svc._file = ShortWrites(svc._file, 17)
        self.emit(event("delivery", 2))
        [error] = self.messages("error")
        self.assertIn("could not queue event 1002", error)
        self.emit(event("delivery", 3))
        # The cursor stopped before 1002: the follower's next poll offers it again.
        self.clock.advance(1)
        svc.seal()
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002", "1003"])

    def test_failed_write_is_cut_back(self) -> None:
        svc = self.service()
        self.emit(event("delivery", 1))
        svc._file = ShortWrites(svc._file, 5, raises=True)
        self.emit(event("delivery", 2))
        self.assertIn("could not queue event 1002", self.messages("error")[0])
        self.emit(event("delivery", 3))
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002", "1003"])

    def test_a_fragment_that_cannot_be_cut_is_sealed_away(self) -> None:
        """If even the truncation fails, the batch is sealed now, without the fragment."""
        svc = self.service()
        self.emit(event("delivery", 1))
        svc._file = ShortWrites(svc._file, 17)
        self.patch(os, "ftruncate", failing_ftruncate)
        self.emit(event("delivery", 2))
        self.assertEqual(event_ids(self.agent.last), ["1001"])
        self.assertIn("1 incomplete event line(s)", self.messages("warn")[0])
        self.emit(event("delivery", 3))
        self.agent.last.answer(200)
        self.clock.advance(1)  # the follower's poll offers 1002 again, with 1003
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1002", "1003"])

    def test_a_fragment_alone_leaves_no_batch(self) -> None:
        svc = self.service()
        svc._file = ShortWrites(svc._file, 17)
        self.patch(os, "ftruncate", failing_ftruncate)
        self.emit(event("delivery", 1))
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(self.batch_files(), [])
        self.emit(event("delivery", 2))
        self.clock.advance(1)
        svc.seal()
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002"])

    def test_broken_lines_never_go_out(self) -> None:
        """Sealing checks every line, as the start-up does: a broken one is dropped, with a warning."""
        q = QueueDirectory(self.directory)
        os.makedirs(self.directory)
        good = envelope_line(event("delivery", 1))
        with open(q.open_path(3), "wb") as f:
            f.write(good + b'{"msys": {"mess' + good.replace(b"1001", b"1002") + b"[1]\n")
        batch_id = "00000000-0000-4000-8000-000000000000"
        batch = q.seal(3, os.open(q.open_path(3), os.O_RDONLY), int(START), batch_id)
        assert batch is not None
        self.assertEqual(QueueDirectory.read(batch), good)
        self.assertEqual(self.files(), [os.path.basename(batch.path)])
        self.assertIn("2 incomplete event line(s)", self.messages("warn")[0])


class BatchBytesTests(ServiceTestCase):
    def test_batches_by_bytes(self) -> None:
        """A batch is sealed before an event would take its body past max_batch_bytes."""
        line = len(envelope_line(event("delivery", 1)))
        self.service(max_batch_bytes=2 * line + 1)  # the body of two events, exactly
        for n in range(1, 6):
            self.emit(event("delivery", n))
        posted = [self.agent.last]
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002"])
        self.assertEqual(len(self.agent.last.body), 2 * line + 1)
        self.agent.last.answer(200)
        posted.append(self.agent.last)
        self.assertEqual(event_ids(self.agent.last), ["1003", "1004"])
        self.agent.last.answer(200)
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1005"])

    def test_an_event_over_the_limit_goes_alone(self) -> None:
        self.service(max_batch_bytes=100)
        self.emit(event("delivery", 1))
        self.emit(event("delivery", 2))
        self.assertEqual(event_ids(self.agent.last), ["1001"])
        self.agent.last.answer(200)
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1002"])


class TooLargeTests(ServiceTestCase):
    def test_413_splits_the_batch_in_order(self) -> None:
        svc = self.service(max_batch_size=5)
        for n in range(1, 8):
            self.emit(event("delivery", n))
        original = self.agent.last
        self.assertEqual(event_ids(original), ["1001", "1002", "1003", "1004", "1005"])
        original.answer(413, b"Request Entity Too Large")
        # The first half goes at once, under a new id; no back-off, nothing dropped.
        first = self.agent.last
        self.assertEqual(event_ids(first), ["1001", "1002"])
        self.assertNotIn(first.batch_id, (original.batch_id, None))
        self.assertEqual(svc.failures, 0)
        self.assertIn("as two batches", self.messages("warn")[0])
        self.assertEqual(len(self.batch_files()), 2)
        self.assertFalse(any(original.batch_id in f for f in self.files()))
        first.answer(413)  # too large again: halved again
        self.assertEqual(event_ids(self.agent.last), ["1001"])
        self.agent.last.answer(200)
        self.assertEqual(event_ids(self.agent.last), ["1002"])
        self.agent.last.answer(200)
        second = self.agent.last
        self.assertEqual(event_ids(second), ["1003", "1004", "1005"])
        self.assertNotIn(second.batch_id, (original.batch_id, first.batch_id))
        second.answer(200)
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1006", "1007"])
        self.agent.last.answer(200)
        self.assertEqual(self.batch_files(), [])
        self.assertEqual(self.messages("error"), [])

    def test_one_event_refused_as_too_large_is_dropped(self) -> None:
        svc = self.service()
        self.emit(event("delivery", 1))
        svc.seal()
        refused = self.agent.last
        self.emit(event("delivery", 2))
        svc.seal()
        refused.answer(413)
        [error] = self.messages("error")
        self.assertIn(f"dropping batch {refused.batch_id}", error)
        self.assertIn("HTTP 413", error)
        self.assertEqual(event_ids(self.agent.last), ["1002"])  # the next one goes at once
        self.agent.last.answer(200)
        self.assertEqual(self.batch_files(), [])

    def test_halves_survive_a_restart(self) -> None:
        self.service(max_batch_size=4)
        for n in range(1, 5):
            self.emit(event("delivery", n))
        self.agent.last.answer(413)
        first, = [r for r in self.agent.requests[1:]]
        self.stop()
        self.assertEqual(len(self.batch_files()), 2)
        self.service()
        self.assertEqual((self.agent.last.batch_id, event_ids(self.agent.last)),
                         (first.batch_id, ["1001", "1002"]))
        self.agent.last.answer(200)
        self.assertEqual(event_ids(self.agent.last), ["1003", "1004"])

    def test_a_split_cut_short_by_a_crash(self) -> None:
        """The halves replace their batch only once both are in place."""
        q = QueueDirectory(self.directory)
        os.makedirs(self.directory)
        ids = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(4)]
        lines = [envelope_line(event("delivery", n)) for n in range(1, 5)]

        def write(path: str, data: bytes) -> None:
            with open(path, "wb") as f:
                f.write(data)

        # Batch 1 was split and both halves are there: the halves are posted.
        write(q.batch_path(1, int(START), ids[0]), lines[0] + lines[1])
        write(q.batch_path(1, int(START), ids[1], "0"), lines[0])
        write(q.batch_path(1, int(START), ids[2], "1"), lines[1])
        # Batch 2 was being split: only one half was in place. The batch is posted whole.
        write(q.batch_path(2, int(START), ids[3]), lines[2] + lines[3])
        write(q.batch_path(2, int(START), ids[0], "0"), lines[2])
        self.service()
        posted = []
        while len(self.agent.requests) > len(posted):
            posted.append((self.agent.last.batch_id, event_ids(self.agent.last)))
            self.agent.last.answer(200)
        self.assertEqual(posted, [(ids[1], ["1001"]), (ids[2], ["1002"]), (ids[3], ["1003", "1004"])])
        self.assertEqual(self.batch_files(), [])


class HeldRunner:
    """Runs everything at once but seals, which it holds until the test finishes them."""

    def __init__(self) -> None:
        self.held: list[tuple[defer.Deferred, Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        if getattr(f, "__name__", "") == "seal":
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, f, args))
            return d
        return run_synchronously(f, *args)

    def finish_last(self) -> None:
        d, f, args = self.held.pop()
        d.callback(f(*args))


class SealTests(ServiceTestCase):
    def test_batches_go_out_in_order_whatever_order_seals_finish_in(self) -> None:
        runner = HeldRunner()
        self.webhooks(config(max_batch_size=1), run=runner, fsync_interval=0)
        for n in range(1, 4):
            self.emit(event("delivery", n))
        while runner.held:
            runner.finish_last()  # the latest seal first
        posted = []
        while len(self.agent.requests) > len(posted):
            posted.extend(event_ids(self.agent.last))
            self.agent.last.answer(200)
        self.assertEqual(posted, ["1001", "1002", "1003"])

    def test_seal_timer_is_set_again_when_sealing_fails(self) -> None:
        self.service()
        self.emit(event("delivery", 1))
        dup = os.dup
        failures = [OSError(errno.EMFILE, "Too many open files")]

        def failing_dup(fd: int) -> int:
            if failures:
                raise failures.pop()
            return dup(fd)

        self.clock.advance(29)  # the fsync loop's own dup is done by now
        self.patch(os, "dup", failing_dup)
        self.clock.advance(1)
        self.assertEqual(self.agent.requests, [])
        self.assertIn("Too many open files", self.messages("error")[0])
        self.emit(event("delivery", 2))
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002"])

    def test_fsync_loop_outlives_a_failure(self) -> None:
        svc = self.service()
        self.patch(os, "dup", lambda fd: failing_ftruncate(fd, 0))
        self.emit(event("delivery", 1))
        self.assertIn("fsync failed: [Errno 5]", self.messages("error")[0])
        self.flushLoggedErrors(OSError)  # the follower's: the event is not durable, so not taken
        self.clock.advance(1)
        self.assertTrue(svc._syncer is not None and svc._syncer.running)
        self.flushLoggedErrors(OSError)


class CursorRunner:
    """Runs everything at once but the fsyncs of open batch files, which it holds; can fail cursor saves."""

    def __init__(self) -> None:
        self.held: list[tuple[defer.Deferred, Any, tuple[Any, ...]]] = []
        self.fail_cursor = False

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        name = getattr(f, "__name__", "")
        if "fsync" in name:  # the open file's; a seal's own fsync runs inside queue.seal
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, f, args))
            return d
        if name == "save_cursor" and self.fail_cursor:
            return defer.fail(OSError(errno.EIO, "Input/output error"))
        return run_synchronously(f, *args)

    def finish(self) -> None:
        while self.held:
            d, f, args = self.held.pop(0)
            d.callback(f(*args))


class FollowerTests(ServiceTestCase):
    """The webhook reads the event log through its follower, from a cursor in its queue."""

    def cursor(self) -> Cursor | None:
        return load_cursor(os.path.join(self.directory, "cursor"))

    def log_end(self) -> Cursor:
        st = os.stat(self.log_path)
        return Cursor(st.st_dev, st.st_ino, st.st_size)

    def test_the_cursor_moves_once_the_open_file_is_synced(self) -> None:
        runner = CursorRunner()
        self.webhooks(config(), run=runner, fsync_interval=0)
        start = self.cursor()
        self.emit(event("delivery", 1))
        self.assertEqual(len(runner.held), 1)
        self.assertEqual(self.cursor(), start)
        runner.finish()
        self.assertEqual(self.cursor(), self.log_end())

    def test_the_cursor_moves_once_a_batch_is_sealed(self) -> None:
        runner = CursorRunner()
        self.webhooks(config(max_batch_size=2), run=runner, fsync_interval=0)
        self.emit(event("delivery", 1))
        runner.finish()
        self.emit(event("delivery", 2))  # seals: the seal's own fsync is what makes it durable
        self.assertEqual(runner.held, [])
        self.assertEqual(self.cursor(), self.log_end())
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002"])

    def test_events_written_while_stopped_are_posted_after_the_start(self) -> None:
        self.service()
        self.emit(event("delivery", 1))
        self.stop()
        self.emit(event("delivery", 2))
        self.emit(event("delivery", 3))
        self.service()
        self.assertEqual(event_ids(self.agent.last), ["1001"])  # sealed at the start
        self.agent.last.answer(200)
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1002", "1003"])

    def test_a_new_webhook_starts_at_the_end_of_the_log(self) -> None:
        """As a newly created SparkPost webhook gets only events from then on."""
        self.emit(event("delivery", 1))
        self.service()
        self.assertEqual(self.cursor(), self.log_end())
        self.emit(event("delivery", 2))
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1002"])

    def test_a_queue_from_before_cursors_starts_at_the_end(self) -> None:
        """The old code put every event it had into the open file already: nothing is lost or doubled."""
        self.emit(event("delivery", 1))
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "0000000003.open"), "wb") as f:
            f.write(envelope_line(event("delivery", 1)))
        self.service()
        self.assertEqual(event_ids(self.agent.last), ["1001"])
        self.agent.last.answer(200)
        self.emit(event("delivery", 2))
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1002"])

    def test_a_crash_before_the_cursor_is_saved_repeats_and_keeps_batch_ids(self) -> None:
        runner = CursorRunner()
        runner.fail_cursor = True
        self.webhooks(config(max_batch_size=2), run=runner, fsync_interval=0)
        before = self.cursor()
        self.emit(event("delivery", 1))
        self.emit(event("delivery", 2))
        runner.finish()
        sealed = self.agent.last
        self.assertIn("could not save cursor", formatEvent(
            [e for e in self.logged if e.get("log_namespace") == "appliance.follower"][0]))
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.cursor(), before)
        self.stop()  # as good as a crash: the cursor on disk is before both events
        self.webhooks(config(max_batch_size=2))
        self.assertEqual((self.agent.last.batch_id, event_ids(self.agent.last)),
                         (sealed.batch_id, ["1001", "1002"]))
        self.agent.last.answer(200)
        # Read again from the durable cursor: delivered twice, never lost.
        self.assertEqual(event_ids(self.agent.last), ["1001", "1002"])
        self.assertNotEqual(self.agent.last.batch_id, sealed.batch_id)
        self.assertEqual(self.cursor(), self.log_end())

    def test_a_cursor_save_cut_short_is_cleared(self) -> None:
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "cursor.tmp4242"), "wb") as f:
            f.write(b'{"vers')
        self.service()
        self.assertEqual(self.files(), ["0000000000.open", "cursor"])
        self.assertEqual(self.messages("warn"), [])

    def test_a_broken_line_in_the_log_is_skipped(self) -> None:
        self.service()
        with open(self.log_path, "ab") as f:
            f.write(b'{"type":"deliv\n')
        self.emit(event("delivery", 1))
        self.clock.advance(30)
        self.assertEqual(event_ids(self.agent.last), ["1001"])
        self.assertIn("not an event", self.messages("warn")[0])
