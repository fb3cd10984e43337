"""
A helper process: reads jobs on its stdin, answers on its stdout, until stdin closes.

Started by ``appliance.helpers.pool`` as ``python -m appliance.helpers.child
OWNER_PID``. It touches no file: what it needs comes over the pipe (its
``KitSettings`` first, then jobs). It ends when its owner does, even in the
middle of a job: on Linux the kernel kills it when the owner dies
(``PR_SET_PDEATHSIG``); elsewhere it sees its stdin close at the next read.
SIGINT and SIGHUP are its owner's to handle: a terminal's ^C or a reload
signal sent to the whole process group must not end helpers under it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from typing import BinaryIO

from appliance.helpers.frames import FrameReader, frame

PR_SET_PDEATHSIG = 1


def _die_with(owner: int) -> None:
    """Be killed when the owner ends, however it ends (``kill -9`` included)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # stdin's end still stops it, after the job at hand
    if os.getppid() != owner:  # the owner ended before the line above took effect
        os._exit(0)


def serve(jobs: int, answers: BinaryIO) -> None:
    """Answer each job in turn until ``jobs`` ends."""
    # Imported here, once the owner's death is watched: these imports take a while.
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from appliance.copywork import Kit

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    reader = FrameReader()
    kit: Kit | None = None
    while True:
        data = os.read(jobs, 1 << 20)
        if not data:
            return
        for message in reader.feed(data):
            kind = message[0]
            if kind == "settings":
                kit = Kit(message[1])
                continue
            if kind == "link_keys":
                assert kit is not None
                kit.use_link_keys(message[1])
                continue
            number, name, args = message[1], message[2], message[3]
            try:
                assert kit is not None, "a job before the settings"
                answer = (number, True, kit.run(name, args))
            except Exception as e:
                answer = (number, False, (type(e).__name__, str(e), traceback.format_exc()))
            answers.write(frame(answer))
            answers.flush()


def main() -> None:
    _die_with(int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to the log, never into the answers
    serve(0, answers)


if __name__ == "__main__":
    main()
