"""
What happens to a message between the injection server's final dot and its ``250``, and after.

The ``Injector`` is the one place that decides whether a transaction is
accepted: it checks recipients at ``RCPT``, gives each transaction its
identity, checks ``X-MSYS-API`` and asks the policy about each recipient,
resolves each recipient's tracking settings and commits the message to the
spool (and so to disk) before anything is acknowledged. The SMTP protocol
only speaks the dialogue around it.

Only durability comes before the ``250``. The ``injection`` events (and the
``policy_rejection`` events of recipients left out of an accepted message)
are owed from then on: the committed envelope names them, with their
event_ids assigned in advance, and they are written after the reply, once
the message is prepared for tracking (in a worker thread); then the message
goes to delivery and the spool's journal marks them written. An entry whose
events are still owed at start-up (a ``kill -9`` in between) gets them
written by ``recover_owed``, skipping any whose event_id the event log's
tail already holds, so each is written once.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Callable
from email.message import Message
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp

from appliance.config import EngagementTrackerConfig
from appliance.envelope import Envelope, QueuedMessage, Recipient
from appliance.events import EventLog
from appliance.eventtypes import (
    TEXT_CAPS,
    cap_text,
    injection_event,
    policy_rejection_event,
    recipient_fields,
)
from appliance.headers import HeaderReader, as_message, readable
from appliance.policy import ACCEPT, Policy, PolicyEnvelope, Verdict
from appliance.settings import (
    MsysApi,
    MsysApiError,
    header_values,
    is_transactional,
    limit_notes,
    parse_msys_api,
    resolve,
)
from appliance.spool import Spool
from appliance.spoolwriter import SpoolWriter

if TYPE_CHECKING:
    # Annotations only: injection hands messages to delivery through the Queue protocol
    # and must not load the delivery client to do it.
    from appliance.delivery.copies import CopyMaker
    from appliance.rewrite import Prepared
    from appliance.smtp import Session

log = Logger()

MAX_HEADER_BYTES = 1024 * 1024  # header fields beyond this are not kept for events, but X-MSYS-API
# How much of the event log recovery reads for owed events written just before a crash:
# far more than is written between an event and its journal mark.
EVENT_LOG_TAIL = 8 * 1024 * 1024
_EVENT_ID = re.compile(rb'"event_id":"(\d+)"')


class Router(Protocol):
    def undeliverable(self, domain: str) -> str | None: ...


class Queue(Protocol):
    def enqueue(self, queued: QueuedMessage) -> None: ...

    def full(self) -> bool: ...


class Suppressions(Protocol):
    """The suppression list (``appliance.suppression.SuppressionList``), asked in memory."""

    def suppressed(self, address: str, transactional: bool) -> str | None: ...


# SparkPost's reply for a suppressed recipient, with the scope that stopped it.
SUPPRESSED = "5.7.1 Recipient address was suppressed due to customer policy ({scope} suppression list)"


def address_text(address: smtp.Address | bytes | str) -> str:
    if isinstance(address, smtp.Address):
        address = bytes(address)
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    return address


def header_text(headers: Message, name: str) -> str:
    """
    A header's value as a person reads it (``appliance.headers.readable``); empty when absent.

    The raw value is read, not compat32's decoding of it, which turns raw
    8-bit text (RFC 6532) into U+FFFD.
    """
    wanted = name.lower()
    raw = next((str(v) for k, v in headers.raw_items() if k.lower() == wanted), None)
    if raw is None:
        return ""
    return readable(raw.encode("utf-8", "surrogateescape"))


def friendly_from(headers: Message) -> str:
    """
    SparkPost's ``friendly_from``: the address of the ``From`` header (``sender@example.com``).

    Falls back to the decoded header text when no address can be parsed out of it.
    """
    text = header_text(headers, "From")
    _name, address = email.utils.parseaddr(text)
    return address if "@" in address else text


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def missing_fields(names: set[str], now: float, transmission_id: str, hostname: str) -> bytes:
    """
    The ``Date`` and ``Message-ID`` fields a header without them gets, as Postfix's cleanup adds them.

    Added once, at injection, so every copy and every retry carries the same
    values; the Message-ID is on the appliance's host name, as Postfix puts it
    on ``myhostname``.
    """
    has_date, has_id = "date" in names, "message-id" in names
    if has_date and has_id:
        return b""
    date, stamp = _time_texts(int(now))
    added = b"" if has_date else b"Date: " + date + b"\r\n"
    if not has_id:
        added += b"Message-ID: <%s.%s@%s>\r\n" % (stamp, transmission_id.encode(),
                                                   hostname.encode("utf-8", "replace"))
    return added


_last_second: tuple[int, bytes, bytes] = (-1, b"", b"")


def _time_texts(second: int) -> tuple[bytes, bytes]:
    """
    RFC 5322's date of ``second`` in UTC, and its ``YYYYMMDDhhmmss`` stamp; the last one is kept.

    Formatted here, not by the email package (ten times the cost), and once
    a second: the messages of a busy second share it.
    """
    global _last_second
    if _last_second[0] != second:
        t = time.gmtime(second)
        date = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
        stamp = f"{t.tm_year}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}"
        _last_second = (second, date.encode(), stamp.encode())
    return _last_second[1], _last_second[2]


class Transaction:
    """One message being received: its spool writer, sender, recipients and header block."""

    def __init__(self, session: Session, writer: SpoolWriter, mail_from: str,
                 recipients: list[str], received: bytes, now: float, hostname: str = "localhost") -> None:
        self.session = session
        self.writer = writer
        self.mail_from = mail_from
        self.recipients = recipients
        self.started = now
        self.hostname = hostname
        # Set by the session when its connection drops before the reply: nothing is committed then.
        self.client_gone = False
        # The header as appliance.headers reads it, at most MAX_HEADER_BYTES of it kept but
        # every X-MSYS-API field, however far down: the rewriter strips each one it finds.
        self._header = HeaderReader(MAX_HEADER_BYTES, frozenset({"x-msys-api"}))
        self._header.feed(received)
        # Our trace header and the message's header are held until the header ends, so a
        # missing Date or Message-ID can go in after the trace header (``missing_fields``);
        # a header longer than MAX_HEADER_BYTES is not held, nor added to.
        self._held: list[bytes] | None = [received]
        self._held_size = len(received)

    @property
    def transmission_id(self) -> str:
        return self.writer.transmission_id

    def write(self, data: bytes) -> None:
        if self._held is None:
            self.writer.write(data)
            if not self._header.done:
                self._header.feed(data)
            return
        self._header.feed(data)
        self._held.append(data)
        self._held_size += len(data)
        if self._header.done or self._held_size > MAX_HEADER_BYTES:
            self._release()

    def _release(self) -> None:
        """Write what is held, with the fields the header lacks if all of it was read."""
        held, self._held = self._held, None
        assert held is not None
        if self._held_size <= MAX_HEADER_BYTES:
            added = missing_fields({f.name for f in self._header.fields}, self.started,
                                   self.transmission_id, self.hostname)
            if added:
                held.insert(1, added)
        self.writer.write(b"".join(held))

    def headers(self) -> Message:
        """
        The header fields as ``appliance.headers`` reads them, for the policy and the events.

        The same fields the rewriter strips X-MSYS-API from and DKIM signs:
        up to the empty line, or to the first line that is not a field; past
        MAX_HEADER_BYTES only the X-MSYS-API fields. The message text is
        whole once this is called: a header still held is written out.
        """
        fields = self._header.finish()
        if self._held is not None:
            self._release()
        return as_message(fields)

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
        policy: Policy | None = None,
        copies: CopyMaker | None = None,
        tracker: EngagementTrackerConfig | None = None,
        max_hops: int = 50,
        suppressions: Suppressions | None = None,
        next_turn: Callable[..., object] | None = None,
    ) -> None:
        """
        ``next_turn``: runs a call on the reactor's next pass, after its next poll
        (``callFromThread``): a message's events and its hand-over to delivery start
        there, once its 250 is on the wire. Without it (tests), they start at once.
        """
        self.spool = spool
        self.events = events
        self.router = router
        self.queue = queue
        self.hostname = hostname
        self.now = now
        self.policy = policy
        self.copies = copies
        self.tracker = tracker or EngagementTrackerConfig()
        self.max_hops = max_hops
        self.suppressions = suppressions
        self.next_turn = next_turn
        # Transactions received whole whose reply is not yet known, and the owed events of
        # messages already answered: a stop waits for both, or their events would find the
        # event log closed.
        self.in_flight: set[Transaction] = set()
        self.announcing: set[defer.Deferred] = set()
        self._idle_waiters: list[defer.Deferred] = []
        self._logged_ids: frozenset[str] | None = None  # the event log's tail, read once at recovery

    def check_recipient(self, session: Session, dest: smtp.Address, count: int) -> tuple[int, bytes]:
        """The reply to one ``RCPT``: ``250``, or why not."""
        if not session.may_relay():
            return 554, b"5.7.1 Relay access denied"
        if count >= session.listener.max_recipients:
            return 452, b"4.5.3 Too many recipients"
        if self.queue.full():  # delivery.max_queued_copies: the client tries again later
            return 452, b"4.3.1 Queue full, try again later"
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
                           [address_text(r) for r in recipients], received, now, self.hostname)

    def _received_header(self, session: Session, transmission_id: str,
                         recipients: list[smtp.Address], now: float) -> bytes:
        """The trace header RFC 5321 §4.4 asks every relay to add."""
        proto = "ESMTP" + ("S" if session.tls else "") + ("A" if session.auth_user else "")
        helo = "".join(c for c in session.helo if c.isprintable() and c not in "()") or "unknown"
        # Every line within RFC 5322's 998 octets: a HELO name is at most a domain name's 255
        # (a longer one is cut), and a recipient too long for its line is left out.
        if len(helo.encode("utf-8", "replace")) > 255:
            helo = helo.encode("utf-8", "replace")[:252].decode("utf-8", "ignore") + "..."
        lines = [
            f"Received: from {helo} ([{session.client_address}])",
            f"\tby {self.hostname} (engage-appliance) with {proto} id {transmission_id}",
        ]
        date = f"; {email.utils.formatdate(now)}"
        if len(recipients) == 1 and len(address_text(recipients[0])) + len(date) <= 900:
            lines.append(f"\tfor <{address_text(recipients[0])}>")
        lines[-1] += date
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")

    def finish(self, transaction: Transaction) -> defer.Deferred:
        """
        Decide, commit and announce an entirely received message; fires with the SMTP reply.

        SMTP has one reply for the whole message, so: a bad ``X-MSYS-API``
        refuses it for everyone (``550 5.6.0``); a temporary policy answer
        for any recipient refuses it for everyone with that answer, so the
        client retries and nobody is lost; recipients the policy rejects
        for good, and recipients on the suppression list, are left out,
        each with a ``policy_rejection`` event, and if that leaves nobody
        the first rejection is the reply.

        An accepted message's events and its hand-over to delivery come after
        the reply has been given to whoever waits on the returned Deferred.
        """
        reply: defer.Deferred = defer.Deferred()
        d = self._finish(transaction)
        waiting = not d.called

        def answered(result: tuple[tuple[int, bytes], QueuedMessage | None]) -> None:
            answer, queued = result
            reply.callback(answer)
            if queued is not None:
                # The reply is only written to the transport here; the socket gets it at the
                # reactor's next poll. Preparing the message would otherwise start first, in a
                # thread that holds the interpreter while the 250 waits (traced: the whole
                # prepare, 0.6 ms and more, between the commit and the 250). A call made with
                # callLater(0) would still run before that poll, in this same pass.
                if self.next_turn is not None:
                    announced: defer.Deferred = defer.Deferred()
                    self.next_turn(lambda: defer.maybeDeferred(self._announce, queued)
                                   .chainDeferred(announced))
                else:
                    announced = self._announce(queued)
                self._track(announced.addBoth(self._enqueue, queued))

        if waiting:
            self.in_flight.add(transaction)
        d.addCallbacks(answered, reply.errback)
        if waiting:  # after ``answered``: a stop must not see a gap between the two
            d.addBoth(self._finished, transaction)
        return reply

    def _track(self, d: defer.Deferred) -> None:
        if d.called:
            return
        self.announcing.add(d)

        def done(_: Any) -> None:
            self.announcing.discard(d)
            self._wake_idle()

        d.addBoth(done)

    def _finished(self, result: Any, transaction: Transaction) -> Any:
        self.in_flight.discard(transaction)
        self._wake_idle()
        return result

    def _wake_idle(self) -> None:
        if not self.in_flight and not self.announcing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def idle(self) -> defer.Deferred:
        """Fires once no transaction is being decided or committed, and no event is owed."""
        self.spool.write_marks()  # a stop waits for them, not for their delay
        if not self.in_flight and not self.announcing:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    @defer.inlineCallbacks
    def _finish(self, transaction: Transaction) -> Any:
        """What ``finish`` does, without the bookkeeping a stop waits on."""
        headers = transaction.headers()
        recipients = [self._recipient(transaction, rcpt) for rcpt in transaction.recipients]
        hops = len(headers.get_all("Received") or ())  # our own trace header is the first
        if hops > self.max_hops:
            return self._refuse_now(transaction, headers, recipients, [
                (554, f"5.4.6 Too many hops ({hops} Received: headers, at most {self.max_hops}): "
                      "a mail loop?")] * len(recipients))
        try:
            api = parse_msys_api(header_values(headers), self.tracker.max_metadata_len)
        except MsysApiError as e:
            return self._refuse_now(transaction, headers, recipients,
                                    [(550, f"5.6.0 {e}")] * len(recipients))

        verdicts = yield self._policy_verdicts(transaction, headers)
        verdicts = self._suppressed(transaction.recipients, verdicts, api)
        temporary = next((v for v in verdicts if v.temporary), None)
        if temporary is not None:
            return self._refuse_now(transaction, headers, recipients,
                                    [(temporary.code, temporary.text)] * len(recipients))
        if not any(v.accepted for v in verdicts):
            return self._refuse_now(transaction, headers, recipients,
                                    [(v.code, v.text) for v in verdicts])

        smtpapi = transaction.session.listener.smtpapi
        accepted: list[Recipient] = []
        rejected: list[tuple[Recipient, Verdict]] = []
        limits: list[dict[str, Any]] = []
        for rcpt, verdict in zip(recipients, verdicts, strict=True):
            if not verdict.accepted:
                rejected.append((rcpt, verdict))
                continue
            limits.append(limit_notes(api, verdict.context))
            tracking = resolve(smtpapi, self.tracker, api, verdict.context, transaction.started)
            rcpt.tracking = tracking
            rcpt.event_fields = recipient_fields(transaction.transmission_id, rcpt.address,
                                                 rcpt.message_id, tracking)
            accepted.append(rcpt)

        envelope = Envelope(
            transmission_id=transaction.transmission_id,
            mail_from=transaction.mail_from,
            recipients=accepted,
            received_at=transaction.started,
            client_address=transaction.session.client_address,
            auth_user=transaction.session.auth_user,
            listener=transaction.session.listener.name,
            message_size=transaction.writer.size,
            # Cut one byte past the events' cap, so an event still marks it cut (``_capped``).
            subject=cap_text(header_text(headers, "Subject"), TEXT_CAPS["subject"] + 1)[0],
            friendly_from=cap_text(friendly_from(headers), TEXT_CAPS["friendly_from"] + 1)[0],
            announce=self._owed(headers, accepted, rejected, limits),
        )
        if transaction.client_gone:
            # Nobody would hear the 250: committing would deliver a message the client
            # believes failed, and sends again.
            log.info("client {client} left before transaction {tid} was committed; discarded",
                     client=transaction.session.client_address, tid=transaction.transmission_id)
            transaction.abort()
            return (421, b"4.4.2 Connection lost before the message was committed"), None
        queued = yield transaction.writer.commit(envelope)
        # The message is durable now and its 250 stands; its events are owed (``finish``).
        return (250, f"2.0.0 OK queued as {envelope.transmission_id}".encode()), queued

    def _suppressed(self, recipients: list[str], verdicts: list[Verdict], api: MsysApi) -> list[Verdict]:
        """
        The verdicts with each suppressed recipient refused (``550 5.7.1``, naming its scope).

        Whether a copy is transactional is the policy's or the header's to
        say, so it is decided per recipient after the policy. A lookup is a
        set membership test in memory: nothing here waits.
        """
        if self.suppressions is None:
            return verdicts
        out = []
        for rcpt, verdict in zip(recipients, verdicts, strict=True):
            if verdict.accepted:
                scope = self.suppressions.suppressed(rcpt, is_transactional(api, verdict.context))
                if scope is not None:
                    verdict = Verdict(550, SUPPRESSED.format(scope=scope))
            out.append(verdict)
        return out

    def _owed(self, headers: Message, accepted: list[Recipient],
              rejected: list[tuple[Recipient, Verdict]],
              limits: list[dict[str, Any]]) -> dict[str, Any]:
        """
        What the events owed after the 250 say, and their event_ids: stored in the envelope.

        The subject and sender are the envelope's own (schema 4); ``limits``
        holds, per accepted recipient, what Momentum's limits left out, when
        anything was.
        """
        tracked = any(r.tracking.enabled for r in accepted)
        # A sender's signature the copies may break without tracking: by losing X-MSYS-API, or
        # by gaining List-Unsubscribe fields it signed as absent.
        signed_api = headers.get("DKIM-Signature") is not None and (
            bool(header_values(headers)) or any(r.tracking.list_unsubscribe for r in accepted))
        owed: dict[str, Any] = {
            # Prepared before its events: they say when tracking had to be skipped and
            # whether a DKIM signature is broken, and the prepared form stays cached.
            "prepare": self.copies is not None and (tracked or signed_api),
            "injection": [self.events.ids.event_id() for _ in accepted],
            "rejected": [{"recipient": rcpt.to_json(), "code": verdict.code, "text": verdict.text,
                          "event_id": self.events.ids.event_id()} for rcpt, verdict in rejected],
        }
        if any(limits):
            owed["limits"] = limits
        return owed

    def _enqueue(self, _: Any, queued: QueuedMessage) -> None:
        # Prepared from memory (``Spool.read_message``); a copy the cache lacks from now on
        # is read from disk, so a message waiting days for its destination holds no memory.
        queued.text = None
        try:
            self.queue.enqueue(queued)
        except Exception:
            log.failure("could not queue message {tid}; it is on disk and is delivered after a restart",
                        tid=queued.envelope.transmission_id)

    def recover_owed(self, queued: QueuedMessage) -> None:
        """
        Write the events a recovered entry still owes (the spool's ``on_owed``).

        Called before its delivery is scheduled. An event whose event_id is in
        the event log's tail was written before the crash, only its mark was
        not: it is not written again.
        """
        if self._logged_ids is None:
            self._logged_ids = self._event_ids_in_tail()
        log.info("writing the events message {tid} still owed at the last stop",
                 tid=queued.envelope.transmission_id)
        self._track(self._announce(queued, self._logged_ids))

    def _event_ids_in_tail(self) -> frozenset[str]:
        try:
            with open(self.events.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - EVENT_LOG_TAIL))
                tail = f.read()
        except FileNotFoundError:
            return frozenset()
        return frozenset(m.decode() for m in _EVENT_ID.findall(tail))

    def _announce(self, queued: QueuedMessage, written: frozenset[str] = frozenset()) -> defer.Deferred:
        """
        Write the events ``queued`` owes (all but those in ``written``), then mark them written.

        Fires once the events are in the log; the mark follows in the file pool.
        """
        envelope = queued.envelope
        owed = envelope.announce
        if owed is None:
            return defer.succeed(None)
        try:
            for rejection in owed["rejected"]:
                if rejection["event_id"] not in written:
                    self._rejection_event(
                        Recipient.from_json(rejection["recipient"]), envelope.mail_from,
                        owed.get("friendly_from", envelope.friendly_from),
                        owed.get("subject", envelope.subject), envelope.client_address,
                        rejection["code"], rejection["text"], envelope.received_at,
                        rejection["event_id"])
        except Exception:
            log.failure("announcing message {tid} failed", tid=envelope.transmission_id)
        d = self._prepared(queued) if owed["prepare"] else defer.succeed(None)
        d.addCallback(self._injection_events, queued, written)
        d.addErrback(lambda f: log.failure("announcing message {tid} failed; it is queued all the same",
                                           f, tid=envelope.transmission_id))
        d.addCallback(lambda _: self._mark_announced(queued))
        return d

    def _mark_announced(self, queued: QueuedMessage) -> None:
        mark = defer.maybeDeferred(self.spool.announced, queued)
        if self._idle_waiters:
            self.spool.write_marks()  # stopping: not after the spool's delay
        mark.addErrback(lambda f: log.failure(
            "could not mark the events of {tid} written; a restart before its copies are final "
            "looks for them in the event log", f, tid=queued.envelope.transmission_id))
        self._track(mark)

    def _policy_verdicts(self, transaction: Transaction, headers: Any) -> defer.Deferred:
        if self.policy is None:
            return defer.succeed([ACCEPT] * len(transaction.recipients))
        session = transaction.session
        everyone = tuple(transaction.recipients)
        envelopes = [PolicyEnvelope(transaction.mail_from, rcpt, everyone, transaction.transmission_id,
                                    session.listener.name, session.helo, session.tls)
                     for rcpt in transaction.recipients]
        return self.policy.check_all(envelopes, session.client_address, session.auth_user, headers)

    def _refuse_now(self, transaction: Transaction, headers: Any, recipients: list[Recipient],
                    replies: list[tuple[int, str]]) -> tuple[tuple[int, bytes], None]:
        """Nothing is kept; every recipient gets a ``policy_rejection`` event with its reason."""
        transaction.abort()
        sender, subject = friendly_from(headers), header_text(headers, "Subject")
        for rcpt, (code, text) in zip(recipients, replies, strict=True):
            self._rejection_event(rcpt, transaction.mail_from, sender, subject,
                                  transaction.session.client_address, code, text, transaction.started)
        code, text = replies[0]
        return (code, text.encode("ascii", "replace")), None

    def _rejection_event(self, rcpt: Recipient, mail_from: str, sender: str, subject: str,
                         client_address: str, code: int, text: str, received_at: float,
                         event_id: str | None = None) -> None:
        kind, fields = policy_rejection_event(rcpt, mail_from, sender, subject, client_address,
                                              code, text, received_at)
        if event_id is not None:
            fields = {**fields, "event_id": event_id}
        try:
            self.events.emit(kind, **fields)
        except OSError:
            log.failure("could not write the policy_rejection event of {message_id}",
                        message_id=rcpt.message_id)

    def _prepared(self, queued: QueuedMessage) -> defer.Deferred:
        """
        The message prepared for its copies (in a worker thread); ``None`` if that failed.

        Done now, not only at delivery, so the injection event can say when
        tracking had to be skipped and whether a DKIM signature is broken;
        the prepared form stays cached for delivery.
        """
        if self.copies is None:
            return defer.succeed(None)

        def failed(failure: Any) -> None:
            # Committed already: the event goes out without what the rewrite would have told.
            log.failure("could not prepare message {tid}", failure,
                        tid=queued.envelope.transmission_id)
            return None

        return defer.maybeDeferred(self.copies.prepare_later, queued).addErrback(failed)

    def _recipient(self, transaction: Transaction, rcpt: str) -> Recipient:
        message_id = self.events.ids.message_id()
        return Recipient(address=rcpt, message_id=message_id,
                         event_fields=recipient_fields(transaction.transmission_id, rcpt, message_id))

    def _injection_events(self, prepared: Prepared | None, queued: QueuedMessage,
                          written: frozenset[str]) -> None:
        envelope = queued.envelope
        owed = envelope.announce or {}
        # Schema 3 kept the subject and sender with the events owed; schema 4 in the envelope.
        sender = owed.get("friendly_from", envelope.friendly_from)
        subject = owed.get("subject", envelope.subject)
        event_ids = owed.get("injection") or [None] * len(envelope.recipients)
        limits = owed.get("limits") or [None] * len(envelope.recipients)
        # A copy the appliance signs itself carries a valid signature: SPEC §5 asks for
        # dkim_broken only when it does not re-sign.
        resigned = prepared is not None and self.copies is not None and self.copies.resigns(prepared)
        for rcpt, event_id, noted in zip(envelope.recipients, event_ids, limits, strict=True):
            if event_id in written:
                continue
            skipped: list[str] = []
            broken = False
            if prepared is not None and self.copies is not None:
                skipped = self.copies.tracking_notes(prepared, envelope.transmission_id, rcpt)
                broken = prepared.dkim_broken(rcpt.tracking) and not resigned
            kind, fields = injection_event(envelope, rcpt, sender, subject, skipped, broken, noted)
            if event_id is not None:
                fields = {**fields, "event_id": event_id}
            try:
                self.events.emit(kind, **fields)
            except OSError:
                # The message is already safe on disk; a missing event must not lose it.
                log.failure("could not write the injection event of {message_id}",
                            message_id=rcpt.message_id)
