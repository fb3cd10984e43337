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

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from appliance.config import ListenerConfig

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


class InjectionESMTP(smtp.ESMTP):
    """
    One injection session.

    Hardening of the stock protocol: no per-envelope log lines (PII), commands
    sent after STARTTLS in the same packet are dropped and the session reset
    (CVE-2011-0411), DATA is read raw by ``DataReader``, and input that arrives
    while a message is being committed waits, so replies stay in order even for
    a client that pipelines without being offered PIPELINING.
    """

    noisy = False
    factory: InjectionFactory

    def __init__(self, listener: ListenerConfig, injector: Injector) -> None:
        super().__init__()
        self.listener = listener
        self.injector = injector
        self._reader: DataReader | None = None
        self._transaction: Transaction | None = None
        self._held: list[bytes] | None = None
        self._drop_rest = False

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        if self._reader is not None:
            rest = self._reader.feed(data)
            if rest is None:
                self.resetTimeout()
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
            self.lineReceived(line)
            if self._drop_rest:
                self._drop_rest, buf = False, b""
            if self._reader is not None:  # DATA began: what follows is message text
                self._buffer = b""
                if buf:
                    self.dataReceived(buf)
                return
        self._buffer = buf
        if len(buf) > MAX_COMMAND_LINE:
            self.lineLengthExceeded(buf)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()

    # -- the envelope --------------------------------------------------------

    def greeting(self) -> bytes:
        return self.host + b" ESMTP engage-appliance"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext = super().extensions()
        ext.pop(b"AUTH", None)
        ext[b"SIZE"] = [str(self.listener.max_message_size).encode()]
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        return ext

    def ext_STARTTLS(self, rest: bytes) -> None:
        before = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not before:
            self._drop_rest = True
            self._helo, self._from, self._to = None, None, []

    def do_RSET(self, rest: bytes) -> None:
        self._from, self._to = None, []
        self.sendCode(250, b"2.0.0 Reset")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 OK")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.sendCode(500, b"5.5.1 Command not recognised")

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], None]:
        code, text = self.injector.check_recipient(self.session(), user.dest, len(self._to))
        if code >= 400:
            raise smtp.SMTPServerError(code, text.decode("utf-8", "replace"))
        return lambda: None

    def _cbFromValidate(self, fromEmail: smtp.Address, code: int = 250,
                        msg: bytes = b"2.1.0 Sender OK") -> None:
        super()._cbFromValidate(fromEmail, code, msg)

    def _cbToValidate(self, to: Any, user: Any = None, code: int = 250,
                      msg: bytes = b"2.1.5 Recipient OK") -> None:
        super()._cbToValidate(to, user, code, msg)

    def session(self) -> Session:
        peer = self.transport.getPeer()
        return Session(
            listener=self.listener,
            client_address=getattr(peer, "host", str(peer)),
            helo=(self._helo[0] or b"").decode("ascii", "replace") if self._helo else "",
            tls=bool(self.startedTLS),
            auth_user=None,
        )

    # -- the message ---------------------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
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
        self._reader = DataReader(transaction.write, self.listener.max_message_size)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _end_of_data(self) -> None:
        reader, transaction = self._reader, self._transaction
        assert reader is not None and transaction is not None
        self._reader = self._transaction = None
        if reader.refused:
            transaction.abort()
            if reader.too_big:
                self.sendCode(552, b"5.3.4 Message too big")
            elif reader.bare_newline:
                self.sendCode(554, b"5.6.0 Bare CR or LF in message text is not allowed")
            else:
                self.sendCode(554, b"5.6.0 Message has a line longer than 998 octets")
            return
        self._held = []
        self.transport.pauseProducing()
        d = defer.maybeDeferred(self.injector.finish, transaction)
        d.addErrback(self._commit_failed, transaction)
        d.addCallback(self._reply_and_resume)

    def _commit_failed(self, failure: Failure, transaction: Transaction) -> tuple[int, bytes]:
        log.failure("message could not be stored", failure)
        transaction.abort()
        return 451, b"4.3.0 Cannot store the message now, try again later"

    def _reply_and_resume(self, reply: tuple[int, bytes]) -> None:
        if getattr(self.transport, "disconnected", False):
            return
        self.sendCode(*reply)
        held, self._held = self._held or [], None
        self.transport.resumeProducing()
        if held:
            self.dataReceived(b"".join(held))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._transaction is not None:
            self._transaction.abort()
            self._transaction = self._reader = None
        super().connectionLost(reason)


class Session:
    """What the injector needs to know of the client behind a transaction."""

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


class InjectionFactory(protocol.ServerFactory):
    """Builds sessions for one listener; its protocols share the listener's settings."""

    noisy = False

    def __init__(self, listener: ListenerConfig, injector: Injector, hostname: str,
                 timeout: float) -> None:
        self.listener = listener
        self.injector = injector
        self.hostname = hostname
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> InjectionESMTP:
        p = InjectionESMTP(self.listener, self.injector)
        p.factory = self
        p.host = self.hostname.encode("idna")
        p.timeout = self.timeout
        return p
