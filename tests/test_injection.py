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

from appliance.envelope import QueuedMessage
from appliance.events import EventLog
from appliance.injection import Injector, friendly_from, header_text
from appliance.policy import ACCEPT, Verdict
from appliance.smtp import Session
from appliance.spool import Spool, run_synchronously
from tests.test_smtp import listener

MESSAGE = b"From: <sender@example.net>\r\nSubject: hello\r\n\r\nbody\r\n"


class Routes:
    def undeliverable(self, domain: str) -> str | None:
        return None


class RecordingQueue:
    def __init__(self, error: Exception | None = None) -> None:
        self.queued: list[QueuedMessage] = []
        self.error = error

    def full(self) -> bool:
        return False

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
    def test_the_envelope_keeps_a_long_subject_cut_just_past_the_cap(self) -> None:
        subject = b"\r\n ".join([b"x" * 500] * 5)  # folded: 2,504 bytes unfolded
        message = b"From: <sender@example.net>\r\nSubject: " + subject + b"\r\n\r\nb\r\n"
        _, d = self.send(self.injector(), message)
        self.assertEqual(self.successResultOf(d)[0], 250)
        [queued] = self.queue.queued
        self.assertEqual(len(queued.envelope.subject.encode()), 999)
        [event] = self.events_written()
        self.assertEqual((len(event["subject"]), event["subject_truncated"]), (998, True))

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


class HeaderHygieneTests(InjectorCase):
    """A message without Date or Message-ID gets them at injection, as Postfix's cleanup adds them."""

    DATE = b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"  # 1_700_000_000, the injector's clock

    def stored_message(self) -> bytes:
        [queued] = self.queue.queued
        return self.spool.read_message(queued)

    def received_and_rest(self, stored: bytes) -> tuple[bytes, bytes]:
        """Our trace header (it is first, and folded over two or three lines), and what follows it."""
        end = stored.index(b"\r\n", stored.index(b"; ")) + 2
        return stored[:end], stored[end:]

    def test_both_added_after_the_trace_header(self) -> None:
        transaction, d = self.send(self.injector(), MESSAGE, (b"a@example.test", b"b@example.test"))
        self.assertEqual(self.successResultOf(d)[0], 250)
        received, rest = self.received_and_rest(self.stored_message())
        self.assertTrue(received.startswith(b"Received: from client.test"))
        message_id = b"Message-ID: <20231114221320.%s@mx.test>\r\n" % transaction.transmission_id.encode()
        self.assertEqual(rest, self.DATE + message_id + MESSAGE)
        # The size the events report is the size stored, added fields and all.
        [queued] = self.queue.queued
        self.assertEqual(queued.envelope.message_size, len(self.stored_message()))
        self.assertEqual([e["msg_size"] for e in self.events_written()],
                         [str(queued.envelope.message_size)] * 2)

    def test_the_date_is_rfc_5322s_in_utc(self) -> None:
        """Formatted by hand for speed: the same text the email package gives, second by second."""
        import email.utils
        from datetime import UTC, datetime

        from appliance.injection import missing_fields
        for ts in (0, 951782400, 1_700_000_000, 1_700_000_000.9, 1_700_000_001, 4102444799):
            expected = email.utils.format_datetime(datetime.fromtimestamp(int(ts), UTC))
            self.assertEqual(missing_fields({"message-id"}, ts, "1", "h"), f"Date: {expected}\r\n".encode())
        self.assertEqual(missing_fields({"date"}, 951782400.5, "77", "mx.test"),
                         b"Message-ID: <20000229000000.77@mx.test>\r\n")
        self.assertEqual(missing_fields({"date", "message-id"}, 0, "1", "h"), b"")

    def test_a_message_with_both_is_stored_byte_for_byte(self) -> None:
        for fields in (b"Date: Mon, 1 Jan 2024 00:00:00 +0100\r\nMessage-ID: <x@y>\r\n",
                       b"DATE:whenever\r\nmessage-id:\r\n <folded@y>\r\n"):
            self.queue.queued.clear()
            message = fields + MESSAGE
            _, d = self.send(self.injector(), message)
            self.assertEqual(self.successResultOf(d)[0], 250)
            self.assertEqual(self.received_and_rest(self.stored_message())[1], message)

    def test_only_the_missing_one(self) -> None:
        message = b"Message-Id: <kept@example.net>\r\n" + MESSAGE
        _, d = self.send(self.injector(), message)
        self.successResultOf(d)
        self.assertEqual(self.received_and_rest(self.stored_message())[1], self.DATE + message)
        self.queue.queued.clear()
        dated = b"Date: Mon, 1 Jan 2024 00:00:00 +0100\r\n" + MESSAGE
        transaction, d = self.send(self.injector(), dated)
        self.successResultOf(d)
        rest = self.received_and_rest(self.stored_message())[1]
        self.assertEqual(rest, b"Message-ID: <20231114221320.%s@mx.test>\r\n%s"
                         % (transaction.transmission_id.encode(), dated))

    def test_the_same_in_any_pieces(self) -> None:
        """As the network gives it: the header's end can fall in any piece, or a field be cut in two."""
        whole = None
        for size in (1, 3, 17, len(MESSAGE)):
            self.queue.queued.clear()
            transaction = self.injector().begin(self.session(), smtp.Address(b"sender@example.net"),
                                                [smtp.Address(b"a@example.test")])
            for i in range(0, len(MESSAGE), size):
                transaction.write(MESSAGE[i:i + size])
            self.successResultOf(self.injector().finish(transaction))
            rest = self.received_and_rest(self.stored_message())[1]
            rest = rest.replace(transaction.transmission_id.encode(), b"TID")
            whole = whole or rest
            self.assertEqual(rest, whole, size)
        self.assertTrue(whole is not None and whole.endswith(MESSAGE))

    def test_a_header_without_its_end(self) -> None:
        """The message ends inside its header: the fields still go after the trace header."""
        _, d = self.send(self.injector(), b"Subject: only a header")
        self.successResultOf(d)
        rest = self.received_and_rest(self.stored_message())[1]
        self.assertTrue(rest.startswith(self.DATE + b"Message-ID: <"))
        self.assertTrue(rest.endswith(b"\r\nSubject: only a header"))

    def test_a_header_past_the_limit_is_not_added_to(self) -> None:
        """Past MAX_HEADER_BYTES a Date may still follow unread: adding one could make two."""
        from appliance.injection import MAX_HEADER_BYTES
        filler = b"".join(b"X-Filler-%07d: %s\r\n" % (i, b"f" * 80) for i in range(MAX_HEADER_BYTES // 90))
        message = filler + b"Date: late\r\n" + MESSAGE
        _, d = self.send(self.injector(), message)
        self.successResultOf(d)
        self.assertEqual(self.received_and_rest(self.stored_message())[1], message)

    def test_refused_message_leaves_nothing(self) -> None:
        _, d = self.send(self.injector(), b'X-MSYS-API: {"tags":"x"}\r\n' + MESSAGE)
        self.assertEqual(self.successResultOf(d)[0], 550)
        self.assertEqual(self.stored(), ([], []))
        self.assertEqual(self.queue.queued, [])


class LimitTests(InjectorCase):
    """Momentum's limits leave out what is over them and the injection event says so; bad values refuse."""

    def test_what_was_left_out_is_named_in_the_injection_event(self) -> None:
        tags = [f"t{i}" for i in range(12)]
        api = json.dumps({"campain_id": "typo", "tags": tags, "metadata": {"k": "v" * 2000},
                          "options": {"open_tracking": True, "sandbox": True}})
        _, d = self.send(self.injector(), f"X-MSYS-API: {api}\r\n".encode() + MESSAGE,
                         (b"a@example.test", b"b@example.test"))
        self.assertEqual(self.successResultOf(d)[0], 250)
        events = self.events_written()
        self.assertEqual(len(events), 2)
        for event in events:
            self.assertEqual(event["rcpt_tags"], tags[:10])
            self.assertEqual(event["rcpt_tags_ignored"], 2)
            self.assertEqual(event["rcpt_meta"], {"k": "v" * 2000})  # events carry it; links do not
            self.assertIs(event["rcpt_meta_left_out_of_links"], True)
            self.assertEqual(event["msys_api_unknown_fields"], ["campain_id", "options.sandbox"])
        [queued] = self.queue.queued
        for rcpt in queued.envelope.recipients:
            self.assertEqual((rcpt.tracking.metadata_in_links, rcpt.tracking.include_metadata),
                             (False, False))

    def test_nothing_left_out_says_nothing(self) -> None:
        _, d = self.send(self.injector(), b'X-MSYS-API: {"tags":["a"],"metadata":{"k":1}}\r\n' + MESSAGE)
        self.successResultOf(d)
        [event] = self.events_written()
        for name in ("rcpt_tags_ignored", "rcpt_meta_left_out_of_links", "msys_api_unknown_fields"):
            self.assertNotIn(name, event)

    def test_values_that_cannot_be_carried_are_refused_naming_the_field(self) -> None:
        for api, text in ((b'{"metadata":{"n":1e999}}',
                           b"5.6.0 X-MSYS-API 'metadata' must not contain a number out of range "
                           b"(it would be Infinity)"),
                          (b'{"tags":[1]}', b"5.6.0 X-MSYS-API 'tags' must be an array of strings"),
                          (b'{"options":{"initial_open":"yes"}}',
                           b"5.6.0 X-MSYS-API 'options.initial_open' must be of type 'boolean'")):
            _, d = self.send(self.injector(), b"X-MSYS-API: " + api + b"\r\n" + MESSAGE)
            self.assertEqual(self.successResultOf(d), (550, text))
            self.assertEqual(self.stored(), ([], []))
        self.assertEqual(self.queue.queued, [])
        self.assertEqual({e["type"] for e in self.events_written()}, {"policy_rejection"})
