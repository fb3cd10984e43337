"""The AUTH decisions and the input hold, on their own: no session, no transport but a recording one."""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from appliance.smtp import SessionAuth
from appliance.smtp.hold import InputHold


class Checker:
    """Knows one user; ``broken`` makes every check fail with an error of the checker's own."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.broken = False

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred:
        self.seen.append((credentials.username, credentials.password))
        if self.broken:
            return defer.fail(RuntimeError("users file unreadable"))
        if (credentials.username, credentials.password) == ("alice", b"secret"):
            return defer.succeed("alice")
        return defer.fail(UnauthorizedLogin())


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SessionAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.checker = Checker()
        self.auth = SessionAuth(self.checker)

    def answer(self, reply: Any) -> tuple[int, bytes]:
        if isinstance(reply, defer.Deferred):
            return self.successResultOf(reply)
        return reply

    def begin(self, rest: bytes, tls: bool = True, in_transaction: bool = False) -> tuple[int, bytes]:
        return self.answer(self.auth.begin(rest, tls=tls, in_transaction=in_transaction))

    def test_offered_only_with_a_checker_and_tls(self) -> None:
        self.assertTrue(self.auth.offered(True))
        self.assertFalse(self.auth.offered(False))
        self.assertFalse(SessionAuth(None).offered(True))

    def test_refusals_before_any_exchange(self) -> None:
        self.assertEqual(SessionAuth(None).begin(b"PLAIN", tls=True, in_transaction=False)[0], 502)
        self.assertEqual(self.begin(b"PLAIN", tls=False)[0], 538)
        self.assertEqual(self.begin(b"PLAIN", in_transaction=True)[0], 503)
        self.assertEqual(self.begin(b"CRAM-MD5")[0], 504)
        self.assertEqual(self.begin(b"")[0], 504)
        self.assertFalse(self.auth.in_progress)
        self.assertEqual(self.checker.seen, [])

    def test_plain_with_initial_response(self) -> None:
        self.assertEqual(self.begin(b"plain " + b64(b"\0alice\0secret")),
                         (235, b"2.7.0 Authentication successful"))
        self.assertEqual((self.auth.user, self.auth.in_progress), ("alice", False))
        self.assertEqual(self.begin(b"PLAIN")[0], 503)  # once is enough

    def test_login_exchange(self) -> None:
        self.assertEqual(self.begin(b"LOGIN"), (334, b64(b"Username:")))
        self.assertTrue(self.auth.in_progress)
        self.assertEqual(self.answer(self.auth.respond(b64(b"alice"))), (334, b64(b"Password:")))
        self.assertEqual(self.answer(self.auth.respond(b64(b"secret")))[0], 235)
        self.assertEqual(self.checker.seen, [("alice", b"secret")])

    def test_cancelled_and_undecodable_responses_get_501(self) -> None:
        self.begin(b"LOGIN")
        self.assertEqual(self.answer(self.auth.respond(b"*")), (501, b"5.0.0 Authentication cancelled"))
        self.assertFalse(self.auth.in_progress)
        self.begin(b"PLAIN")
        self.assertEqual(self.answer(self.auth.respond(b"not base64!"))[0], 501)
        self.assertEqual(self.begin(b"PLAIN " + b64(b"no separators"))[0], 501)
        self.assertEqual(self.checker.seen, [])

    def test_acting_for_another_user_is_a_failed_login(self) -> None:
        self.assertEqual(self.begin(b"PLAIN " + b64(b"bob\0alice\0secret"))[0], 535)
        self.assertEqual(self.checker.seen, [("", b"")])
        self.assertIsNone(self.auth.user)

    def test_three_failures_close_the_session(self) -> None:
        replies = [self.begin(b"PLAIN " + b64(b"\0alice\0wrong"))[0] for _ in range(3)]
        self.assertEqual(replies, [535, 535, 421])

    def test_a_checker_error_is_temporary_and_not_counted(self) -> None:
        self.checker.broken = True
        replies = [self.begin(b"PLAIN " + b64(b"\0alice\0secret"))[0] for _ in range(3)]
        self.assertEqual(replies, [454, 454, 454])
        self.assertEqual(self.auth.failures, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_a_name_that_is_not_utf8_never_reaches_the_checker(self) -> None:
        self.assertEqual(self.begin(b"PLAIN " + b64(b"\0\xff\0secret"))[0], 535)
        self.assertEqual(self.checker.seen, [])


class InputHoldTests(SynchronousTestCase):
    def test_hold_keeps_input_and_pauses_until_the_end(self) -> None:
        transport = StringTransport()
        hold = InputHold()
        self.assertFalse(hold.active)
        hold.start(transport)
        self.assertEqual((hold.active, transport.producerState), (True, "paused"))
        hold.keep(b"RCPT TO:<a@b>\r\n")
        hold.keep(b"DATA\r\n")
        self.assertEqual(hold.end(transport), b"RCPT TO:<a@b>\r\nDATA\r\n")
        self.assertEqual((hold.active, transport.producerState), (False, "producing"))

    def test_abandon_drops_input_but_reads_again(self) -> None:
        transport = StringTransport()
        hold = InputHold()
        hold.start(transport)
        hold.keep(b"QUIT\r\n")
        hold.abandon(transport)
        self.assertEqual((hold.active, transport.producerState), (False, "producing"))
        self.assertEqual(hold.end(transport), b"")
