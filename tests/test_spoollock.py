"""One appliance per spool: the lock, in one process and against a second real ``twistd``."""

from __future__ import annotations

import os
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.spoollock import SpoolLock, SpoolLocked
from tests.crash_durability import TWISTD, write_config
from tests.helpers import REPO
from tests.memory import MemoryAppliance
from tests.ports import free_port, wait_for_port


class SpoolLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = os.path.abspath(self.mktemp())

    def test_a_second_lock_on_the_spool_fails_naming_spool_and_holder(self) -> None:
        first = SpoolLock(self.spool)
        first.acquire()
        self.addCleanup(first.release)
        with open(os.path.join(self.spool, "lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        with self.assertRaises(SpoolLocked) as caught:
            SpoolLock(self.spool).acquire()
        self.assertEqual(str(caught.exception), f"the spool is in use by process {os.getpid()}: "
                                                f"{self.spool} (is the appliance already running?)")
        # The holder's pid is still there for the next one to read.
        with open(os.path.join(self.spool, "lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")

    def test_released_the_lock_can_be_taken_again(self) -> None:
        first = SpoolLock(self.spool)
        first.acquire()
        first.acquire()  # taken already: nothing happens
        first.release()
        second = SpoolLock(self.spool)
        second.acquire()
        self.addCleanup(second.release)
        self.assertTrue(second.held)
        self.assertFalse(first.held)

    def test_a_stale_pid_is_overwritten(self) -> None:
        os.makedirs(self.spool)
        with open(os.path.join(self.spool, "lock"), "w") as f:
            f.write("99999999\nleft over by a process killed with -9\n")
        lock = SpoolLock(self.spool)
        lock.acquire()
        self.addCleanup(lock.release)
        with open(os.path.join(self.spool, "lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")


class ApplianceLockTests(SynchronousTestCase):
    def test_a_second_appliance_on_the_spool_opens_nothing(self) -> None:
        directory = self.mktemp()
        first = MemoryAppliance(directory)
        first.start()
        self.addCleanup(first.stop)
        second = MemoryAppliance(directory)
        with self.assertRaises(SpoolLocked):
            second.appliance.privilegedStartService()
        self.assertEqual(second.reactor.tcpServers, [])
        self.assertFalse(second.appliance.running)
        self.flushLoggedErrors()
        # The first keeps its lock; once it stops, the second may start.
        self.assertTrue(first.appliance.spool_lock.held)
        first.stop()
        second.start()
        self.addCleanup(second.stop)
        self.assertTrue(second.appliance.spool_lock.held)
        self.assertEqual(len(second.reactor.tcpServers), 3)  # SMTP, tracker, admin

    def test_start_without_a_privileged_start_takes_the_lock(self) -> None:
        running = MemoryAppliance(self.mktemp())
        running.start()
        self.assertTrue(running.appliance.spool_lock.held)
        running.stop()
        self.assertFalse(running.appliance.spool_lock.held)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class SecondProcessTests(TestCase):
    """Two real ``twistd -n`` on one spool: the second exits at once and opens no port."""

    timeout = 120

    def start(self, workdir: str, config: str, log: str) -> subprocess.Popen:
        out = open(os.path.join(workdir, log), "wb")
        self.addCleanup(out.close)
        return subprocess.Popen(TWISTD + ["-n", "--pidfile=", "engage-appliance", "-c", config],
                                cwd=workdir, env={**os.environ, "PYTHONPATH": REPO}, stdout=out,
                                stderr=subprocess.STDOUT)

    def test_second_start_on_the_same_spool_fails_at_once(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        first = self.start(workdir, write_config(workdir, port, free_port()), "first.log")
        self.addCleanup(lambda: (first.terminate(), first.wait(30)))
        wait_for_port(port, first)
        # The second has ports of its own (so only the lock can stop it) and the same spool.
        other = os.path.join(workdir, "other")
        os.makedirs(other)
        second_port = free_port()
        config = write_config(other, second_port, free_port())
        with open(config) as f:
            text = f.read()
        spool = os.path.join(workdir, "spool")
        with open(config, "w") as f:
            f.write(text.replace('directory = "spool"', f'directory = "{spool}"'))
        began = time.monotonic()
        second = self.start(other, config, "second.log")
        self.assertNotEqual(second.wait(60), 0)
        self.assertLess(time.monotonic() - began, 60)
        with open(os.path.join(other, "second.log"), encoding="utf-8", errors="replace") as f:
            output = f.read()
        self.assertIn(f"the spool is in use by process {first.pid}: {spool}", output)
        self.assertFalse(listening(second_port))
        self.assertFalse(os.path.exists(os.path.join(other, "events.jsonl")))  # it never opened its log
        self.assertIsNone(first.poll())
