"""
The injection server's SMTP session.

Built on ``twisted.mail.smtp.ESMTP`` for the command dialogue (through
``ESMTPAdapter``, the only code that touches its internals), but the message
text is read by our own ``DataReader`` instead of Twisted's per-line,
per-recipient ``IMessage`` fan-out: the text is stored once per transaction,
lines are checked as a whole (length, bare CR/LF) without ever leaving DATA
mode, and the reply after the final dot comes from the ``Injector``, which
answers ``250`` only once the spool has the message on disk.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.config import ListenerConfig
from appliance.smtp.auth import MECHANISMS, Reply, SessionAuth
from appliance.smtp.data import DataReader
from appliance.smtp.envelope import EnvelopeCommands
from appliance.smtp.hold import InputHold
from appliance.smtp.replies import with_enhanced_code

if TYPE_CHECKING:
    from appliance.injection import Injector, Transaction
    from appliance.smtp.listener import InjectionFactory

log = Logger()

MAX_COMMAND_LINE = 4096  # generous: RFC 5321 allows 512 plus extension parameters

# Commands that never move a transaction on: they do not restart the idle clock,
# and a session may send only so many (Postfix's smtpd_junk_command_limit).
JUNK_COMMANDS = frozenset({b"NOOP", b"RSET", b"HELP", b"VRFY", b"EXPN"})


class InjectionESMTP(EnvelopeCommands):
    """
    One injection session.

    Hardening of the stock protocol: no per-envelope log lines (PII); every
    reply but the greeting and the EHLO answer carries an enhanced status
    code; commands sent after STARTTLS in the same packet are dropped and the
    session reset (CVE-2011-0411); AUTH is our own PLAIN/LOGIN dialogue
    (``SessionAuth``), offered and accepted only under TLS; DATA is read raw
    by ``DataReader``; input that arrives while a message is committed or a
    password checked waits (``InputHold``), so replies stay in order even for
    a client that pipelines without being offered PIPELINING. Three clocks
    guard the session: ``timeout`` (no input at all), ``command_timeout`` (a
    command line, once begun, must be finished) and ``data_timeout`` (the
    whole message text). Only commands that make progress restart the idle
    clock (not ``JUNK_COMMANDS``), and a session that sends more than
    ``junk_command_limit`` of those, or earns ``hard_error_limit`` error
    replies, is told ``421 4.7.0`` and closed; both counts start again once a
    message is accepted.
    """

    noisy = False
    factory: InjectionFactory

    def __init__(self, listener: ListenerConfig, injector: Injector,
                 tls: CertificateOptions | None = None,
                 checker: ICredentialsChecker | None = None) -> None:
        super().__init__(contextFactory=tls)
        self.listener = listener
        self.injector = injector
        self.auth = SessionAuth(checker)
        self.command_timeout = 60.0
        self.data_timeout = 1800.0
        self.clock: IReactorTime | None = None  # set by the factory; measures the idle clock
        self._progress_at = 0.0  # when the session last made progress (the idle clock's start)
        self.junk_command_limit = 100
        self.hard_error_limit = 20
        self._junk = 0
        self._errors = 0
        self._reader: DataReader | None = None
        self._transaction: Transaction | None = None
        self._deciding: Transaction | None = None  # received whole, its reply not yet known
        self._store_error: OSError | None = None
        self._hold_input = InputHold()
        self._unread = b""  # the start of a command line whose CRLF has not come yet
        self._feeding: deque[bytes] | None = None  # input still to read while dataReceived runs
        self._drop_rest = False
        self._raw_reply = False
        self._command_timer: IDelayedCall | None = None
        self._data_timer: IDelayedCall | None = None
        self._stopping = False  # the appliance is stopping: close once the pending reply is out
        self._shut = False  # told 421 for a stop: nothing more is read

    def connectionMade(self) -> None:
        self._progress_at = self._now()
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
        # A loop, never a recursion: 1,000 pipelined messages are 1,000 turns, not 1,000 frames.
        if self._feeding is not None:  # a reply released held input while we read: it comes next
            self._feeding.append(data)
            return
        self._feeding = queue = deque([data])
        try:
            while queue:
                rest = self._consume(queue.popleft())
                if rest:
                    queue.appendleft(rest)
        finally:
            self._feeding = None

    def _consume(self, data: bytes) -> bytes:
        """Read ``data``; returns what to read afresh (message text once DATA began, or input to hold)."""
        if self._shut:
            return b""
        if self._hold_input.active:
            self._hold_input.keep(data)
            return b""
        if self._reader is not None:
            self.resetTimeout()
            rest = self._reader.feed(data)
            if rest is None:
                return b""
            self._end_of_data()
            if self._hold_input.active:
                self._hold_input.keep(rest)
                return b""
            data = rest
        buf = self._unread + data
        pos = 0  # lines are read by offset: slicing off each line would copy the rest every time
        while True:
            if self.transport.disconnecting:
                return b""
            i = buf.find(b"\r\n", pos)
            if i < 0:
                break
            line, pos = buf[pos:i], i + 2
            if len(line) > MAX_COMMAND_LINE:
                self.lineLengthExceeded(line)
                return b""
            self._cancel("_command_timer")
            if not self._count_junk(line):
                return b""
            self.lineReceived(line)
            if self._drop_rest:
                self._drop_rest, pos = False, len(buf)
            if self._reader is not None or self._hold_input.active:
                # DATA began (what follows is message text) or we wait on ourselves.
                self._unread = b""
                return buf[pos:]
        buf = buf[pos:]
        self._unread = buf
        if len(buf) > MAX_COMMAND_LINE:
            self.lineLengthExceeded(buf)
        elif buf and self._command_timer is None and not self.transport.disconnecting:
            # A line has begun: the command clock bounds it; the idle clock waits for its end.
            self.setTimeout(None)
            self._command_timer = self.callLater(self.command_timeout, self._command_timed_out)
        return b""

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def _count_junk(self, line: bytes) -> bool:
        """
        Restart the idle clock for a command that makes progress, and only for one:
        after a junk command it runs on from the last progress. False once the
        session is closed.
        """
        if self.auth.in_progress or line.split(b" ", 1)[0].upper() not in JUNK_COMMANDS:
            self._progress_at = self._now()
            self.setTimeout(self.timeout)
            return True
        self._junk += 1
        if self._junk > self.junk_command_limit:
            self._cut_off(b"Too many commands that do not make progress")
            return False
        left = self._progress_at + self.timeout - self._now()
        if left <= 0:
            self.timeoutConnection()
            return False
        self.setTimeout(left)
        return True

    def _cut_off(self, why: bytes) -> None:
        """421 and close, for a session that only spends the server's time."""
        self._raw_reply = False
        self._shut = True
        self.sendCode(421, b"4.7.0 " + self.host + b" " + why + b", closing connection")
        if self._hold_input.active:
            self._hold_input.abandon(self.transport)
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> Any:
        if self.auth.in_progress:
            self.resetTimeout()
            return self._answer_auth(self.auth.respond(line))
        return self.run_command(line)

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
        self._hold_input.start(self.transport)
        self.setTimeout(None)

    def _release(self) -> None:
        self._progress_at = self._now()
        self.setTimeout(self.timeout)
        held = self._hold_input.end(self.transport)
        if held:
            self.dataReceived(held)

    def _gone(self) -> bool:
        return bool(getattr(self.transport, "disconnected", False))

    # -- replies -------------------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if not self._raw_reply:
            message = with_enhanced_code(code, message)
        super().sendCode(code, message)
        if code >= 400 and code != 421 and not self._shut:
            self._errors += 1
            if self._errors >= self.hard_error_limit:
                self._cut_off(b"Too many errors")

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
        if self.auth.offered(bool(self.startedTLS)):
            ext[b"AUTH"] = list(MECHANISMS)
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
        if self._hold_input.active:
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
        self._hold_input.abandon(self.transport)
        self.transport.loseConnection()

    def _cancel(self, name: str) -> None:
        """Stop the timer in attribute ``name``, if it runs."""
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
        elif self.helo_argument() is None:
            self.sendCode(503, b"5.5.1 Send EHLO first")
        elif self.sender() is not None:
            self.sendCode(503, b"5.5.1 STARTTLS not allowed during a mail transaction")
        else:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207 §4.2: forget everything said in plain text, and anything still unread.
            self._drop_rest = True
            self.forget_greeting()

    def ext_AUTH(self, rest: bytes) -> None:
        self._answer_auth(self.auth.begin(rest, tls=bool(self.startedTLS),
                                          in_transaction=self.sender() is not None))

    def _answer_auth(self, answer: Reply | defer.Deferred) -> None:
        """Send AUTH's reply, or wait (input held) while the password is checked."""
        if isinstance(answer, defer.Deferred):
            self._hold()
            answer.addCallback(self._reply_and_resume)
        else:
            self.sendCode(*answer)
            if answer[0] == 421:  # too many failures, refused without a check
                self.transport.loseConnection()

    # -- the message ---------------------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
        if rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: DATA")
            return
        sender, recipients = self.sender(), self.recipients()
        if sender is None or not recipients:
            self.sendCode(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        try:
            transaction = self.injector.begin(self.session(), sender, [user.dest for user in recipients])
        except OSError:
            log.failure("cannot open a spool file")
            self.sendCode(451, b"4.3.0 Cannot store the message now, try again later")
            return
        self.reset_envelope()
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
        refusal = reader.refusal()
        if refusal is not None:
            transaction.abort()
            self.sendCode(*refusal)
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
        if self._shut:
            return
        if reply[0] == 250:  # a message accepted: the session is doing real work
            self._junk = self._errors = 0
        if reply[0] == 421:
            self._hold_input.abandon(self.transport)
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
