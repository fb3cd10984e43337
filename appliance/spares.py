"""
Spare files: empty files made ahead in the spool's ``incoming/`` for the next transactions.

Creating a message's file was a file-pool call of its own for every
message, made as DATA began so that the commit would not wait for it, and
under load it could still be late for the final dot. ``SpareFiles`` keeps a
few ready, made in one file-pool call whenever half of them are taken; a
transaction takes one with no call at all. A spare has a name the spool
never gives an entry (``SPARE_PREFIX``). Its name is made durable before it
is handed out, so a message committed into it is on disk under that name
until its link into ``active/`` is; a start links such a message into
``active/`` if the link is missing, and removes every other spare
(``appliance.spool``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.files import create_new, fsync_directory

if TYPE_CHECKING:
    from appliance.reactors import Runner

log = Logger()

# The names of the spare files in incoming/; no transmission_id starts so.
SPARE_PREFIX = "spare-"
# How many the appliance keeps: more than the transactions that usually reach DATA between
# two batches; each is an open descriptor and an empty file.
SPARE_FILES = 8
PAUSE = 10.0  # seconds without spares after a batch could not be made

Spare = tuple[str, int]  # a spare file's path and its open descriptor


def is_spare(name: str) -> bool:
    """Whether a name in ``incoming/`` is a spare file's."""
    return name.startswith(SPARE_PREFIX)


def without_spares(names: list[str]) -> list[str]:
    """The names of a listing of ``incoming/`` that are not spare files."""
    return [name for name in names if not is_spare(name)]


class SpareFiles:
    """
    Up to ``count`` spare files in ``directory``, made in ``run`` (the file pool).

    Used on the reactor thread; only the making and the closing run in the pool.
    """

    def __init__(self, directory: str, run: Runner, count: int = 0) -> None:
        self.directory = directory
        self.run = run
        self.wanted = count
        self.count = count  # 0 once closed, until reopened
        self._ready: collections.deque[Spare] = collections.deque()
        self._making = False
        self._paused_until = 0.0  # after a batch failed: none is tried before
        self._run_token = secrets.token_hex(4)  # names never meet a file from another run
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> Spare | None:
        """A spare file, or ``None`` if none is ready."""
        return self._ready.popleft() if self._ready else None

    def top_up(self) -> None:
        """Fill up, in one file-pool call, once half or fewer are left."""
        if (not self.count or len(self._ready) > self.count // 2 or self._making
                or time.monotonic() < self._paused_until):
            return
        self._making = True
        names = [f"{SPARE_PREFIX}{self._run_token}-{next(self._numbers)}"
                 for _ in range(self.count - len(self._ready))]
        d = self.run(_create, self.directory, names)
        d.addCallbacks(self._made, self._failed)
        d.addBoth(self._ended)

    def drop(self) -> defer.Deferred:
        """Close and remove the spares made so far, in the file pool; more are made as needed."""
        spares, self._ready = list(self._ready), collections.deque()
        if not spares:
            return defer.succeed(None)
        return self.run(_drop, spares).addErrback(
            lambda f: log.failure("could not remove spare spool files", f))

    def close(self) -> defer.Deferred:
        """Close and remove the spares (on stop); none is made after, until ``reopen``."""
        self.count = 0
        return self.drop()

    def reopen(self) -> None:
        """Make spares again (a start)."""
        self.count = self.wanted

    def _made(self, made: list[Spare]) -> None:
        if not self.count:  # closed meanwhile: not used, and not left open
            _drop(made)
        else:
            self._ready.extend(made)

    def _failed(self, failure: Failure) -> None:
        # Tried again after a pause, not at every DATA: a full disk logs once in a while.
        self._paused_until = time.monotonic() + PAUSE
        log.failure("could not make spare spool files; each message's file is created as it "
                    "comes, and spares are tried again in {pause} s", failure, pause=PAUSE)

    def _ended(self, _: Any) -> None:
        self._making = False


def _create(directory: str, names: list[str]) -> list[Spare]:
    """
    New, empty files in ``directory``, with their descriptors; as many as could be made.

    Their names are on disk before any is handed out: a message committed
    into a spare is acknowledged once its file is, before its link into
    ``active/`` is made durable (``appliance.spool``).
    """
    made: list[Spare] = []
    try:
        for name in names:
            path = os.path.join(directory, name)
            made.append((path, create_new(path)))
    except OSError:
        if not made:
            raise
    try:
        fsync_directory(directory)
    except OSError:
        _drop(made)
        raise
    return made


def _drop(spares: list[Spare]) -> None:
    for path, fd in spares:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
