"""
The injection server as an attacker or a careless client meets it: real sockets, real TLS.

Each test runs a whole appliance on loopback with a sink behind it, talks to
it with smtplib or with ``RawClient`` (which shows every reply as sent), and
checks what was answered, what reached the sink and what the event log says.
Connection limits and timeouts need no socket: they run the same appliance on
a memory reactor (``tests.memory``), with a clock the test moves.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from appliance.tls import write_pair
from appliance.users import set_user
from tests.helpers import RunningAppliance, free_port, in_thread, wait_until
from tests.memory import MemoryAppliance, SmtpConversation
from tests.smtpclient import RawClient, unverified_context

MESSAGE = b"From: <sender@example.net>\r\nSubject: hello\r\n\r\nbody\r\n"
ENHANCED = re.compile(rb"^(\d)\d\d[ -](\d)\.\d{1,3}\.\d{1,3}( |$)")


def tls_files(directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    write_pair(cert, key, "localhost", 30)
    return cert, key


def users_file(directory: str, **users: str) -> str:
    path = os.path.join(directory, "users")
    for name, password in users.items():
        set_user(path, name, password.encode(), cost=10)  # cheap for tests; the shipped default is 15
    return path


class ApplianceTestCase(unittest.TestCase):
    """An appliance with TLS and a users file (alice / secret); ``smtp`` changes the [smtp] table."""

    smtp: dict[str, Any] = {}
    listener: dict[str, Any] = {}

    def setUp(self) -> defer.Deferred:
        base = os.path.abspath(self.mktemp())
        cert, key = tls_files(os.path.join(base, "tls"))
        users = users_file(base, alice="secret")
        smtp: dict[str, Any] = {"tls_certificate": cert, "tls_key": key, "users_file": users,
                                **self.smtp}
        if self.listener:
            smtp["listeners"] = {"default": self.listener}
        self.running = RunningAppliance(os.path.join(base, "run"), smtp=smtp)
        self.port = self.running.smtp_port
        return self.running.start()

    @defer.inlineCallbacks
    def tearDown(self) -> defer.Generator:
        yield wait_until(self.running.settled)
        yield self.running.stop()

    def injections(self) -> list[dict]:
        return [e for e in self.running.events() if e["type"] == "injection"]

    def transaction(self, client: RawClient, rcpt: bytes = b"a@example.test") -> None:
        """EHLO, MAIL, RCPT and DATA, each expected to succeed."""
        assert client.command(b"EHLO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<sender@example.net>")[0] == 250
        assert client.command(b"RCPT TO:<" + rcpt + b">")[0] == 250
        assert client.command(b"DATA")[0] == 354


class StartTLSTests(ApplianceTestCase):
    @defer.inlineCallbacks
    def test_starttls_then_auth_then_send(self) -> defer.Generator:
        def session() -> tuple[Any, ...]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo("client.test")
                before = dict(c.esmtp_features)
                code, _ = c.starttls(context=unverified_context())
                c.ehlo("client.test")
                after = dict(c.esmtp_features)
                cipher = c.sock.cipher()
                c.login("alice", "secret")
                refused = c.sendmail("sender@example.net", ["a@example.test"], MESSAGE)
                return before, code, after, cipher, refused

        before, code, after, cipher, refused = yield in_thread(session)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)
        self.assertEqual(code, 220)
        self.assertNotIn("starttls", after)
        self.assertEqual(after["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertIsNotNone(cipher)
        self.assertEqual(refused, {})
        received = yield self.running.sink.wait_for(1)
        self.assertIn(b"with ESMTPSA id", received[0].data)
        yield wait_until(lambda: len(self.injections()) == 1)
        self.assertEqual(self.injections()[0]["auth_user"], "alice")

    @defer.inlineCallbacks
    def test_plaintext_after_starttls_is_discarded_and_state_reset(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                # One packet: the commands after STARTTLS must never run, in or out of TLS.
                c.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example.net>\r\n"
                       b"RCPT TO:<a@example.test>\r\n")
                replies = [c.reply(), c.reply()]
                c.starttls()
                # Nothing was said before the handshake: MAIL needs a new EHLO first.
                replies.append(c.command(b"MAIL FROM:<sender@example.net>"))
                replies.append(c.command(b"RCPT TO:<a@example.test>"))
                replies.append(c.command(b"NOOP"))
                return replies

        replies = yield in_thread(session)
        self.assertEqual(replies[0][0], 250)
        self.assertEqual(replies[1], (220, [b"220 2.0.0 Ready to start TLS"]))
        self.assertEqual(replies[2], (503, [b"503 5.5.1 Send EHLO first"]))
        self.assertEqual(replies[3][0], 503)
        self.assertEqual(replies[4], (250, [b"250 2.0.0 OK"]))
        self.assertEqual(self.running.spooled(), [])

    @defer.inlineCallbacks
    def test_starttls_twice_and_with_argument(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                c.command(b"EHLO client.test")
                out = [c.command(b"STARTTLS now")]
                assert c.command(b"STARTTLS")[0] == 220
                c.starttls()
                c.command(b"EHLO client.test")
                out.append(c.command(b"STARTTLS"))
                return out

        replies = yield in_thread(session)
        self.assertEqual(replies, [(501, [b"501 5.5.4 Syntax: STARTTLS"]),
                                   (503, [b"503 5.5.1 TLS already active"])])


class AuthTests(ApplianceTestCase):
    # Loopback is not a relay network here: only authenticated users may inject. No back-off
    # between failed logins, so one session can show every answer (tests.test_smtp_guard has it).
    smtp = {"relay_networks": ["192.0.2.0/24"], "auth_failure_backoff": "0s"}

    def tls_client(self) -> RawClient:
        c = RawClient(self.port)
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"STARTTLS")[0] == 220
        c.starttls()
        c.command(b"EHLO client.test")
        return c

    @defer.inlineCallbacks
    def test_auth_refused_before_tls(self) -> defer.Generator:
        def session() -> tuple[Any, ...]:
            with RawClient(self.port) as c:
                c.reply()
                _, ehlo = c.command(b"EHLO client.test")
                return ehlo, c.login_plain("alice", "secret"), c.command(b"AUTH LOGIN")

        ehlo, plain, login = yield in_thread(session)
        self.assertFalse([line for line in ehlo if b"AUTH" in line])
        for reply in (plain, login):
            self.assertEqual(reply, (538, [b"538 5.7.11 Encryption required for requested "
                                           b"authentication mechanism"]))

    @defer.inlineCallbacks
    def test_unauthenticated_refused_authenticated_accepted(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with self.tls_client() as c:
                out = [c.command(b"MAIL FROM:<sender@example.net>"),
                       c.command(b"RCPT TO:<a@example.test>"),
                       c.command(b"RSET"),
                       c.login_plain("alice", "secret"),
                       c.command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
                       c.command(b"MAIL FROM:<sender@example.net> AUTH=<>"),
                       c.command(b"RCPT TO:<a@example.test>"),
                       c.command(b"DATA"),
                       c.command(MESSAGE + b".")]
                return out

        replies = yield in_thread(session)
        codes = [code for code, _ in replies]
        self.assertEqual(codes, [250, 554, 250, 235, 503, 250, 250, 354, 250])
        self.assertEqual(replies[1][1], [b"554 5.7.1 Relay access denied"])
        self.assertEqual(replies[3][1], [b"235 2.7.0 Authentication successful"])
        yield self.running.sink.wait_for(1)
        yield wait_until(lambda: len(self.injections()) == 1)
        self.assertEqual(self.injections()[0]["auth_user"], "alice")

    @defer.inlineCallbacks
    def test_login_mechanism(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with self.tls_client() as c:
                return [c.command(b"AUTH LOGIN"),
                        c.command(base64.b64encode(b"alice")),
                        c.command(base64.b64encode(b"secret")),
                        c.command(b"MAIL FROM:<sender@example.net>"),
                        c.command(b"RCPT TO:<a@example.test>")]

        replies = yield in_thread(session)
        self.assertEqual(replies[0], (334, [b"334 VXNlcm5hbWU6"]))
        self.assertEqual(replies[1], (334, [b"334 UGFzc3dvcmQ6"]))
        self.assertEqual([r[0] for r in replies[2:]], [235, 250, 250])

    @defer.inlineCallbacks
    def test_bad_credentials_and_bad_input(self) -> defer.Generator:
        def session() -> tuple[list[tuple[int, list[bytes]]], bool]:
            with self.tls_client() as c:
                out = [c.login_plain("alice", "wrong"),
                       c.login_plain("nobody", "secret"),
                       c.command(b"AUTH PLAIN !!!notbase64"),
                       c.command(b"AUTH PLAIN " + base64.b64encode(b"no-nul-bytes")),
                       c.command(b"AUTH CRAM-MD5"),
                       c.command(b"AUTH PLAIN"),
                       c.command(b"*"),
                       c.command(b"MAIL FROM:<sender@example.net>"),
                       c.command(b"RCPT TO:<a@example.test>"),
                       c.command(b"RSET"),
                       # Acting for another user (authzid) is not offered.
                       c.command(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret")),
                       ]
                return out, c.closed()

        replies, closed = yield in_thread(session)
        self.assertEqual(replies[0], (535, [b"535 5.7.8 Authentication credentials invalid"]))
        self.assertEqual(replies[1][0], 535)
        self.assertEqual(replies[2], (501, [b"501 5.5.2 Cannot decode the response"]))
        self.assertEqual(replies[3][0], 501)
        self.assertEqual(replies[4], (504, [b"504 5.5.4 Unrecognized authentication type"]))
        self.assertEqual(replies[5], (334, [b"334 "]))
        self.assertEqual(replies[6], (501, [b"501 5.0.0 Authentication cancelled"]))
        self.assertEqual(replies[8], (554, [b"554 5.7.1 Relay access denied"]))
        # The third wrong password ends the session.
        self.assertEqual(replies[10], (421, [b"421 4.7.0 Too many authentication failures, "
                                             b"closing connection"]))
        self.assertTrue(closed)
        self.assertEqual(self.injections(), [])

    @defer.inlineCallbacks
    def test_users_added_later_log_in_without_restart(self) -> defer.Generator:
        yield in_thread(set_user, self.running.config.smtp.users_file, "bob", b"hunter2", 10)

        def session() -> tuple[int, list[bytes]]:
            with self.tls_client() as c:
                return c.login_plain("bob", "hunter2")

        reply = yield in_thread(session)
        self.assertEqual(reply[0], 235)


class RequireAuthTests(ApplianceTestCase):
    listener = {"require_auth": True, "tls": "required"}

    @defer.inlineCallbacks
    def test_mail_needs_tls_then_auth(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                c.command(b"EHLO client.test")
                out = [c.command(b"MAIL FROM:<sender@example.net>")]
                c.command(b"STARTTLS")
                c.starttls()
                c.command(b"EHLO client.test")
                out.append(c.command(b"MAIL FROM:<sender@example.net>"))
                out.append(c.login_plain("alice", "secret"))
                out.append(c.command(b"MAIL FROM:<sender@example.net>"))
                return out

        replies = yield in_thread(session)
        self.assertEqual(replies[0], (530, [b"530 5.7.0 Must issue a STARTTLS command first"]))
        self.assertEqual(replies[1], (530, [b"530 5.7.0 Authentication required"]))
        self.assertEqual([r[0] for r in replies[2:]], [235, 250])


class ImplicitTLSTests(ApplianceTestCase):
    listener = {"tls": "implicit"}

    @defer.inlineCallbacks
    def test_tls_from_the_first_byte(self) -> defer.Generator:
        def session() -> tuple[Any, ...]:
            with smtplib.SMTP_SSL("127.0.0.1", self.port, timeout=10,
                                  context=unverified_context()) as c:
                c.ehlo("client.test")
                features = dict(c.esmtp_features)
                c.login("alice", "secret")
                return features, c.sendmail("sender@example.net", ["a@example.test"], MESSAGE)

        features, refused = yield in_thread(session)
        self.assertNotIn("starttls", features)
        self.assertIn("auth", features)
        self.assertEqual(refused, {})
        yield self.running.sink.wait_for(1)

    @defer.inlineCallbacks
    def test_plain_text_client_gets_nothing(self) -> defer.Generator:
        def session() -> bytes:
            with RawClient(self.port, timeout=5) as c:
                c.send(b"EHLO client.test\r\n")
                try:
                    return c.sock.recv(100)
                except ConnectionError:
                    return b""

        data = yield in_thread(session)
        self.assertNotIn(b"250", data)


class SSLEndpointTests(unittest.TestCase):
    """An ``ssl:`` endpoint string is implicit TLS too: AUTH is offered at once."""

    def setUp(self) -> defer.Deferred:
        base = os.path.abspath(self.mktemp())
        cert, key = tls_files(os.path.join(base, "tls"))
        self.port = free_port()
        endpoint = f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.running = RunningAppliance(os.path.join(base, "run"), smtp={
            "users_file": users_file(base, alice="secret"),
            "listeners": {"default": {"endpoint": endpoint}},
        })
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    @defer.inlineCallbacks
    def test_auth_offered_on_ssl_endpoint(self) -> defer.Generator:
        def session() -> tuple[Any, ...]:
            with smtplib.SMTP_SSL("127.0.0.1", self.port, timeout=10,
                                  context=unverified_context()) as c:
                c.ehlo("client.test")
                features = dict(c.esmtp_features)
                return features, c.login("alice", "secret")[0]

        features, code = yield in_thread(session)
        self.assertNotIn("starttls", features)
        self.assertEqual(code, 235)


class LimitsTests(ApplianceTestCase):
    smtp = {"max_message_size": 2000, "max_recipients": 2}

    @defer.inlineCallbacks
    def test_size_advertised_and_refused_at_mail(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                return [c.command(b"EHLO client.test"),
                        c.command(b"MAIL FROM:<sender@example.net> SIZE=2001"),
                        c.command(b"MAIL FROM:<sender@example.net> SIZE=big"),
                        c.command(b"MAIL FROM:<sender@example.net> SIZE=2000")]

        replies = yield in_thread(session)
        self.assertIn(b"250-SIZE 2000", replies[0][1])
        self.assertEqual(replies[1], (552, [b"552 5.3.4 Message size exceeds fixed maximum "
                                            b"message size"]))
        self.assertEqual(replies[2][0], 501)
        self.assertEqual(replies[3][0], 250)

    @defer.inlineCallbacks
    def test_size_enforced_in_data_without_leaving_it(self) -> defer.Generator:
        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                self.transaction(c)
                body = b"".join(b"%04d " % i + b"x" * 60 + b"\r\n" for i in range(60))
                c.send(MESSAGE + body + b"RSET\r\nQUIT\r\n")  # inside DATA: text, not commands
                return [c.command(b"."), c.command(b"NOOP")]

        replies = yield in_thread(session)
        self.assertEqual(replies, [(552, [b"552 5.3.4 Message too big"]), (250, [b"250 2.0.0 OK"])])
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(self.injections(), [])

    @defer.inlineCallbacks
    def test_recipients_per_message(self) -> defer.Generator:
        def session() -> list[int]:
            with RawClient(self.port) as c:
                c.reply()
                c.command(b"EHLO client.test")
                c.command(b"MAIL FROM:<sender@example.net>")
                return [c.command(b"RCPT TO:<%d@example.test>" % i)[0] for i in range(3)] + \
                    [c.command(b"DATA")[0], c.command(MESSAGE + b".")[0]]

        codes = yield in_thread(session)
        self.assertEqual(codes, [250, 250, 452, 354, 250])
        received = yield self.running.sink.wait_for(2)
        self.assertEqual(sorted(r for m in received for r in m.rcpt_to),
                         ["0@example.test", "1@example.test"])


class MemoryApplianceTestCase(SynchronousTestCase):
    """
    The appliance of ``ApplianceTestCase`` (TLS offered, alice / secret) on a memory
    reactor, for what needs no real socket: limits and timeouts, on a clock the test moves.
    """

    smtp: dict[str, Any] = {}

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        cert, key = tls_files(os.path.join(base, "tls"))
        users = users_file(base, alice="secret")
        smtp: dict[str, Any] = {"tls_certificate": cert, "tls_key": key, "users_file": users,
                                **self.smtp}
        self.running = MemoryAppliance(os.path.join(base, "run"), smtp=smtp)
        self.running.start()
        self.addCleanup(self.running.stop)

    def transaction(self, client: SmtpConversation, rcpt: bytes = b"a@example.test") -> None:
        """EHLO, MAIL, RCPT and DATA, each expected to succeed."""
        self.assertEqual(client.command(b"EHLO client.test")[0], 250)
        self.assertEqual(client.command(b"MAIL FROM:<sender@example.net>")[0], 250)
        self.assertEqual(client.command(b"RCPT TO:<" + rcpt + b">")[0], 250)
        self.assertEqual(client.command(b"DATA")[0], 354)


class ConnectionLimitTests(MemoryApplianceTestCase):
    smtp = {"max_connections_per_client": 2, "max_connections": 3}

    def test_per_client_limit(self) -> None:
        first, second = self.running.smtp(), self.running.smtp()
        out: list[Any] = [first.reply()[0], second.reply()[0]]
        third = self.running.smtp()
        out.append(third.reply())
        out.append(third.closed)
        first.command(b"QUIT")
        first.close()  # the server has seen the close once this returns
        fourth = self.running.smtp()
        out.append(fourth.reply()[0])
        fourth.close()
        second.close()
        self.assertEqual(out[:2], [220, 220])
        self.assertEqual(out[2], (421, [b"421 4.7.0 localhost Too many connections from your "
                                        b"address, try again later"]))
        self.assertTrue(out[3])
        self.assertEqual(out[4], 220)


class TotalConnectionLimitTests(MemoryApplianceTestCase):
    smtp = {"max_connections_per_client": 10, "max_connections": 2}

    def test_total_limit(self) -> None:
        a, b = self.running.smtp(), self.running.smtp()
        a.reply(), b.reply()
        c = self.running.smtp()
        self.assertEqual(c.reply(), (421, [b"421 4.7.0 localhost Too many connections, try again later"]))


PUBLIC_PORT = 2587


class ListenerBudgetTests(MemoryApplianceTestCase):
    """Each listener counts its own connections: a full public one leaves the trusted one working."""

    smtp = {"max_connections_per_client": 3, "max_connections": 4,
            "listeners": {"public": {"endpoint": f"tcp:{PUBLIC_PORT}:interface=0.0.0.0",
                                     "max_connections": 2, "max_connections_per_client": 1}}}

    def test_full_public_listener_leaves_the_trusted_one_working(self) -> None:
        public = [self.running.smtp(f"198.51.100.{i}", port=PUBLIC_PORT) for i in range(2)]
        self.assertEqual([c.reply()[0] for c in public], [220, 220])
        refused = self.running.smtp("198.51.100.9", port=PUBLIC_PORT)
        self.assertEqual(refused.reply(), (421, [b"421 4.7.0 localhost Too many connections, try again "
                                                 b"later"]))
        again = self.running.smtp("198.51.100.0", port=PUBLIC_PORT)
        self.assertEqual(again.reply()[0], 421)
        trusted = [self.running.smtp() for _ in range(3)]
        self.assertEqual([c.reply()[0] for c in trusted], [220, 220, 220])
        self.assertEqual(trusted[0].command(b"EHLO client.test")[0], 250)
        fourth = self.running.smtp()
        self.assertEqual(fourth.reply(), (421, [b"421 4.7.0 localhost Too many connections from your "
                                                b"address, try again later"]))


class TimeoutTests(MemoryApplianceTestCase):
    smtp = {"timeout": "400ms", "command_timeout": "400ms", "data_timeout": "600ms"}

    def test_idle(self) -> None:
        c = self.running.smtp()
        c.reply()
        self.running.advance(0.399)
        self.assertEqual(c.replies(), [])
        self.running.advance(0.001)
        reply = c.reply()
        self.assertEqual(reply[0], 421)
        self.assertRegex(reply[1][0], rb"^421 4\.4\.2 .*idle")
        self.assertTrue(c.closed)

    def test_unfinished_command_line(self) -> None:
        c = self.running.smtp()
        c.reply()
        for ch in b"NOOP":  # a byte at a time keeps the idle clock happy, not the command clock
            if c.closed:
                break
            c.send(bytes([ch]))
            self.running.advance(0.15)
        reply = c.reply()
        self.assertRegex(reply[1][0], rb"^421 4\.4\.2 .*command not completed")
        self.assertTrue(c.closed)

    def test_slow_data(self) -> None:
        c = self.running.smtp()
        c.reply()
        self.transaction(c)
        for _ in range(8):
            if c.closed:
                break  # the server hung up: its reply is still there to read
            c.send(b"x\r\n")
            self.running.advance(0.15)
        reply = c.reply()
        self.assertRegex(reply[1][0], rb"^421 4\.4\.2 .*message text not completed")
        self.assertTrue(c.closed)
        self.assertEqual(self.running.spooled(), [])


class DataTests(ApplianceTestCase):
    def one_message(self, text: bytes) -> defer.Deferred:
        """Send ``text`` (and the final dot) after DATA; returns every reply up to QUIT's."""

        def session() -> list[tuple[int, list[bytes]]]:
            with RawClient(self.port) as c:
                c.reply()
                self.transaction(c)
                c.send(text + b"\r\n.\r\nQUIT\r\n")
                replies = []
                while True:
                    reply = c.reply()
                    replies.append(reply)
                    if reply[0] == 221:
                        return replies

        return in_thread(session)

    @defer.inlineCallbacks
    def test_long_line_refused_body_never_commands(self) -> defer.Generator:
        text = (MESSAGE + b"y" * 999 + b"\r\nRSET\r\nMAIL FROM:<evil@example.net>\r\n"
                b"RCPT TO:<b@example.test>\r\nDATA\r\nSubject: evil\r\n\r\nevil")
        replies = yield self.one_message(text)
        self.assertEqual(replies, [(554, [b"554 5.6.0 Message has a line longer than 998 octets"]),
                                   (221, [b"221 2.0.0 Bye"])])
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(self.injections(), [])

    @defer.inlineCallbacks
    def test_line_of_998_accepted(self) -> defer.Generator:
        replies = yield self.one_message(MESSAGE + b"y" * 998)
        self.assertEqual(replies[0][0], 250)
        received = yield self.running.sink.wait_for(1)
        self.assertTrue(received[0].data.endswith(b"y" * 998 + b"\r\n"))

    @defer.inlineCallbacks
    def test_bare_cr_and_bare_lf(self) -> defer.Generator:
        for text in (MESSAGE + b"a\rb", MESSAGE + b"a\nb", b"Subject: x\nBcc: y@example.test\r\n\r\nz"):
            replies = yield self.one_message(text)
            self.assertEqual(replies[0], (554, [b"554 5.6.0 Bare CR or LF in message text is not "
                                                b"allowed"]), text)
            self.assertEqual(len(replies), 2)
        self.assertEqual(self.running.spooled(), [])
        self.assertEqual(self.injections(), [])

    @defer.inlineCallbacks
    def test_smuggling_never_splits_a_message(self) -> defer.Generator:
        smuggled = (b"MAIL FROM:<admin@example.net>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
                    b"From: admin@example.net\r\nSubject: smuggled\r\n\r\nsmuggled")
        endings = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r.\n",
                   b"\r\n.\n", b"\n\n.\n\n", b"\r\r.\r\r"]
        for ending in endings:
            replies = yield self.one_message(MESSAGE + b"first" + ending + smuggled)
            # One message, one verdict: refused for its bare newline, nothing run as a command.
            self.assertEqual(len(replies), 2, (ending, replies))
            self.assertEqual(replies[0][0], 554, ending)
        # A NUL before the dot is no line end either: one message, delivered whole.
        replies = yield self.one_message(MESSAGE + b"first\r\n\x00.\r\n" + smuggled)
        self.assertEqual([r[0] for r in replies], [250, 221])
        received = yield self.running.sink.wait_for(1)
        # Every session closed and every accepted copy delivered: a second message would be here.
        yield wait_until(self.running.settled)
        self.assertEqual(len(self.running.sink.messages), 1)
        self.assertEqual(received[0].rcpt_to, ["a@example.test"])
        self.assertIn(b"\x00.\r\nMAIL FROM:<admin@example.net>", received[0].data)
        self.assertEqual(len(self.injections()), 1)

    @defer.inlineCallbacks
    def test_8bitmime(self) -> defer.Generator:
        body = "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n" \
               "Content-Transfer-Encoding: 8bit\r\n\r\nna\u00efve \u2014 \u00fcber\r\n"

        def session() -> list[int]:
            with RawClient(self.port) as c:
                c.reply()
                _, ehlo = c.command(b"EHLO client.test")
                assert b"250-8BITMIME" in ehlo
                codes = [c.command(b"MAIL FROM:<s@example.net> BODY=BINARYMIME")[0],
                         c.command(b"MAIL FROM:<s@example.net> SMTPUTF8")[0],
                         c.command(b"MAIL FROM:<s@example.net> BODY=8BITMIME")[0],
                         c.command(b"RCPT TO:<a@example.test> NOTIFY=NEVER")[0],
                         c.command(b"RCPT TO:<a@example.test>")[0],
                         c.command(b"DATA")[0],
                         c.command(body.encode() + b".")[0]]
                return codes

        codes = yield in_thread(session)
        self.assertEqual(codes, [555, 555, 250, 555, 250, 354, 250])
        received = yield self.running.sink.wait_for(1)
        self.assertTrue(received[0].data.endswith(body.encode()))

    @defer.inlineCallbacks
    def test_every_reply_has_an_enhanced_code(self) -> defer.Generator:
        commands = [b"HELO client.test", b"EHLO client.test", b"NOOP", b"VRFY x", b"EXPN x",
                    b"BOGUS", b"", b"RCPT TO:<a@example.test>", b"DATA", b"MAIL FROM:broken<",
                    b"MAIL FROM:<s@example.net>", b"MAIL FROM:<s@example.net>",
                    b"RCPT TO:<a@nowhere.invalid>", b"RCPT TO:<a@example.test>", b"DATA x",
                    b"AUTH PLAIN", b"RSET", b"STARTTLS x", b"QUIT"]

        def session() -> list[tuple[bytes, tuple[int, list[bytes]]]]:
            with RawClient(self.port) as c:
                c.reply()
                return [(cmd, c.command(cmd)) for cmd in commands]

        replies = yield in_thread(session)
        for cmd, (_code, lines) in replies:
            if cmd.startswith((b"HELO", b"EHLO")):
                continue  # RFC 2034: the greeting and HELO/EHLO replies carry none
            for line in lines:
                m = ENHANCED.match(line)
                self.assertIsNotNone(m, (cmd, line))
                self.assertEqual(m.group(1), m.group(2), (cmd, line))
