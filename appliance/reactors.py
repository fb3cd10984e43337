"""
The reactor as the appliance's parts see it.

``tap.py`` picks the global reactor; everything below it is handed one, so a
test can hand a ``MemoryReactorClock`` instead and drive time, connections
and listeners without sockets. Twisted describes a reactor as several
interfaces; ``Reactor`` is the intersection of those the appliance uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.python.threadpool import ThreadPool


class Reactor(Protocol):
    """
    ``IReactorTime``, ``IReactorTCP``, ``IReactorSSL``, ``IReactorUDP`` (DNS),
    ``IReactorThreads`` and ``IReactorFromThreads``.
    """

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> IDelayedCall: ...

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any: ...

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any: ...

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> Any: ...

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any: ...

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...

    def getThreadPool(self) -> ThreadPool: ...


Runner = Callable[..., defer.Deferred]


def thread_runner(reactor: Reactor, pool: ThreadPool | None = None) -> Runner:
    """
    Runs blocking calls in ``pool``, by default ``reactor``'s thread pool.

    The appliance runs its own calls in ``appliance.workers`` pools (CPU,
    files and passwords apart); this is for tools and tests that want
    Twisted's pool.
    """

    def run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, pool or reactor.getThreadPool(), f, *args, **kwargs)

    return run
