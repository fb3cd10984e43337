"""The users file, its scrypt hashes, the cred checker and the engage-appliance-users command."""

from __future__ import annotations

import io
import os
import sys

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase

from appliance import users
from appliance.spool import run_synchronously


class HashTests(SynchronousTestCase):
    def test_round_trip_and_salt(self) -> None:
        a, b = users.hash_password(b"pw", cost=10), users.hash_password(b"pw", cost=10)
        self.assertNotEqual(a, b)  # salted
        self.assertRegex(a, r"^\$scrypt\$ln=10,r=8,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")
        parsed = users.ScryptHash.parse(a)
        self.assertTrue(parsed.verify(b"pw"))
        self.assertFalse(parsed.verify(b"pw "))
        self.assertEqual(parsed.encode(), a)

    def test_default_cost_is_slow(self) -> None:
        self.assertGreaterEqual(users.DEFAULT_COST, 15)  # N = 32768: 32 MiB per check

    def test_bad_files_name_the_line(self) -> None:
        good = users.hash_password(b"x", cost=10)
        cases = {
            "alice\n": "line 1: expected name:hash",
            f"# c\n\nal ice:{good}\n": "line 3: not a valid user name",
            "alice:$scrypt$ln=30,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA\n": "line 1: scrypt parameters",
            "alice:$2b$12$bcrypt\n": "line 1: expected a hash like",
            f"alice:{good}\nalice:{good}\n": "line 2: user 'alice' appears twice",
        }
        for text, message in cases.items():
            e = self.assertRaises(ValueError, users.parse_users, text)
            self.assertIn(message, str(e), text)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        users.set_user(self.path, "alice", b"secret", cost=10)
        self.checker = users.UsersFileChecker(self.path, run=run_synchronously)

    def login(self, name: str, password: str) -> object:
        d = self.checker.requestAvatarId(UsernamePassword(name.encode(), password.encode()))
        return d

    def test_right_wrong_unknown(self) -> None:
        self.assertEqual(self.successResultOf(self.login("alice", "secret")), "alice")
        self.failureResultOf(self.login("alice", "Secret"), UnauthorizedLogin)
        self.failureResultOf(self.login("bob", "secret"), UnauthorizedLogin)

    def test_changes_picked_up_and_broken_file_keeps_users(self) -> None:
        users.set_user(self.path, "bob", b"pw", cost=10)
        self.assertEqual(self.successResultOf(self.login("bob", "pw")), "bob")
        users.set_user(self.path, "alice", b"new", cost=10)
        self.failureResultOf(self.login("alice", "secret"), UnauthorizedLogin)
        with open(self.path, "a") as f:
            f.write("garbage line\n")
        self.assertEqual(self.successResultOf(self.login("alice", "new")), "alice")
        self.assertEqual(len(self.flushLoggedErrors()), 0)  # logged as an error line, not a failure
        os.unlink(self.path)
        self.assertEqual(self.successResultOf(self.login("bob", "pw")), "bob")


class CommandTests(SynchronousTestCase):
    def run_command(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return users.main(list(argv)), out.getvalue(), err.getvalue()

    def test_add_list_change_remove(self) -> None:
        path = os.path.join(self.mktemp(), "users")
        rc, out, _ = self.run_command("--file", path, "add", "alice", "--password-stdin", "--cost", "10",
                                      stdin="s3cret\n")
        self.assertEqual((rc, out), (0, f"added alice in {path}\n"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertTrue(users.read_users(path)["alice"].verify(b"s3cret"))
        rc, out, _ = self.run_command("--file", path, "add", "alice", "--password-stdin", "--cost", "10",
                                      stdin="other\n")
        self.assertIn("changed the password of alice", out)
        self.assertTrue(users.read_users(path)["alice"].verify(b"other"))
        self.assertEqual(self.run_command("--file", path, "list")[:2], (0, "alice\n"))
        self.assertEqual(self.run_command("--file", path, "remove", "alice")[0], 0)
        self.assertEqual(users.read_users(path), {})
        rc, _, err = self.run_command("--file", path, "remove", "alice")
        self.assertEqual((rc, err), (1, "engage-appliance-users: no user 'alice'\n"))

    def test_refusals(self) -> None:
        path = self.mktemp()
        rc, _, err = self.run_command("--file", path, "add", "a:b", "--password-stdin", stdin="x\n")
        self.assertEqual(rc, 1)
        self.assertIn("not a valid user name", err)
        rc, _, err = self.run_command("--file", path, "add", "alice", "--password-stdin", stdin="\n")
        self.assertEqual((rc, err), (1, "engage-appliance-users: empty password\n"))
        self.assertFalse(os.path.exists(path))
