"""
The one place where the injection server leans on ``twisted.mail.smtp.ESMTP``'s internals.

``ESMTP`` keeps the greeting and the envelope in private attributes
(``_helo``, ``_from``, ``_to``) and answers ``validateFrom``/``validateTo``
through private callbacks (``_cbFromValidate``, ``_cbToValidate``); it
dispatches command lines by its ``mode``. The server reads and resets that
state and words those replies, and does so only through the named methods
here. Each says what of Twisted it relies on, and
``tests/test_twisted_contract.py`` checks those assumptions against the
installed Twisted, so an upgrade that changes them fails there, by name,
instead of somewhere in a session.

Not relied on at all: ``LineOnlyReceiver``'s buffer and line splitting (the
server reads its input itself) and the stock DATA mode (``do_DATA`` is
replaced, so ``mode`` never leaves ``COMMAND``).
"""

from __future__ import annotations

from typing import Any

from twisted.mail import smtp

# What validateTo may return for a recipient the transaction already has: the
# client is told it was accepted, but it is not added a second time.
ACCEPTED_AGAIN = object()


class ESMTPAdapter(smtp.ESMTP):
    """``smtp.ESMTP`` with its private state behind named methods."""

    SENDER_OK = b"2.1.0 Sender OK"
    RECIPIENT_OK = b"2.1.5 Recipient OK"

    # -- the greeting and the envelope -------------------------------------------

    def helo_argument(self) -> bytes | None:
        """
        What the client gave HELO or EHLO, or ``None`` if it has not (or not since STARTTLS).

        Relies on ``SMTP._helo``: ``(None, peer host)`` from ``connectionMade``,
        ``(argument, peer host)`` once ``do_HELO``/``do_EHLO`` ran.
        """
        return self._helo[0] if self._helo else None

    def sender(self) -> smtp.Address | None:
        """
        The transaction's MAIL FROM, or ``None`` outside a transaction.

        Relies on ``SMTP._from``: set by ``_cbFromValidate``, cleared by
        HELO/EHLO, RSET and the start of DATA.
        """
        return self._from

    def recipients(self) -> list[smtp.User]:
        """
        The transaction's accepted recipients, in order.

        Relies on ``SMTP._to``: a list of ``(User, validateTo's result)`` pairs,
        appended to by ``_cbToValidate``.
        """
        return [user for user, _ in self._to]

    def recipient_count(self) -> int:
        """How many recipients the transaction has, without copying them (``SMTP._to``)."""
        return len(self._to)

    def envelope_marker(self) -> object:
        """
        An object that is replaced whenever the transaction's recipients are reset.

        Relies on ``SMTP._to`` being given a new list (``[]``) by HELO/EHLO, RSET,
        DATA and ``reset_envelope``, and only appended to otherwise.
        """
        return self._to

    def reset_envelope(self) -> None:
        """
        End the transaction (RSET, the start of DATA): no sender, no recipients.

        Relies on ``do_MAIL``, ``do_RCPT`` and ``_cbToValidate`` reading the
        envelope from ``_from`` and ``_to`` alone: ``None`` and ``[]`` are what
        ``SMTP.__init__`` and the stock RSET leave there.
        """
        self._from, self._to = None, []

    def forget_greeting(self) -> None:
        """
        Forget HELO/EHLO and the transaction (RFC 3207 §4.2, after STARTTLS): EHLO is needed again.

        Relies on ``_helo`` being ``None`` meaning "no greeting yet", as before
        ``connectionMade``; ``helo_argument`` then answers ``None``.
        """
        self._helo = None
        self.reset_envelope()

    # -- the answers to validateFrom and validateTo -------------------------------

    def _cbFromValidate(self, fromEmail: smtp.Address, code: int = 250,
                        msg: bytes = SENDER_OK) -> None:
        """
        Relies on ``SMTP.do_MAIL`` calling this with ``validateFrom``'s result,
        and on the stock method recording it as the sender and replying ``code msg``;
        only the reply's wording changes.
        """
        super()._cbFromValidate(fromEmail, code, msg)

    def _cbToValidate(self, to: Any, user: smtp.User | None = None, code: int = 250,
                      msg: bytes = RECIPIENT_OK) -> None:
        """
        Relies on ``SMTP.do_RCPT`` calling this with ``validateTo``'s result and the
        ``User``, and on the stock method appending the pair to the recipients and
        replying. ``ACCEPTED_AGAIN`` gets the reply without the append.
        """
        if to is ACCEPTED_AGAIN:
            self.sendCode(code, msg)
            return
        super()._cbToValidate(to, user, code, msg)

    # -- commands ----------------------------------------------------------------

    def run_command(self, line: bytes) -> Any:
        """
        Run one command line (without its CRLF) the stock way.

        Relies on ``SMTP.lineReceived`` resetting the idle timer and dispatching to
        ``state_`` + ``mode``, which is ``COMMAND`` unless the stock ``do_DATA``
        ran, and on ``state_COMMAND`` finding ``do_``/``ext_`` methods through
        ``lookupMethod`` with the rest of the line as their one argument.
        """
        return super().lineReceived(line)
