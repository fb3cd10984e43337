"""
The outbound side: from a spooled message to each recipient's mail server.

``DeliveryService`` keeps, in memory, the schedule of every copy that the
spool says is not final, and runs attempts on an injected clock. Each attempt
sends one recipient's copy in its own SMTP transaction (the copies differ),
and its outcome is written as an event *before* the spool's journal records
it, so a crash can repeat an attempt but never lose one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, ssl
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.mail import smtp

from appliance.config import DeliveryConfig, Route
from appliance.events import EventLog
from appliance.spool import QueuedMessage, Spool

log = Logger()

CopyRenderer = Callable[[QueuedMessage, int], bytes]


class Router:
    """Where a recipient domain's mail goes: a static route, else the smarthost."""

    def __init__(self, config: DeliveryConfig) -> None:
        self.routes = config.routes
        self.smarthost = config.smarthost

    def route(self, domain: str) -> Route | None:
        domain = domain.lower().rstrip(".")
        if domain in self.routes:
            return self.routes[domain]
        parts = domain.split(".")
        for i in range(1, len(parts)):
            wildcard = "*." + ".".join(parts[i:])
            if wildcard in self.routes:
                return self.routes[wildcard]
        return self.smarthost

    def can_route(self, domain: str) -> bool:
        return self.route(domain) is not None


class Sender(smtp.ESMTPSender):
    """
    Sends canonical CRLF text with dot-stuffing that holds across chunks.

    The stock ``transformChunk`` turns LF into CRLF (so CRLF becomes CR CR LF)
    and stuffs each 16 KiB chunk on its own, missing a "." that starts a chunk.
    The spool holds CRLF text already, so only stuffing is needed here.
    """

    _at_line_start = True

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        if self._at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        return chunk.replace(b"\n.", b"\n..")

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        self.sendLine(b"." if self._at_line_start else b"\r\n.")


class SenderFactory(smtp.ESMTPSenderFactory):
    protocol = Sender


class Outcome:
    """The result of one attempt, in the terms the events use."""

    def __init__(self, kind: str, code: int = 0, reason: str = "", ip_address: str = "") -> None:
        self.kind = kind  # "delivery", "delay" or "bounce"
        self.code = code
        self.reason = reason
        self.ip_address = ip_address


_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

# SparkPost bounce classes by enhanced status code (RFC 3463), most specific first.
_BOUNCE_CLASSES: tuple[tuple[str, str], ...] = (
    ("5.1.", "10"),  # bad destination mailbox or address: Invalid Recipient
    ("5.2.2", "22"),  # Mailbox Full
    ("5.2.3", "23"),  # message too long: Too Large
    ("5.3.4", "23"),
    ("5.4.4", "21"),  # unable to route: DNS Failure
    ("5.4.7", "24"),  # delivery time expired: Timeout
    ("5.7.1", "50"),  # delivery not authorized: Mail Block
    ("5.7.", "50"),
    ("5.2.", "25"),  # mailbox disabled or unavailable: Admin Failure
    ("5.", "40"),  # any other permanent failure: Generic Bounce
    ("4.", "20"),  # a temporary failure that outlived the queue lifetime: Soft Bounce
)


def bounce_class(code: int, reason: str) -> str:
    """SparkPost's ``bounce_class`` from the enhanced status code, else the basic code."""
    m = _ENHANCED.search(reason)
    status = ".".join(m.groups()) if m else (f"{code // 100}." if code else "")
    for prefix, klass in _BOUNCE_CLASSES:
        if status.startswith(prefix):
            return klass
    return "1"  # Undetermined


class DeliveryService(Service):
    name = "delivery"

    def __init__(
        self,
        config: DeliveryConfig,
        spool: Spool,
        events: EventLog,
        render: CopyRenderer,
        router: Router,
        helo_name: str,
        reactor: Any = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.spool = spool
        self.events = events
        self.render = render
        self.router = router
        self.helo_name = helo_name
        self.reactor: IReactorTCP & IReactorTime = reactor
        self.now = now or reactor.seconds
        self._limit = defer.DeferredSemaphore(config.max_connections)
        self._timers: dict[tuple[str, int], Any] = {}
        self._in_flight: set[defer.Deferred] = set()

    # -- the schedule ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        recovered = 0
        for queued in self.spool.recover():
            recovered += 1
            self.enqueue(queued)
        if recovered:
            log.info("picked up {n} spooled message(s) from before the restart", n=recovered)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return defer.DeferredList(list(self._in_flight), consumeErrors=True)

    def enqueue(self, queued: QueuedMessage) -> None:
        for index, state in enumerate(queued.states):
            if not state.done:
                self._schedule(queued, index, max(0.0, state.next_attempt - self.now()))

    def _schedule(self, queued: QueuedMessage, index: int, delay: float) -> None:
        key = (queued.envelope.transmission_id, index)
        self._timers[key] = self.reactor.callLater(delay, self._start, queued, index)

    def _start(self, queued: QueuedMessage, index: int) -> None:
        self._timers.pop((queued.envelope.transmission_id, index), None)
        d = self._limit.run(self._attempt, queued, index)
        self._in_flight.add(d)
        d.addErrback(lambda f: log.failure("delivery attempt crashed", f))
        d.addBoth(lambda _: self._in_flight.discard(d))

    # -- one attempt -----------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, queued: QueuedMessage, index: int) -> Any:
        recipient = queued.envelope.recipients[index]
        domain = recipient.address.rpartition("@")[2]
        route = self.router.route(domain)
        if route is None:
            outcome = Outcome("delay", 451, f"4.4.4 No route to {domain} in the configuration")
        else:
            try:
                data = self.render(queued, index)
            except OSError as e:
                outcome = Outcome("delay", 451, f"4.3.0 Cannot read the spooled message: {e}")
            else:
                outcome = yield self._send(route, queued.envelope.mail_from, recipient.address, data)
        yield self._settle(queued, index, outcome)

    def _send(self, route: Route, mail_from: str, rcpt: str, data: bytes) -> defer.Deferred:
        result: defer.Deferred = defer.Deferred()
        factory = SenderFactory(
            None, None, mail_from, rcpt, io.BytesIO(data), result,
            retries=0, timeout=self.config.command_timeout,
            contextFactory=ssl.CertificateOptions(),
            requireAuthentication=False, requireTransportSecurity=False,
        )
        factory.domain = self.helo_name.encode("idna")
        self.reactor.connectTCP(route.host, route.port, factory,
                                timeout=self.config.connect_timeout)
        where = f"{route.host}:{route.port}"
        return result.addCallbacks(self._sent, self._failed, callbackArgs=(where,),
                                   errbackArgs=(where,))

    @staticmethod
    def _sent(result: tuple[int, list[Any]], where: str) -> Outcome:
        _count, addresses = result
        _addr, code, resp = addresses[0]
        return Outcome("delivery", code, resp.decode("utf-8", "replace"), where)

    @staticmethod
    def _failed(failure: Any, where: str) -> Outcome:
        exc = failure.value
        if isinstance(exc, smtp.SMTPClientError) and exc.code >= 400:
            resp = exc.resp.decode("utf-8", "replace") if isinstance(exc.resp, bytes) else str(exc.resp)
            kind = "bounce" if 500 <= exc.code < 600 else "delay"
            return Outcome(kind, exc.code, f"{exc.code} {resp}", where)
        if isinstance(exc, smtp.SMTPClientError | error.ConnectError | error.ConnectionLost |
                      error.TimeoutError | error.ConnectionDone):
            return Outcome("delay", 0, f"Connection to {where} failed: {exc}", where)
        log.failure("unexpected failure delivering to {where}", failure, where=where)
        return Outcome("delay", 0, f"Delivery to {where} failed: {exc}", where)

    def _backoff(self, attempts: int) -> float:
        return min(self.config.retry_initial * 2 ** max(attempts - 1, 0), self.config.retry_max)

    def _settle(self, queued: QueuedMessage, index: int, outcome: Outcome) -> defer.Deferred:
        state = queued.states[index]
        state.attempts += 1
        now = self.now()
        queue_time = now - queued.envelope.received_at
        if outcome.kind == "delay" and queue_time >= self.config.max_queue_lifetime:
            outcome = Outcome("bounce", outcome.code,
                              f"5.4.7 Message expired after {int(queue_time)}s in queue; last error: "
                              f"{outcome.reason}",
                              outcome.ip_address)
        fields: dict[str, Any] = {
            **queued.envelope.recipients[index].event_fields,
            "ip_address": outcome.ip_address,
            "queue_time": str(int(queue_time * 1000)),
            "num_retries": str(state.attempts - 1),
            "delv_method": "esmtp",
            "routing_domain": queued.envelope.recipients[index].address.rpartition("@")[2].lower(),
            "msg_from": queued.envelope.mail_from,
        }
        if outcome.kind != "delivery":
            fields.update(
                error_code=str(outcome.code) if outcome.code else "",
                reason=outcome.reason,
                raw_reason=outcome.reason,
            )
        if outcome.kind == "bounce":
            fields["bounce_class"] = bounce_class(outcome.code, outcome.reason)
        self.events.emit(outcome.kind, **fields)
        final = outcome.kind != "delay"
        if not final:
            state.next_attempt = now + self._backoff(state.attempts)
            if self.running:
                self._schedule(queued, index, state.next_attempt - now)
        return self.spool.record(queued, index, done=final)


def message_from_spool(spool: Spool) -> CopyRenderer:
    """The copy renderer used while no rewriting is configured: the spooled text itself."""

    def render(queued: QueuedMessage, index: int) -> bytes:
        return spool.read_message(queued)

    return render

