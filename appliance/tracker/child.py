"""
A tracker process: answers hits on the socket the appliance hands it and sends
the events it makes to the appliance, which writes them to the one event log.

``appliance.tracker.processes`` starts it as ``python -m appliance.tracker.child
<owner pid>`` with its listening socket as descriptor 3, its messages in on
stdin and out on stdout (``appliance.tracker.wire``), and its log lines on
stderr, which the appliance logs as its own. Everything it needs arrives in
the ``setup`` message (the link keys among it): it reads no configuration
file, so it can never read one differently from the appliance.

It answers with the same ``Tracker`` and resources as the appliance's own
listener; only where a hit's events go differs (``EventRelay``). It ends when
the appliance says ``stop`` (after sending what it still holds), when its
stdin closes (the appliance is gone), or, as a last resort, by the kernel's
parent-death signal.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure

from appliance.config import TrackerLimits
from appliance.engagement import Engagement
from appliance.engagement.geo import open_geoip
from appliance.engagement.networks import EMPTY, Networks, read_networks
from appliance.events import Event, IdGenerator, new_event
from appliance.links import LinkCodec
from appliance.tracker import Tracker, TrackerSite, make_site
from appliance.tracker.wire import Decoder, Message, WireError, encode, keyring_from

log = Logger()

LISTENING_FD = 3
STATS_INTERVAL = 1.0  # seconds between the counters sent to the appliance
DROP_LOG_INTERVAL = 10.0  # at most one log line this often about events dropped
STOP_GRACE = 3.0  # seconds a stopping process waits for its last batches to be taken


class EventRelay:
    """
    Where a tracker process's events go: made as the event log makes them, sent in batches.

    A batch leaves when ``batch_size`` events wait or ``interval`` after the
    first; at most ``window`` batches wait for the appliance's ``ack``. While
    the appliance does not take them (busy, or stopped), hits keep being
    answered and their events wait here, up to ``max_buffered``; the events
    of a hit beyond that are dropped, counted in ``dropped`` and logged.
    """

    def __init__(self, index: int, node_name: str, customer_id: str, send: Callable[[Message], None],
                 clock: IReactorTime, *, max_buffered: int = 20_000, batch_size: int = 200,
                 interval: float = 0.01, window: int = 4, now: Callable[[], float] = time.time) -> None:
        self.index = index
        self.node_name = node_name
        self.customer_id = customer_id
        self.ids = IdGenerator(node_name, now, process=index)
        self._now = now
        self._send = send
        self._clock = clock
        self.max_buffered = max_buffered
        self.batch_size = batch_size
        self.interval = interval
        self.window = window
        self._hits: list[list[Any]] = []
        self.buffered = 0  # events in ``_hits``
        self.unacked = 0
        self.dropped = 0
        self._dropped_logged = 0
        self._last_drop_log = float("-inf")
        self._timer: Any = None
        self._drained: list[defer.Deferred[None]] = []

    def make(self, type_: str, **fields: Any) -> Event:
        return new_event(self.ids, self._now, self.node_name, self.customer_id, type_, fields)

    def hit(self, events: list[Event], address: str, token: bytes) -> None:
        """One hit's events, with what the appliance's limiter counts them by."""
        if self.buffered + len(events) > self.max_buffered:
            self.dropped += len(events)
            self._log_drops()
            return
        self._hits.append([address, token.decode("latin-1"), events])
        self.buffered += len(events)
        if self.buffered >= self.batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self.interval, self.flush)

    def flush(self) -> None:
        """Send what waits, in batches, as far as the window allows."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        while self._hits and self.unacked < self.window:
            taken = count = 0
            for hit in self._hits:
                taken += 1
                count += len(hit[2])
                if count >= self.batch_size:
                    break
            batch = self._hits[:taken]
            del self._hits[:taken]
            self.buffered -= count
            self.unacked += 1
            self._send({"batch": batch})
        self._check_drained()

    def ack(self) -> None:
        self.unacked = max(0, self.unacked - 1)
        self.flush()

    def drain(self) -> defer.Deferred[None]:
        """Fires once every event is sent and acknowledged."""
        self.flush()
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        self._check_drained()
        return d

    def _check_drained(self) -> None:
        if self._drained and not self._hits and not self.unacked:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _log_drops(self) -> None:
        now = self._clock.seconds()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            log.warn("{count} event(s) dropped ({total} in all): the appliance is not taking them "
                     "and {buffered} wait already", count=self.dropped - self._dropped_logged,
                     total=self.dropped, buffered=self.buffered)
            self._dropped_logged = self.dropped
            self._last_drop_log = now


class RelayedTracker(Tracker):
    """The appliance's ``Tracker``, whose hits go to the relay; the appliance applies the limiter."""

    events: EventRelay  # type: ignore[assignment]

    def write(self, events: list[Event], address: str, token: bytes) -> None:
        self.events.hit(events, address, token)


class TrackerProcess(Protocol):
    """The process's side of the pipes: ``setup`` starts it answering, ``stop`` or EOF ends it."""

    def __init__(self, reactor: Any, stop: Callable[[], None]) -> None:
        self.reactor = reactor
        self._stop_reactor = stop
        self._decoder = Decoder()
        self.relay: EventRelay | None = None
        self.site: TrackerSite | None = None
        self.codec: LinkCodec | None = None
        self.port: Any = None
        self._stats = LoopingCall(self.send_stats)
        self._stats.clock = reactor
        self._stopping = False
        self.latency_buckets: tuple[float, ...] = ()
        self.latency_counts: list[int] = []
        self.latency_seconds = 0.0

    def send(self, message: Message) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def dataReceived(self, data: bytes) -> None:
        try:
            for message in self._decoder.feed(data):
                self.handle(message)
        except WireError as e:
            log.error("the appliance sent a broken message ({error}); stopping", error=str(e))
            self.stop()

    def handle(self, message: Message) -> None:
        if "ack" in message:
            if self.relay is not None:
                self.relay.ack()
        elif "setup" in message:
            self.setup(message["setup"])
        elif "keys" in message:
            if self.codec is not None:
                self.codec.use(keyring_from(message["keys"]))
        elif "networks" in message:
            self.reload_networks()
        elif "stop" in message:
            self.stop()

    def setup(self, s: dict[str, Any]) -> None:
        import ipaddress

        self.codec = LinkCodec(keyring_from(s["keys"]))
        self.relay = EventRelay(s["index"], s["node_name"], s["customer_id"], self.send, self.reactor,
                                max_buffered=s["max_buffered"])
        limits = TrackerLimits(**s["limits"])
        trusted = [ipaddress.ip_network(n) for n in s["trusted_proxies"]]
        self.engagement_files = s.get("engagement", {})
        self.engagement = open_engagement(self.engagement_files)
        self.site = make_site(self.codec, self.relay, trusted, reactor=self.reactor, limits=limits,
                              engagement=self.engagement, tracker_type=RelayedTracker, limit_hits=False)
        family = socket.AF_INET6 if s["family"] == "inet6" else socket.AF_INET
        self.port = self.reactor.adoptStreamPort(LISTENING_FD, family, self.site)
        os.close(LISTENING_FD)  # adopting made its own copy
        self.latency_buckets = tuple(s["latency_buckets"])
        self.latency_counts = [0] * (len(self.latency_buckets) + 1)
        self.site.on_answered = self.answered
        self._stats.start(STATS_INTERVAL, now=True)

    def reload_networks(self) -> None:
        """Re-read the prefetch networks file in a thread; a file that cannot be used keeps the old ones."""
        path = self.engagement_files.get("prefetch_networks_file")
        if not path or self.engagement is None:
            return

        def use(networks: Networks) -> None:
            self.engagement.prefetch_networks = networks

        def keep(failure: Failure) -> None:
            log.error("kept the prefetch networks in use: {error}", error=failure.getErrorMessage())

        threads.deferToThread(read_networks, path).addCallbacks(use, keep)

    def answered(self, seconds: float) -> None:
        """One answer's time, counted as the appliance's ``/metrics`` histogram counts them."""
        self.latency_counts[bisect.bisect_left(self.latency_buckets, seconds)] += 1
        self.latency_seconds += seconds

    def send_stats(self) -> None:
        if self.site is None or self.relay is None:
            return
        connections = self.site.connections
        self.send({"stats": {"connections": connections.total, "refused": connections.refused,
                             "evicted": connections.evicted, "dropped": self.relay.dropped,
                             "waiting": self.relay.buffered,
                             "latency": [self.latency_counts, self.latency_seconds]}})

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop listening, hand over the events still held (for a while at most), and end."""
        if self._stopping:
            return
        self._stopping = True
        try:
            if self.port is not None:
                yield self.port.stopListening()
            if self.relay is not None and self.transport is not None:
                drained = self.relay.drain()
                timer = self.reactor.callLater(STOP_GRACE, drained.cancel)
                try:
                    yield drained
                except defer.CancelledError:
                    log.warn("stopping with {count} event(s) not taken by the appliance",
                             count=self.relay.buffered)
                else:
                    timer.cancel()
                self.send_stats()
        finally:
            if self._stats.running:
                self._stats.stop()
            self._stop_reactor()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """The appliance closed the pipe (or ended): nothing more can be handed over."""
        self.transport = None
        if not self._stopping:
            self._stopping = True
            if self._stats.running:
                self._stats.stop()
            self._stop_reactor()


def open_engagement(files: dict[str, Any]) -> Engagement:
    """The owner's engagement rules over the same files (``processes.engagement_files``)."""
    networks_file, geoip_file = files.get("prefetch_networks_file"), files.get("geoip_database")
    networks = read_networks(networks_file) if networks_file else EMPTY
    geoip = open_geoip(geoip_file) if geoip_file else None
    return Engagement(networks, geoip, float(files.get("click_prefetch_seconds", 0.0)))


def die_with(owner: int) -> None:
    """Be killed by the kernel when the process that started this one ends (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != owner:  # it ended before the signal was asked for
        os._exit(0)


def main(argv: list[str]) -> int:
    die_with(int(argv[1]))
    # The appliance handles these and passes on what concerns this process (a Ctrl-C or a
    # signal to the whole group must not end it before it handed over its events).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stderr, lambda e: (eventAsText(e, includeTimestamp=False,
                                                            includeSystem=False) or "") + "\n")],
        redirectStandardIO=False)
    from twisted.internet import reactor, stdio  # this module is a program of its own

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    stdio.StandardIO(TrackerProcess(reactor, stop), reactor=reactor)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
