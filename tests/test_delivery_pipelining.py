"""
Outbound PIPELINING (RFC 2920): one write for a copy's commands, the same outcomes as one at a time.

The client is driven over a ``StringTransport`` by a small scripted server
that answers whatever complete commands the client has written so far, all
in one read, as a real server does with a pipelined group. Every reply
combination is run twice, with PIPELINING offered and without, and the
outcomes must be the same; what was written, and in which writes, is
checked as well. ``SinkTests`` then deliver over loopback to the sink, which
records the commands it got in each read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import Route
from appliance.delivery.client import DeliveryClient
from appliance.delivery.outcome import Outcome
from appliance.delivery.routing import Hop
from tests.helpers import wait_until
from tests.sink import SinkFactory
from tests.test_delivery_smtp import MESSAGE, DeliveryCase

BODY = b"Subject: hello\r\n\r\nThe body of the copy.\r\n"
BODY_LINE = b"The body of the copy."
COMMAND_TIMEOUT = 30.0
DATA_TIMEOUT = 600.0

# What the scripted server answers: a reply (lines joined by CRLF), "silent" (no answer, to
# this or anything after it) or "drop" (the connection is lost), given the command's verb
# and the number of the transaction it belongs to (1 for the first MAIL, 2 for the next...).
Answer = bytes | str
Script = Callable[[str, int], Answer]


@dataclass
class FakeJob:
    mail_from: str
    address: str
    data: bytes


class FakeAttempt:
    """An ``Attempt`` with copies to hand out; it records what the client reports."""

    def __init__(self, addresses: list[str]) -> None:
        self.hop = Hop("mx.x.test", "192.0.2.25")
        self.pending = [FakeJob("sender@s.test", a, BODY) for a in addresses]
        self.outcomes: list[tuple[str, Outcome]] = []
        self.given_back: list[str] = []
        self.hop_outcome: Outcome | None = None
        self.established_count = 0
        self.closed_count = 0

    def connected(self, client: DeliveryClient) -> None:
        pass

    def established(self) -> None:
        self.established_count += 1

    def next_job(self) -> FakeJob | None | defer.Deferred:
        return self.pending.pop(0) if self.pending else None

    def has_more(self) -> bool:
        return bool(self.pending)

    def give_back(self, job: FakeJob) -> None:
        self.given_back.append(job.address)
        self.pending.insert(0, job)

    def job_done(self, job: FakeJob, outcome: Outcome) -> None:
        self.outcomes.append((job.address, outcome))

    def wait_for_work(self) -> bool:
        return False  # no connection reuse: QUIT once nothing is pending

    def stop_waiting(self) -> None:
        pass

    def hop_failed(self, outcome: Outcome, tls_failed: bool) -> None:
        self.hop_outcome = outcome

    def closed(self) -> None:
        self.closed_count += 1


class WriteRecorder(StringTransport):
    """A ``StringTransport`` that keeps each write apart: a pipelined group is one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def default_script(verb: str, n: int) -> Answer:
    return {"RSET": b"250 2.0.0 Ok", "MAIL": b"250 2.1.0 Ok", "RCPT": b"250 2.1.5 Ok",
            "DATA": b"354 End data with <CR><LF>.<CR><LF>", "EOM": b"250 2.0.0 Ok: queued as %d" % n,
            "QUIT": b"221 2.0.0 Bye"}[verb]


def script_with(**answers: Answer | dict[int, Answer]) -> Script:
    """The default answers but for some verbs: one answer for every transaction, or one per number."""
    def script(verb: str, n: int) -> Answer:
        answer = answers.get(verb)
        if isinstance(answer, dict):
            answer = answer.get(n)
        return default_script(verb, n) if answer is None else answer
    return script


@dataclass
class Run:
    attempt: FakeAttempt
    client: DeliveryClient
    transport: WriteRecorder
    clock: Clock
    heard: list[str]  # what the server read: verbs and "EOM"
    message_lines: list[bytes]  # what it read between a 354 and the dot
    reads: list[list[str]]  # the verbs the server read in each read

    def bodies_sent(self) -> int:
        return self.message_lines.count(BODY_LINE)


def converse(script: Script, pipelining: bool, addresses: list[str]) -> Run:
    """Greeting, EHLO (offering PIPELINING or not), then the server answers until the client stops."""
    attempt = FakeAttempt(addresses)
    clock = Clock()
    client = DeliveryClient(attempt, b"client.test", None, clock, COMMAND_TIMEOUT, DATA_TIMEOUT)
    transport = WriteRecorder()
    client.makeConnection(transport)
    ehlo = [b"250-mx.x.test", b"250-SIZE 10000000", b"250-8BITMIME"]
    ehlo += [b"250-PIPELINING"] if pipelining else []
    ehlo += [b"250 ENHANCEDSTATUSCODES"]
    client.dataReceived(b"220 mx.x.test ESMTP\r\n")
    assert transport.value() == b"EHLO client.test\r\n", transport.value()
    run = Run(attempt, client, transport, clock, [], [], [])
    position, buffered, in_data, number = len(transport.value()), b"", False, 0
    client.dataReceived(b"\r\n".join(ehlo) + b"\r\n")
    for _ in range(100):
        while transport.producer is not None:
            transport.producer.resumeProducing()
        written = transport.value()
        buffered += written[position:]
        position = len(written)
        answers: list[bytes] = []
        read: list[str] = []
        stop = ""
        while b"\r\n" in buffered and not stop:
            line, buffered = buffered.split(b"\r\n", 1)
            if in_data:
                if line != b".":
                    run.message_lines.append(line)
                    continue
                in_data, verb = False, "EOM"
            else:
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].decode()
                read.append(verb)
                number += verb == "MAIL"
            run.heard.append(verb)
            answer = script(verb, number)
            if isinstance(answer, str):
                stop = answer
                break
            answers.append(answer)
            in_data = in_data or (verb == "DATA" and answer.startswith(b"354"))
        if read:
            run.reads.append(read)
        if answers:
            client.dataReceived(b"".join(a + b"\r\n" for a in answers))
        if stop == "drop":
            client.connectionLost(Failure(error.ConnectionLost("gone")))
            return run
        if stop == "silent" or not answers:
            break
    if transport.disconnecting and not attempt.closed_count:
        client.connectionLost(Failure(error.ConnectionDone()))
    return run


def group(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


MAIL = b"MAIL FROM:<sender@s.test> SIZE=%d" % len(BODY)


class OutOfStepTests(SynchronousTestCase):
    def test_a_reply_before_the_message_is_sent_ends_the_session(self) -> None:
        """
        A reply that comes with the 354, before the client sent the message, answers nothing:
        the session ends there, and no later copy takes a reply that was not its own.
        """
        def script(verb: str, n: int) -> Answer:
            if verb == "DATA" and n == 1:
                return b"354 go\r\n550 5.7.1 early refusal"  # in one read with the 354
            return default_script(verb, n)

        for pipelining in (False, True):
            run = converse(script, pipelining, ["a@x.test", "b@x.test", "c@x.test"])
            self.assertEqual([(a, o.kind) for a, o in run.attempt.outcomes], [("a@x.test", "bounce")])
            self.assertTrue(run.transport.disconnecting)


class PipeliningTests(SynchronousTestCase):
    def test_used_when_offered(self) -> None:
        run = converse(default_script, True, ["a@x.test", "b@x.test"])
        self.assertIn(group(MAIL, b"RCPT TO:<a@x.test>", b"DATA"), run.transport.writes)
        # The RSET that starts the next copy on the same connection goes with its commands.
        self.assertIn(group(b"RSET", MAIL, b"RCPT TO:<b@x.test>", b"DATA"), run.transport.writes)
        self.assertEqual(run.reads, [["MAIL", "RCPT", "DATA"], ["RSET", "MAIL", "RCPT", "DATA"], ["QUIT"]])
        self.assertEqual([(a, o.kind, o.raw_reason) for a, o in run.attempt.outcomes],
                         [("a@x.test", "delivery", "250 2.0.0 Ok: queued as 1"),
                          ("b@x.test", "delivery", "250 2.0.0 Ok: queued as 2")])
        self.assertEqual(run.bodies_sent(), 2)
        self.assertEqual((run.attempt.established_count, run.attempt.closed_count), (1, 1))

    def test_not_used_unless_offered(self) -> None:
        run = converse(default_script, False, ["a@x.test", "b@x.test"])
        self.assertEqual(run.reads, [["MAIL"], ["RCPT"], ["DATA"], ["RSET"], ["MAIL"], ["RCPT"], ["DATA"],
                                     ["QUIT"]])
        for command in (MAIL, b"RCPT TO:<a@x.test>", b"DATA", b"RSET"):
            self.assertIn(command + b"\r\n", run.transport.writes)  # each in a write of its own
        self.assertEqual([o.kind for _a, o in run.attempt.outcomes], ["delivery", "delivery"])

    def test_not_used_after_helo(self) -> None:
        attempt = FakeAttempt(["a@x.test"])
        client = DeliveryClient(attempt, b"client.test", None, Clock(), COMMAND_TIMEOUT, DATA_TIMEOUT)
        transport = WriteRecorder()
        client.makeConnection(transport)
        client.dataReceived(b"220 old.x.test SMTP\r\n500 5.5.1 what is EHLO\r\n")
        transport.clear()
        client.dataReceived(b"250 old.x.test\r\n")
        self.assertEqual(transport.value(), group(b"MAIL FROM:<sender@s.test>"))
        client.setTimeout(None)

    def test_no_message_after_a_refusal_and_a_lone_dot_after_a_354(self) -> None:
        # A server that answers DATA with 354 though the only recipient was refused: RFC 2920
        # §3.1 has the client end that DATA with a lone dot, and send nothing of the message.
        script = script_with(RCPT={1: b"550 5.1.1 <a@x.test>: no such user"},
                             EOM={1: b"554 5.5.1 no valid recipients"})
        run = converse(script, True, ["a@x.test", "b@x.test"])
        self.assertEqual(run.heard, ["MAIL", "RCPT", "DATA", "EOM", "RSET", "MAIL", "RCPT", "DATA", "EOM",
                                     "QUIT"])
        self.assertIn(b".\r\n", run.transport.writes)
        self.assertEqual(run.message_lines, BODY.split(b"\r\n")[:-1])  # the second copy's alone
        self.assertEqual([(a, o.kind, o.raw_reason) for a, o in run.attempt.outcomes],
                         [("a@x.test", "bounce", "550 5.1.1 <a@x.test>: no such user"),
                          ("b@x.test", "delivery", "250 2.0.0 Ok: queued as 2")])

    def test_a_refused_rset_gives_the_copy_back_untried(self) -> None:
        run = converse(script_with(RSET=b"421 4.3.2 closing"), True, ["a@x.test", "b@x.test"])
        self.assertEqual([a for a, _o in run.attempt.outcomes], ["a@x.test"])
        self.assertEqual(run.attempt.given_back, ["b@x.test"])
        self.assertEqual(run.bodies_sent(), 1)  # the first copy's, and no other
        self.assertTrue(run.transport.disconnecting)

    def test_a_connection_lost_after_rset_gives_the_copy_back_untried(self) -> None:
        run = converse(script_with(RSET="drop"), True, ["a@x.test", "b@x.test"])
        self.assertEqual([a for a, _o in run.attempt.outcomes], ["a@x.test"])
        self.assertEqual((run.attempt.given_back, run.attempt.closed_count), (["b@x.test"], 1))

    def test_a_421_read_out_of_a_refused_group_ends_the_session(self) -> None:
        closing = b"421 4.3.2 shutting down"
        script = script_with(MAIL={1: b"451 4.3.0 try later"}, RCPT={1: closing}, DATA={1: closing},
                             RSET=closing)
        run = converse(script, True, ["a@x.test", "b@x.test"])
        self.assertEqual(run.heard, ["MAIL", "RCPT", "DATA", "QUIT"])  # no RSET, no next copy
        self.assertEqual(([a for a, _o in run.attempt.outcomes], run.attempt.given_back), (["a@x.test"], []))
        self.assertTrue(run.transport.disconnecting)

    def test_the_data_timeout_covers_the_reply_to_the_lone_dot(self) -> None:
        script = script_with(MAIL={1: b"451 4.3.0 try later"}, RCPT={1: b"503 5.5.1 need MAIL"},
                             EOM="silent")
        run = converse(script, True, ["a@x.test"])
        self.assertEqual(run.heard, ["MAIL", "RCPT", "DATA", "EOM"])
        run.clock.advance(COMMAND_TIMEOUT)
        self.assertFalse(run.transport.disconnecting)  # an empty message, but "." is "."
        run.clock.advance(DATA_TIMEOUT - COMMAND_TIMEOUT)
        self.assertTrue(run.transport.disconnecting)
        self.assertEqual([(a, o.code) for a, o in run.attempt.outcomes], [("a@x.test", 451)])


# Reply combinations whose outcomes must not depend on pipelining. Two copies each, so a
# refusal of the first shows whether the connection goes on to the second as it did.
SAME_OUTCOMES: dict[str, Script] = {
    "all accepted": default_script,
    "MAIL 4xx": script_with(MAIL={1: b"451 4.3.0 Temporary failure"}),
    "MAIL 5xx, then 503 to RCPT and DATA": script_with(MAIL={1: b"553 5.7.1 sender blocked"},
                                                       RCPT={1: b"503 5.5.1 need MAIL"},
                                                       DATA={1: b"503 5.5.1 need MAIL"}),
    "MAIL 5xx, RCPT accepted anyway, DATA 354": script_with(MAIL={1: b"550 5.7.1 no"},
                                                            EOM={1: b"503 5.5.1 nothing to send"}),
    # A server that says 421 closes: it answers nothing after that but 421, if anything.
    "MAIL 421, then the end": script_with(MAIL={1: b"421 4.3.2 closing"}, RCPT={1: "drop"}, RSET="drop"),
    "MAIL 421, then 421s": script_with(MAIL={1: b"421 4.3.2 closing"}, RCPT={1: b"421 4.3.2 closing"},
                                       RSET=b"421 4.3.2 closing", DATA={1: "drop"}),
    "RCPT 4xx": script_with(RCPT={1: b"450 4.2.1 <a@x.test>: mailbox busy"},
                            DATA={1: b"554 5.5.1 Error: no valid recipients"}),
    "RCPT 5xx multi-line": script_with(RCPT={1: b"550-5.1.1 <a@x.test>: no such user\r\n550 5.1.1 see "
                                                b"https://x.test/why"},
                                       DATA={1: b"554 5.5.1 Error: no valid recipients"}),
    "RCPT 5xx, DATA 354, dot refused": script_with(RCPT={1: b"550 5.1.1 no such user"},
                                                   EOM={1: b"554 5.5.1 no valid recipients"}),
    "RCPT 5xx, DATA 354, dot accepted": script_with(RCPT={1: b"550 5.1.1 no such user"}),
    "RCPT 5xx on the second copy": script_with(RCPT={2: b"550 5.1.1 no such user"},
                                               DATA={2: b"554 5.5.1 no valid recipients"}),
    "RCPT 251": script_with(RCPT=b"251 2.1.5 will forward"),
    "DATA 4xx": script_with(DATA={1: b"451 4.3.0 not now"}),
    "DATA 5xx": script_with(DATA={1: b"554 5.7.1 go away"}),
    "message 4xx": script_with(EOM={1: b"452 4.3.1 Insufficient system storage"}),
    "message 5xx": script_with(EOM={2: b"554 5.7.1 Message rejected as spam"}),
    "RSET refused": script_with(RSET=b"421 4.3.2 closing"),
    "RSET 5xx": script_with(RSET=b"500 5.5.1 what"),
    "connection lost instead of the MAIL reply": script_with(MAIL={2: "drop"}),
    "connection lost instead of the RCPT reply": script_with(RCPT={1: "drop"}),
    "connection lost instead of the DATA reply": script_with(DATA={1: "drop"}),
    "connection lost after the message": script_with(EOM={1: "drop"}),
    "no reply to MAIL": script_with(MAIL={1: "silent"}),
    "no reply to RCPT": script_with(RCPT={2: "silent"}),
    "no reply to DATA": script_with(DATA={1: "silent"}),
    "no reply to the message": script_with(EOM={1: "silent"}),
    "no reply to RSET": script_with(RSET="silent"),
    "not SMTP in reply to RCPT": script_with(RCPT={1: b"hello there"}),
}


class SameOutcomesTests(SynchronousTestCase):
    """Every reply combination comes to the same outcomes, pipelined or not."""

    def finish(self, run: Run) -> tuple[list[tuple[str, Outcome]], list[str], Outcome | None, int, int]:
        """Let any timeout fire, then what the attempt was told and how many bodies went out."""
        run.clock.advance(DATA_TIMEOUT)
        if run.transport.disconnecting and not run.attempt.closed_count:
            run.client.connectionLost(Failure(error.ConnectionDone()))
        run.client.setTimeout(None)
        untried = [job.address for job in run.attempt.pending]
        return (run.attempt.outcomes, untried, run.attempt.hop_outcome, run.attempt.closed_count,
                run.bodies_sent())

    def test_the_same_outcomes(self) -> None:
        for name, script in SAME_OUTCOMES.items():
            one_by_one = self.finish(converse(script, False, ["a@x.test", "b@x.test"]))
            pipelined_run = converse(script, True, ["a@x.test", "b@x.test"])
            self.assertIn(group(MAIL, b"RCPT TO:<a@x.test>", b"DATA"), pipelined_run.transport.writes, name)
            pipelined = self.finish(pipelined_run)
            self.assertEqual(pipelined, one_by_one, name)
            self.assertTrue(one_by_one[0], name)  # a case where nothing was reported proves little

    def test_the_cases_cover_every_kind_of_outcome(self) -> None:
        kinds = set()
        for script in SAME_OUTCOMES.values():
            run = converse(script, True, ["a@x.test", "b@x.test"])
            kinds |= {o.kind for _a, o in self.finish(run)[0]}
        self.assertEqual(kinds, {"delivery", "delay", "bounce"})


class SinkTests(DeliveryCase):
    """Over real loopback sockets: how the commands arrived at the sink, read by read."""

    def verbs_by_read(self, sink: SinkFactory) -> list[list[bytes]]:
        return [[line.split(b" ")[0].split(b":")[0] for line in lines] for _n, lines in sink.reads]

    @defer.inlineCallbacks
    def deliver_three(self, pipelining: bool) -> Any:
        sink = SinkFactory(pipelining=pipelining)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        self.queue(["a@x.test", "b@x.test", "c@x.test"])
        yield self.wait_events(3)
        yield wait_until(lambda: sink.commands[-1][1] == b"QUIT")
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * 3)
        self.assertEqual([m.rcpt_to for m in sink.messages], [["a@x.test"], ["b@x.test"], ["c@x.test"]])
        self.assertEqual([m.data for m in sink.messages], [MESSAGE] * 3)
        self.assertEqual({n for n, _lines in sink.reads}, {1})  # one connection carried all
        return sink

    @defer.inlineCallbacks
    def test_one_write_for_each_copy_when_offered(self) -> Any:
        sink = yield self.deliver_three(pipelining=True)
        self.assertEqual(self.verbs_by_read(sink), [[b"EHLO"], [b"MAIL", b"RCPT", b"DATA"]]
                         + [[b"RSET", b"MAIL", b"RCPT", b"DATA"]] * 2 + [[b"QUIT"]])

    @defer.inlineCallbacks
    def test_one_command_per_write_when_not_offered(self) -> Any:
        sink = yield self.deliver_three(pipelining=False)
        one_by_one = [[b"MAIL"], [b"RCPT"], [b"DATA"]]
        self.assertEqual(self.verbs_by_read(sink), [[b"EHLO"]] + (one_by_one + [[b"RSET"]]) * 2
                         + one_by_one + [[b"QUIT"]])

    @defer.inlineCallbacks
    def test_refusals_in_a_pipelined_group(self) -> Any:
        def script(cmd: str, arg: bytes) -> Any:
            if cmd == "RCPT" and b"unknown@" in arg:
                return 550, "5.1.1 <unknown@x.test>: Recipient address rejected: User unknown"
            if cmd == "RCPT" and b"busy@" in arg:
                return 450, "4.2.1 <busy@x.test>: mailbox busy"
            if cmd == "MAIL" and b"blocked" in arg:
                return 553, "5.7.1 sender blocked"
            return None

        sink = SinkFactory(script, pipelining=True)
        port = self.listen(sink)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, max_connections_per_destination=1)
        self.queue(["unknown@x.test", "busy@x.test", "ok@x.test"])
        self.queue(["c@x.test"], mail_from="blocked@sender.test")
        yield self.wait_events(4)
        by_rcpt = {e["rcpt_to"]: e for e in self.written}
        self.assertEqual(by_rcpt["ok@x.test"]["type"], "delivery")
        found = {r: (e["type"], e["error_code"], e["bounce_class"], e["raw_reason"])
                 for r, e in by_rcpt.items() if r != "ok@x.test"}
        self.assertEqual(found, {
            "unknown@x.test": ("bounce", "550", "10",
                               "550 5.1.1 <unknown@x.test>: Recipient address rejected: User unknown"),
            "busy@x.test": ("delay", "450", "70", "450 4.2.1 <busy@x.test>: mailbox busy"),
            "c@x.test": ("bounce", "553", "50", "553 5.7.1 sender blocked"),
        })
        self.assertEqual([m.rcpt_to for m in sink.messages], [["ok@x.test"]])  # nothing after a refusal
        self.assertEqual(sink.connections, 1)  # the connection went on after each refusal
        yield wait_until(lambda: sink.commands[-1][1] == b"QUIT")
        self.assertEqual(len([line for _n, line in sink.commands if line == b"DATA"]), 4)
