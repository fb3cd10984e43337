"""
What happens to a message between the injection server's final dot and its ``250``.

The ``Injector`` is the one place that decides whether a transaction is
accepted: it checks recipients at ``RCPT``, gives each transaction its
identity, commits it to the spool (and so to disk) before anything is
acknowledged, writes the ``injection`` events and hands the message to
delivery. The SMTP protocol only speaks the dialogue around it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp

from appliance.events import EventLog
from appliance.spool import Envelope, QueuedMessage, Recipient, Spool, SpoolWriter

if TYPE_CHECKING:
    from appliance.smtp import Session

log = Logger()

MAX_HEADER_BYTES = 1024 * 1024  # headers beyond this are not read for events


class Router(Protocol):
    def undeliverable(self, domain: str) -> str | None: ...


class Queue(Protocol):
    def enqueue(self, queued: QueuedMessage) -> None: ...


def address_text(address: smtp.Address | bytes | str) -> str:
    if isinstance(address, smtp.Address):
        address = bytes(address)
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    return address


def iso_time(ts: float) -> str:
    """SparkPost's ``injection_time`` form: 2016-04-18T14:25:07.000+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def header_text(value: str | None) -> str:
    """A header's value as text: RFC 2047 decoded, unfolded; empty when absent."""
    if value is None:
        return ""
    try:
        text = str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        text = value
    return " ".join(text.split())


class Transaction:
    """One message being received: its spool writer, sender, recipients and header block."""

    def __init__(self, session: Session, writer: SpoolWriter, mail_from: str,
                 recipients: list[str], received: bytes, now: float) -> None:
        self.session = session
        self.writer = writer
        self.mail_from = mail_from
        self.recipients = recipients
        self.started = now
        self._head: list[bytes] = [received]
        self._head_size = len(received)
        self._head_done = False
        writer.write(received)

    @property
    def transmission_id(self) -> str:
        return self.writer.transmission_id

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        if not self._head_done:
            seam = self._head[-1][-3:] + data
            self._head.append(data)
            self._head_size += len(data)
            if b"\r\n\r\n" in seam or self._head_size > MAX_HEADER_BYTES:
                self._head_done = True

    def headers(self) -> Any:
        head = b"".join(self._head)
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            head = head[: end + 2]
        return BytesHeaderParser(policy=compat32).parsebytes(head)

    def abort(self) -> None:
        self.writer.abort()


class Injector:
    def __init__(
        self,
        spool: Spool,
        events: EventLog,
        router: Router,
        queue: Queue,
        hostname: str,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.events = events
        self.router = router
        self.queue = queue
        self.hostname = hostname
        self.now = now

    def check_recipient(self, session: Session, dest: smtp.Address, count: int) -> tuple[int, bytes]:
        """The reply to one ``RCPT``: ``250``, or why not."""
        if not session.may_relay():
            return 554, b"5.7.1 Relay access denied"
        if count >= session.listener.max_recipients:
            return 452, b"4.5.3 Too many recipients"
        domain = dest.domain.decode("ascii", "replace").lower()
        if not domain:
            return 550, b"5.1.3 Recipient address needs a domain"
        problem = self.router.undeliverable(domain)
        if problem:
            return 550, f"5.1.2 {problem}".encode()
        return 250, b"2.1.5 Recipient OK"

    def begin(self, session: Session, mail_from: smtp.Address, recipients: list[smtp.Address]
              ) -> Transaction:
        now = self.now()
        transmission_id = self.events.ids.transmission_id()
        writer = self.spool.writer(transmission_id)
        received = self._received_header(session, transmission_id, recipients, now)
        return Transaction(session, writer, address_text(mail_from),
                           [address_text(r) for r in recipients], received, now)

    def _received_header(self, session: Session, transmission_id: str,
                         recipients: list[smtp.Address], now: float) -> bytes:
        """The trace header RFC 5321 §4.4 asks every relay to add."""
        proto = "ESMTP" + ("S" if session.tls else "") + ("A" if session.auth_user else "")
        helo = "".join(c for c in session.helo if c.isprintable() and c not in "()") or "unknown"
        lines = [
            f"Received: from {helo} ([{session.client_address}])",
            f"\tby {self.hostname} (engage-appliance) with {proto} id {transmission_id}",
        ]
        if len(recipients) == 1:
            lines.append(f"\tfor <{address_text(recipients[0])}>")
        lines[-1] += f"; {email.utils.formatdate(now)}"
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")

    @defer.inlineCallbacks
    def finish(self, transaction: Transaction) -> Any:
        """Commit an entirely received message; fires with the SMTP reply."""
        headers = transaction.headers()
        envelope = Envelope(
            transmission_id=transaction.transmission_id,
            mail_from=transaction.mail_from,
            recipients=[self._recipient(transaction, rcpt) for rcpt in transaction.recipients],
            received_at=transaction.started,
            client_address=transaction.session.client_address,
            auth_user=transaction.session.auth_user,
            listener=transaction.session.listener.name,
            message_size=transaction.writer.size,
        )
        queued = yield transaction.writer.commit(envelope)
        self._injection_events(envelope, headers)
        self.queue.enqueue(queued)
        return 250, f"2.0.0 OK queued as {envelope.transmission_id}".encode()

    def _recipient(self, transaction: Transaction, rcpt: str) -> Recipient:
        message_id = self.events.ids.message_id()
        return Recipient(
            address=rcpt,
            message_id=message_id,
            event_fields={
                "message_id": message_id,
                "transmission_id": transaction.transmission_id,
                "campaign_id": "",
                "rcpt_to": rcpt.lower(),
                "raw_rcpt_to": rcpt,
                "rcpt_meta": {},
                "rcpt_tags": [],
            },
        )

    def _injection_events(self, envelope: Envelope, headers: Any) -> None:
        common = {
            "msg_from": envelope.mail_from,
            "friendly_from": header_text(headers.get("From")),
            "subject": header_text(headers.get("Subject")),
            "msg_size": str(envelope.message_size),
            "recv_method": "esmtp",
            "open_tracking": False,
            "click_tracking": False,
            "injection_time": iso_time(envelope.received_at),
            # Not a SparkPost field: the SMTP AUTH user who injected the message, or null.
            "auth_user": envelope.auth_user,
        }
        for rcpt in envelope.recipients:
            try:
                self.events.emit(
                    "injection",
                    **rcpt.event_fields,
                    routing_domain=rcpt.address.rpartition("@")[2].lower(),
                    **common,
                )
            except OSError:
                # The message is already safe on disk; a missing event must not lose it.
                log.failure("could not write the injection event of {message_id}",
                            message_id=rcpt.message_id)
