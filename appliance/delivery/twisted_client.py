"""
The one place where the delivery client leans on ``twisted.mail.smtp.ESMTPClient``'s internals.

``SMTPClient`` routes each server reply through three private attributes
(``_expected``, ``_okresponse``, ``_failresponse``), ``ESMTPClient`` keeps
whether the connection is encrypted in ``_tlsMode``, and QUIT is sent by the
private ``_disconnectFromServer``. The client writes its own mail
transaction, so it needs all of them; it reaches them only through the named
methods here. Each says what of Twisted it relies on, and
``tests/test_twisted_contract.py`` checks those assumptions against the
installed Twisted, so an upgrade that changes them fails there, by name.

Beware: ``ESMTPClient.__setattr__`` writes straight into the instance
``__dict__``, bypassing property setters, so state is changed here by
methods, never by assigning to a property.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from twisted.mail import smtp

# What SMTPClient calls with a complete reply: its code and its text, lines joined by LF.
ReplyHandler = Callable[[int, bytes], Any]


class ESMTPClientAdapter(smtp.ESMTPClient):
    """``smtp.ESMTPClient`` with its private state behind named methods."""

    def expect(self, codes: Container[int], on_ok: ReplyHandler, on_fail: ReplyHandler) -> None:
        """
        Route the next reply: to ``on_ok`` if its code is in ``codes``, else to ``on_fail``.

        Relies on ``SMTPClient.lineReceived`` calling ``_okresponse(code, resp)``
        when ``code in _expected`` and ``_failresponse(code, resp)`` otherwise,
        once the last line of a (multi-line) reply is in. Replies that come in
        one read (a pipelined group's) are routed one by one, each by what the
        handler of the one before it expected.
        """
        self._expected = codes
        self._okresponse = on_ok
        self._failresponse = on_fail

    def on_refusal(self, handler: ReplyHandler) -> None:
        """
        Route the next reply that is not expected to ``handler``; what is expected stays as it is.

        Relies on the stock state methods (``smtpState_helo``) setting
        ``_expected`` and ``_okresponse`` but leaving ``_failresponse`` to the caller.
        """
        self._failresponse = handler

    def tls_active(self) -> bool:
        """
        Whether the connection is encrypted.

        Relies on ``ESMTPClient._tlsMode``: set in ``connectionMade`` from
        ``ISSLTransport`` (implicit TLS), read by ``tryTLS`` and
        ``esmtpState_ehlo`` to skip STARTTLS.
        """
        return bool(self._tlsMode)

    def note_tls_started(self) -> None:
        """
        Record that STARTTLS went through, as the stock ``esmtpState_starttls`` does.

        Relies on ``_tlsMode`` being all that ``esmtpState_ehlo`` and ``tryTLS``
        consult: the EHLO after STARTTLS then neither asks for STARTTLS again
        nor falls back to HELO for want of TLS.
        """
        self._tlsMode = True

    def discard_unread(self) -> None:
        """
        Drop whatever the server sent that has not been read as a reply yet.

        Relies on ``LineReceiver.dataReceived`` taking each next line from the
        buffer that ``clearLineBuffer`` empties, so that clearing it from
        ``lineReceived`` also drops the rest of the current read.
        """
        self.clearLineBuffer()

    def quit(self) -> None:
        """
        Send QUIT and close once any reply comes.

        Relies on ``SMTPClient._disconnectFromServer``: it expects any code and
        hands the reply to ``smtpState_disconnect``, which closes the transport.
        """
        self._disconnectFromServer()

    def reply_lines_so_far(self) -> int:
        """Lines of the reply being read. Relies on ``SMTPClient.resp``, emptied after each reply."""
        return len(self.resp)
