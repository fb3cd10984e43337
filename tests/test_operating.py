"""The operating files (systemd unit, logrotate) and twistd's own log reopened on SIGHUP."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import time
import tomllib
import urllib.error
import urllib.request

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.crash_durability import TWISTD, write_config
from tests.helpers import REPO, port_of
from tests.ports import free_port, wait_for_port


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.05)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TwistdLogTests(TestCase):
    """A real ``twistd -n -l FILE``: logrotate's rename and SIGHUP move its log to a new file."""

    timeout = 120

    def test_sighup_reopens_twistds_log_file(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        config = write_config(workdir, port, free_port())
        log = os.path.join(workdir, "twistd.log")
        proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "-l", log, "engage-appliance", "-c", config],
                                cwd=workdir, env={**os.environ, "PYTHONPATH": REPO},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.terminate(), proc.wait(30)))
        wait_for_port(port, proc)
        # Ports open before the reactor runs, the SIGHUP handler once it does: a /healthz
        # answer comes after the whole start, handler included.
        with open(config, "rb") as f:
            admin = tomllib.load(f)["admin"]["endpoint"]
        wait_for(lambda: healthy(f"http://127.0.0.1:{port_of(admin)}/healthz"))
        os.rename(log, log + ".1")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: os.path.exists(log) and b"reopened twistd's log file" in open(log, "rb").read())
        with open(log + ".1", "rb") as f:
            old = f.read()
        self.assertIn(b"twistd 26", old)  # the start-up lines stayed in the renamed file
        self.assertNotIn(b"reopened twistd's log file", old)
        proc.terminate()
        proc.wait(30)  # twistd ends by the signal it was stopped with, as it reports its stop
        with open(log, "rb") as f:
            self.assertIn(b"Main loop terminated.", f.read())  # everything after, in the new file


class SystemdUnitTests(SynchronousTestCase):
    def test_the_unit(self) -> None:
        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string(read("etc/engage-appliance.service"))
        service = unit["Service"]
        start = service["ExecStart"].split()
        self.assertTrue(start[0].endswith("/twistd"))
        self.assertEqual(start[1:4], ["-n", "--pidfile=", "engage-appliance"])
        self.assertIn("check", service["ExecStartPre"].split())
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(service["Restart"], "on-failure")
        self.assertTrue(service["WorkingDirectory"].startswith("/"))
        self.assertTrue(service["ReadWritePaths"].startswith(service["WorkingDirectory"]))
        for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
            self.assertIn(key, service)
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")


class LogrotateTests(SynchronousTestCase):
    def test_both_logs_rotated_by_rename_and_sighup(self) -> None:
        lines = [x.split("#")[0].strip() for x in read("etc/logrotate.d/engage-appliance").splitlines()]
        [head] = [x for x in lines if x.endswith("{")]
        self.assertEqual([os.path.basename(p) for p in head[:-1].split()], ["events.jsonl", "twistd.log"])
        directives = {x.split()[0] for x in lines if x and not x.endswith("{") and x != "}"}
        self.assertNotIn("copytruncate", directives)
        self.assertTrue({"nocreate", "delaycompress", "sharedscripts"} <= directives)


class TwistdLogFileTests(SynchronousTestCase):
    """Where twistd keeps its log file, as ``twisted.scripts._twistd_unix`` installs it."""

    def setUp(self) -> None:
        self.previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, self.previous)

    def test_found_through_twistds_handler_then_reopened_unrotated(self) -> None:
        from twisted.python import logfile
        from twisted.scripts._twistd_unix import UnixAppLogger

        from appliance import tap

        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.assertIsNone(tap.twistd_log_file())
        path = os.path.abspath(self.mktemp())
        observer = UnixAppLogger({"logfile": path, "nodaemon": True})._getLogObserver()
        found = tap.twistd_log_file()
        self.assertIsInstance(found, logfile.LogFile)
        assert found is not None
        self.addCleanup(found.close)
        self.assertEqual(found.path, path)
        self.assertEqual(found.rotateLength, 1000000)
        tap.rotate_twistd_log_externally()
        self.assertIsNone(found.rotateLength)
        os.rename(path, path + ".1")
        tap.reopen_twistd_log()
        observer({"log_format": "after", "log_time": 0, "log_level": None, "log_namespace": "x"})
        found.flush()
        with open(path) as f:
            self.assertIn("after", f.read())
        with open(path + ".1") as f:
            self.assertNotIn("after", f.read())


class EarlySighupTests(SynchronousTestCase):
    """twistd opens the ports before the reactor runs: SIGHUP is taken before them."""

    def setUp(self) -> None:
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)

    def test_the_handler_is_installed_by_the_privileged_start(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from appliance.build import build
        from appliance.service import Appliance
        from tests.helpers import make_config
        from tests.memory import run_synchronously

        reactor = MemoryReactorClock()
        appliance = Appliance(build(make_config(os.path.abspath(self.mktemp()))), reactor,
                              run=run_synchronously)
        assert appliance.sighup is not None
        appliance.privilegedStartService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), appliance.sighup._handle)
        self.assertTrue(reactor.tcpServers)  # the ports are open, the services not started
        self.assertFalse(appliance.events.running)
        appliance.startService()
        appliance.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)
