"""``engage-appliance check``: every problem of a configuration and its files at once, nothing made."""

from __future__ import annotations

import contextlib
import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from appliance import console
from tests.test_console import toml_text


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, extra: str = "", directory: str | None = None, tracker: str = "tcp:0") -> str:
        path = os.path.join(self.directory, "appliance.toml")
        text = toml_text(directory or self.directory).replace(
            '[tracker]\nendpoint = "tcp:0:', f'[tracker]\nendpoint = "{tracker}:')
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + extra)
        return path

    def run_check(self, path: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = console.main(["check", "--config", path])
        return status, out.getvalue(), err.getvalue()

    def test_a_good_configuration_passes_and_nothing_is_made(self) -> None:
        # The self-signed pair would be made under var/tls of the working directory.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        path = self.write(f'[admin]\ntoken_file = {json.dumps(os.path.join(self.directory, "t"))}\n'
                          '[smtp]\ncreate_certificate = true\n')
        before = sorted(os.listdir(self.directory))
        status, out, err = self.run_check(path)
        self.assertEqual((status, out, err), (0, f"{path}: configuration OK\n", ""))
        # The first start would make the link keys, the admin token and a certificate; a check does not.
        self.assertEqual(sorted(os.listdir(self.directory)), before)

    def test_every_problem_is_listed_by_key_path(self) -> None:
        blocker = os.path.join(self.directory, "a-file")
        with open(blocker, "w") as f:
            f.write("not a directory\n")
        missing = os.path.join(self.directory, "missing")
        path = self.write(
            "[admin]\n"
            f'token_file = {json.dumps(os.path.join(blocker, "admin.token"))}\n'
            "bogus = 1\n"
            "[smtp]\n"
            f'users_file = {json.dumps(os.path.join(missing, "users"))}\n'
            f'tls_certificate = {json.dumps(os.path.join(missing, "cert.pem"))}\n'
            f'tls_key = {json.dumps(os.path.join(missing, "key.pem"))}\n'
            "[dkim]\n"
            'domain = "example.com"\nselector = "s1"\n'
            f'key_file = {json.dumps(os.path.join(missing, "dkim.pem"))}\n',
            directory=blocker, tracker="tcp:notaport")
        status, out, err = self.run_check(path)
        self.assertEqual((status, out), (1, ""))
        lines = err.splitlines()
        self.assertTrue(lines[0].endswith(f" configuration error(s) in {path}:"), lines[0])
        keys = [line.strip().split(":", 1)[0] for line in lines[1:]]
        self.assertIn("tracker.endpoint: 'tcp:notaport:interface=127.0.0.1': invalid literal for int()", err)
        for key in ("admin.bogus", "tracker.endpoint", "spool.directory", "events.log_file",
                    "smtp.tls_certificate", "dkim.key_file", "smtp.users_file", "links.keys_file",
                    "admin.token_file"):
            self.assertIn(key, keys, err)
        self.assertIn(f"admin.token_file: {blocker}/admin.token cannot be created: {blocker} is not a "
                      "directory", err)
        self.assertEqual(int(lines[0].split()[0]), len(lines) - 1)
        self.assertEqual(sorted(os.listdir(self.directory)), ["a-file", "appliance.toml"])

    def test_a_file_that_is_not_toml(self) -> None:
        path = os.path.join(self.directory, "appliance.toml")
        with open(path, "w") as f:
            f.write("[node\n")
        status, _, err = self.run_check(path)
        self.assertEqual(status, 1)
        self.assertIn("not valid TOML", err)

    def test_help(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            console.main(["check", "--help"])
        self.assertEqual(caught.exception.code, 0)
        self.assertIn("--config", out.getvalue())
