"""
The tracker on several processes (``[tracker] processes``): this one and N - 1 children.

How connections are spread: the appliance opens one listening socket per
process on the same address, each with ``SO_REUSEPORT``, and hands each child
its own; the kernel then spreads new connections evenly over the sockets (by
a hash of the connection's addresses). A plain shared socket would not: the
process that wakes first accepts up to 100 connections at once and the
others idle. Passing accepted connections from this process instead
(``sendFileDescriptor``) would cost this process a system call or two per
connection, and this is the process whose core is busiest. Because the
appliance holds every child's socket, a child that dies loses nothing
already queued on it: the replacement takes over the same socket and
accepts what waited. Only processes of the same user may join a
``SO_REUSEPORT`` address on Linux, and the sockets are made before twistd
drops privileges, so a child never binds anything itself.

What stays in this process: the event log (children send their events over
their pipes, ``appliance.tracker.wire``, and this process writes them, so
there is one log and one ``/metrics`` counting every event), the per-link
event limit (each hit a child sends passes this process's limiter, so it is
counted once across all processes), the link keys (sent at start and after
every SIGHUP re-read) and the signals (SIGHUP and SIGTERM reach only this
process; it passes on what concerns the children). The connection limits
are per socket, so each process holds its share of them (``share``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import appliance
from appliance.config import EngagementTrackerConfig, TrackerLimits
from appliance.config.values import tcp_listen_address
from appliance.links import Keyring
from appliance.tracker import TrackerSite
from appliance.tracker.wire import Decoder, Message, WireError, encode, keys_message

log = Logger()


def engagement_files(c: EngagementTrackerConfig) -> dict[str, Any]:
    """What a tracker process needs to classify hits as this one does: the files, and the rule's time."""
    return {"prefetch_networks_file": c.prefetch_networks_file, "geoip_database": c.geoip_database,
            "click_prefetch_seconds": c.click_prefetch_seconds}

RESTART_DELAY = 1.0  # seconds before replacing a child that lived less than QUICK_DEATH
QUICK_DEATH = 5.0
STOP_TIMEOUT = 10.0  # seconds a child has to hand over its events and end, then it is killed
MAX_BUFFERED = 20_000  # events a child holds while this process does not take them


def share(limits: TrackerLimits, processes: int) -> TrackerLimits:
    """
    One process's part of the connection limits: each is divided among the processes,
    rounded up, so together they hold at most about what one process would.
    """
    return dataclasses.replace(
        limits,
        max_connections=math.ceil(limits.max_connections / processes),
        max_connections_per_address=math.ceil(limits.max_connections_per_address / processes))


def open_sockets(endpoint: str, count: int) -> list[socket.socket]:
    """
    ``count`` listening sockets on ``endpoint``'s address, each with ``SO_REUSEPORT``.

    A port of 0 is the one the first socket was given, for all of them.
    """
    address = tcp_listen_address(endpoint)
    if address is None:
        raise ValueError(f"tracker processes need a tcp: endpoint, not {endpoint!r}")
    interface, port, backlog = address
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((interface, port))
            port = s.getsockname()[1]
            s.listen(backlog)
            s.setblocking(False)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


@dataclasses.dataclass
class ChildCounters:
    """What a child last reported; a counter's total is what ended children reported plus these."""

    connections: int = 0
    refused: int = 0
    evicted: int = 0
    dropped: int = 0
    waiting: int = 0  # events it holds, not yet sent


LEVELS = ("connections", "waiting")  # not counts: what an ended child had is gone with it


class TrackerChild(ProcessProtocol):
    """This process's side of one child's pipes."""

    def __init__(self, pool: TrackerProcesses, index: int) -> None:
        self.pool = pool
        self.index = index
        self.counters = ChildCounters()
        self.started = pool.reactor.seconds()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exited = False
        self.process_id: int | None = None  # kept for the log line once it has ended
        self.ready = False  # it reported once: it is set up and answering
        self.latency: tuple[list[int], float] = ([], 0.0)  # answers by bucket, and their seconds
        self._decoder = Decoder()
        self._errors = b""

    def send(self, message: Message) -> None:
        if not self.exited and self.transport is not None:
            self.transport.write(encode(message))

    def connectionMade(self) -> None:
        self.process_id = self.transport.pid
        self.send({"setup": self.pool.setup(self.index)})

    def outReceived(self, data: bytes) -> None:
        try:
            for message in self._decoder.feed(data):
                self.handle(message)
        except (WireError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.error("tracker process {index} sent a broken message ({error}); ending it",
                      index=self.index, error=str(e))
            self.kill()

    def handle(self, message: Message) -> None:
        if "batch" in message:
            self.pool.take(message["batch"])
            self.send({"ack": 1})
        elif "stats" in message:
            stats = message["stats"]
            self.ready = True
            counts, seconds = stats.get("latency", ([], 0.0))
            self.latency = ([int(n) for n in counts], float(seconds))
            self.counters = ChildCounters(*(int(stats.get(f.name, 0))
                                            for f in dataclasses.fields(ChildCounters)))

    def errReceived(self, data: bytes) -> None:
        """The child's log lines, logged here with its index."""
        self._errors += data
        *lines, self._errors = self._errors.split(b"\n")
        for line in lines:
            if line.strip():
                log.info("tracker process {index}: {line}", index=self.index,
                         line=line.decode("utf-8", "replace"))

    def kill(self) -> None:
        if not self.exited and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except Exception:  # it ended meanwhile
                pass

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.errReceived(b"\n")
        self.pool.child_ended(self, reason)
        self.ended.callback(None)


class TrackerProcesses(Service):
    """
    The tracker listener on ``processes`` processes, in place of a plain listening service.

    ``site`` answers in this process and receives the children's events (its
    ``tracker``'s ``write``); ``keyring`` is read at each start and each
    ``send_keys`` so children sign and verify with what this process uses.
    ``factory`` is ``site``, as on a strports service, for the health check.
    ``reactor`` provides ``IReactorTime``, ``IReactorProcess`` and ``IReactorSocket``.
    """

    def __init__(self, site: TrackerSite, endpoint: str, processes: int, *, reactor: Any,
                 keyring: Callable[[], Keyring], node_name: str, customer_id: str,
                 trusted_proxies: Sequence[Any], limits: TrackerLimits,
                 engagement: Mapping[str, Any] | None = None,
                 python: str = sys.executable, max_buffered: int = MAX_BUFFERED) -> None:
        """``engagement``: what ``engagement_files`` says, for children to open the same files."""
        if processes < 2:
            raise ValueError("TrackerProcesses is for more than one process")
        self.site = site
        self.factory = site
        self.endpoint = endpoint
        self.processes = processes
        self.reactor = reactor
        self.keyring = keyring
        self.node_name = node_name
        self.customer_id = customer_id
        self.trusted_proxies = tuple(trusted_proxies)
        self.limits = limits
        self.engagement = dict(engagement or {})
        self.python = python
        self.max_buffered = max_buffered
        self.children: dict[int, TrackerChild] = {}
        self.retired = ChildCounters()  # what ended children had counted
        self.restarts = 0
        self.latency_buckets: tuple[float, ...] = ()  # the children count their answers in these
        self._retired_latency: tuple[list[int], float] = ([], 0.0)
        self._sockets: list[socket.socket] = []
        self._port: Any = None
        self._pending: dict[int, Any] = {}  # index: the delayed call that replaces its child

    # -- starting and stopping ------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Open the sockets before twistd gives up privileges (a port below 1024)."""
        if not self._sockets:
            self._sockets = open_sockets(self.endpoint, self.processes)
        super().privilegedStartService()

    def startService(self) -> None:
        if not self._sockets:
            self._sockets = open_sockets(self.endpoint, self.processes)
        super().startService()
        own = self._sockets[0]
        self._port = self.reactor.adoptStreamPort(own.fileno(), own.family, self.site)
        own.close()  # the port holds its own copy
        for index in range(1, self.processes):
            self.spawn(index)

    @property
    def port(self) -> int:
        """The port every process listens on."""
        return int(self._port.getHost().port)

    def spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        child = TrackerChild(self, index)
        here = os.path.dirname(os.path.dirname(os.path.abspath(appliance.__file__)))
        env = dict(os.environ)
        # The child runs this very code, wherever it was imported from.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        self.reactor.spawnProcess(
            child, self.python, [self.python, "-m", "appliance.tracker.child", str(os.getpid())],
            env=env, childFDs={0: "w", 1: "r", 2: "r", 3: self._sockets[index].fileno()})
        self.children[index] = child
        log.info("tracker process {index} started (pid {pid})", index=index, pid=child.process_id)

    def child_ended(self, child: TrackerChild, reason: Failure) -> None:
        if self.children.get(child.index) is not child:
            return
        del self.children[child.index]
        for f in dataclasses.fields(ChildCounters):
            if f.name not in LEVELS:
                setattr(self.retired, f.name,
                        getattr(self.retired, f.name) + getattr(child.counters, f.name))
        self._retired_latency = _add_latency(self._retired_latency, child.latency)
        if not self.running:
            return
        lived = self.reactor.seconds() - child.started
        delay = RESTART_DELAY if lived < QUICK_DEATH else 0
        how = "" if reason.check(ProcessDone) else f": {reason.value}"
        log.error("tracker process {index} (pid {pid}) ended{how}; starting another in {delay:g}s",
                  index=child.index, pid=child.process_id,
                  how=how, delay=delay)
        self.restarts += 1
        self._pending[child.index] = self.reactor.callLater(delay, self.spawn, child.index)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening, let each child hand over its events and end, then close the sockets."""
        super().stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        children = list(self.children.values())
        for child in children:
            child.send({"stop": 1})
        if self._port is not None:
            yield self._port.stopListening()
            self._port = None
        if children:
            ended = defer.DeferredList([c.ended for c in children])
            timer = self.reactor.callLater(STOP_TIMEOUT, self._kill_all, children)
            yield ended
            if timer.active():
                timer.cancel()
        for s in self._sockets:
            s.close()
        self._sockets = []

    def _kill_all(self, children: list[TrackerChild]) -> None:
        for child in children:
            if not child.exited:
                log.error("tracker process {index} did not end in {timeout:g}s; killing it",
                          index=child.index, timeout=STOP_TIMEOUT)
                child.kill()

    # -- what children need and send ------------------------------------------------------

    def setup(self, index: int) -> Message:
        family = "inet6" if self._sockets[index].family == socket.AF_INET6 else "inet"
        return {"index": index, "node_name": self.node_name, "customer_id": self.customer_id,
                "trusted_proxies": [str(n) for n in self.trusted_proxies],
                "limits": dataclasses.asdict(self.limits), "keys": keys_message(self.keyring()),
                "family": family, "max_buffered": self.max_buffered, "engagement": self.engagement,
                "latency_buckets": list(self.latency_buckets)}

    def send_keys(self) -> None:
        """After a SIGHUP re-read: every child signs and verifies with the keys in use here."""
        keys = keys_message(self.keyring())
        for child in self.children.values():
            child.send({"keys": keys})

    def reload_networks(self) -> None:
        """After a SIGHUP: every child re-reads the prefetch networks file, as this process does."""
        if self.engagement.get("prefetch_networks_file"):
            for child in self.children.values():
                child.send({"networks": 1})

    def take(self, batch: list[Any]) -> None:
        """A child's hits: each passes this process's limiter and its events go to the log."""
        tracker = self.site.tracker
        for address, token, events in batch:
            tracker.write(events, address, token.encode("latin-1"))

    # -- counters for /metrics -----------------------------------------------------------

    def total(self, name: str) -> int:
        """A child counter summed over the children, the ended ones included (not for levels)."""
        live = sum(getattr(c.counters, name) for c in self.children.values())
        return live + (0 if name in LEVELS else getattr(self.retired, name))

    def latency(self) -> tuple[list[int], float]:
        """The children's answers by ``latency_buckets`` bucket and their seconds, ended ones included."""
        total = self._retired_latency
        for child in self.children.values():
            total = _add_latency(total, child.latency)
        return total


def _add_latency(a: tuple[list[int], float], b: tuple[list[int], float]) -> tuple[list[int], float]:
    longer, shorter = (a[0], b[0]) if len(a[0]) >= len(b[0]) else (b[0], a[0])
    counts = list(longer)
    for i, n in enumerate(shorter):
        counts[i] += n
    return counts, a[1] + b[1]
