"""
Posting a batch over HTTP: its body, the start of the receiver's answer, and whom to trust.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Prefix(Protocol):
    """Keeps the start of a response body for the log and discards the rest."""

    def __init__(self, finished: defer.Deferred, limit: int = 200) -> None:
        self.finished = finished
        self.limit = limit
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]

    def connectionLost(self, reason: Failure) -> None:
        # A body cut short does not change the status the receiver already gave.
        if not self.finished.called:  # not cancelled
            self.finished.callback(self.data)


def read_prefix(response: IResponse, limit: int = 200) -> defer.Deferred:
    """The first ``limit`` bytes of ``response``'s body; cancelling closes the connection."""

    def cancel(_: defer.Deferred) -> None:
        abort = getattr(protocol.transport, "abortConnection", None)
        if abort is not None:
            abort()

    d: defer.Deferred = defer.Deferred(cancel)
    protocol = _Prefix(d, limit)
    response.deliverBody(protocol)
    return d


@implementer(IPolicyForHTTPS)
class TrustFile:
    """HTTPS that trusts only the certificates of one PEM file (a private CA, a self-signed receiver)."""

    def __init__(self, trust: ssl.IOpenSSLTrustRoot) -> None:
        self._trust = trust

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def describe_failure(failure: Failure) -> str:
    """A failed attempt in a few words, for the log line that says when the next one is."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer in time"
    message = failure.getErrorMessage()
    reasons = getattr(failure.value, "reasons", None)  # ResponseNeverReceived and friends
    if reasons:
        message = "; ".join(r.getErrorMessage() for r in reasons)
    return f"{failure.type.__name__}: {message}" if message else failure.type.__name__

