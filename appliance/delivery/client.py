"""
The SMTP client side of delivery: one connection that carries many copies.

``DeliveryClient`` is Twisted's ``ESMTPClient`` (EHLO, STARTTLS, AUTH) with
the mail transaction written anew (Twisted's internals reached only through
``ESMTPClientAdapter``), because the stock one takes one message
and its recipients up front. Here the connection asks its ``Attempt`` for the
next copy after every transaction (``RSET`` in between), so one connection
carries as many copies as are ready for its destination, and every reply is
reported, per copy, as an ``Outcome``.

When the server's EHLO reply lists PIPELINING (RFC 2920), each copy's
``MAIL FROM``, ``RCPT TO`` and ``DATA`` (and the ``RSET`` before it on a
reused connection) go out in one write and their replies are read in order;
a copy costs one round trip before its message instead of three or four.
Every reply is still checked, and the copy's outcome is the one the same
replies give without pipelining.

The client never decides what to do next about a failure; it reports:
before the session is established (greeting, EHLO, STARTTLS, AUTH) a failure
belongs to the *host* and the attempt moves on to the next one; during a
transaction it belongs to the copy being sent.
"""

from __future__ import annotations

import io
import itertools
import re
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure

from appliance.delivery.outcome import DELAY, Outcome, internal, reply_outcome
from appliance.delivery.twisted_client import ESMTPClientAdapter

if TYPE_CHECKING:
    from appliance.delivery.routing import Hop

MAX_REPLY_LINES = 1000  # a multi-line reply longer than this is not SMTP
_REPLY = re.compile(rb"[2-5][0-9][0-9]([ -].*)?")
_STAGES = {b"EHLO", b"HELO", b"STARTTLS", b"AUTH", b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT"}
_STAGE_NAMES = {b"MAIL": "MAIL FROM", b"RCPT": "RCPT TO"}
_LINE_BREAKERS = re.compile(r"[\r\n\0]")  # would end or cut a command line: never sent


_CR, _DOT = itertools.repeat(b"\r"), itertools.repeat(b".")


def _crlf_only(data: bytes, lines: list[bytes]) -> bool:
    """Whether every CR and every LF of ``data`` is part of a CRLF; ``lines`` is ``data.split(b"\\n")``."""
    # Each piece but the last ends where an LF was: each must end with its CR, and then
    # those are all the CRs there are.
    return data.count(b"\r") == len(lines) - 1 and all(map(bytes.endswith, lines[:-1], _CR))


def _dot_after_newline(lines: list[bytes]) -> bool:
    """Whether a line after the first starts with "." (``lines`` as for ``_crlf_only``)."""
    return any(map(bytes.startswith, lines[1:], _DOT))


class BodyEncoder:
    """
    Turns a message, chunk by chunk, into DATA's wire form: CRLF line ends and dot-stuffing.

    Any line ending (CRLF, bare LF, bare CR) becomes CRLF, and a "." at the
    start of a line is doubled, whatever the chunk boundaries: a CR that ends
    one chunk is held back until the next shows whether an LF follows, and
    whether the next chunk starts a line is remembered. Twisted's stock
    ``transformChunk`` does neither, so CRLF input became CR CR LF and a "."
    line that started a 16 KiB chunk ended the message early.
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return chunk
        # What the appliance sends is CRLF throughout, and mostly without a line that
        # starts with a dot. Both are checked with one-byte searches, several times
        # faster than searching for CRLF, and the text is rewritten only where needed.
        lines = chunk.split(b"\n")
        if not _crlf_only(chunk, lines):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            lines = chunk.split(b"\n")
        if _dot_after_newline(lines):
            chunk = chunk.replace(b"\n.", b"\n..")
        if self.at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        self.at_line_start = chunk.endswith(b"\n")
        return chunk

    def end(self) -> bytes:
        """What ends the body: the last line's CRLF if it had none, then the lone dot."""
        if self._pending_cr:
            self._pending_cr = False
            return b"\r\n.\r\n"
        return b".\r\n" if self.at_line_start else b"\r\n.\r\n"


def encode_body(data: bytes, chunk_size: int = basic.FileSender.CHUNK_SIZE) -> bytes:
    """A whole message in wire form, chunked as the client sends it (for tests and tools)."""
    encoder = BodyEncoder()
    out = [encoder.encode(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]
    return b"".join(out) + encoder.end()


class Job(Protocol):
    """What the client needs of one copy."""

    mail_from: str
    address: str
    data: bytes


class Attempt(Protocol):
    """The client's view of whoever opened the connection (``attempt._HopAttempt``)."""

    hop: Hop

    def connected(self, client: DeliveryClient) -> None: ...
    def established(self) -> None: ...
    def next_job(self) -> Job | None | defer.Deferred: ...
    def has_more(self) -> bool: ...
    def give_back(self, job: Job) -> None: ...
    def job_done(self, job: Job, outcome: Outcome) -> None: ...
    def hop_failed(self, outcome: Outcome, tls_failed: bool) -> None: ...
    def closed(self) -> None: ...
    def wait_for_work(self) -> bool: ...
    def stop_waiting(self) -> None: ...


class DeliveryClient(ESMTPClientAdapter):
    debug = False  # no line log kept: it would hold message envelopes (PII)

    def __init__(self, attempt: Attempt, identity: bytes,
                 context: CertificateOptions | IOpenSSLClientConnectionCreator | None,
                 clock: IReactorTime,
                 command_timeout: float, data_timeout: float,
                 username: bytes | None = None, password: bytes | None = None,
                 require_tls: bool = False) -> None:
        super().__init__(password, context, identity)
        self.attempt = attempt
        self.hop = attempt.hop
        self.callLater = clock.callLater
        self.timeout = command_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.requireTransportSecurity = require_tls
        if username is not None:
            self.requireAuthentication = True
            self.registerAuthenticator(smtp.PLAINAuthenticator(username))
            self.registerAuthenticator(smtp.LOGINAuthenticator(username))
        self.stage = "greeting"
        self.job: Job | None = None
        self.extensions: dict[bytes, bytes | None] = {}
        self.is_established = False
        self._failed = False
        self._tls_started = False
        self._tls_confirmed = False
        self._sending = False
        self._closed = False
        self._encoder = BodyEncoder()
        self._reset_due = False  # pipelining: the next group starts with RSET
        # Pipelining: the copy sent behind an RSET whose reply has not come yet. It is not
        # the copy in transaction until then: if the RSET fails it was never tried.
        self._held: Job | None = None

    # -- the line level ------------------------------------------------------

    def sendLine(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        if verb in _STAGES:
            self.stage = _STAGE_NAMES.get(verb, verb.decode())
            if verb == b"EHLO" and self._tls_started:
                self.stage = "EHLO after STARTTLS"
        super().sendLine(line)

    def lineReceived(self, line: bytes) -> Any:
        if not _REPLY.fullmatch(line):
            shown = line[:80].decode("ascii", "backslashreplace")
            return self.sendError(smtp.SMTPProtocolError(-1, f"not an SMTP reply: {shown!r}"))
        if self.reply_lines_so_far() >= MAX_REPLY_LINES:
            return self.sendError(smtp.SMTPProtocolError(-1, "a reply of more than 1000 lines"))
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendError(smtp.SMTPProtocolError(-1, f"a reply line over {self.MAX_LENGTH} bytes"))

    # -- session set-up (greeting, EHLO, STARTTLS, AUTH) --------------------------

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        # EHLO was refused and HELO is the fallback; the stock client would send
        # HELO again after every refusal of HELO, for ever.
        super().smtpState_helo(code, resp)
        self.on_refusal(self._refused)

    def _refused(self, code: int, resp: bytes) -> None:
        self.sendError(smtp.SMTPClientError(code, resp))

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        items: dict[bytes, bytes | None] = {}
        for line in resp.splitlines():
            key, _, value = line.partition(b" ")
            items[key.upper()] = value or None
        self.extensions = items
        if self._tls_started:
            self._tls_confirmed = True
        self.tryTLS(code, resp, items)

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        # The stock method replaces the server's refusal (say "454 4.7.0 TLS not available")
        # with a text of its own; the server's words are the better reason.
        self.sendError(smtp.TLSError(code, resp or b"STARTTLS refused"))

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        try:
            self.transport.startTLS(self.context)
        except Exception as e:
            return self.sendError(smtp.TLSError(code, f"could not start TLS: {e}".encode()))
        self.note_tls_started()
        self._tls_started = True
        # Whatever came after the 220 in the same read was sent in plaintext and must not be
        # taken for the server's answers inside TLS (the client side of CVE-2011-0411).
        self.discard_unread()
        self.esmtpState_ehlo(code, resp)

    # -- the mail transactions -------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        self.setTimeout(self.command_timeout)
        job = self.attempt.next_job()
        if not self.is_established:
            self.is_established = True
            self.attempt.established()
        self._send(job)

    def _send(self, job: Job | None | defer.Deferred) -> None:
        """Start the transaction of ``job``; wait first if its copy is still being made."""
        while job is not None:
            if isinstance(job, defer.Deferred):
                # The copy's message is being read or parsed: nothing is asked of the server
                # meanwhile, so no reply is awaited and no command timeout runs; a reply
                # that comes all the same (a 421 on its way out) ends the session.
                self.setTimeout(None)
                self.expect([], self._refused, self._refused)
                job.addCallback(self._copy_made)
                return
            refusal = self._unsendable(job)
            if refusal is None:
                break
            self.attempt.job_done(job, refusal)
            job = self.attempt.next_job()
        if job is None:
            return self._no_more_work()
        self.job = job
        params = b""
        if b"SIZE" in self.extensions:
            params += b" SIZE=%d" % len(job.data)
        if b"8BITMIME" in self.extensions and not job.data.isascii():
            params += b" BODY=8BITMIME"
        mail = b"MAIL FROM:<" + job.mail_from.encode("utf-8") + b">" + params
        if self.pipelining():
            return self._send_group(job, mail)
        self.expect([250], self.smtpState_to, self.smtpTransferFailed)
        self.sendLine(mail)

    def _copy_made(self, job: Job | None | defer.Deferred) -> None:
        if self._failed or self._closed:
            # The session failed while the copy was being made (the attempt takes back a
            # copy made after it heard of the close itself): the copy was never tried.
            if job is not None and not isinstance(job, defer.Deferred):
                self.attempt.give_back(job)
            return
        self.setTimeout(self.command_timeout)
        self._send(job)

    def _unsendable(self, job: Job) -> Outcome | None:
        """A bounce for a copy whose addresses would smuggle a command into the dialogue."""
        if _LINE_BREAKERS.search(job.mail_from):
            return internal(550, "5.1.7", "the sender address holds a CR, LF or NUL and cannot be sent "
                            "in MAIL FROM", self.hop.address, self.tls_active())
        if _LINE_BREAKERS.search(job.address):
            return internal(550, "5.1.3", "the recipient address holds a CR, LF or NUL and cannot be sent "
                            "in RCPT TO", self.hop.address, self.tls_active())
        return None

    def smtpState_to(self, code: int, resp: bytes) -> None:
        assert self.job is not None
        self.expect([250, 251], self._rcpt_accepted, self.smtpTransferFailed)
        self.sendLine(b"RCPT TO:<" + self.job.address.encode("utf-8") + b">")

    def _rcpt_accepted(self, code: int, resp: bytes) -> None:
        self.expect([354], self.smtpState_data, self.smtpTransferFailed)
        self.sendLine(b"DATA")

    def smtpState_data(self, code: int, resp: bytes) -> None:
        assert self.job is not None
        self.expect(smtp.SUCCESS, self.smtpState_msgSent, self.smtpTransferFailed)
        self._encoder = BodyEncoder()
        self._sending = True
        self.stage = "the message"
        sender = basic.FileSender()
        d = sender.beginFileTransfer(io.BytesIO(self.job.data), self.transport, self.transformChunk)
        d.addCallbacks(self.finishedFileTransfer, self._transfer_failed)

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return self._encoder.encode(chunk)

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        self._sending = False
        if self._failed or self.transport is None:
            return
        self.stage = "end of data"
        self.setTimeout(self.data_timeout)  # RFC 5321 §4.5.3.2.6: ten minutes for the reply to "."
        self.transport.write(self._encoder.end())

    def _transfer_failed(self, failure: Failure) -> None:
        # The transport stopped the producer because the connection went away;
        # connectionLost tells the copy's story.
        self._sending = False

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        self._report(code, resp)
        if self._sending:
            # A reply before the message was sent whole: the dialogue is out of step.
            self._failed = True
            self.transport.abortConnection()
            return
        self._next_transaction()

    def _report(self, code: int, resp: bytes) -> None:
        """The reply that decides the copy in transaction: its outcome."""
        job, self.job = self.job, None
        if job is not None:
            text = b" ".join(resp.splitlines()).decode("utf-8", "replace")
            self.attempt.job_done(job, reply_outcome(code, text, self.hop.address, self.tls_active(),
                                                     self._sending_ip()))

    def _sending_ip(self) -> str:
        """The appliance's own address on this connection (SparkPost's ``sending_ip``)."""
        try:
            return str(self.transport.getHost().host)
        except AttributeError:  # a transport without addresses (tests' in-memory ones)
            return ""

    def _next_transaction(self) -> None:
        self.setTimeout(self.command_timeout)
        if not self.attempt.has_more():
            self._no_more_work()
        elif self.pipelining():
            # RSET may open a group (RFC 2920 §3.1): it goes out with the next copy's commands.
            self._reset_due = True
            self._send(self.attempt.next_job())
        else:
            self.expect(smtp.SUCCESS, self.smtpState_from, self._refused)
            self.sendLine(b"RSET")

    # -- an idle connection, kept for the destination's next copy ----------------------

    def _no_more_work(self) -> None:
        """Nothing left to send: wait, idle, for the next copy if the attempt keeps it open; else QUIT."""
        if self._failed or self._closed or not self.attempt.wait_for_work():
            return self.quit()
        self.stage = "idle"
        self.setTimeout(None)  # the attempt's reuse timer ends the wait
        self.expect([], self._idle_reply, self._idle_reply)

    def _idle_reply(self, code: int, resp: bytes) -> None:
        # Nothing was asked: a server closing an idle connection says so (421) first. No copy
        # is in transaction, so nothing is reported; the connection just ends.
        self.attempt.stop_waiting()
        self.stage = "closing"
        self.transport.loseConnection()

    def resume(self) -> None:
        """Leave the idle wait: the next copy goes out, behind ``RSET`` as after any transaction."""
        self._next_transaction()

    def close_idle(self) -> None:
        """End an idle connection with QUIT; a server that does not answer it is cut off."""
        self.setTimeout(self.command_timeout)
        self.quit()

    # -- pipelining (RFC 2920) -------------------------------------------------

    def pipelining(self) -> bool:
        """Whether the server's last EHLO reply offered PIPELINING (never after HELO)."""
        return b"PIPELINING" in self.extensions

    def _send_group(self, job: Job, mail: bytes) -> None:
        """
        Write [RSET,] MAIL, RCPT and DATA at once; their replies come back in that order.

        DATA ends the group (RFC 2920 §3.1): the message goes only after its 354,
        and only if MAIL and RCPT were accepted. ``stage`` names the reply awaited,
        so a timeout or a lost connection is described as without pipelining.
        """
        lines = [mail, b"RCPT TO:<" + job.address.encode("utf-8") + b">", b"DATA"]
        if self._reset_due:
            self._reset_due = False
            self.job, self._held = None, job
            lines.insert(0, b"RSET")
            self.stage = "RSET"
            self.expect(smtp.SUCCESS, self._group_reset, self._group_reset_refused)
        else:
            self._await_mail()
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def _group_reset(self, code: int, resp: bytes) -> None:
        self.job, self._held = self._held, None
        self._await_mail()

    def _group_reset_refused(self, code: int, resp: bytes) -> None:
        # Without pipelining the copy would not have been taken before RSET's 250.
        self._release_held()
        self._refused(code, resp)

    def _release_held(self) -> None:
        job, self._held = self._held, None
        if job is not None:
            self.attempt.give_back(job)

    def _await_mail(self) -> None:
        self.stage = "MAIL FROM"
        self.expect([250], self._group_mail_accepted, self._group_mail_refused)

    def _group_mail_accepted(self, code: int, resp: bytes) -> None:
        self.stage = "RCPT TO"
        self.expect([250, 251], self._group_rcpt_accepted, self._group_rcpt_refused)

    def _group_rcpt_accepted(self, code: int, resp: bytes) -> None:
        self.stage = "DATA"
        self.expect([354], self.smtpState_data, self.smtpTransferFailed)

    # A refused MAIL or RCPT is the copy's outcome at once, as without pipelining (a
    # connection lost later does not change it); the rest of the group is read out.

    def _group_mail_refused(self, code: int, resp: bytes) -> None:
        self._report(code, resp)
        self.stage = "RCPT TO"
        self.expect(range(1000), self._rcpt_read_out, self._rcpt_read_out)

    def _group_rcpt_refused(self, code: int, resp: bytes) -> None:
        self._report(code, resp)
        self._await_data_after_refusal()

    def _rcpt_read_out(self, code: int, resp: bytes) -> None:
        if not self._closing(code, resp):
            self._await_data_after_refusal()

    def _await_data_after_refusal(self) -> None:
        self.stage = "DATA"
        self.expect([354], self._data_without_recipient, self._group_over)

    def _data_without_recipient(self, code: int, resp: bytes) -> None:
        # RFC 2920 §3.1: a server may accept DATA although no recipient was accepted;
        # the client then sends a lone dot, and no message.
        self.stage = "end of data"
        self.setTimeout(self.data_timeout)
        self.expect(range(1000), self._group_over, self._group_over)
        self.transport.write(b".\r\n")

    def _group_over(self, code: int, resp: bytes) -> None:
        if not self._closing(code, resp):
            self._next_transaction()

    def _closing(self, code: int, resp: bytes) -> bool:
        """A 421 read out of a refused group: the server is closing, as a refused RSET would say."""
        if code != 421:
            return False
        self._refused(code, resp)
        return True

    # -- failures -------------------------------------------------------------

    def sendError(self, exc: Exception) -> None:
        outcome, tls_failed = self._describe(exc)
        self._fail(outcome, tls_failed)
        if self.transport is None:
            return
        if isinstance(exc, smtp.SMTPTimeoutError | smtp.SMTPProtocolError):
            self.transport.abortConnection()  # it does not listen: a QUIT would wait for ever
        else:
            self.expect(range(0, 1000), self.smtpState_disconnect, self.smtpState_disconnect)
            super().sendLine(b"QUIT")
            self.transport.loseConnection()

    def _describe(self, exc: Exception) -> tuple[Outcome, bool]:
        """What went wrong, as a delay the operator can read, and whether it was TLS."""
        where, ip, tls = str(self.hop), self.hop.address, self.tls_active()
        if isinstance(exc, smtp.SMTPTimeoutError):
            wait = self.data_timeout if self.stage == "end of data" else self.command_timeout
            return internal(421, "4.4.2", f"no reply from {where} within {wait:g}s "
                            f"(waiting for the reply to {self.stage})", ip, tls), False
        if isinstance(exc, smtp.SMTPProtocolError):
            return internal(421, "4.5.0", f"{where} answered {self.stage} with {_text(exc.resp)}",
                            ip, tls), False
        if isinstance(exc, smtp.TLSRequiredError):
            return internal(421, "4.7.4", f"{where} does not offer STARTTLS, and TLS is required",
                            ip, tls), True
        if isinstance(exc, smtp.TLSError):
            return Outcome(DELAY, exc.code if exc.code > 0 else 421,
                           f"{exc.code} {_text(exc.resp)}" if exc.code > 0 else
                           f"421 4.7.0 [internal] STARTTLS with {where} failed: {_text(exc.resp)}",
                           ip, tls), True
        if isinstance(exc, smtp.AUTHRequiredError):
            return internal(421, "4.7.0", f"{where} offers no AUTH mechanism the appliance can use "
                            "(PLAIN or LOGIN)", ip, tls), False
        if isinstance(exc, smtp.SMTPClientError) and exc.code > 0:
            return Outcome(DELAY, exc.code, f"{exc.code} {_text(exc.resp)}", ip, tls), False
        return internal(421, "4.4.2", f"delivery to {where} failed during {self.stage}: {exc}",
                        ip, tls), False

    def _fail(self, outcome: Outcome, tls_failed: bool = False) -> None:
        if self._failed:
            return
        self._failed = True
        self._release_held()
        job, self.job = self.job, None
        if job is not None:
            self.attempt.job_done(job, outcome.with_kind(DELAY))
        elif not self.is_established:
            # Anything that ends a session between STARTTLS and the EHLO after it is TLS's fault.
            tls_failed = tls_failed or (self._tls_started and not self._tls_confirmed)
            self.attempt.hop_failed(outcome, tls_failed)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        super().connectionLost(reason)
        if not self._failed and (self.job is not None or not self.is_established):
            where = str(self.hop)
            tls_failed = self._tls_started and not self._tls_confirmed
            if tls_failed:
                text = f"TLS handshake with {where} failed: {_reason_text(reason)}"
                outcome = internal(421, "4.7.0", text, self.hop.address, False)
            else:
                doing = ("sending the message" if self._sending
                         else f"waiting for the reply to {self.stage}")
                text = f"connection to {where} lost while {doing}"
                if not reason.check(protocol.connectionDone.type):
                    text += f": {_reason_text(reason)}"
                outcome = internal(421, "4.4.2", text, self.hop.address, self.tls_active())
            self._fail(outcome, tls_failed)
        self._release_held()
        self.attempt.closed()


def _text(resp: object) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(str(resp).split())


def _reason_text(reason: Failure) -> str:
    value = reason.value
    text = str(value).strip() or type(value).__name__
    return " ".join(text.split())[:300]


class ClientFactory(protocol.ClientFactory):
    """Connects one ``DeliveryClient`` for one attempt; a refused connect fails the hop."""

    noisy = False

    def __init__(self, attempt: Attempt, **client_args: Any) -> None:
        self.attempt = attempt
        self.client_args = client_args
        self.client: DeliveryClient | None = None

    def buildProtocol(self, addr: IAddress) -> DeliveryClient:
        self.client = DeliveryClient(self.attempt, **self.client_args)
        self.client.factory = self
        self.attempt.connected(self.client)
        return self.client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        hop = self.attempt.hop
        self.attempt.hop_failed(
            internal(421, "4.4.1", f"cannot connect to {hop}: {_reason_text(reason)}", hop.address),
            False)
        self.attempt.closed()
