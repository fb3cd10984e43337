"""Small file-system helpers shared by the commands that write the appliance's own files."""

from __future__ import annotations

import os


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
