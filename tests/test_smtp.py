"""The injection server's reading of DATA and its command dialogue, without sockets."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import LOOPBACK, ListenerConfig, SmtpapiConfig
from appliance.smtp import DataReader, InjectionFactory


def read_all(chunks: list[bytes], max_size: int = 1 << 20) -> tuple[DataReader, bytes, bytes | None]:
    out: list[bytes] = []
    reader = DataReader(out.append, max_size)
    rest = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk  # past the end: what a real session would read as commands
        else:
            rest = reader.feed(chunk)
    return reader, b"".join(out), rest


class DataReaderTests(SynchronousTestCase):
    def test_plain_message(self) -> None:
        reader, text, rest = read_all([b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"])
        self.assertEqual(text, b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertFalse(reader.refused)

    def test_empty_message(self) -> None:
        _, text, rest = read_all([b".\r\n"])
        self.assertEqual((text, rest), (b"", b""))

    def test_dot_unstuffing(self) -> None:
        _, text, _ = read_all([b"..\r\n.a\r\n...\r\nx.\r\n.\r\n"])
        self.assertEqual(text, b".\r\na\r\n..\r\nx.\r\n")

    def test_every_split_point(self) -> None:
        message = b"A: b\r\n\r\n..x\r\nline\r\n..\r\n.\r\nNEXT"
        for i in range(len(message)):
            for j in range(i, len(message)):
                reader, text, rest = read_all([message[:i], message[i:j], message[j:]])
                self.assertEqual(text, b"A: b\r\n\r\n.x\r\nline\r\n.\r\n", (i, j))
                self.assertEqual(rest, b"NEXT", (i, j))
                self.assertFalse(reader.refused)

    def test_smuggling_payloads_do_not_end_data(self) -> None:
        for smuggled in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r"):
            payload = b"x" + smuggled + b"MAIL FROM:<evil@example.com>\r\n"
            reader, _, rest = read_all([payload])
            self.assertIsNone(rest, smuggled)  # still in DATA: nothing is a command
            rest = reader.feed(b".\r\n")
            self.assertEqual(rest, b"", smuggled)
            self.assertTrue(reader.bare_newline, smuggled)

    def test_long_line_refused_without_leaving_data(self) -> None:
        reader, text, rest = read_all([b"a" * 998 + b"\r\n", b"b" * 999 + b"\r\n.\r\n"])
        self.assertTrue(reader.line_too_long)
        self.assertEqual(rest, b"")

    def test_line_of_998_is_fine(self) -> None:
        reader, text, _ = read_all([b"a" * 500, b"a" * 498 + b"\r", b"\n.\r\n"])
        self.assertFalse(reader.refused)
        self.assertEqual(text, b"a" * 998 + b"\r\n")

    def test_endless_line_keeps_memory_bounded(self) -> None:
        out: list[bytes] = []
        reader = DataReader(out.append, 1 << 30)
        for _ in range(100):
            self.assertIsNone(reader.feed(b"x" * 65536))
        self.assertLess(len(reader._buffer), 2000)
        self.assertIsNone(reader.feed(b".\r\n"))  # a "." in mid-line is not the end
        self.assertEqual(reader.feed(b".\r\nRSET\r\n"), b"RSET\r\n")
        self.assertTrue(reader.line_too_long)
        self.assertEqual(out, [])

    def test_too_big(self) -> None:
        reader, text, rest = read_all([b"x" * 50 + b"\r\n" for _ in range(10)] + [b".\r\n"], max_size=100)
        self.assertTrue(reader.too_big)
        self.assertEqual(rest, b"")


class FakeTransaction:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.aborted = False
        self.client_gone = False
        self.mail_from = b""
        self.recipients: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def abort(self) -> None:
        self.aborted = True


class FakeInjector:
    """Records what the protocol asks; ``finish`` answers with ``self.result``."""

    def __init__(self) -> None:
        self.transactions: list[FakeTransaction] = []
        self.result: defer.Deferred | None = None
        self.refuse: tuple[int, bytes] | None = None
        self.limit = 1000

    def check_recipient(self, session: Any, dest: Any, count: int) -> tuple[int, bytes]:
        if not session.may_relay():
            return 554, b"5.7.1 Relay access denied"
        if count >= self.limit:
            return 452, b"4.5.3 Too many recipients"
        return self.refuse or (250, b"2.1.5 OK")

    def begin(self, session: Any, mail_from: Any, recipients: list[Any]) -> FakeTransaction:
        t = FakeTransaction()
        t.mail_from, t.recipients = bytes(mail_from), [bytes(r) for r in recipients]
        self.transactions.append(t)
        return t

    def finish(self, transaction: FakeTransaction) -> Any:
        if self.result is not None:
            return self.result
        return (250, b"2.0.0 OK queued")


def listener(**overrides: Any) -> ListenerConfig:
    values: dict[str, Any] = dict(name="test", endpoint="tcp:0", smtpapi=SmtpapiConfig(),
                                  relay_networks=LOOPBACK, max_message_size=10000, max_recipients=3)
    values.update(overrides)
    return ListenerConfig(**values)


def talk(proto: Any, transport: StringTransport, data: bytes) -> list[bytes]:
    """Feed ``data`` to a session on a string transport; its reply lines."""
    transport.clear()
    proto.dataReceived(data)
    return transport.value().splitlines()


class ProtocolTests(SynchronousTestCase):
    def connect(self, peer: str = "127.0.0.1", **overrides: Any) -> tuple[Any, StringTransport]:
        self.injector = FakeInjector()
        # No session clock may outlive the test.
        factory = InjectionFactory(listener(**overrides), self.injector, "mx.test", 300, clock=Clock())
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_IPv4(peer))
        proto.makeConnection(transport)
        return proto, transport

    def test_greeting_and_ehlo(self) -> None:
        proto, transport = self.connect()
        self.assertEqual(transport.value(), b"220 mx.test ESMTP engage-appliance\r\n")
        lines = talk(proto, transport, b"EHLO client.test\r\n")
        self.assertIn(b"250-SIZE 10000", lines)
        self.assertIn(b"250-8BITMIME", lines)
        self.assertIn(b"250 ENHANCEDSTATUSCODES", lines + [lines[-1]])
        self.assertFalse(any(b"AUTH" in line for line in lines))

    def test_full_transaction(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\n")
        self.assertEqual(talk(proto, transport, b"MAIL FROM:<a@b.test>\r\n"), [b"250 2.1.0 Sender OK"])
        self.assertEqual(talk(proto, transport, b"RCPT TO:<x@y.test>\r\n"), [b"250 2.1.5 Recipient OK"])
        self.assertEqual(talk(proto, transport, b"DATA\r\n")[0][:3], b"354")
        lines = talk(proto, transport, b"Subject: s\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(lines, [b"250 2.0.0 OK queued"])
        self.assertEqual(b"".join(self.injector.transactions[0].data), b"Subject: s\r\n\r\nhi\r\n")

    def test_relay_denied_outside_networks(self) -> None:
        proto, transport = self.connect(peer="192.0.2.7")
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertEqual(talk(proto, transport, b"RCPT TO:<x@y.test>\r\n"),
                         [b"554 5.7.1 Relay access denied"])

    def test_data_in_same_packet_as_command_is_message_text(self) -> None:
        proto, transport = self.connect()
        lines = talk(proto, transport,
                          b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"
                          b"RCPT TO:<evil@y.test>\r\n.\r\nNOOP\r\n")
        self.assertEqual(lines[-2:], [b"250 2.0.0 OK queued", b"250 2.0.0 OK"])
        self.assertEqual(b"".join(self.injector.transactions[0].data), b"RCPT TO:<evil@y.test>\r\n")

    def test_commands_wait_while_message_is_committed(self) -> None:
        proto, transport = self.connect()
        self.injector.result = defer.Deferred()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        lines = talk(proto, transport, b"hi\r\n.\r\nMAIL FROM:<c@d.test>\r\n")
        self.assertEqual(lines, [])
        self.assertEqual(transport.producerState, "paused")
        transport.clear()
        self.injector.result.callback((250, b"2.0.0 OK queued"))
        self.assertEqual(transport.value().splitlines(), [b"250 2.0.0 OK queued", b"250 2.1.0 Sender OK"])
        self.assertEqual(transport.producerState, "producing")

    def test_store_failure_answers_451(self) -> None:
        proto, transport = self.connect()
        self.injector.result = defer.fail(OSError(28, "No space left on device"))
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        lines = talk(proto, transport, b"hi\r\n.\r\n")
        self.assertEqual(lines, [b"451 4.3.0 Cannot store the message now, try again later"])
        self.assertTrue(self.injector.transactions[0].aborted)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_bare_lf_refused_at_end_of_data(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        lines = talk(proto, transport, b"a\n.\nMAIL FROM:<e@f.test>\r\n.\r\n")
        self.assertEqual(lines, [b"554 5.6.0 Bare CR or LF in message text is not allowed"])
        self.assertTrue(self.injector.transactions[0].aborted)

    def test_client_disconnect_mid_data_aborts(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nhalf")
        proto.connectionLost(None)
        self.assertTrue(self.injector.transactions[0].aborted)

    def test_client_gone_while_message_is_decided_is_told_to_the_transaction(self) -> None:
        proto, transport = self.connect()
        self.injector.result = defer.Deferred()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        talk(proto, transport, b"hi\r\n.\r\n")
        self.assertFalse(self.injector.transactions[0].client_gone)
        transport.disconnected = True
        proto.connectionLost(None)
        self.assertTrue(self.injector.transactions[0].client_gone)
        transport.clear()
        self.injector.result.callback((421, b"4.4.2 Connection lost"))
        self.assertEqual(transport.value(), b"")

    def test_control_characters_and_8bit_in_addresses_refused(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\n")
        for bad in (b'"x\nRCPT TO:<hidden@example.org>"@example.net', b'"x\ry"@example.net',
                    b'"x\x00y"@example.net', b'"x\ty"@example.net', b'"x\x7fy"@example.net',
                    b'"caf\xc3\xa9"@example.net', b"x\\\ry@example.net"):
            self.assertEqual(talk(proto, transport, b"MAIL FROM:<" + bad + b">\r\n"),
                             [b"553 5.1.7 Sender address contains characters that are not allowed"], bad)
            self.assertEqual(talk(proto, transport, b"MAIL FROM:<a@b.test>\r\n"),
                             [b"250 2.1.0 Sender OK"], bad)
            rcpt = b"RCPT TO:<" + bad.replace(b".net", b".test") + b">\r\n"
            self.assertEqual(talk(proto, transport, rcpt),
                             [b"553 5.1.3 Recipient address contains characters that are not allowed"], bad)
            talk(proto, transport, b"RSET\r\n")
        # A space inside quotes is printable ASCII, and allowed (RFC 5321 qtextSMTP).
        lines = talk(proto, transport, b'MAIL FROM:<"a b"@b.test>\r\nRCPT TO:<"c d"@y.test>\r\n')
        self.assertEqual(lines, [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"])

    def test_non_ascii_command_verb(self) -> None:
        proto, transport = self.connect()
        lines = talk(proto, transport, b"\xff\xfe\r\nNOOP\r\nNO\xffOP x\r\n")
        self.assertEqual(lines, [b"500 5.5.2 Command not recognised", b"250 2.0.0 OK",
                                 b"500 5.5.2 Command not recognised"])
        self.assertFalse(transport.disconnecting)

    def test_duplicate_recipients_accepted_once(self) -> None:
        proto, transport = self.connect()
        lines = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
                                            b"RCPT TO:<x@Y.Test>\r\nRCPT TO:<X@y.test>\r\n"
                                            b"RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n")
        self.assertEqual(lines[-6:-1], [b"250 2.1.5 Recipient OK"] * 5)
        # The local part may be case-sensitive (RFC 5321 2.4); the domain is not.
        self.assertEqual(self.injector.transactions[0].recipients, [b"x@y.test", b"X@y.test", b"z@y.test"])

    def test_duplicate_recipient_at_the_limit_is_still_250(self) -> None:
        proto, transport = self.connect(max_recipients=1)
        self.injector.limit = 1
        lines = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
                                            b"RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\n")
        self.assertEqual(lines[-3:], [b"250 2.1.5 Recipient OK"] * 2 + [b"452 4.5.3 Too many recipients"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")), max_size=6),
           st.sampled_from([b"", b"MAIL FROM:", b"RCPT TO:", b"EHLO ", b"MAIL FROM:<", b'RCPT TO:<"']))
    def test_any_command_line_gets_an_answer(self, lines: list[bytes], prefix: bytes) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        for line in lines:
            transport.clear()
            proto.dataReceived(prefix + line + b"\r\n")  # never raises
            if transport.disconnecting or proto._reader is not None:
                return  # QUIT, or DATA began
            self.assertRegex(transport.value(), rb"^(\d{3}[ -].*\r\n)+$", line)

    def test_data_without_recipients(self) -> None:
        proto, transport = self.connect()
        self.assertEqual(talk(proto, transport, b"EHLO c\r\nDATA\r\n")[-1],
                         b"503 5.5.1 Need MAIL and RCPT before DATA")

    def test_overlong_command_closes(self) -> None:
        proto, transport = self.connect()
        lines = talk(proto, transport, b"NOOP " + b"x" * 5000 + b"\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertEqual(lines, [b"500 5.5.2 Line too long"])
        self.assertTrue(transport.disconnecting)


class _IPv4:
    """Just enough of IPv4Address for the protocol."""

    type = "TCP"

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000
