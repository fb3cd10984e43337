"""The worker pools: calls run in threads, results handed back to the reactor in batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.workers import WorkerPool


class HeldReactor:
    """``callFromThread`` recorded from any thread; the test runs what was handed back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Callable[[], Any]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append(lambda: f(*args, **kwargs))

    def run_handed_back(self) -> int:
        with self.lock:
            calls, self.calls = self.calls, []
        for call in calls:
            call()
        return len(calls)


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


class HandBackTests(SynchronousTestCase):
    def pool(self, threads: int) -> tuple[WorkerPool, HeldReactor]:
        held = HeldReactor()
        pool = WorkerPool(held, threads, "test")  # type: ignore[arg-type]
        self.addCleanup(pool.stop)
        return pool, held

    def test_calls_that_end_together_wake_the_reactor_once(self) -> None:
        pool, held = self.pool(1)
        results: list[Any] = []
        for i in range(10):
            pool.run(lambda i=i: i * i).addCallback(results.append)
        pool.start()
        until(lambda: pool.unfinished == 0)
        self.assertEqual(results, [])  # nothing fires off the reactor thread
        self.assertEqual(held.run_handed_back(), 1)
        self.assertEqual(results, [i * i for i in range(10)])
        # The next call to end wakes it again.
        pool.run(lambda: "again").addCallback(results.append)
        until(lambda: pool.unfinished == 0)
        self.assertEqual(held.run_handed_back(), 1)
        self.assertEqual(results[-1], "again")

    def test_a_failure_is_the_call_s_own(self) -> None:
        pool, held = self.pool(2)
        pool.start()
        failures: list[Failure] = []

        def fail() -> None:
            raise ZeroDivisionError("no")

        pool.run(fail).addErrback(failures.append)
        pool.run(int, "12", base=8).addCallback(failures.append)
        until(lambda: pool.unfinished == 0)
        held.run_handed_back()
        self.assertEqual(len(failures), 2)
        self.assertTrue(failures[0].check(ZeroDivisionError) or failures[1].check(ZeroDivisionError))
        self.assertIn(10, failures)

    def test_calls_before_start_wait_for_it(self) -> None:
        pool, held = self.pool(2)
        ran = threading.Event()
        pool.run(ran.set)
        self.assertEqual(pool.unfinished, 1)
        self.assertFalse(ran.wait(0.05))
        pool.start()
        self.assertTrue(ran.wait(10))

    def test_stop_ends_every_call_made_before_it(self) -> None:
        pool, held = self.pool(2)
        gate = threading.Event()
        ended: list[int] = []
        for i in range(6):
            pool.run(lambda i=i: (gate.wait(10), ended.append(i)))
        pool.start()
        threading.Timer(0.05, gate.set).start()
        pool.stop()  # blocks until the six have ended
        self.assertEqual(sorted(ended), list(range(6)))
        self.assertEqual(pool.unfinished, 0)
        self.assertFalse(any(t.is_alive() for t in threading.enumerate() if t.name.startswith("test-")))

    def test_a_reactor_that_cannot_be_woken_once_loses_nothing(self) -> None:
        pool, held = self.pool(1)
        failing = [True]
        wake = held.callFromThread

        def call_from_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            if failing and failing.pop():
                raise OSError("the waker is closed")
            wake(f, *args, **kwargs)

        self.patch(held, "callFromThread", call_from_thread)
        results: list[int] = []
        pool.run(lambda: 1).addCallback(results.append)
        pool.start()
        until(lambda: pool.unfinished == 0)
        self.assertEqual(held.run_handed_back(), 0)  # that wake-up failed
        pool.run(lambda: 2).addCallback(results.append)
        until(lambda: pool.unfinished == 0)
        held.run_handed_back()
        self.assertEqual(results, [1, 2])  # the next one took both back
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_deferred_that_cannot_fire_holds_up_no_other(self) -> None:
        pool, held = self.pool(1)
        results: list[Any] = []
        pool.run(lambda: "late").callback("fired already, by its caller")
        pool.run(lambda: "next").addCallback(results.append)
        pool.start()
        until(lambda: pool.unfinished == 0)
        held.run_handed_back()
        self.assertEqual(results, ["next"])
        self.assertEqual(len(self.flushLoggedErrors(defer.AlreadyCalledError)), 1)

    def test_a_call_after_stop_is_not_run(self) -> None:
        pool, held = self.pool(1)
        pool.start()
        pool.stop()
        ran: list[int] = []
        d = pool.run(lambda: ran.append(1))
        time.sleep(0.05)
        held.run_handed_back()
        self.assertEqual(ran, [])
        self.assertFalse(d.called)
        self.assertEqual(pool.unfinished, 0)


class ReactorTests(TestCase):
    """On the real reactor: results come back on its thread, many calls at once."""

    @defer.inlineCallbacks
    def test_many_calls_in_flight(self) -> Any:
        pool = WorkerPool(reactor, 4, "test-real")
        pool.start()
        self.addCleanup(pool.stop)
        main = threading.get_ident()
        seen: list[int] = []

        def check(result: int) -> int:
            seen.append(threading.get_ident())
            return result

        def call(i: int) -> int:
            time.sleep(0.001)
            return i

        results = yield defer.gatherResults([pool.run(call, i).addCallback(check) for i in range(200)])
        self.assertEqual(results, list(range(200)))
        self.assertEqual(set(seen), {main})
        self.assertEqual(pool.unfinished, 0)
