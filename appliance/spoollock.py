"""
One appliance per spool: an exclusive ``flock`` held for as long as the process runs.

Two appliances on one spool would each recover every queued copy and deliver
it, so a second start must fail before it opens a port or moves a message.
The lock is on ``lock`` in the spool directory, taken in the process that
runs (twistd forks before ``privilegedStartService``, and the pid written
into the file must be the daemon's), and the kernel drops it when the
process ends, however it ends: a ``kill -9`` leaves no stale lock behind,
only a stale pid in the file, which the next holder overwrites.

``flock`` locks belong to an open file description, so two appliances in one
process conflict too, as two processes do.
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_NAME = "lock"


class SpoolLocked(Exception):
    """Another process holds the spool; the message names the spool and that process."""


class SpoolLock:
    """The exclusive lock on a spool directory; ``acquire`` raises ``SpoolLocked`` when taken."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write this process's pid in the file; at once, never waiting."""
        if self._fd is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        # Not truncated on open: until the lock is ours the pid in it is the holder's.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            who = f"process {holder}" if holder else "another process"
            # Short and the process first: a daemonizing twistd shows only 100 bytes of it.
            raise SpoolLocked(f"the spool is in use by {who}: {self.directory} "
                              "(is the appliance already running?)") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock up; the file stays (removing it would race the next start's open)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
