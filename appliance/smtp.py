"""
The ESMTP injection server.

Built on ``twisted.mail.smtp.ESMTP`` for the command dialogue, but the
message text is read by our own ``DataReader`` instead of Twisted's
per-line, per-recipient ``IMessage`` fan-out: the text is stored once per
transaction, lines are checked as a whole (length, bare CR/LF) without ever
leaving DATA mode, and the reply after the final dot comes from the
``Injector``, which answers ``250`` only once the spool has the message on
disk.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, ssl
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from appliance.config import ListenerConfig, SmtpConfig

if TYPE_CHECKING:
    from appliance.injection import Injector, Transaction

log = Logger()

MAX_LINE = 998  # RFC 5321 §4.5.3.1.6, without the CRLF
MAX_COMMAND_LINE = 4096  # generous: RFC 5321 allows 512 plus extension parameters


class DataReader:
    """
    Reads the message text of one DATA command, up to the lone ``.`` line.

    Pure byte handling, no I/O: ``feed`` passes dot-unstuffed text to
    ``sink`` and notes, instead of acting on, every problem (a line over 998
    octets, a bare CR or LF, more bytes than allowed). Once a problem is noted
    nothing more reaches the sink, but reading goes on to the real end of the
    message, so no line of the body is ever taken for a command. Only CRLF . CRLF
    ends the text: ``<LF>.<LF>`` and friends are data (and bare newlines).
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self.sink = sink
        self.max_size = max_size
        self.size = 0
        self.line_too_long = False
        self.bare_newline = False
        self.too_big = False
        self._buffer = b""
        # False while the buffer holds the middle of a line whose start was dropped.
        self._at_line_start = True

    @property
    def refused(self) -> bool:
        return self.line_too_long or self.bare_newline or self.too_big

    def feed(self, data: bytes) -> bytes | None:
        """Take more bytes; returns ``None`` until the end, then whatever follows it."""
        buf = self._buffer + data
        if self._at_line_start and buf.startswith(b".\r\n"):
            end, rest = 0, buf[3:]
        else:
            i = buf.find(b"\r\n.\r\n")
            end, rest = (i + 2, buf[i + 5 :]) if i >= 0 else (-1, None)
        if rest is not None:
            self._buffer = b""
            self._take(buf[:end])
            return rest
        j = buf.rfind(b"\r\n")
        cut = j + 2 if j >= 0 else 0
        # The unfinished last line stays buffered: it may be the start of the final ".".
        self._take(buf[:cut])
        tail = buf[cut:]
        if len(tail) > MAX_LINE + 1:  # 998 octets and possibly the CR of its CRLF
            self.line_too_long = True
            self.size += len(tail) - 1
            tail = tail[-1:]
            self._at_line_start = False
        self._buffer = tail
        return None

    def _take(self, text: bytes) -> None:
        """Check and pass on ``text``, which ends at a line end (or is empty)."""
        if not text:
            return
        at_start, self._at_line_start = self._at_line_start, True
        self.size += len(text)
        if self.size > self.max_size:
            self.too_big = True
        crlf = text.count(b"\r\n")
        if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
            self.bare_newline = True
        if max(map(len, text.split(b"\n"))) > MAX_LINE + 1:
            self.line_too_long = True
        if self.refused:
            return
        if at_start and text[:1] == b".":
            text = text[1:]
        self.sink(text.replace(b"\r\n.", b"\r\n"))


# Replies whose text carries no enhanced status code get this one (RFC 2034, RFC 3463).
_DEFAULT_ENHANCED = {
    221: b"2.0.0", 235: b"2.7.0", 250: b"2.0.0", 252: b"2.5.2",
    421: b"4.3.0", 451: b"4.3.0", 452: b"4.5.3", 454: b"4.7.0",
    500: b"5.5.2", 501: b"5.5.4", 502: b"5.5.1", 503: b"5.5.1", 504: b"5.5.4",
    530: b"5.7.0", 535: b"5.7.8", 538: b"5.7.11", 550: b"5.0.0", 552: b"5.3.4",
    553: b"5.1.7", 554: b"5.0.0", 555: b"5.5.4",
}
_ENHANCED_RE = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# What an address may hold: printable ASCII, and the space only Twisted's grammar lets in
# inside quotes. Its qstring takes anything between quotes (LF, CR, NUL, 8-bit): written
# into a Received: header or a MAIL command, an LF would start a header or a command.
_ADDRESS = re.compile(rb"[\x20-\x7e]*")
_DUPLICATE = object()  # validateTo's answer for a recipient the transaction already has
_MAX_AUTH_FAILURES = 3
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


class InjectionESMTP(smtp.ESMTP):
    """
    One injection session.

    Hardening of the stock protocol: no per-envelope log lines (PII); every
    reply but the greeting and the EHLO answer carries an enhanced status
    code; commands sent after STARTTLS in the same packet are dropped and the
    session reset (CVE-2011-0411); AUTH is our own PLAIN/LOGIN dialogue,
    offered and accepted only under TLS; DATA is read raw by ``DataReader``;
    input that arrives while a message is committed or a password checked
    waits, so replies stay in order even for a client that pipelines without
    being offered PIPELINING. Three clocks guard the session: ``timeout``
    (no input at all), ``command_timeout`` (a command line, once begun, must
    be finished) and ``data_timeout`` (the whole message text).
    """

    noisy = False
    factory: InjectionFactory

    def __init__(self, listener: ListenerConfig, injector: Injector,
                 tls: Any = None, checker: Any = None) -> None:
        super().__init__(contextFactory=tls)
        self.listener = listener
        self.injector = injector
        self.checker = checker
        self.auth_user: str | None = None
        self.command_timeout = 60.0
        self.data_timeout = 1800.0
        self._reader: DataReader | None = None
        self._transaction: Transaction | None = None
        self._deciding: Transaction | None = None  # received whole, its reply not yet known
        self._store_error: OSError | None = None
        self._held: list[bytes] | None = None
        self._drop_rest = False
        self._raw_reply = False
        self._auth: AuthExchange | None = None
        self._auth_failures = 0
        self._command_timer: Any = None
        self._data_timer: Any = None
        self._stopping = False  # the appliance is stopping: close once the pending reply is out
        self._shut = False  # told 421 for a stop: nothing more is read

    def connectionMade(self) -> None:
        self._raw_reply = True  # the greeting carries no enhanced code
        try:
            super().connectionMade()
        finally:
            self._raw_reply = False
        # A listener with implicit TLS hands us a transport that is TLS already.
        if ISSLTransport.providedBy(self.transport):
            self.startedTLS = True

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._shut:
            return
        if self._held is not None:
            self._held.append(data)
            return
        self.resetTimeout()
        if self._reader is not None:
            rest = self._reader.feed(data)
            if rest is None:
                return
            self._end_of_data()
            if self._held is not None:
                self._held.append(rest)
                return
            data = rest
        buf = self._buffer + data
        while True:
            if self.transport.disconnecting:
                return
            i = buf.find(b"\r\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 2 :]
            if i > MAX_COMMAND_LINE:
                self.lineLengthExceeded(line)
                return
            self._cancel("_command_timer")
            self.lineReceived(line)
            if self._drop_rest:
                self._drop_rest, buf = False, b""
            if self._reader is not None or self._held is not None:
                # DATA began (what follows is message text) or we wait on ourselves.
                self._buffer = b""
                if buf:
                    self.dataReceived(buf)
                return
        self._buffer = buf
        if len(buf) > MAX_COMMAND_LINE:
            self.lineLengthExceeded(buf)
        elif buf and self._command_timer is None and not self.transport.disconnecting:
            self._command_timer = self.callLater(self.command_timeout, self._command_timed_out)

    def lineReceived(self, line: bytes) -> Any:
        if self._auth is not None:
            self.resetTimeout()
            return self._auth_response(line)
        return super().lineReceived(line)

    def lookupMethod(self, command: bytes) -> Any:
        # Twisted decodes the verb as ASCII and would raise out of dataReceived on any other byte.
        if not command.isascii():
            return self._not_a_command
        return super().lookupMethod(command)

    def _not_a_command(self, rest: bytes) -> None:
        self.sendCode(500, b"5.5.2 Command not recognised")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()

    def _hold(self) -> None:
        """Wait on ourselves (a commit, a password check): input queues, no clock runs."""
        self._held = []
        self.setTimeout(None)
        self.transport.pauseProducing()

    def _release(self) -> None:
        held, self._held = self._held or [], None
        self.setTimeout(self.timeout)
        self.transport.resumeProducing()
        if held:
            self.dataReceived(b"".join(held))

    def _gone(self) -> bool:
        return bool(getattr(self.transport, "disconnected", False))

    # -- replies -------------------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if not self._raw_reply and (200 <= code < 300 or 400 <= code < 600):
            default = _DEFAULT_ENHANCED.get(code, b"%d.0.0" % (code // 100))
            message = b"\n".join(
                line if _ENHANCED_RE.match(line) else default + (b" " + line if line else b"")
                for line in (message.splitlines() or [b""])
            )
        super().sendCode(code, message)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP engage-appliance"

    def do_EHLO(self, rest: bytes) -> None:
        self._raw_reply = True
        try:
            super().do_EHLO(rest)
        finally:
            self._raw_reply = False

    def do_HELO(self, rest: bytes) -> None:
        self._raw_reply = True
        try:
            super().do_HELO(rest)
        finally:
            self._raw_reply = False

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {}
        if self.canStartTLS and not self.startedTLS and self.listener.tls in ("starttls", "required"):
            ext[b"STARTTLS"] = None
        if self.checker is not None and self.startedTLS:
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        ext[b"SIZE"] = [str(self.listener.max_message_size).encode()]
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        return ext

    def timeoutConnection(self) -> None:
        self._close_for_time(b"idle for too long")

    def _command_timed_out(self) -> None:
        self._command_timer = None
        self._close_for_time(b"command not completed in time")

    def _data_timed_out(self) -> None:
        self._data_timer = None
        self._close_for_time(b"message text not completed in time")

    def _close_for_time(self, why: bytes) -> None:
        if self.transport.disconnecting:
            return
        self.sendCode(421, b"4.4.2 " + self.host + b" Timeout: " + why + b", closing connection")
        self.transport.loseConnection()

    def shut_down(self) -> None:
        """
        The appliance is stopping: say so (RFC 5321 §3.8) and close.

        A message being decided, or a password being checked, gets its reply
        first. A message still being received is dropped: nothing of it was
        acknowledged, so the client sends it again later.
        """
        if self._shut or self._stopping or self.transport is None or self.transport.disconnecting:
            return
        if self._held is not None:
            self._stopping = True
            return
        self._say_goodbye()

    def _say_goodbye(self) -> None:
        self._shut = True
        if self._transaction is not None:
            self._transaction.abort()
            self._transaction = self._reader = None
        self._cancel("_command_timer")
        self._cancel("_data_timer")
        self.sendCode(421, b"4.3.2 " + self.host + b" Service shutting down, closing connection")
        # Read again, or the client's close (and TLS close_notify) would go unnoticed.
        self._held = None
        self.transport.resumeProducing()
        self.transport.loseConnection()

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            setattr(self, name, None)
            if timer.active():
                timer.cancel()

    # -- TLS and AUTH --------------------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: STARTTLS")
        elif self.startedTLS:
            self.sendCode(503, b"5.5.1 TLS already active")
        elif not self.canStartTLS or self.listener.tls not in ("starttls", "required"):
            self.sendCode(502, b"5.5.1 STARTTLS not available")
        elif self._from is not None:
            self.sendCode(503, b"5.5.1 STARTTLS not allowed during a mail transaction")
        else:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207 §4.2: forget everything said in plain text, and anything still unread.
            self._drop_rest = True
            self._helo, self._from, self._to = None, None, []

    def ext_AUTH(self, rest: bytes) -> None:
        if self.checker is None:
            self.sendCode(502, b"5.5.1 AUTH not available")
            return
        if not self.startedTLS:
            self.sendCode(538, b"5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.auth_user is not None:
            self.sendCode(503, b"5.5.1 Already authenticated")
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 AUTH not allowed during a mail transaction")
            return
        parts = rest.split(None, 1)
        mechanism = parts[0].upper() if parts else b""
        if mechanism not in (b"PLAIN", b"LOGIN"):
            self.sendCode(504, b"5.5.4 Unrecognized authentication type")
            return
        self._auth = AuthExchange(mechanism)
        if len(parts) > 1:
            self._auth_response(parts[1].strip())
        else:
            self.sendCode(334, self._auth.first_challenge())

    def _auth_response(self, line: bytes) -> None:
        exchange = self._auth
        assert exchange is not None
        if line.strip() == b"*":
            self._auth = None
            self.sendCode(501, b"5.0.0 Authentication cancelled")
            return
        try:
            challenge = exchange.step(line.strip())
        except ValueError:
            self._auth = None
            self.sendCode(501, b"5.5.2 Cannot decode the response")
            return
        if challenge is not None:
            self.sendCode(334, challenge)
            return
        self._auth = None
        assert exchange.username is not None and exchange.password is not None
        self._hold()
        try:
            name = exchange.username.decode("utf-8")
        except UnicodeDecodeError:
            d: defer.Deferred = defer.fail(UnauthorizedLogin())
        else:
            d = defer.maybeDeferred(self.checker.requestAvatarId,
                                    UsernamePassword(name, exchange.password))
        d.addCallbacks(self._authenticated, self._not_authenticated)
        d.addCallback(self._reply_and_resume)

    def _authenticated(self, user: str) -> tuple[int, bytes]:
        self.auth_user = user
        return 235, b"2.7.0 Authentication successful"

    def _not_authenticated(self, failure: Failure) -> tuple[int, bytes]:
        if not failure.check(UnauthorizedLogin):
            log.failure("checking a password failed", failure)
            return 454, b"4.7.0 Temporary authentication failure"
        self._auth_failures += 1
        if self._auth_failures >= _MAX_AUTH_FAILURES:
            return 421, b"4.7.0 Too many authentication failures, closing connection"
        return 535, b"5.7.8 Authentication credentials invalid"

    # -- the envelope --------------------------------------------------------

    def do_RSET(self, rest: bytes) -> None:
        self._from, self._to = None, []
        self.sendCode(250, b"2.0.0 Reset")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 OK")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(252, b"2.5.2 Cannot VRFY user, but will accept the message and attempt delivery")

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.sendCode(500, b"5.5.1 Command not recognised")

    def do_MAIL(self, rest: bytes) -> None:
        if self._helo is None or self._helo[0] is None:
            self.sendCode(503, b"5.5.1 Send EHLO first")
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Nested MAIL command")
            return
        if self.listener.tls == "required" and not self.startedTLS:
            self.sendCode(530, b"5.7.0 Must issue a STARTTLS command first")
            return
        if self.listener.require_auth and self.auth_user is None:
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        m = self.mail_re.match(rest)
        if not m:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        if not _ADDRESS.fullmatch(m.group("path")):
            self.sendCode(553, b"5.1.7 Sender address contains characters that are not allowed")
            return
        refusal = self._mail_parameters(m.group("opts") or b"")
        if refusal is not None:
            self.sendCode(*refusal)
            return
        super().do_MAIL(rest)

    def _mail_parameters(self, opts: bytes) -> tuple[int, bytes] | None:
        """Check MAIL's ESMTP parameters: only those of extensions we advertise."""
        for param in opts.split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":  # RFC 1870: refuse now what would be refused after DATA
                if not value.isdigit():
                    return 501, b"5.5.4 Bad SIZE parameter"
                if int(value) > self.listener.max_message_size:
                    return 552, b"5.3.4 Message size exceeds fixed maximum message size"
            elif key == b"BODY":  # RFC 6152: we take 8-bit text as it is
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 555, b"5.5.4 Unsupported BODY type"
            elif key == b"AUTH" and self.checker is not None and self.startedTLS:
                pass  # RFC 4954 §5: the identity the message was submitted by; informational
            else:
                return 555, b"5.5.4 Unsupported MAIL parameter " + key[:32]
        return None

    def do_RCPT(self, rest: bytes) -> None:
        m = self.rcpt_re.match(rest) if self._from is not None else None
        if m is not None and m.group("opts"):
            self.sendCode(555, b"5.5.4 Unsupported RCPT parameter")
            return
        if m is not None and not _ADDRESS.fullmatch(m.group("path")):
            self.sendCode(553, b"5.1.3 Recipient address contains characters that are not allowed")
            return
        super().do_RCPT(rest)

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        if any(_same_mailbox(user.dest, known.dest) for known, _ in self._to):
            # Accepted again, queued once (Postfix's cleanup does the same).
            return _DUPLICATE
        code, text = self.injector.check_recipient(self.session(), user.dest, len(self._to))
        if code >= 400:
            raise smtp.SMTPServerError(code, text.decode("utf-8", "replace"))
        return lambda: None

    def _cbFromValidate(self, fromEmail: smtp.Address, code: int = 250,
                        msg: bytes = b"2.1.0 Sender OK") -> None:
        super()._cbFromValidate(fromEmail, code, msg)

    def _cbToValidate(self, to: Any, user: Any = None, code: int = 250,
                      msg: bytes = b"2.1.5 Recipient OK") -> None:
        if to is _DUPLICATE:
            self.sendCode(code, msg)
            return
        super()._cbToValidate(to, user, code, msg)

    def session(self) -> Session:
        peer = self.transport.getPeer()
        return Session(
            listener=self.listener,
            client_address=getattr(peer, "host", str(peer)),
            helo=(self._helo[0] or b"").decode("ascii", "replace") if self._helo else "",
            tls=bool(self.startedTLS),
            auth_user=self.auth_user,
        )

    # -- the message ---------------------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
        if rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: DATA")
            return
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        try:
            transaction = self.injector.begin(
                self.session(), self._from, [user.dest for user, _ in self._to]
            )
        except OSError:
            log.failure("cannot open a spool file")
            self.sendCode(451, b"4.3.0 Cannot store the message now, try again later")
            return
        self._from, self._to = None, []
        self._transaction = transaction
        self._store_error = None
        self._reader = DataReader(self._store, self.listener.max_message_size)
        self._data_timer = self.callLater(self.data_timeout, self._data_timed_out)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _store(self, data: bytes) -> None:
        """Pass message text to the spool; a write error is answered at the end of DATA."""
        if self._store_error is not None or self._transaction is None:
            return
        try:
            self._transaction.write(data)
        except OSError as e:
            log.error("cannot write message text to the spool: {e}", e=e)
            self._store_error = e

    def _end_of_data(self) -> None:
        reader, transaction = self._reader, self._transaction
        assert reader is not None and transaction is not None
        self._reader = self._transaction = None
        self._cancel("_data_timer")
        if reader.refused:
            transaction.abort()
            if reader.too_big:
                self.sendCode(552, b"5.3.4 Message too big")
            elif reader.bare_newline:
                self.sendCode(554, b"5.6.0 Bare CR or LF in message text is not allowed")
            else:
                self.sendCode(554, b"5.6.0 Message has a line longer than 998 octets")
            return
        if self._store_error is not None:
            transaction.abort()
            self.sendCode(451, b"4.3.0 Cannot store the message now, try again later")
            return
        self._hold()
        self._deciding = transaction
        d = defer.maybeDeferred(self.injector.finish, transaction)
        d.addErrback(self._commit_failed, transaction)
        d.addBoth(self._decided)
        d.addCallback(self._reply_and_resume)

    def _decided(self, reply: Any) -> Any:
        self._deciding = None
        return reply

    def _commit_failed(self, failure: Failure, transaction: Transaction) -> tuple[int, bytes]:
        log.failure("message could not be stored", failure)
        transaction.abort()
        return 451, b"4.3.0 Cannot store the message now, try again later"

    def _reply_and_resume(self, reply: tuple[int, bytes]) -> None:
        if self._gone():
            return
        self.sendCode(*reply)
        if reply[0] == 421:
            # Read again, or the client's close (and TLS close_notify) would go unnoticed.
            self._held = None
            self.transport.resumeProducing()
            self.transport.loseConnection()
            return
        if self._stopping:
            self._say_goodbye()
            return
        self._release()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._cancel("_command_timer")
        self._cancel("_data_timer")
        if self._transaction is not None:
            self._transaction.abort()
            self._transaction = self._reader = None
        if self._deciding is not None:
            # The injector checks this before it commits: a 250 nobody hears is a duplicate later.
            self._deciding.client_gone = True
        super().connectionLost(reason)


def _same_mailbox(a: smtp.Address, b: smtp.Address) -> bool:
    """
    One mailbox twice in a transaction: the domain compared without case, the local part exactly.

    RFC 5321 §2.4 lets a local part be case-sensitive, so ``Joe@`` and ``joe@``
    may be two people; dropping one would lose mail, while a duplicate copy
    of one mailbox only costs a second message.
    """
    return a.local == b.local and a.domain.lower() == b.domain.lower()


class Session:
    """What the injector and the policy hook need to know of the client behind a transaction."""

    __slots__ = ("listener", "client_address", "helo", "tls", "auth_user")

    def __init__(self, listener: ListenerConfig, client_address: str, helo: str, tls: bool,
                 auth_user: str | None) -> None:
        self.listener = listener
        self.client_address = client_address
        self.helo = helo
        self.tls = tls
        self.auth_user = auth_user

    def may_relay(self) -> bool:
        if self.auth_user is not None:
            return True
        try:
            ip = ipaddress.ip_address(self.client_address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.listener.relay_networks)


class ConnectionLimits:
    """
    Open injection connections, in total and per client address, across all listeners.

    It also knows the sessions themselves, so that a stop can close them all.
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.sessions: set[InjectionESMTP] = set()
        self._closed_waiters: list[defer.Deferred] = []

    def session_opened(self, session: InjectionESMTP) -> None:
        self.sessions.add(session)

    def session_closed(self, session: InjectionESMTP) -> None:
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
    def client_of(addr: Any) -> str:
        host = getattr(addr, "host", "")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return str(host)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return str(ip)

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
                 limits: ConnectionLimits | None = None, tls: Any = None,
                 checker: Any = None, clock: IReactorTime) -> None:
        """``clock`` runs the sessions' timeouts."""
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

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        host = self.hostname.encode("idna")
        client = ConnectionLimits.client_of(addr)
        if self.limits is not None:
            refusal = self.limits.acquire(client)
            if refusal is not None:
                log.info("refused a connection from {client}: {why}", client=client,
                         why=refusal.decode())
                return _Refuse(host, refusal)
        p = _LimitedESMTP(self.listener, self.injector, self.tls, self.checker)
        p.factory = self
        p.callLater = self.clock.callLater
        p.host = host
        p.timeout = self.timeout
        p.command_timeout = self.command_timeout
        p.data_timeout = self.data_timeout
        p._client = client
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
                self.factory.limits.release(self._client)
                self.factory.limits.session_closed(self)


def listener_factory(listener: ListenerConfig, injector: Injector, hostname: str, smtp_config: SmtpConfig,
                     limits: ConnectionLimits, checker: Any = None,
                     tls: ssl.CertificateOptions | None = None, *, clock: IReactorTime) -> protocol.Factory:
    """
    The factory for one listener, wrapped in TLS from the first byte for ``tls = "implicit"``.
    ``tls``: the listener's certificate as the builder loaded it; ``None`` for no TLS.
    """
    factory = InjectionFactory(
        listener, injector, hostname, smtp_config.timeout,
        command_timeout=smtp_config.command_timeout, data_timeout=smtp_config.data_timeout,
        limits=limits, tls=tls, checker=checker, clock=clock,
    )
    if listener.tls == "implicit" and tls is not None and not listener.endpoint.startswith("ssl:"):
        return TLSMemoryBIOFactory(tls, False, factory, clock)
    return factory


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
