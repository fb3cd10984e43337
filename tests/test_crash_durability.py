"""CI's small run of the crash durability script (tests/crash_durability.py); run it larger by hand."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.helpers import REPO


class CrashDurabilityTests(TestCase):
    timeout = 180

    def test_kill_9_under_load_loses_nothing(self) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.crash_durability", "--messages", "120", "--kills", "4",
             "--clients", "4"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
            timeout=170,
        )
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, output)
        counts = dict(re.findall(r"(\w+)=(\d+)", output.splitlines()[-1]))
        self.assertEqual(counts["lost"], "0", output)
        self.assertEqual(counts["kills"], "4", output)
        self.assertEqual(int(counts["accepted"]), 108, output)  # all but the 12 refused by design
        self.assertEqual(counts["refused"], "12", output)
        self.assertGreaterEqual(int(counts["delivered"]), 108, output)

    def test_helpers_killed_under_load_lose_nothing(self) -> None:
        """Every copy signed in a helper; helpers and the owner killed with -9 at random moments."""
        proc = subprocess.run(
            [sys.executable, "-m", "tests.crash_durability", "--messages", "120", "--kills", "2",
             "--clients", "4", "--helpers", "1", "--dkim", "--helper-kills", "4"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
            timeout=170,
        )
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, output)
        counts = dict(re.findall(r"(\w+)=(\d+)", output.splitlines()[-1]))
        self.assertEqual(counts["lost"], "0", output)
        self.assertEqual((counts["kills"], counts["helper_kills"]), ("2", "4"), output)
        self.assertEqual(int(counts["accepted"]), 108, output)
        self.assertGreaterEqual(int(counts["delivered"]), 108, output)

    def test_every_kind_of_process_killed_under_load_loses_nothing(self) -> None:
        """Helpers, tracker processes and the owner killed with -9; no child outlives the owner."""
        proc = subprocess.run(
            [sys.executable, "-m", "tests.crash_durability", "--messages", "120", "--kills", "2",
             "--clients", "4", "--helpers", "1", "--helper-kills", "2", "--tracker-processes", "2",
             "--tracker-kills", "3"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
            timeout=170,
        )
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, output)  # orphans, a tracker not answering: problems
        counts = dict(re.findall(r"(\w+)=(\d+)", output.splitlines()[-1]))
        self.assertEqual(counts["lost"], "0", output)
        self.assertEqual((counts["kills"], counts["helper_kills"], counts["tracker_kills"]),
                         ("2", "2", "3"), output)
        self.assertEqual(int(counts["accepted"]), 108, output)
        self.assertGreaterEqual(int(counts["delivered"]), 108, output)
        self.assertGreater(int(counts["hits_answered"]), 0, output)
