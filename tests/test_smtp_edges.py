"""Protocol edges of the injection server: pipelined floods, duplicates, STARTTLS, postmaster, Received."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError
from appliance.injection import Injector
from appliance.smtp import InjectionFactory, Session
from tests.building import checked
from tests.helpers import base_toml, merge
from tests.test_smtp import FakeInjector, _IPv4, listener, talk
from tests.test_smtp_session import TLSStringTransport


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


class EdgeTests(SynchronousTestCase):
    def connect(self, postmaster: str = "", **overrides: Any) -> tuple[Any, TLSStringTransport]:
        self.injector = FakeInjector()
        factory = InjectionFactory(listener(**overrides), self.injector, "mx.test", 300, clock=Clock(),
                                   tls=object(), postmaster=postmaster)  # type: ignore[arg-type]
        proto = factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=_IPv4("127.0.0.1"))
        proto.makeConnection(transport)
        return proto, transport

    def test_starttls_before_ehlo(self) -> None:
        proto, transport = self.connect(tls="starttls")
        self.assertEqual(talk(proto, transport, b"STARTTLS\r\n"), [b"503 5.5.1 Send EHLO first"])
        self.assertIsNone(transport.tls_started)
        talk(proto, transport, b"EHLO c\r\n")
        self.assertEqual(talk(proto, transport, b"STARTTLS\r\n"), [b"220 2.0.0 Ready to start TLS"])

    def test_postmaster_without_a_domain_goes_to_node_postmaster(self) -> None:
        proto, transport = self.connect(postmaster="hostmaster@example.org")
        lines = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<Postmaster>\r\n"
                                       b"RCPT TO:<postmaster@y.test>\r\nDATA\r\n")
        self.assertEqual(lines[-3:-1], [b"250 2.1.5 Recipient OK"] * 2)
        self.assertEqual(self.injector.transactions[0].recipients,
                         [b"hostmaster@example.org", b"postmaster@y.test"])

    def test_postmaster_defaults_to_the_host_name(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
        self.assertEqual(self.injector.transactions[0].recipients, [b"postmaster@mx.test"])

    def test_duplicate_check_does_not_walk_the_recipients(self) -> None:
        proto, transport = self.connect(max_recipients=5000)
        walks = []
        original = proto.recipients

        def recipients() -> list[smtp.User]:
            walks.append(1)
            return original()

        proto.recipients = recipients
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        lines = talk(proto, transport, b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(300))
                     + b"RCPT TO:<r7@Y.TEST>\r\nRCPT TO:<R7@y.test>\r\n")
        self.assertEqual(lines, [b"250 2.1.5 Recipient OK"] * 302)
        self.assertLessEqual(len(walks), 1)  # once, when the transaction's first recipient came
        walks.clear()
        talk(proto, transport, b"DATA\r\n")
        self.assertEqual(len(self.injector.transactions[0].recipients), 301)
        talk(proto, transport, b".\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r7@y.test>\r\n"
                               b"RCPT TO:<r7@y.test>\r\nDATA\r\n")
        self.assertEqual(self.injector.transactions[1].recipients, [b"r7@y.test"])

    def pipelined_refusals(self, count: int) -> tuple[list[bytes], int]:
        """``count`` bare-LF messages in one packet: the replies, and the deepest stack of a reply."""
        proto, transport = self.connect()
        proto.hard_error_limit = 10 * count
        deepest = [0]
        send_code = proto.sendCode

        def recording_send_code(code: int, message: bytes = b"") -> None:
            deepest[0] = max(deepest[0], stack_depth())
            send_code(code, message)

        proto.sendCode = recording_send_code
        talk(proto, transport, b"EHLO c\r\n")
        message = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\na\nb\r\n.\r\n"
        lines = talk(proto, transport, message * count + b"NOOP\r\n")
        return lines, deepest[0]

    def test_pipelined_refusals_do_not_recurse(self) -> None:
        few, few_depth = self.pipelined_refusals(3)
        many, many_depth = self.pipelined_refusals(300)
        self.assertEqual(many_depth, few_depth)
        refusal = b"554 5.6.0 Bare CR or LF in message text is not allowed"
        self.assertEqual(many, [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK",
                                b"354 End data with <CR><LF>.<CR><LF>", refusal] * 300 + [b"250 2.0.0 OK"])
        self.assertEqual(few[-1], b"250 2.0.0 OK")

    def test_many_pipelined_commands_in_one_packet(self) -> None:
        proto, transport = self.connect()
        proto.junk_command_limit = 100_000
        lines = talk(proto, transport, b"EHLO c\r\n" + b"NOOP\r\n" * 50_000 + b"QUIT\r\n")
        self.assertEqual(lines[-2:], [b"250 2.0.0 OK", b"221 2.0.0 Bye"])
        self.assertEqual(lines.count(b"250 2.0.0 OK"), 50_000)


class ReceivedHeaderTests(SynchronousTestCase):
    def header(self, helo: str, recipient: bytes) -> bytes:
        injector = Injector.__new__(Injector)
        injector.hostname = "mx.test"
        session = Session(listener(), "192.0.2.1", helo, True, None)
        return injector._received_header(session, "1234", [smtp.Address(recipient)], 1.9e9)

    def test_every_line_within_998_octets(self) -> None:
        header = self.header("h" * 4000, b"<" + b"l" * 60 + b"@" + b"d" * 3000 + b".test>")
        lines = header.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        self.assertTrue(all(len(line) <= 998 for line in lines), [len(line) for line in lines])
        self.assertTrue(lines[0].startswith(b"Received: from " + b"h" * 252 + b"... ([192.0.2.1])"))
        self.assertNotIn(b"for <", header)

    def test_ordinary_header_unchanged(self) -> None:
        header = self.header("client.example", b"<a@example.test>")
        self.assertEqual(header.split(b"\r\n")[:3], [
            b"Received: from client.example ([192.0.2.1])",
            b"\tby mx.test (engage-appliance) with ESMTPS id 1234",
            b"\tfor <a@example.test>; " + header.split(b"; ", 1)[1].split(b"\r\n")[0]])


class PostmasterConfigTests(SynchronousTestCase):
    def test_default_and_set(self) -> None:
        node = checked(merge(base_toml(), {"node": {"hostname": "mx.example.com"}}), "x.toml").node
        self.assertEqual(node.postmaster, "postmaster@mx.example.com")
        node = checked(merge(base_toml(), {"node": {"postmaster": "ops@example.com"}}), "x.toml").node
        self.assertEqual(node.postmaster, "ops@example.com")
        e = self.assertRaises(ConfigError, checked, merge(base_toml(), {"node": {"postmaster": "<x>"}}),
                              "x.toml")
        self.assertEqual(dict(e.problems), {"node.postmaster": 'expected an address like '
                                                               'postmaster@example.com, got "<x>"'})
