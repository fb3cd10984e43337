"""The atomic private-file writer behind the key, certificate and users commands."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from appliance.files import fsync_and_close, fsync_directory, fsync_path, write_atomically, write_synced


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FsyncTests(SynchronousTestCase):
    def record_fsyncs(self) -> list[str]:
        """The paths fsynced from now on, in order (Linux: read back through /proc)."""
        calls: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            calls.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        self.patch(os, "fsync", fsync)
        return calls

    def test_path_and_directory(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        path = os.path.join(directory, "f")
        with open(path, "wb") as f:
            f.write(b"x")
        calls = self.record_fsyncs()
        fsync_path(path)
        fsync_directory(directory)
        self.assertEqual(calls, [path, directory])
        self.assertRaises(NotADirectoryError, fsync_directory, path)

    def test_write_synced_replaces_the_content_and_syncs_it(self) -> None:
        path = os.path.abspath(self.mktemp())
        write_synced(path, b"a longer first text", 0o640)
        calls = self.record_fsyncs()
        write_synced(path, b"second", 0o600)
        self.assertEqual(calls, [path])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"second")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640 & ~_umask())  # an existing file keeps its mode

    def test_fsync_and_close_closes_even_when_the_fsync_fails(self) -> None:
        fd = os.open(os.path.abspath(self.mktemp()), os.O_WRONLY | os.O_CREAT, 0o600)

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.patch(os, "fsync", failing)
        self.assertRaises(OSError, fsync_and_close, fd)
        self.assertRaises(OSError, os.fstat, fd)  # closed
