"""
Connection limits and the shutdown drain of the injection server.

A stop must not cut off a client whose message is on its way to the spool,
nor leave clients waiting on a server that will not answer: ``SessionDrain``
lets every message received whole get its decision and reply, tells every
session ``421``, and cuts off what is left after a grace period.
``ConnectionLimits`` knows the sessions of all listeners, so a stop can close
them; each listener counts its own connections in a ``ConnectionBudget``, so a
public listener that is full never keeps a trusted one from taking mail.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime, ITCPTransport
from twisted.logger import Logger

if TYPE_CHECKING:
    from appliance.injection import Injector

log = Logger()


class DrainableSession(Protocol):
    """What a stop needs of a session: to be told, and, when time is up, to be cut off."""

    transport: ITCPTransport | None

    def shut_down(self) -> None: ...


class ConnectionBudget:
    """
    One listener's open connections, in total and per client address.

    Each listener has its own, so that clients filling a public listener
    cannot take the places of the trusted ones.
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self.by_client: dict[str, int] = {}

    def acquire(self, client: str) -> bytes | None:
        """Count one more connection, or say why not."""
        if self.open >= self.total:
            return b"4.7.0 Too many connections, try again later"
        if self.by_client.get(client, 0) >= self.per_client:
            return b"4.7.0 Too many connections from your address, try again later"
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


class ConnectionLimits:
    """
    The open injection sessions of all listeners, each counted in its listener's budget.

    It knows the sessions themselves, so that a stop can close them all.
    """

    def __init__(self) -> None:
        self.open = 0
        self.sessions: set[DrainableSession] = set()
        self._closed_waiters: list[defer.Deferred] = []

    def session_opened(self, session: DrainableSession) -> None:
        self.sessions.add(session)

    def session_closed(self, session: DrainableSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def shut_down(self) -> defer.Deferred:
        """Tell every session that the appliance is stopping; fires once all have closed."""
        for session in list(self.sessions):
            session.shut_down()
        if not self.sessions:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def abort_all(self) -> None:
        """Cut every session off, for a stop that has waited long enough."""
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abortConnection()

    @staticmethod
    def client_of(addr: IAddress) -> str:
        host = getattr(addr, "host", "")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return str(host)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return str(ip)

    def acquire(self, client: str, budget: ConnectionBudget) -> bytes | None:
        """Count one more connection in ``budget`` (its listener's), or say why not."""
        refusal = budget.acquire(client)
        if refusal is None:
            self.open += 1
        return refusal

    def release(self, client: str, budget: ConnectionBudget) -> None:
        self.open -= 1
        budget.release(client)


class SessionDrain(Service):
    """
    The step of a stop between the listeners and delivery: lets every message
    received whole get its decision, events and reply, and closes every session.

    Sessions with nothing in flight are told ``421 4.3.2`` at once, so clients
    do not wait on a server that will not answer; a message half received is
    dropped (nothing of it was acknowledged). After ``stop_grace`` seconds
    whatever is left is logged and cut off: a message not yet committed is then
    not kept, since its client never hears a ``250``.
    """

    name = "smtp-drain"
    stop_grace = 10.0

    def __init__(self, sessions: ConnectionLimits, injector: Injector, clock: IReactorTime) -> None:
        self.sessions = sessions
        self.injector = injector
        self.clock = clock

    def stopService(self) -> defer.Deferred:
        super().stopService()
        done = defer.DeferredList([self.sessions.shut_down(), self.injector.idle()])
        stopped: defer.Deferred = defer.Deferred()

        def cut_off() -> None:
            left = sorted(t.transmission_id for t in self.injector.in_flight)
            if left:
                log.warn("stopping: {n} message(s) still being decided after {grace} s, cut off "
                         "(kept only if already committed): {ids}",
                         n=len(left), grace=self.stop_grace, ids=", ".join(left))
            if self.sessions.sessions:
                log.warn("stopping: {n} injection session(s) still open after {grace} s, cut off",
                         n=len(self.sessions.sessions), grace=self.stop_grace)
            self.sessions.abort_all()
            stopped.callback(None)

        timer = self.clock.callLater(self.stop_grace, cut_off)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
                stopped.callback(None)

        done.addBoth(finished)
        return stopped
