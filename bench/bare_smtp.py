"""
A bare Twisted ESMTP server that accepts every message and throws it away.

The baseline for bench/smtp_bench.py (what Twisted's own SMTP server costs on
this machine) and the delivery target of the appliance under test.

    python bench/bare_smtp.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class Discard:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return Discard


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    noisy = False

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        p = super().buildProtocol(addr)
        p.delivery = Delivery()
        p.noisy = False
        return p


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), Factory(), interface="127.0.0.1")
    reactor.run()
