"""
SMTP AUTH for the injection server (RFC 4954): PLAIN and LOGIN, under TLS only.

Kept apart from the protocol so that every decision of the dialogue (what is
offered, the 538 before TLS, the 501 for a cancelled or undecodable response,
the 535 for bad credentials and the 421 after too many) is made in one place,
without I/O; the session only sends what it is told and waits while a
password is checked.
"""

from __future__ import annotations

import base64
import binascii

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.smtp.guard import AuthGuard

log = Logger()

Reply = tuple[int, bytes]

MECHANISMS = [b"PLAIN", b"LOGIN"]  # CRAM-MD5 would need passwords stored in a reversible form
MAX_AUTH_FAILURES = 3
_LOGIN_USERNAME = base64.b64encode(b"Username:")
_LOGIN_PASSWORD = base64.b64encode(b"Password:")


class AuthExchange:
    """
    The SASL dialogue of one ``AUTH`` command (PLAIN or LOGIN, RFC 4616 and the
    LOGIN draft), without I/O: ``step`` takes the client's base64 line and
    returns the next challenge, or ``None`` once ``username`` and ``password``
    are known. A malformed response raises ``ValueError``.
    """

    def __init__(self, mechanism: bytes) -> None:
        self.mechanism = mechanism
        self.username: bytes | None = None
        self.password: bytes | None = None

    def first_challenge(self) -> bytes:
        return b"" if self.mechanism == b"PLAIN" else _LOGIN_USERNAME

    def step(self, response: bytes) -> bytes | None:
        decoded = _b64(response)
        if self.mechanism == b"PLAIN":
            parts = decoded.split(b"\0")
            if len(parts) != 3 or not parts[1]:
                raise ValueError("PLAIN needs authzid NUL authcid NUL password")
            authzid, self.username, self.password = parts
            if authzid and authzid != self.username:
                # Acting for another user is not offered: the refusal is a failed login.
                self.username = self.password = b""
            return None
        if self.username is None:
            self.username = decoded
            return _LOGIN_PASSWORD
        self.password = decoded
        return None


def _b64(text: bytes) -> bytes:
    if text == b"=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


class SessionAuth:
    """
    The AUTH state of one session: who logged in, the exchange under way, failures so far.

    ``begin`` and ``respond`` answer with a reply, or with a Deferred of one
    while the checker decides; the session holds its input until then. A
    ``421`` reply means the session must close.
    """

    def __init__(self, checker: ICredentialsChecker | None, guard: AuthGuard | None = None,
                 client: str = "") -> None:
        """``guard`` bounds the password checks, ``client`` (the peer's address) is who it counts."""
        self.checker = checker
        self.guard = guard
        self.client = client
        self.user: str | None = None
        self.failures = 0
        self._exchange: AuthExchange | None = None

    def offered(self, tls: bool) -> bool:
        """AUTH is advertised, and its MAIL parameter taken, only once the session is encrypted."""
        return self.checker is not None and tls

    @property
    def in_progress(self) -> bool:
        """An exchange is under way: the client's next line is a response, not a command."""
        return self._exchange is not None

    def begin(self, rest: bytes, *, tls: bool, in_transaction: bool) -> Reply | defer.Deferred:
        """The answer to ``AUTH <rest>``."""
        if self.checker is None:
            return 502, b"5.5.1 AUTH not available"
        if not tls:
            return 538, b"5.7.11 Encryption required for requested authentication mechanism"
        if self.user is not None:
            return 503, b"5.5.1 Already authenticated"
        if in_transaction:
            return 503, b"5.5.1 AUTH not allowed during a mail transaction"
        parts = rest.split(None, 1)
        mechanism = parts[0].upper() if parts else b""
        if mechanism not in MECHANISMS:
            return 504, b"5.5.4 Unrecognized authentication type"
        self._exchange = AuthExchange(mechanism)
        if len(parts) > 1:
            return self.respond(parts[1].strip())
        return 334, self._exchange.first_challenge()

    def respond(self, line: bytes) -> Reply | defer.Deferred:
        """The answer to the client's line in the exchange under way."""
        exchange = self._exchange
        assert exchange is not None
        if line.strip() == b"*":
            self._exchange = None
            return 501, b"5.0.0 Authentication cancelled"
        try:
            challenge = exchange.step(line.strip())
        except ValueError:
            self._exchange = None
            return 501, b"5.5.2 Cannot decode the response"
        if challenge is not None:
            return 334, challenge
        self._exchange = None
        assert exchange.username is not None and exchange.password is not None
        assert self.checker is not None
        if self.guard is not None:
            refusal = self.guard.admit(self.client)
            if refusal is not None:
                return self._failed(refusal)
        try:
            name = exchange.username.decode("utf-8")
        except UnicodeDecodeError:
            d: defer.Deferred = defer.fail(UnauthorizedLogin())
        else:
            d = defer.maybeDeferred(self.checker.requestAvatarId,
                                    UsernamePassword(name, exchange.password))
        return d.addCallbacks(self._authenticated, self._not_authenticated)

    def _authenticated(self, user: str) -> Reply:
        self.user = user
        if self.guard is not None:
            self.guard.succeeded(self.client)
        return 235, b"2.7.0 Authentication successful"

    def _not_authenticated(self, failure: Failure) -> Reply:
        if not failure.check(UnauthorizedLogin):
            log.failure("checking a password failed", failure)
            return 454, b"4.7.0 Temporary authentication failure"
        if self.guard is not None:
            self.guard.failed(self.client)
        return self._failed((535, b"5.7.8 Authentication credentials invalid"))

    def _failed(self, reply: Reply) -> Reply:
        """A failed attempt, checked or refused unchecked: enough of them end the session."""
        self.failures += 1
        if self.failures >= MAX_AUTH_FAILURES:
            return 421, b"4.7.0 Too many authentication failures, closing connection"
        return reply
