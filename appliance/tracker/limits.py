"""
What keeps the tracker answering when it faces the open internet.

The tracker is the one listener every stranger may reach, so nothing a
client does may hold resources without bound: connections are counted in
total and per address, the whole request must arrive within a deadline that
trickled bytes do not extend, a kept-alive connection serves a bounded number
of requests, repeated hits of one link from one address stop writing events,
and client-supplied text is cut before it reaches the event log.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.logger import Logger
from twisted.web import http

from appliance.config import TrackerLimits

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

USER_AGENT_CAP = 512
OTHER_CAP = 256
# The most of a request body kept (a one-click unsubscribe's is 26 bytes); the rest is
# read and dropped, and the request is answered 413.
MAX_BODY_BYTES = 16 * 1024


# The ``[tracker]`` limits; the defaults are the shipped ones.
Limits = TrackerLimits

DEFAULT_LIMITS = Limits()


# -- repeated hits ----------------------------------------------------------------------


class HitLimiter:
    """
    Allows ``limit`` event writes per address and link in each ``window``.

    The key is address and token together, so a proxy that fetches many
    different links from one address is never held back. Windows are fixed
    and start with the first hit after the last one ended; at most
    ``capacity`` keys are kept, the oldest dropped first (a dropped key only
    lets a few more events through). Keys are hashes, so a key costs the
    same whatever the token's length.
    """

    def __init__(self, limit: int, window: float, capacity: int,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self._now = now
        self._start = float("-inf")
        self._counts: dict[int, int] = {}
        self.suppressed = 0

    def allow(self, address: str, token: bytes) -> bool:
        """Whether this hit's events are written; a refused hit is counted in ``suppressed``."""
        now = self._now()
        if now >= self._start + self.window:
            self._counts.clear()
            self._start = now
        key = hash((address, token))
        seen = self._counts.get(key, 0)
        if seen >= self.limit:
            self.suppressed += 1
            return False
        if not seen and len(self._counts) >= self.capacity:
            del self._counts[next(iter(self._counts))]
        self._counts[key] = seen + 1
        return True

    def __len__(self) -> int:
        return len(self._counts)


# -- connections --------------------------------------------------------------------------


def _host(addr: IAddress | None) -> str:
    host = getattr(addr, "host", "")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ConnectionCount:
    """
    Open tracker connections, in total and per peer address.

    A peer in ``exempt`` (a trusted reverse proxy, which carries many
    clients on its connections) counts only towards the total. When the
    total is reached, the connection that has waited longest for a request
    is closed to make room: a client that sends its request at once is then
    served while slow or idle connections fill the table, and the open
    files stay bounded all the same. Only when no connection is waiting
    (all are being answered) is the new one refused.
    """

    def __init__(self, limits: Limits, exempt: Sequence[Network] = ()) -> None:
        self.limits = limits
        self.exempt = tuple(exempt)
        self.total = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0
        # Connections waiting for a request, oldest first, each with what closes it.
        self._waiting: dict[object, Callable[[], None]] = {}

    def waiting(self, channel: object, close: Callable[[], None]) -> None:
        """``channel`` now waits for a request; ``close`` releases it at once and drops it."""
        self._waiting.pop(channel, None)
        self._waiting[channel] = close

    def not_waiting(self, channel: object) -> None:
        self._waiting.pop(channel, None)

    def _exempt(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.exempt)

    def acquire(self, addr: IAddress | None) -> str | None:
        """The key to release later, or ``None`` when the connection is over a limit."""
        host = _host(addr)
        exempt = self._exempt(host)
        if not exempt and self.by_address.get(host, 0) >= self.limits.max_connections_per_address:
            self.refused += 1
            return None
        if self.total >= self.limits.max_connections:
            if not self._waiting:
                self.refused += 1
                return None
            oldest = next(iter(self._waiting))
            self._waiting.pop(oldest)()
            self.evicted += 1
        if not exempt:
            self.by_address[host] = self.by_address.get(host, 0) + 1
        self.total += 1
        return host

    def release(self, host: str) -> None:
        self.total -= 1
        left = self.by_address.get(host, 0) - 1
        if left > 0:
            self.by_address[host] = left
        else:
            self.by_address.pop(host, None)


class GuardedChannel(http.HTTPChannel):
    """
    An ``HTTPChannel`` whose request must arrive whole within ``header_timeout``.

    Twisted's own idle timer restarts on every byte, so a client sending one
    byte at a time holds a connection for ever. Here a second timer starts
    when the connection opens and again when a response is done, and only a
    request that has arrived completely (head and body) stops it. The idle
    timer remains, set to ``keepalive_timeout``. The channel also closes the
    connection after ``max_requests_per_connection`` responses.
    """

    limits: Limits
    connections: ConnectionCount
    release: Callable[[], None] | None = None
    _deadline: IDelayedCall | None = None
    _served = 0
    _lost = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self, evictable: bool = True) -> None:
        """
        Start the deadline for the next request; ``evictable``, the connection waits for one.

        A connection closing after its answer is not evictable: the answer may
        still be in the transport's buffer, and an eviction (an abort) would
        throw it away. Its deadline still cuts off a peer that never lets the
        close finish.
        """
        self._disarm()
        if self._lost:
            return
        self._deadline = self.callLater(self.limits.header_timeout, self._too_slow)
        if evictable:
            self.connections.waiting(self, self._evict)

    def _rearm(self) -> None:
        """As ``_arm``, after an answer given at once: the running deadline is moved, not replaced."""
        deadline = self._deadline
        if deadline is None or not deadline.active():
            self._arm()
            return
        deadline.reset(self.limits.header_timeout)
        self.connections.waiting(self, self._evict)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.connections.not_waiting(self)

    def _too_slow(self) -> None:
        self._deadline = None
        self.connections.not_waiting(self)
        self.transport.abortConnection()

    def _evict(self) -> None:
        """Closed to make room: its place is given up now, before the transport says it is gone."""
        self._disarm()
        self._release()
        self.transport.abortConnection()

    def _release(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        self._served += 1
        persistent: bool = super().checkPersistence(request, version)
        if persistent and self._served >= self.limits.max_requests_per_connection:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return persistent

    def requestDone(self, request: Any) -> None:
        # Before the next pipelined request, which disarms it; and when the connection is
        # closing, so that a peer that never lets the close finish (a TLS one ignoring
        # close_notify) is cut off at the deadline instead of holding its place for ever.
        self._arm(evictable=bool(self.persistent))
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._lost = True  # an answer finished after this must not wait again
        self._disarm()
        self._release()
        super().connectionLost(reason)
