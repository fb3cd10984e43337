"""
A message that cannot be stored gets ``451 4.3.0``, never 250 or 5xx, and leaves nothing behind.

Real files and real sockets: the spool made unusable under a running
appliance (a file where its directories should be, which stops even root),
and a disk that fills up mid-message (a separate ``twistd`` with a file size
limit, so writes fail with EFBIG exactly as on a full disk).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import smtplib
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from appliance.spool import without_spares
from tests.crash_durability import TWISTD, wait_for_port, write_config
from tests.helpers import REPO, RunningAppliance, free_port, in_thread, wait_until
from tests.smtpclient import RawClient

MESSAGE = b"From: <sender@example.net>\r\nSubject: hello\r\n\r\nbody\r\n"


def send(port: int, message: bytes) -> tuple[int, bytes]:
    """The reply to the end of DATA (or to whatever refused the message first)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("sender@example.net", ["a@example.test"], message)
            return 250, b""
    except smtplib.SMTPDataError as e:
        return e.smtp_code, e.smtp_error


class SpoolUnusableTests(unittest.TestCase):
    def setUp(self) -> defer.Deferred:
        self.running = RunningAppliance(self.mktemp())
        self.spool = self.running.config.spool.directory
        return self.running.start()

    @defer.inlineCallbacks
    def tearDown(self) -> defer.Generator:
        active = os.path.join(self.spool, "active")
        yield wait_until(lambda: self.running.appliance.smtp_limits.open == 0
                         and (not os.path.isdir(active) or not os.listdir(active)))
        yield self.running.stop()

    def replace_with_file(self, name: str) -> None:
        path = os.path.join(self.spool, name)
        shutil.rmtree(path)
        with open(path, "w") as f:
            f.write("not a directory\n")

    def restore(self, name: str) -> None:
        path = os.path.join(self.spool, name)
        os.unlink(path)
        os.mkdir(path)

    @defer.inlineCallbacks
    def test_incoming_unusable_answers_451_at_data(self) -> defer.Generator:
        self.replace_with_file("incoming")

        def session() -> tuple[int, list[bytes]]:
            with RawClient(self.running.smtp_port) as c:
                c.reply()
                c.command(b"EHLO client.test")
                c.command(b"MAIL FROM:<sender@example.net>")
                c.command(b"RCPT TO:<a@example.test>")
                return c.command(b"DATA")

        reply = yield in_thread(session)
        self.assertEqual(reply, (451, [b"451 4.3.0 Cannot store the message now, try again later"]))
        self.flushLoggedErrors(OSError)
        self.restore("incoming")
        self.assertEqual(os.listdir(os.path.join(self.spool, "active")), [])
        self.assertEqual(self.running.events(), [])
        # Once the spool is usable again, so is the server.
        code, _ = yield in_thread(send, self.running.smtp_port, MESSAGE)
        self.assertEqual(code, 250)
        yield self.running.sink.wait_for(1)

    @defer.inlineCallbacks
    def test_commit_failure_answers_451_at_end_of_data(self) -> defer.Generator:
        self.replace_with_file("active")  # the message is written, but cannot be committed
        code, text = yield in_thread(send, self.running.smtp_port, MESSAGE)
        self.assertEqual((code, text), (451, b"4.3.0 Cannot store the message now, try again later"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(without_spares(os.listdir(os.path.join(self.spool, "incoming"))), [])
        self.assertEqual(self.running.events(), [])
        self.assertEqual(self.running.sink.messages, [])
        self.restore("active")


class DiskFullTests(unittest.TestCase):
    """The appliance under a 256 KiB file size limit: a bigger message cannot be written."""

    timeout = 60
    LIMIT = 256 * 1024

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.port = free_port()
        # Delivery goes to a port nobody listens on: accepted mail stays in the spool.
        config = write_config(self.workdir, self.port, free_port())
        limit = self.LIMIT

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        self.log = open(os.path.join(self.workdir, "twistd.log"), "wb")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "engage-appliance", "-c", config],
            cwd=self.workdir, env={**os.environ, "PYTHONPATH": REPO}, stdout=self.log,
            stderr=subprocess.STDOUT, preexec_fn=limit_file_size,
        )
        wait_for_port(self.port, self.proc)

    def tearDown(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()

    def injection_subjects(self) -> list[str]:
        with open(os.path.join(self.workdir, "events.jsonl"), "rb") as f:
            return [e["subject"] for e in map(json.loads, f) if e["type"] == "injection"]

    def test_disk_full_answers_451_and_keeps_nothing(self) -> None:
        big = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (self.LIMIT // 78 * 2)
        self.assertEqual(send(self.port, big),
                         (451, b"4.3.0 Cannot store the message now, try again later"))
        self.assertEqual(send(self.port, b"Subject: small\r\n\r\nsmall\r\n"), (250, b""))
        spool = os.path.join(self.workdir, "spool")
        self.assertEqual(without_spares(os.listdir(os.path.join(spool, "incoming"))), [])
        self.assertEqual(len(os.listdir(os.path.join(spool, "active"))), 1)
        self.assertEqual(self.injection_subjects(), ["small"])
        with open(os.path.join(self.workdir, "twistd.log"), "rb") as f:
            self.assertIn(b"File too large", f.read())
        self.assertIsNone(self.proc.poll())  # still running
