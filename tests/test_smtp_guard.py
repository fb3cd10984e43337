"""How many password checks the injection server starts: per second in all, and per address after failures."""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from appliance.build import build
from appliance.service import Appliance
from appliance.smtp import InjectionFactory
from appliance.smtp.guard import BACKING_OFF, BUSY, AuthGuard
from tests.helpers import make_config
from tests.test_smtp import FakeInjector, _IPv4, listener
from tests.test_smtp_security import users_file
from tests.test_smtp_session import PLAIN, PendingChecker, TLSStringTransport, talk


class AuthGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.guard = AuthGuard(self.clock, attempts_per_second=3, backoff=1.0, backoff_max=4.0)

    def test_attempts_per_second_for_the_whole_server(self) -> None:
        answers = [self.guard.admit(f"192.0.2.{i}") for i in range(4)]
        self.assertEqual(answers, [None, None, None, BUSY])
        self.clock.advance(1)
        self.assertIsNone(self.guard.admit("192.0.2.9"))

    def test_backoff_doubles_per_failure_up_to_the_maximum(self) -> None:
        waits = []
        for _ in range(4):
            self.assertIsNone(self.guard.admit("192.0.2.1"))
            self.guard.failed("192.0.2.1")
            waited = 0.0
            while self.guard.admit("192.0.2.1") == BACKING_OFF:
                self.clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 4.0])

    def test_backoff_is_per_address_and_forgotten_on_success(self) -> None:
        self.guard.failed("192.0.2.1")
        self.assertEqual(self.guard.admit("192.0.2.1"), BACKING_OFF)
        self.assertIsNone(self.guard.admit("192.0.2.2"))
        self.clock.advance(1)
        self.assertIsNone(self.guard.admit("192.0.2.1"))
        self.guard.failed("192.0.2.1")
        self.guard.succeeded("192.0.2.1")
        self.assertIsNone(self.guard.admit("192.0.2.1"))

    def test_a_quiet_address_starts_again_from_the_shortest_wait(self) -> None:
        for _ in range(3):
            self.guard.failed("192.0.2.1")
        self.clock.advance(4 + 4 + 1)  # its wait, then more than backoff_max without failures
        self.guard.failed("192.0.2.1")
        self.clock.advance(1)
        self.assertIsNone(self.guard.admit("192.0.2.1"))


class GuardedSessionTests(SynchronousTestCase):
    """The session answers for the guard, and a refused attempt counts as a failed one."""

    def connect(self) -> tuple[Any, TLSStringTransport]:
        self.clock = Clock()
        self.checker = PendingChecker()
        factory = InjectionFactory(listener(tls="starttls"), FakeInjector(), "mx.test", 300,
                                   tls=object(), checker=self.checker, clock=self.clock)
        proto = factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=_IPv4("192.0.2.1"))
        proto.makeConnection(transport)
        proto.auth.guard = AuthGuard(self.clock, attempts_per_second=100, backoff=5.0, backoff_max=60.0)
        proto.auth.client = "192.0.2.1"
        return proto, transport

    def test_backoff_answers_without_a_check_and_counts_as_a_failure(self) -> None:
        proto, transport = self.connect()
        talk(proto, transport, b"EHLO c\r\nSTARTTLS\r\n")
        talk(proto, transport, b"EHLO c\r\n" + PLAIN)
        transport.clear()
        self.checker.pending[0][1].errback(UnauthorizedLogin())
        self.assertEqual(transport.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(talk(proto, transport, PLAIN),
                         [b"454 4.7.0 Too many failed logins from your address, try again later"])
        self.assertEqual(talk(proto, transport, PLAIN),
                         [b"421 4.7.0 Too many authentication failures, closing connection"])
        self.assertEqual(len(self.checker.pending), 1)
        self.assertTrue(transport.disconnecting)


class RecordingPool(ThreadPool):
    """A pool that only records what it is given."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.given: list[Any] = []

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any, **kw: Any) -> None:
        self.given.append(func)


class RecordingQueue:
    """Stands for a worker pool's queue of calls: records each call, runs none."""

    def __init__(self, given: list[Any]) -> None:
        self.given = given

    def put(self, call: Any) -> None:
        self.given.append(call)


class PoolReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.pool = RecordingPool("reactor")

    def getThreadPool(self) -> ThreadPool:
        return self.pool


class PasswordPoolTests(SynchronousTestCase):
    def test_password_checks_have_one_thread_of_their_own(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = make_config(directory, smtp={"users_file": users_file(directory, alice="secret")})
        reactor = PoolReactor()
        appliance = Appliance(build(config), reactor, handle_sighup=False)
        assert appliance.password_pool is not None and appliance.cpu_pool is not None
        self.assertEqual(appliance.password_pool.pool.size, 1)
        given: list[Any] = []
        cpu: list[Any] = []
        self.patch(appliance.password_pool.pool, "_calls", RecordingQueue(given))
        self.patch(appliance.cpu_pool.pool, "_calls", RecordingQueue(cpu))
        assert appliance.users is not None
        appliance.users.requestAvatarId(UsernamePassword("alice", b"wrong"))
        self.assertEqual(len(given), 1)
        self.assertEqual((cpu, reactor.pool.given), ([], []))
