"""
The listener side of the injection server: one factory per configured listener.

It enforces the connection limits before a session exists (a refused client
is told ``421`` by a protocol that does nothing else), gives each session the
listener's settings and timeouts, and wraps the listener in TLS from the
first byte for ``tls = "implicit"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import protocol
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from appliance.config import ListenerConfig, SmtpConfig
from appliance.smtp.drain import ConnectionBudget, ConnectionLimits
from appliance.smtp.guard import AuthGuard
from appliance.smtp.server import InjectionESMTP

if TYPE_CHECKING:
    from appliance.injection import Injector

log = Logger()


class _Refuse(protocol.Protocol):
    """Says 421 and hangs up: the reply RFC 5321 §3.8 gives a server that cannot serve now."""

    def __init__(self, host: bytes, text: bytes) -> None:
        self.host = host
        self.text = text

    def connectionMade(self) -> None:
        code, _, text = self.text.partition(b" ")
        self.transport.write(b"421 " + code + b" " + self.host + b" " + text + b"\r\n")
        self.transport.loseConnection()


class InjectionFactory(protocol.ServerFactory):
    """Builds sessions for one listener; its protocols share the listener's settings."""

    noisy = False

    def __init__(self, listener: ListenerConfig, injector: Injector, hostname: str,
                 timeout: float, *, command_timeout: float = 60.0, data_timeout: float = 1800.0,
                 limits: ConnectionLimits | None = None, tls: CertificateOptions | None = None,
                 checker: ICredentialsChecker | None = None, clock: IReactorTime,
                 junk_command_limit: int = 100, hard_error_limit: int = 20,
                 auth_guard: AuthGuard | None = None, postmaster: str = "") -> None:
        """``clock`` runs the sessions' timeouts; the connection budget is the listener's own."""
        self.listener = listener
        self.injector = injector
        self.hostname = hostname
        self.timeout = timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.limits = limits
        self.tls = tls
        self.checker = checker
        self.clock = clock
        self.junk_command_limit = junk_command_limit
        self.hard_error_limit = hard_error_limit
        self.auth_guard = auth_guard
        self.postmaster = (postmaster or f"postmaster@{hostname}").encode("ascii")
        self.budget = ConnectionBudget(listener.max_connections, listener.max_connections_per_client)

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol:
        host = self.hostname.encode("idna")
        client = ConnectionLimits.client_of(addr)
        if self.limits is not None:
            refusal = self.limits.acquire(client, self.budget)
            if refusal is not None:
                log.info("refused a connection from {client}: {why}", client=client,
                         why=refusal.decode())
                return _Refuse(host, refusal)
        p = _LimitedESMTP(self.listener, self.injector, self.tls, self.checker)
        p.factory = self
        p.callLater = self.clock.callLater
        p.clock = self.clock
        p.host = host
        p.timeout = self.timeout
        p.command_timeout = self.command_timeout
        p.data_timeout = self.data_timeout
        p.junk_command_limit = self.junk_command_limit
        p.hard_error_limit = self.hard_error_limit
        p._client = client
        p.auth.guard, p.auth.client = self.auth_guard, client
        p.postmaster = self.postmaster
        return p


class _LimitedESMTP(InjectionESMTP):
    """A session that gives its place back to the factory's limits when it ends."""

    _client = ""

    def connectionMade(self) -> None:
        if self.factory.limits is not None:
            self.factory.limits.session_opened(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if self.factory.limits is not None:
                self.factory.limits.release(self._client, self.factory.budget)
                self.factory.limits.session_closed(self)


def listener_factory(listener: ListenerConfig, injector: Injector, hostname: str, smtp_config: SmtpConfig,
                     limits: ConnectionLimits, checker: ICredentialsChecker | None = None,
                     tls: CertificateOptions | None = None, *, clock: IReactorTime,
                     auth_guard: AuthGuard | None = None, postmaster: str = "") -> protocol.Factory:
    """
    The factory for one listener, wrapped in TLS from the first byte for ``tls = "implicit"``.
    ``tls``: the listener's certificate as the builder loaded it; ``None`` for no TLS.
    ``auth_guard``: shared by all listeners, since the password thread is.
    ``postmaster``: where ``RCPT TO:<postmaster>`` goes (``node.postmaster``).
    """
    factory = InjectionFactory(
        listener, injector, hostname, smtp_config.timeout,
        command_timeout=smtp_config.command_timeout, data_timeout=smtp_config.data_timeout,
        limits=limits, tls=tls, checker=checker, clock=clock,
        junk_command_limit=smtp_config.junk_command_limit, hard_error_limit=smtp_config.hard_error_limit,
        auth_guard=auth_guard, postmaster=postmaster,
    )
    if listener.tls == "implicit" and tls is not None and not listener.endpoint.startswith("ssl:"):
        return TLSMemoryBIOFactory(tls, False, factory, clock)
    return factory
