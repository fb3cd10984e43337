"""
Small file-system helpers shared by everything that writes the appliance's own files.

The spool, the webhook queues and the key files all make data durable the
same way: the file's bytes, then its directory entry. These are the one copy
of those steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure


def fsync_and_close(fd: int) -> None:
    """Flush ``fd`` to disk and close it, closing it even when the flush fails."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """Flush a file that is already written and closed (or written through another descriptor)."""
    fsync_and_close(os.open(path, os.O_RDONLY))


def fsync_directory(path: str) -> None:
    """Flush a directory, so that entries created, renamed or removed in it survive a power loss."""
    fsync_and_close(os.open(path, os.O_RDONLY | os.O_DIRECTORY))


def write_synced(path: str, data: bytes, mode: int = 0o666) -> None:
    """Create or truncate ``path`` (``mode`` as ``open`` takes it) and have ``data`` on disk on return."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace ``path`` with ``data`` so that a reader sees the old file or the new, never half.

    The new file is written beside the old one with ``mode`` from the start (a
    key is never readable by others, even for a moment), fsynced, renamed over
    the old one, and the directory fsynced so the rename survives a crash.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


class DirectorySync:
    """
    Group commit for one directory: one fsync covers every entry changed in it before it began.

    Called on the reactor thread once a create or rename in ``path`` has
    returned, ``sync()`` fires after an fsync of ``path`` that began after
    the call has finished, and never before. Callers arriving while one runs
    share the next, so concurrent transactions pay for one directory fsync,
    not one each. ``run`` runs the fsync (in a thread in the appliance).
    """

    def __init__(self, path: str, run: Callable[..., Deferred],
                 fsync: Callable[[str], None] = fsync_directory) -> None:
        self.path = path
        self.run = run
        self.fsync = fsync
        self._running = False
        self._next: list[Deferred] = []

    def sync(self) -> Deferred:
        d: Deferred = Deferred()
        self._next.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        waiters, self._next = self._next, []
        self._running = True
        maybeDeferred(self.run, self.fsync, self.path).addBoth(self._done, waiters)

    def _done(self, result: object, waiters: list[Deferred]) -> None:
        self._running = False
        if self._next:
            self._start()
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
