"""The twistd plugin, as a user gets it: from an installed package, not from this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.helpers import REPO

# The twistd script of the interpreter running the tests (the venv's).
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class InstalledPluginTests(TestCase):
    timeout = 300

    def test_twistd_finds_installed_plugin(self) -> None:
        """Install the package into an empty directory and ask twistd for its subcommands there."""
        target = os.path.abspath(self.mktemp())
        build = os.path.abspath(self.mktemp())
        # Install from a copy of the sources alone: a checkout's build/ directory may hold
        # files from an older layout that would hide a package missing from the wheel.
        source = os.path.abspath(self.mktemp())
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "var", "_trial_temp*", "*.egg-info", "__pycache__"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--target", target, source],
            check=True, capture_output=True, env={**os.environ, "TMPDIR": os.path.dirname(build)},
        )
        self.assertTrue(os.path.exists(os.path.join(target, "twisted", "plugins", "engage_appliance.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "plugins", "__init__.py")))
        os.makedirs(build)
        probe = (
            "import sys; from twisted.application.service import IServiceMaker;"
            "from twisted.plugin import getPlugins;"
            "import appliance, appliance.tap; print(appliance.tap.__file__);"
            "print([p.tapname for p in getPlugins(IServiceMaker)])"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = target
        out = subprocess.run([sys.executable, "-c", probe], cwd=build, env=env, check=True,
                             capture_output=True, text=True).stdout
        where, names = out.splitlines()[-2:]
        self.assertTrue(where.startswith(target), where)
        self.assertIn("'engage-appliance'", names)
        twistd = subprocess.run(
            [TWISTD, "engage-appliance", "--help"], cwd=build, env=env,
            capture_output=True, text=True,
        )
        self.assertEqual(twistd.returncode, 0, twistd.stderr)
        self.assertIn("--config", twistd.stdout)


class BadConfigStopsStartTests(TestCase):
    timeout = 60

    def test_config_error_exits_nonzero_and_names_key(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[smtpapi]\ntracking_link_expiry = "soon"\nbogus = 1\n')
        proc = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "engage-appliance", "--config", path],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertNotEqual(proc.returncode, 0)
        output = proc.stdout + proc.stderr
        self.assertIn('smtpapi.tracking_link_expiry: expected seconds, got "soon"', output)
        self.assertIn("smtpapi.bogus: unknown key", output)
        self.assertIn("smtp.listeners:", output)
