"""
The ``Injector`` between the final dot and the reply: real spool files, a real event log.

No sockets: a ``Session`` stands for the client, the spool runs its fsyncs
synchronously, and the queue records what it is given.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog
from appliance.injection import Injector, friendly_from, header_text
from appliance.policy import ACCEPT, Verdict
from appliance.smtp import Session
from appliance.spool import QueuedMessage, Spool, run_synchronously
from tests.test_smtp import listener

MESSAGE = b"From: <sender@example.net>\r\nSubject: hello\r\n\r\nbody\r\n"


class Routes:
    def undeliverable(self, domain: str) -> str | None:
        return None


class RecordingQueue:
    def __init__(self, error: Exception | None = None) -> None:
        self.queued: list[QueuedMessage] = []
        self.error = error

    def enqueue(self, queued: QueuedMessage) -> None:
        if self.error is not None:
            raise self.error
        self.queued.append(queued)


class PendingPolicy:
    """A policy whose verdicts the test gives, after doing whatever it likes meanwhile."""

    def __init__(self) -> None:
        self.pending: defer.Deferred | None = None

    def check_all(self, envelopes: list[Any], *args: Any) -> defer.Deferred:
        self.pending = defer.Deferred()
        self.count = len(envelopes)
        return self.pending


class BrokenCopies:
    """Stands for a rewriter that fails on a message: a bug, not a disk error."""

    def prepare_later(self, queued: QueuedMessage) -> Any:
        raise RuntimeError("rewriter bug")


class InjectorCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        self.spool = Spool(os.path.join(base, "spool"), run=run_synchronously)
        self.spool.prepare()
        self.events = EventLog(os.path.join(base, "events.jsonl"), "n", fsync_interval=0, clock=object())
        self.events.open()
        self.addCleanup(self.events.close)
        self.queue = RecordingQueue()

    def injector(self, **kwargs: Any) -> Injector:
        return Injector(self.spool, self.events, Routes(), kwargs.pop("queue", self.queue), "mx.test",
                        now=lambda: 1_700_000_000.0, **kwargs)

    def session(self) -> Session:
        return Session(listener(), "127.0.0.1", "client.test", False, None)

    def send(self, injector: Injector, message: bytes = MESSAGE,
             rcpts: tuple[bytes, ...] = (b"a@example.test",)) -> tuple[Any, Any]:
        """Begin, write and finish one transaction; returns it and the Deferred reply."""
        transaction = injector.begin(self.session(), smtp.Address(b"sender@example.net"),
                                     [smtp.Address(r) for r in rcpts])
        transaction.write(message)
        return transaction, injector.finish(transaction)

    def events_written(self) -> list[dict[str, Any]]:
        with open(self.events.path, "rb") as f:
            return [json.loads(line) for line in f]

    def stored(self) -> tuple[list[str], list[str]]:
        return os.listdir(self.spool.incoming), os.listdir(self.spool.active)


class AfterCommitTests(InjectorCase):
    """Once the message is on disk its 250 stands: nothing after the commit may turn it into 451."""

    def test_rewriter_failure_after_commit_still_answers_250_and_enqueues(self) -> None:
        _, d = self.send(self.injector(copies=BrokenCopies()), MESSAGE.replace(
            b"\r\n\r\n", b"\r\nX-MSYS-API: {\"options\": {\"open_tracking\": true}}\r\n\r\n"))
        code, text = self.successResultOf(d)
        self.assertEqual(code, 250, text)
        self.assertEqual(len(self.queue.queued), 1)
        self.assertEqual(len(self.stored()[1]), 1)
        self.assertEqual([e["type"] for e in self.events_written()], ["injection"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_event_failure_of_any_kind_still_enqueues(self) -> None:
        def broken(event: Any) -> None:
            raise TypeError("not serialisable")

        self.events.write = broken  # type: ignore[method-assign]
        _, d = self.send(self.injector())
        self.assertEqual(self.successResultOf(d)[0], 250)
        self.assertEqual(len(self.queue.queued), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_enqueue_failure_still_answers_250(self) -> None:
        queue = RecordingQueue(RuntimeError("queue bug"))
        _, d = self.send(self.injector(queue=queue))
        self.assertEqual(self.successResultOf(d)[0], 250)
        # Durable in active/: a restart picks it up, so the client must not send it again.
        self.assertEqual(self.stored(), ([], os.listdir(self.spool.active)))
        self.assertEqual(len(self.stored()[1]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_gone_during_policy_nothing_committed(self) -> None:
        policy = PendingPolicy()
        transaction, d = self.send(self.injector(policy=policy))
        transaction.client_gone = True  # what the session does when the connection drops
        assert policy.pending is not None
        policy.pending.callback([ACCEPT])
        self.assertEqual(self.successResultOf(d)[0], 421)
        self.assertEqual(self.stored(), ([], []))
        self.assertEqual(self.queue.queued, [])
        self.assertEqual(self.events_written(), [])


class HopCountTests(InjectorCase):
    def message_with(self, hops: int) -> bytes:
        received = b"".join(b"Received: from h%d.example by h%d.example; Tue, 1 Jan 2030 00:00:00 +0000\r\n"
                            % (i, i + 1) for i in range(hops))
        return received + MESSAGE

    def test_more_than_max_hops_refused_as_a_loop(self) -> None:
        # The appliance's own Received: makes 51 of the 50 that arrived.
        _, d = self.send(self.injector(max_hops=50), self.message_with(50))
        code, text = self.successResultOf(d)
        self.assertEqual(code, 554)
        self.assertEqual(text, b"5.4.6 Too many hops (51 Received: headers, at most 50): a mail loop?")
        self.assertEqual(self.stored(), ([], []))
        self.assertEqual(self.queue.queued, [])
        [event] = self.events_written()
        self.assertEqual((event["type"], event["error_code"]), ("policy_rejection", "554"))

    def test_max_hops_accepted(self) -> None:
        _, d = self.send(self.injector(max_hops=50), self.message_with(49))
        self.assertEqual(self.successResultOf(d)[0], 250)
        self.assertEqual(len(self.queue.queued), 1)

    def test_folded_and_lower_case_received_headers_count(self) -> None:
        hops = b"received: from a\r\n\tby b; Tue, 1 Jan 2030 00:00:00 +0000\r\n" * 3
        _, d = self.send(self.injector(max_hops=3), hops + MESSAGE)
        self.assertEqual(self.successResultOf(d)[0], 554)


class HeaderTextTests(SynchronousTestCase):
    """``subject`` and ``friendly_from`` as a person would read them."""

    def parsed(self, raw: bytes) -> Any:
        from email.parser import BytesHeaderParser
        from email.policy import compat32

        return BytesHeaderParser(policy=compat32).parsebytes(raw + b"\r\n")

    def test_raw_utf8_under_8bitmime(self) -> None:
        headers = self.parsed("Subject: Caf\u00e9 \u2014 \u00fcber\r\nFrom: J\u00fcrgen <j@example.net>\r\n"
                              .encode())
        self.assertEqual(header_text(headers, "Subject"), "Caf\u00e9 \u2014 \u00fcber")
        self.assertEqual(header_text(headers, "From"), "J\u00fcrgen <j@example.net>")

    def test_raw_latin1_falls_back(self) -> None:
        headers = self.parsed(b"Subject: Caf\xe9\r\n")
        self.assertEqual(header_text(headers, "Subject"), "Caf\u00e9")

    def test_encoded_words(self) -> None:
        headers = self.parsed(b"Subject: =?utf-8?q?Caf=C3=A9?= =?utf-8?b?IOKAlA==?=  ok\r\n"
                              b" folded\r\n")
        self.assertEqual(header_text(headers, "Subject"), "Caf\u00e9 \u2014 ok folded")

    def test_character_split_across_encoded_words(self) -> None:
        word = "\u65e5\u672c".encode()  # 6 bytes; split in the middle of the second character
        import base64

        a, b = base64.b64encode(word[:4]).decode(), base64.b64encode(word[4:]).decode()
        headers = self.parsed(f"Subject: =?UTF-8?B?{a}?= =?UTF-8?B?{b}?=\r\n".encode())
        self.assertEqual(header_text(headers, "Subject"), "\u65e5\u672c")

    def test_raw_utf8_next_to_an_encoded_word(self) -> None:
        headers = self.parsed("Subject: Caf\u00e9 =?iso-8859-1?q?cr=E8me?=\r\n".encode())
        self.assertEqual(header_text(headers, "Subject"), "Caf\u00e9 cr\u00e8me")

    def test_undecodable_encoded_word_kept_as_written(self) -> None:
        for word in ("=?x-unknown?q?abc?=", "=?utf-8?b?!!!?=", "=?utf-8?q?caf=E9?="):
            headers = self.parsed(f"Subject: before {word} after\r\n".encode())
            self.assertEqual(header_text(headers, "Subject"), f"before {word} after", word)

    def test_friendly_from_is_the_address(self) -> None:
        for raw, expected in ((b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.net>", "j@example.net"),
                              (b"From: plain@example.org", "plain@example.org"),
                              (b'From: "Doe, Jane" <jane@example.com>', "jane@example.com"),
                              (b"From: not an address", "not an address"),
                              (b"X: y", "")):
            self.assertEqual(friendly_from(self.parsed(raw + b"\r\n")), expected, raw)

    def test_absent_header(self) -> None:
        self.assertEqual(header_text(self.parsed(b"X: y\r\n"), "Subject"), "")


class EventTextTests(InjectorCase):
    def test_injection_event_carries_decoded_text(self) -> None:
        message = "From: J\u00fcrgen <j@example.net>\r\nSubject: Caf\u00e9\r\n\r\nbody\r\n".encode()
        _, d = self.send(self.injector(), message)
        self.assertEqual(self.successResultOf(d)[0], 250)
        [event] = self.events_written()
        self.assertEqual((event["subject"], event["friendly_from"]), ("Caf\u00e9", "j@example.net"))


class HeldPreparation:
    """Copies whose preparation (the CPU work after the commit) finishes when the test says."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def prepare_later(self, queued: QueuedMessage) -> defer.Deferred:
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def resigns(self, prepared: Any) -> bool:
        return False


class PartialPolicy:
    """Accepts the first recipient and rejects every other for good."""

    def check_all(self, envelopes: list[Any], *args: Any) -> defer.Deferred:
        return defer.succeed([ACCEPT] + [Verdict(550, "5.7.1 not this one")] * (len(envelopes) - 1))


TRACKED = MESSAGE.replace(b"\r\n\r\n", b"\r\nX-MSYS-API: {\"options\": {\"open_tracking\": true}}\r\n\r\n")


class ReplyFirstTests(InjectorCase):
    """Only durability comes before the 250; the events and delivery follow it."""

    def test_250_only_after_the_fsyncs_and_before_any_event(self) -> None:
        order: list[str] = []
        held: list[defer.Deferred] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            order.append("fsync " + os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"),
                                                    self.spool.directory))
            real_fsync(fd)

        def run(f: Any, *args: Any) -> defer.Deferred:
            # The file pool's work (the commit, its fsyncs in it) finishes when the test says.
            held.append(defer.Deferred().addCallback(lambda _: f(*args)))
            return held[-1]

        self.patch(os, "fsync", fsync)
        self.spool = Spool(self.spool.directory, run=run)
        transaction, d = self.send(self.injector())
        d.addCallback(lambda reply: order.append(f"reply {reply[0]}"
                                                 f" with {len(self.events_written())} event(s)"))
        self.assertNoResult(d)
        self.assertEqual(order, [])
        held.pop().callback(None)
        self.assertEqual(order, ["fsync " + os.path.join("incoming", transaction.transmission_id),
                                 "fsync active", "reply 250 with 0 event(s)"])
        self.assertEqual([e["type"] for e in self.events_written()], ["injection"])
        self.assertEqual(len(self.queue.queued), 1)

    def test_events_and_delivery_wait_for_the_preparation_not_the_reply(self) -> None:
        copies = HeldPreparation()
        injector = self.injector(copies=copies, policy=PartialPolicy())
        _, d = self.send(injector, TRACKED, (b"a@example.test", b"b@example.test"))
        self.assertEqual(self.successResultOf(d)[0], 250)
        # The rejection needs nothing more; the injection event waits for the preparation,
        # and delivery for the injection event.
        [rejection] = self.events_written()
        self.assertEqual((rejection["type"], rejection["rcpt_to"]), ("policy_rejection", "b@example.test"))
        self.assertEqual(self.queue.queued, [])
        self.assertNoResult(injector.idle())  # a stop waits for what is owed
        copies.pending[0].callback(None)
        self.assertEqual([e["type"] for e in self.events_written()], ["policy_rejection", "injection"])
        [queued] = self.queue.queued
        self.assertIsNone(queued.text)  # prepared from memory; not held while it waits
        self.successResultOf(injector.idle())
        # Written with the event_ids the envelope assigned them when it was committed.
        owed = queued.envelope.announce
        self.assertEqual([e["event_id"] for e in self.events_written()],
                         [owed["rejected"][0]["event_id"], owed["injection"][0]])
        self.assertTrue(queued.announced)


class OwedEventsRecoveryTests(InjectorCase):
    """An injection event owed at a kill -9 is written at the next start, once."""

    def restart(self) -> tuple[list[QueuedMessage], Injector]:
        """A new spool, event log and injector on the same files, recovering as at start."""
        self.events.close()
        self.events = EventLog(self.events.path, "n", fsync_interval=0, clock=object())
        self.events.open()
        self.spool = Spool(self.spool.directory, run=run_synchronously)
        self.spool.prepare()
        self.queue = RecordingQueue()
        injector = self.injector()
        self.spool.on_owed = injector.recover_owed
        return list(self.spool.recover()), injector

    def test_killed_before_the_events_they_are_written_at_start_once(self) -> None:
        copies = HeldPreparation()
        _, d = self.send(self.injector(copies=copies, policy=PartialPolicy()), TRACKED,
                         (b"a@example.test", b"b@example.test"))
        self.assertEqual(self.successResultOf(d)[0], 250)
        # Killed here: the rejection is written, the injection event is not (still preparing).
        self.assertEqual([e["type"] for e in self.events_written()], ["policy_rejection"])
        [queued], injector = self.restart()
        self.successResultOf(injector.idle())
        events = self.events_written()
        self.assertEqual([e["type"] for e in events], ["policy_rejection", "injection"])
        self.assertEqual(events[1]["event_id"], queued.envelope.announce["injection"][0])
        self.assertEqual(events[1]["subject"], "hello")
        self.assertEqual(len({e["event_id"] for e in events}), 2)  # the rejection is not written again
        # The mark is on disk now: another restart writes nothing.
        self.restart()
        self.assertEqual(len(self.events_written()), 2)

    def test_killed_between_the_event_and_its_mark_nothing_is_written_twice(self) -> None:
        mark = Spool.announced
        self.patch(Spool, "announced", lambda spool, queued: defer.succeed(None))  # the mark is lost
        _, d = self.send(self.injector(), rcpts=(b"a@example.test", b"c@example.test"))
        self.assertEqual(self.successResultOf(d)[0], 250)
        self.assertEqual(len(self.events_written()), 2)
        self.patch(Spool, "announced", mark)
        [queued], _ = self.restart()
        self.assertEqual(len(self.events_written()), 2)  # found in the log's tail
        self.assertEqual(self.restart()[0][0].announced, True)
