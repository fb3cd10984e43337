"""
The envelope side of an injection session: MAIL, RCPT and the commands around them.

The rules (which addresses and MAIL parameters are taken, when one mailbox
counts twice) are plain functions; ``EnvelopeCommands`` is the layer of the
session that applies them, on top of ``ESMTPAdapter``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.mail import smtp

from appliance.config import ListenerConfig
from appliance.smtp.auth import Reply, SessionAuth
from appliance.smtp.session import Session
from appliance.smtp.twisted_server import ACCEPTED_AGAIN, ESMTPAdapter

if TYPE_CHECKING:
    from appliance.injection import Injector

# What an address may hold: printable ASCII, and the space only Twisted's grammar lets in
# inside quotes. Its qstring takes anything between quotes (LF, CR, NUL, 8-bit): written
# into a Received: header or a MAIL command, an LF would start a header or a command.
_ADDRESS = re.compile(rb"[\x20-\x7e]*")


def address_allowed(path: bytes) -> bool:
    """Whether a MAIL or RCPT path may be written into headers and commands as it is."""
    return _ADDRESS.fullmatch(path) is not None


def mail_parameters_refusal(opts: bytes, max_size: int, auth_offered: bool) -> Reply | None:
    """Check MAIL's ESMTP parameters: only those of extensions we advertise."""
    for param in opts.split():
        key, _, value = param.partition(b"=")
        key = key.upper()
        if key == b"SIZE":  # RFC 1870: refuse now what would be refused after DATA
            if not value.isdigit():
                return 501, b"5.5.4 Bad SIZE parameter"
            if int(value) > max_size:
                return 552, b"5.3.4 Message size exceeds fixed maximum message size"
        elif key == b"BODY":  # RFC 6152: we take 8-bit text as it is
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                return 555, b"5.5.4 Unsupported BODY type"
        elif key == b"AUTH" and auth_offered:
            pass  # RFC 4954 §5: the identity the message was submitted by; informational
        else:
            return 555, b"5.5.4 Unsupported MAIL parameter " + key[:32]
    return None


def same_mailbox(a: smtp.Address, b: smtp.Address) -> bool:
    """
    One mailbox twice in a transaction: the domain compared without case, the local part exactly.

    RFC 5321 §2.4 lets a local part be case-sensitive, so ``Joe@`` and ``joe@``
    may be two people; dropping one would lose mail, while a duplicate copy
    of one mailbox only costs a second message.
    """
    return mailbox_key(a) == mailbox_key(b)


def mailbox_key(a: smtp.Address) -> tuple[bytes, bytes]:
    """What ``same_mailbox`` compares, as a key for a set."""
    return a.local, a.domain.lower()


class EnvelopeCommands(ESMTPAdapter):
    """
    MAIL, RCPT, RSET, NOOP, VRFY and QUIT for an injection session.

    The session gives it the listener's settings, the injector (which judges
    each recipient) and the session's AUTH state.
    """

    listener: ListenerConfig
    injector: Injector
    auth: SessionAuth
    postmaster = b"postmaster@localhost"  # node.postmaster, set by the listener factory
    _mailboxes_of: object | None = None  # the envelope_marker that _mailbox_set belongs to
    _mailbox_set: set[tuple[bytes, bytes]]

    @property
    def auth_user(self) -> str | None:
        """Who logged in with AUTH; ``None`` for an anonymous session."""
        return self.auth.user

    @auth_user.setter
    def auth_user(self, user: str | None) -> None:
        self.auth.user = user

    def do_RSET(self, rest: bytes) -> None:
        self.reset_envelope()
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
        if self.helo_argument() is None:
            self.sendCode(503, b"5.5.1 Send EHLO first")
            return
        if self.sender() is not None:
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
        if not address_allowed(m.group("path")):
            self.sendCode(553, b"5.1.7 Sender address contains characters that are not allowed")
            return
        refusal = mail_parameters_refusal(m.group("opts") or b"", self.listener.max_message_size,
                                          self.auth.offered(bool(self.startedTLS)))
        if refusal is not None:
            self.sendCode(*refusal)
            return
        super().do_MAIL(rest)

    def do_RCPT(self, rest: bytes) -> None:
        m = self.rcpt_re.match(rest) if self.sender() is not None else None
        if m is not None and m.group("path").strip(b"<> ").lower() == b"postmaster":
            # RFC 5321 §4.5.1: <Postmaster> without a domain is this server's; Twisted would
            # complete it with its own idea of the host name.
            rest = rest[: m.start("path")] + b"<" + self.postmaster + b">" + rest[m.end("path"):]
            m = self.rcpt_re.match(rest)
        if m is not None and m.group("opts"):
            self.sendCode(555, b"5.5.4 Unsupported RCPT parameter")
            return
        if m is not None and not address_allowed(m.group("path")):
            self.sendCode(553, b"5.1.3 Recipient address contains characters that are not allowed")
            return
        super().do_RCPT(rest)

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        mailboxes = self._mailboxes()
        key = mailbox_key(user.dest)
        if key in mailboxes:
            # Accepted again, queued once (Postfix's cleanup does the same).
            return ACCEPTED_AGAIN
        code, text = self.injector.check_recipient(self.session(), user.dest, self.recipient_count())
        if code >= 400:
            raise smtp.SMTPServerError(code, text.decode("utf-8", "replace"))
        mailboxes.add(key)  # validateTo answers at once: the recipient is appended next
        return lambda: None

    def _mailboxes(self) -> set[tuple[bytes, bytes]]:
        """The transaction's mailboxes (``mailbox_key``), so a duplicate is found in O(1), not O(n)."""
        marker = self.envelope_marker()
        if self._mailboxes_of is not marker:
            self._mailboxes_of = marker
            self._mailbox_set = {mailbox_key(u.dest) for u in self.recipients()}
        return self._mailbox_set

    def session(self) -> Session:
        peer = self.transport.getPeer()
        return Session(
            listener=self.listener,
            client_address=getattr(peer, "host", str(peer)),
            helo=(self.helo_argument() or b"").decode("ascii", "replace"),
            tls=bool(self.startedTLS),
            auth_user=self.auth_user,
        )
