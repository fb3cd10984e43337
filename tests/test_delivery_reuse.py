"""
Connection reuse: a connection with nothing left to send waits, idle, for its destination's next copy.

Real loopback sockets to the sink; the reuse time runs on the tests' ``Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from appliance.config import Route
from tests.helpers import wait_until
from tests.sink import SinkFactory, SinkProtocol
from tests.test_delivery_smtp import DeliveryCase

REUSE = 2.0


def verbs(sink: SinkFactory) -> list[bytes]:
    return [line.split(b" ")[0].split(b":")[0] for _n, line in sink.commands]


class ReuseTests(DeliveryCase):
    def serve(self, sink: SinkFactory, **config: Any) -> None:
        port = self.listen(sink)
        config.setdefault("connection_reuse_time", REUSE)
        self.start(routes={"x.test": Route("127.0.0.1", port)}, **config)

    def recording(self, sink: SinkFactory) -> list[SinkProtocol]:
        """The sink's side of each connection, to close one as a server would."""
        made: list[SinkProtocol] = []
        build = sink.buildProtocol

        def record(addr: Any) -> SinkProtocol:
            p = build(addr)
            made.append(p)
            return p

        sink.buildProtocol = record  # type: ignore[method-assign]
        return made

    @defer.inlineCallbacks
    def deliver_two_apart(self, pipelining: bool) -> Any:
        sink = SinkFactory(pipelining=pipelining)
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.clock.advance(REUSE - 0.5)  # the second copy comes within the reuse time
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * 2)
        self.assertEqual(sink.connections, 1)
        self.assertEqual([m.connection for m in sink.messages], [1, 1])
        self.assertEqual([m.rcpt_to for m in sink.messages], [["a@x.test"], ["b@x.test"]])
        return sink

    @defer.inlineCallbacks
    def test_two_messages_within_the_reuse_time_use_one_connection(self) -> Any:
        sink = yield self.deliver_two_apart(pipelining=False)
        self.assertEqual(verbs(sink), [b"EHLO", b"MAIL", b"RCPT", b"DATA",
                                       b"RSET", b"MAIL", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_pipelined_reuse_sends_rset_with_the_next_copy(self) -> Any:
        sink = yield self.deliver_two_apart(pipelining=True)
        self.assertEqual([lines for _n, lines in sink.reads][-1][0], b"RSET")
        self.assertEqual(verbs(sink)[-4:], [b"RSET", b"MAIL", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_the_idle_connection_is_quit_when_the_reuse_time_runs_out(self) -> Any:
        sink = SinkFactory()
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.clock.advance(REUSE - 0.1)
        self.assertEqual(verbs(sink)[-1], b"DATA")  # still open, nothing sent
        self.assertEqual(sink.closed, 0)
        self.clock.advance(0.1)
        yield self.finished(sink)
        self.assertEqual(verbs(sink)[-1], b"QUIT")
        assert self.service is not None
        self.assertEqual((self.service._connections, self.service._queues), (0, {}))
        # The next copy needs a new connection.
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([m.connection for m in sink.messages], [1, 2])

    @defer.inlineCallbacks
    def test_a_server_that_closes_the_idle_connection_costs_the_copy_nothing(self) -> Any:
        sink = SinkFactory()
        server_ends = self.recording(sink)
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        server_ends[0].sendLine(b"421 4.4.2 sink.test idle for too long")
        server_ends[0].transport.loseConnection()
        yield self.finished(sink)
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * 2)
        self.assertEqual(self.written[1]["num_retries"], "0")
        self.assertEqual([m.connection for m in sink.messages], [1, 2])

    @defer.inlineCallbacks
    def check_dropped_at_rset(self, pipelining: bool) -> Any:
        """The server closes the idle connection just as the next copy starts on it (a race)."""
        resets = []

        def script(cmd: str, arg: bytes) -> Any:
            if cmd == "RSET":
                resets.append(arg)
                return "drop" if len(resets) == 1 else None
            return None

        sink = SinkFactory(script, pipelining=pipelining)
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.queue(["b@x.test"])
        yield self.finished(sink)  # the first connection is gone; a fresh one is dialled
        yield self.wait_events(2)
        self.assertEqual([e["type"] for e in self.written], ["delivery"] * 2)  # no delay
        self.assertEqual(self.written[1]["num_retries"], "0")  # nor an attempt counted
        self.assertEqual([m.connection for m in sink.messages], [1, 2])
        self.assertEqual(len(resets), 1)  # the fresh connection needs no RSET

    def test_a_connection_dropped_at_rset_costs_the_copy_nothing(self) -> defer.Deferred:
        return self.check_dropped_at_rset(pipelining=False)

    def test_a_pipelined_connection_dropped_at_rset_costs_the_copy_nothing(self) -> defer.Deferred:
        return self.check_dropped_at_rset(pipelining=True)

    @defer.inlineCallbacks
    def test_stop_closes_idle_connections_at_once(self) -> Any:
        sink = SinkFactory()
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        assert self.service is not None
        stopped = self.service.stopService()
        # No clock advance: neither the reuse time nor the stop's grace runs out.
        yield wait_until(lambda: sink.closed == 1)
        self.assertEqual(verbs(sink)[-1], b"QUIT")
        yield stopped

    @defer.inlineCallbacks
    def test_zero_closes_the_connection_at_once(self) -> Any:
        sink = SinkFactory()
        self.serve(sink, connection_reuse_time=0.0)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        yield self.finished(sink)  # no clock advance: QUIT follows the last copy
        self.assertEqual(verbs(sink)[-1], b"QUIT")
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([m.connection for m in sink.messages], [1, 2])

    @defer.inlineCallbacks
    def test_the_message_cap_still_holds_across_idle_waits(self) -> Any:
        sink = SinkFactory()
        self.serve(sink, max_messages_per_connection=2)
        for n, rcpt in enumerate(["a@x.test", "b@x.test", "c@x.test"], 1):
            self.queue([rcpt])
            yield self.wait_events(n)
        self.assertEqual([m.connection for m in sink.messages], [1, 1, 2])
        self.assertEqual(verbs(sink).count(b"QUIT"), 1)  # the first, at its cap, without waiting

    @defer.inlineCallbacks
    def test_a_copy_does_not_wait_for_the_quit_of_a_connection_at_its_cap(self) -> Any:
        """The server sits on the QUIT: the next copy goes out on a new connection all the same."""
        sink = SinkFactory(lambda command, arg: "silent" if command == "QUIT" else None)
        self.serve(sink, max_messages_per_connection=1)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        yield wait_until(lambda: b"QUIT" in verbs(sink))
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([m.connection for m in sink.messages], [1, 2])
        self.assertEqual(sink.closed, 0)  # the first still waits for its answer

    @defer.inlineCallbacks
    def test_a_copy_does_not_wait_for_the_quit_of_a_connection_whose_reuse_time_ran_out(self) -> Any:
        sink = SinkFactory(lambda command, arg: "silent" if command == "QUIT" else None)
        self.serve(sink)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.clock.advance(REUSE)
        yield wait_until(lambda: b"QUIT" in verbs(sink))
        self.queue(["b@x.test"])
        yield self.wait_events(2)
        self.assertEqual([m.connection for m in sink.messages], [1, 2])
        self.assertEqual(sink.closed, 0)

    @defer.inlineCallbacks
    def test_an_idle_connection_gives_way_to_another_destination_at_the_total_limit(self) -> Any:
        x_sink, y_sink = SinkFactory(), SinkFactory()
        x_port, y_port = self.listen(x_sink), self.listen(y_sink)
        self.start(routes={"x.test": Route("127.0.0.1", x_port), "y.test": Route("127.0.0.1", y_port)},
                   connection_reuse_time=REUSE, max_connections=1)
        self.queue(["a@x.test"])
        yield self.wait_events(1)
        self.queue(["b@y.test"])
        yield self.finished(x_sink)  # x.test's idle connection is QUIT at once...
        self.assertEqual(verbs(x_sink)[-1], b"QUIT")
        yield self.wait_events(2)  # ...and y.test gets the connection, with no clock advance
        self.assertEqual([m.rcpt_to for m in y_sink.messages], [["b@y.test"]])
