"""
SIGHUP for every part that re-reads something on it, through one handler.

Python keeps one handler per signal, so each part that installed its own
would have to chain to the one before and give it back in the right order.
``SighupService`` installs a single handler that runs every registered
callback on the reactor thread (a signal can interrupt any line, so nothing
is done inside the handler itself) and then calls the handler it replaced,
so a handler installed before it (another library's, or an ``EventLog``
used on its own with ``sighup=``) keeps working. In the appliance the event
log's reopen is one of its callbacks. Stopped, it gives the replaced
handler back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

log = Logger()

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SighupService(Service):
    """Runs each callback given to ``add`` on the reactor thread when SIGHUP arrives."""

    def __init__(self, reactor: IReactorThreads) -> None:
        self._reactor = reactor
        self._callbacks: list[Callable[[], object]] = []
        self._previous: _Handler = None
        self._installed = False

    def add(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def install(self) -> None:
        """
        Take SIGHUP now (once): under twistd, ``Appliance.privilegedStartService`` calls this
        before the first port opens, so a SIGHUP sent to a process that already listens
        but whose reactor does not run yet is queued for it, never the default action
        (which ends the process). Callbacks run once the reactor runs.
        """
        if not self._installed and hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._handle)
            self._installed = True

    def startService(self) -> None:
        self.install()
        super().startService()

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
            self._previous = None
        return super().stopService()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._run)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def _run(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.failure("a SIGHUP callback failed")
