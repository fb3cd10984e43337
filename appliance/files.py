"""
Small file-system helpers shared by everything that writes the appliance's own files.

The spool, the webhook queues and the key files all make data durable the
same way: the file's bytes, then its directory entry. These are the one copy
of those steps.
"""

from __future__ import annotations

import os
import shutil


def create_new(path: str) -> int:
    """A new, empty file at ``path``, which must not exist yet, readable by its owner only."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


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


def remove_path(path: str) -> None:
    """Remove a file or a directory tree; gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
