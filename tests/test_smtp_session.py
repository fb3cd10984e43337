"""Session rules of the injection server on a fake transport and a fake clock: TLS, AUTH, deadlines."""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from appliance.smtp import InjectionFactory
from tests.test_smtp import FakeInjector, _IPv4, listener, talk

PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_started: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started = contextFactory


class PendingChecker:
    """A password checker whose answers the test gives."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, defer.Deferred]] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((credentials, d))
        return d


class SessionTests(SynchronousTestCase):
    def connect(self, **overrides: Any) -> tuple[Any, TLSStringTransport]:
        self.clock = Clock()
        self.checker = PendingChecker()
        self.context = object()
        factory = InjectionFactory(listener(tls="starttls", **overrides), FakeInjector(), "mx.test", 300,
                                   command_timeout=60, data_timeout=600, tls=self.context,
                                   checker=self.checker, clock=self.clock)
        proto = factory.buildProtocol(None)
        proto.callLater = self.clock.callLater
        transport = TLSStringTransport(peerAddress=_IPv4("192.0.2.1"))
        proto.makeConnection(transport)
        return proto, transport

    def test_starttls_drops_pipelined_plaintext_and_offers_auth_after(self) -> None:
        proto, transport = self.connect()
        lines = talk(proto, transport, b"EHLO c\r\n")
        self.assertIn(b"250-STARTTLS", lines)
        self.assertFalse([line for line in lines if b"AUTH" in line])
        lines = talk(proto, transport, b"STARTTLS\r\n" + PLAIN + b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(lines, [b"220 2.0.0 Ready to start TLS"])
        self.assertIs(transport.tls_started, self.context)
        self.assertEqual(self.checker.pending, [])
        lines = talk(proto, transport, b"EHLO c\r\n")
        self.assertIn(b"250-AUTH PLAIN LOGIN", lines)
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_input_waits_while_the_password_is_checked(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nSTARTTLS\r\n")
        talk(proto, transport, b"EHLO c\r\n")
        lines = talk(proto, transport, PLAIN + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
        self.assertEqual(lines, [])
        self.assertEqual(transport.producerState, "paused")
        credentials, d = self.checker.pending[0]
        self.assertEqual((credentials.username, credentials.password), ("alice", b"secret"))
        transport.clear()
        d.callback("alice")
        self.assertEqual(transport.value().splitlines(),
                         [b"235 2.7.0 Authentication successful", b"250 2.1.0 Sender OK",
                          b"250 2.1.5 Recipient OK"])
        self.assertEqual(proto.session().auth_user, "alice")
        self.assertEqual(transport.producerState, "producing")

    def test_failed_check_leaves_session_unauthenticated(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nSTARTTLS\r\n")
        talk(proto, transport, b"EHLO c\r\n" + PLAIN)
        transport.clear()
        self.checker.pending[0][1].errback(UnauthorizedLogin())
        self.assertEqual(transport.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertIsNone(proto.session().auth_user)

    def test_command_deadline_not_reset_by_trickling_bytes(self) -> None:
        proto, transport = self.connect()
        for ch in b"NOOP":
            self.clock.advance(15)
            talk(proto, transport, bytes([ch]))
        self.assertFalse(transport.disconnecting)  # 60 s not yet up since the first byte
        self.clock.advance(20)
        self.assertEqual(transport.value(), b"421 4.4.2 mx.test Timeout: command not completed in time, "
                                            b"closing connection\r\n")
        self.assertTrue(transport.disconnecting)

    def test_complete_lines_keep_the_session(self) -> None:
        proto, transport = self.connect()
        for _ in range(10):
            self.clock.advance(50)
            self.assertEqual(talk(proto, transport, b"HELO c\r\n")[0][:4], b"250 ")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(300)
        self.assertIn(b"idle for too long", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_junk_commands_do_not_keep_the_session(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\n")
        for _ in range(5):
            self.clock.advance(50)
            self.assertEqual(talk(proto, transport, b"NOOP\r\nRSET\r\nHELP\r\n")[0], b"250 2.0.0 OK")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(49)  # 299 s since EHLO, the last command that made progress
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertIn(b"idle for too long", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_junk_command_limit(self) -> None:
        proto, transport = self.connect()
        proto.junk_command_limit = 5
        lines = talk(proto, transport, b"EHLO c\r\n" + b"NOOP\r\n" * 6 + b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(lines[-6:], [b"250 2.0.0 OK"] * 5 + [
            b"421 4.7.0 mx.test Too many commands that do not make progress, closing connection"])
        self.assertTrue(transport.disconnecting)

    def test_hard_error_limit(self) -> None:
        proto, transport = self.connect()
        proto.hard_error_limit = 3
        lines = talk(proto, transport, b"EHLO c\r\n" + b"BOGUS\r\n" * 4)
        self.assertEqual(lines[-4:-1], [b"500 5.5.1 Command not recognised"] * 3)
        self.assertEqual(lines[-1], b"421 4.7.0 mx.test Too many errors, closing connection")
        self.assertTrue(transport.disconnecting)

    def test_a_message_accepted_starts_the_counts_again(self) -> None:
        proto, transport = self.connect(relay_networks=())
        proto.auth_user = "alice"  # relaying for an authenticated user
        proto.junk_command_limit = proto.hard_error_limit = 3
        talk(proto, transport, b"EHLO c\r\n")
        for _ in range(3):
            lines = talk(proto, transport, b"NOOP\r\nNOOP\r\nBOGUS\r\nBOGUS\r\nMAIL FROM:<a@b.test>\r\n"
                                           b"RCPT TO:<x@example.test>\r\nDATA\r\n")
            lines += talk(proto, transport, b"Subject: x\r\n\r\nx\r\n.\r\n")
            self.assertEqual(lines[-1][:4], b"250 ")
        self.assertFalse(transport.disconnecting)

    def test_data_deadline(self) -> None:
        proto, transport = self.connect(relay_networks=())
        proto.auth_user = "alice"  # relaying for an authenticated user
        talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        transport.clear()
        for _ in range(11):
            self.clock.advance(55)
            proto.dataReceived(b"more text\r\n")
        self.assertIn(b"421 4.4.2 mx.test Timeout: message text not completed in time", transport.value())
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertTrue(proto.injector.transactions[0].aborted)
