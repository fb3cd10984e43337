"""The atomic private-file writer behind the key, certificate and users commands."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from appliance.files import write_atomically


class WriteAtomicallyTests(SynchronousTestCase):
    def test_creates_directories_with_mode_and_replaces(self) -> None:
        path = os.path.join(self.mktemp(), "deep", "secret")
        write_atomically(path, b"one", 0o600)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        write_atomically(path, b"two", 0o600)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"two")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["secret"])

    def test_failure_keeps_old_file_and_leaves_no_temporary(self) -> None:
        path = os.path.join(self.mktemp(), "secret")
        write_atomically(path, b"old", 0o600)
        self.assertRaises(TypeError, write_atomically, path, "not bytes", 0o600)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["secret"])
