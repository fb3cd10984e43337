"""
One message being received into the spool, until it is committed or dropped.

``SpoolWriter`` holds the text in memory (or spills it to the entry's file
past ``SPILL_AT``), and commits it in the file pool: the text and its
envelope in one file, fsynced, and named in ``active/`` before the ``250``.
How a name is made durable, and what recovery does with a commit cut short,
is ``appliance.spool``'s story (its module docstring).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import zlib
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from appliance.envelope import CopyState, Envelope, QueuedMessage
from appliance.files import create_new as _create_new
from appliance.files import remove_path as _remove_path

if TYPE_CHECKING:
    from appliance.spares import Spare
    from appliance.spool import Spool

log = Logger()


# Message text is kept in memory up to this size and only written out by the commit, in a
# worker thread: on the reactor thread an open can wait tens of milliseconds behind other
# messages' fsyncs. A larger message spills to its file as it comes.
SPILL_AT = 1024 * 1024


class SpoolWriter:
    """
    Receives one message's bytes during DATA, then commits or aborts.

    The entry's file is made before the commit needs it: creating a file is the
    slowest of the commit's steps after the fsyncs, and the client waits on
    every one. It is one of the spool's spare files (``appliance.spares``) when
    one is ready, else it is created in the file pool as DATA begins
    (``create_early``). Whichever comes first, that job, a spill to disk or
    the commit, creates it; ``_lock`` keeps the others from trying again.
    """

    def __init__(self, spool: Spool, transmission_id: str, spare: Spare | None = None) -> None:
        """``spare``: an empty file in ``incoming/`` made ahead, and its descriptor, to write to."""
        spool.check_usable()
        self.spool = spool
        self.transmission_id = transmission_id
        self.path = spare[0] if spare is not None else os.path.join(spool.incoming, transmission_id)
        # A spare's name in incoming/ is on disk already (``appliance.spares``): once its file
        # is, the message is, and active/'s fsync after its link there need not be waited for.
        self._spare = spare is not None
        self._file: Any = None  # the text went to disk: it outgrew memory
        # The file, made ahead (a spare) or created early, and not yet taken.
        self._fd: int | None = spare[1] if spare is not None else None
        # Taken by a spill or the commit, or given up by an abort: nothing creates it after.
        self._claimed = False
        self._lock = threading.Lock()  # over _fd and _claimed: pool threads and the reactor
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0
        self.finished = False

    def create_early(self) -> None:
        """Have the file created in the file pool now, before the commit needs it."""
        # A failure is left for the commit, which creates the file itself and fails there.
        self.spool.run(self._create).addErrback(lambda _: None)

    def _create(self) -> None:
        # Under the lock, so an abort or a spill never misses a file being created.
        with self._lock:
            if self._fd is None and not self._claimed:
                self._fd = _create_new(self.path)

    def _take_fd(self) -> int:
        """The file's descriptor, created now unless it was already; the caller closes it."""
        with self._lock:
            fd, self._fd, self._claimed = self._fd, None, True
        return fd if fd is not None else _create_new(self.path)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > SPILL_AT:
            self._open()

    def _open(self) -> None:
        """Write out what memory holds to the entry's file, and what comes next after it."""
        self._file = os.fdopen(self._take_fd(), "wb")
        self._file.write(b"".join(self._pending))
        self._pending, self._pending_size = [], 0

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Make the message durable; fires with its ``QueuedMessage`` once it is on disk."""
        assert envelope.transmission_id == self.transmission_id
        self.finished = True
        d = self.spool.run(self._commit, envelope)
        d.addCallbacks(self.spool.committed, self._failed)
        return d

    def _commit(self, envelope: Envelope) -> QueuedMessage:
        # One file, one fsync: the envelope follows the message, so neither can be on disk
        # without the other. The file's name is made durable by active/'s fsync after the
        # rename; or, for a spare, it was before the spare was handed out. Then the message
        # is on disk once the file is, under that name: its entry in active/ is a second
        # name (a link), and the spare's goes once an fsync of active/ has covered that
        # one (``Spool._drop_spare_names``). The checksum tells recovery whether a spare
        # it finds with no entry in active/ was written whole.
        text = None
        in_place = False
        if self._file is None:
            text = b"".join(self._pending)  # kept: the message is prepared from it next
            self._pending, self._pending_size = [], 0
            fd = self._take_fd()
            try:
                written = _identity(fd)
            except OSError:
                os.close(fd)
                raise
            if self._spare:
                envelope.text_crc32 = zlib.crc32(text)
                in_place = True
            _write_synced(fd, text, envelope.trailer())
        else:
            self._file.write(envelope.trailer())
            self._file.flush()
            os.fsync(self._file.fileno())
            written = _identity(self._file.fileno())
            self._file.close()
        # The file is renamed by its name, written through its descriptor: were incoming/
        # replaced meanwhile (removed, or swapped for a copy), the name would be another
        # file's, or none, and an empty entry could be acknowledged.
        if _identity(self.path) != written:  # FileNotFoundError if it is gone
            raise OSError(errno.ESTALE, f"{self.path} is no longer the file the message was written to")
        final = os.path.join(self.spool.active, self.transmission_id)
        if in_place:
            os.link(self.path, final)
        else:
            os.rename(self.path, final)
            # Shared with every entry renamed before it began; nothing is answered before it.
            self.spool.active_sync.sync()
        states = [CopyState() for _ in envelope.recipients]
        return QueuedMessage(envelope, final, states, message_end=self.size,
                             journal=os.path.join(self.spool.journal, self.transmission_id),
                             text=text, journal_written=False, spare=self.path if in_place else None)

    def _failed(self, failure: Any) -> Any:
        self.spool.commit_failed()
        self._discard()
        return failure

    def abort(self) -> None:
        """
        Forget a message that will not be acknowledged (client went away, refused).

        Its file is closed and removed in the file pool: the early creation may
        hold the lock while the disk is slow, and the reactor must not wait for it.
        """
        if not self.finished:
            self.finished = True
            self._pending = []
            self.spool.run(self._discard).addErrback(
                lambda f: log.failure("could not remove the aborted spool entry {path}", f,
                                      path=self.path))

    def _discard(self) -> None:
        self._pending = []
        with self._lock:  # a creation under way in the pool ends first, and none starts after
            fd, self._fd, self._claimed = self._fd, None, True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove_path(self.path)


def _identity(file: int | str) -> tuple[int, int]:
    """Which file a descriptor or a path is: its device and inode."""
    st = os.fstat(file) if isinstance(file, int) else os.stat(file)
    return st.st_dev, st.st_ino


def _write_synced(fd: int, *chunks: bytes) -> None:
    """Write ``chunks`` to the new, empty file ``fd``, have them on disk, and close it."""
    try:
        data = memoryview(b"".join(chunks))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
