"""The reactor an Appliance is given is the one every part uses: listeners, timers, signals."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.events import EventLog
from tests.memory import ADMIN_PORT, HTTP_PORT, SMTP_PORT, MemoryAppliance


class FromThreads:
    """Records what a signal handler hands to the reactor thread."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append(f)


class EventLogSignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            self.skipTest("no SIGHUP here")
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)

    def test_sighup_reopens_on_the_given_reactor_and_stop_gives_the_signal_back(self) -> None:
        path = os.path.join(self.mktemp(), "events.jsonl")
        threads = FromThreads()
        log = EventLog(path, "n", fsync_interval=0, clock=Clock(), sighup=threads)
        log.startService()
        signal.raise_signal(signal.SIGHUP)
        self.assertEqual(threads.calls, [log.reopen])  # never reopened inside the handler itself
        log.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)

    def test_no_handler_without_a_reactor_for_it(self) -> None:
        log = EventLog(os.path.join(self.mktemp(), "events.jsonl"), "n", fsync_interval=0, clock=Clock())
        log.startService()
        self.addCleanup(log.stopService)
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)


class ApplianceReactorTests(SynchronousTestCase):
    def test_listeners_and_timers_on_the_given_reactor(self) -> None:
        before = set(global_reactor.getDelayedCalls())
        running = MemoryAppliance(self.mktemp(), events={"fsync_interval": "1s"})
        running.start()
        self.addCleanup(running.stop)
        self.assertEqual(sorted(port for port, *_ in running.reactor.tcpServers),
                         [SMTP_PORT, ADMIN_PORT, HTTP_PORT])
        # The event log's fsync timer runs on it too.
        self.assertTrue(running.reactor.getDelayedCalls())
        # A session's timeouts are the given reactor's as well, and nothing waits on the global one.
        client = running.smtp()
        client.reply()
        self.assertEqual(set(global_reactor.getDelayedCalls()) - before, set())
        running.advance(running.config.smtp.timeout)
        self.assertEqual(client.reply()[0], 421)
        self.assertTrue(client.closed)


class EventLogModeTests(SynchronousTestCase):
    def test_the_appliance_creates_its_event_log_with_the_configured_mode(self) -> None:
        old = os.umask(0o077)  # what twistd sets when it daemonizes
        self.addCleanup(os.umask, old)
        running = MemoryAppliance(self.mktemp(), events={"file_mode": "0660"})
        running.start()
        self.addCleanup(running.stop)
        self.assertEqual(os.stat(running.config.events.log_file).st_mode & 0o777, 0o660)
