"""
A whole appliance on a ``MemoryReactorClock``: no sockets, no threads, no waiting.

``MemoryAppliance`` builds the real ``Appliance`` from a test configuration
on a memory reactor, runs its file work synchronously, and connects clients
to its listeners, and its delivery to in-memory SMTP servers, with
``twisted.test.iosim``. ``settle()`` moves every byte and runs every call due
until nothing is left to do, so a test injects a message, reads the ``250``,
sees the copy arrive at the sink and asks the tracker, one step after the
other (as Synapse's ``HomeserverTestCase`` does for a homeserver).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

from appliance.build import build
from appliance.config import Config
from appliance.service import Appliance
from appliance.spool import entries_on_disk, run_synchronously
from tests.fakes import FakeResolver
from tests.helpers import make_config, merge, read_events
from tests.sink import SinkFactory

SMTP_PORT = 2525
HTTP_PORT = 8080
ADMIN_PORT = 8025
SINK = ("127.0.0.1", 2500)
START = 1_000_000.0  # the clock's start; timers are relative to it


class _Collector(protocol.Protocol):
    """The client side of a conversation: keeps what the server sent."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


class SmtpConversation:
    """One SMTP client connection to a listener; every call settles the appliance first."""

    def __init__(self, appliance: MemoryAppliance, client: _Collector) -> None:
        self.appliance = appliance
        self.client = client
        self._read = 0

    def send(self, data: bytes) -> None:
        """Write ``data`` as given (several commands may share one write) and settle."""
        assert self.client.transport is not None
        self.client.transport.write(data)
        self.appliance.settle()

    def replies(self) -> list[tuple[int, list[bytes]]]:
        """Every whole reply received since the last call: (code, each of its lines whole)."""
        out: list[tuple[int, list[bytes]]] = []
        lines: list[bytes] = []
        data = self.client.received
        while True:
            end = data.find(b"\r\n", self._read)
            if end < 0:
                return out
            line = data[self._read:end]
            self._read = end + 2
            lines.append(line)
            if line[3:4] != b"-":
                out.append((int(line[:3]), lines))
                lines = []

    def reply(self) -> tuple[int, list[bytes]]:
        """The one reply waiting; fails the test if there is none or more than one."""
        got = self.replies()
        if len(got) != 1:
            raise AssertionError(f"expected one reply, got {got!r}")
        return got[0]

    def command(self, line: bytes) -> tuple[int, list[bytes]]:
        """Send one command line (CRLF added, as ``RawClient`` does) and return its reply."""
        self.send(line + b"\r\n")
        return self.reply()

    @property
    def closed(self) -> bool:
        return self.client.closed

    def close(self) -> None:
        assert self.client.transport is not None
        self.client.transport.loseConnection()
        self.appliance.settle()


def sendmail(conversation: SmtpConversation, sender: str, recipients: list[str],
             message: bytes) -> list[tuple[int, list[bytes]]]:
    """EHLO to QUIT for one message, with dot-stuffing; every reply, greeting first."""
    conversation.send(b"EHLO client.test\r\n")
    conversation.send(f"MAIL FROM:<{sender}>\r\n".encode())
    for rcpt in recipients:
        conversation.send(f"RCPT TO:<{rcpt}>\r\n".encode())
    conversation.send(b"DATA\r\n")
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in message.splitlines(keepends=True))
    conversation.send(stuffed + b".\r\n")
    conversation.send(b"QUIT\r\n")
    return conversation.replies()


class MemoryAppliance:
    """
    The whole appliance on a memory reactor, its SMTP listener at ``SMTP_PORT``,
    its tracker at ``HTTP_PORT`` and a sink at ``SINK`` that the routes for
    example.test and example.org lead to. ``changes`` are merged into the
    test configuration, as ``RunningAppliance`` takes them.
    """

    def __init__(self, directory: str, resolver: Any = None, sink: SinkFactory | None = None,
                 **changes: Any) -> None:
        self.reactor = ThreadsMemoryReactor()
        self.reactor.advance(START)
        self.sink = sink or SinkFactory()
        route = f"{SINK[0]}:{SINK[1]}"
        self.config: Config = make_config(directory, **merge({
            "smtp": {"listeners": {"default": {"endpoint": f"tcp:{SMTP_PORT}:interface=127.0.0.1"}}},
            "tracker": {"endpoint": f"tcp:{HTTP_PORT}:interface=127.0.0.1"},
            "admin": {"endpoint": f"tcp:{ADMIN_PORT}:interface=127.0.0.1"},
            "delivery": {"routes": {"example.test": route, "example.org": route}},
        }, changes))
        # Never the real DNS in tests: a resolver that knows nothing unless told.
        self.resolver = resolver if resolver is not None else FakeResolver()
        self.appliance = Appliance(build(self.config), self.reactor, run=run_synchronously,
                                   resolver=self.resolver, handle_sighup=False)
        self.servers: dict[tuple[str, int], protocol.Factory] = {SINK: self.sink}
        self.pumps: list[IOPump] = []
        self._client_ports = iter(range(40000, 65000))

    def start(self) -> None:
        self.appliance.startService()
        self.settle()

    def stop(self) -> None:
        """Stop every part (once); the stop must finish without time passing beyond what is due."""
        if not self.appliance.running:
            return
        d = self.appliance.stopService()
        self.settle()
        if not d.called:
            raise AssertionError("the appliance did not stop")

    def listening(self, port: int) -> protocol.Factory:
        """The factory the appliance listens with on ``port`` (any interface)."""
        for p, factory, _backlog, _interface in self.reactor.tcpServers:
            if p == port:
                return factory
        raise AssertionError(f"nothing listens on port {port}")

    def _connect(self, server: protocol.Protocol, client: protocol.Protocol,
                 server_address: IPv4Address, client_address: IPv4Address) -> IOPump:
        server_io = FakeTransport(server, True, hostAddress=server_address, peerAddress=client_address)
        client_io = FakeTransport(client, False, hostAddress=client_address, peerAddress=server_address)
        pump = connect(server, server_io, client, client_io, greet=False, clock=self.reactor)
        self.pumps.append(pump)
        return pump

    def _client_address(self, host: str) -> IPv4Address:
        return IPv4Address("TCP", host, next(self._client_ports))

    def smtp(self, client_host: str = "127.0.0.1", port: int = SMTP_PORT) -> SmtpConversation:
        """A connection to an SMTP listener from ``client_host``, its greeting waiting."""
        address = self._client_address(client_host)
        server = self.listening(port).buildProtocol(address)
        client = _Collector()
        self._connect(server, client, IPv4Address("TCP", "127.0.0.1", port), address)
        self.settle()
        return SmtpConversation(self, client)

    def http(self, request: bytes, client_host: str = "127.0.0.1") -> bytes:
        """Send one raw HTTP/1.1 request to the tracker; the whole response once it closed."""
        address = self._client_address(client_host)
        server = self.listening(HTTP_PORT).buildProtocol(address)
        client = _Collector()
        self._connect(server, client, IPv4Address("TCP", "127.0.0.1", HTTP_PORT), address)
        assert client.transport is not None
        client.transport.write(request)
        self.settle()
        if not client.closed:
            client.transport.loseConnection()
            self.settle()
        return client.received

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` from the tracker: the status, the headers (lower-case names), the body."""
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        response = self.http(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, _, body = response.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        return int(status_line.split()[1]), fields, body

    def _complete_connections(self) -> bool:
        """Connect what delivery dialled to the server listening there, or refuse it."""
        moved = False
        while self.reactor.tcpClients:
            host, port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
            connector = self.reactor.connectors.pop(0)
            moved = True
            server_factory = self.servers.get((host, port))
            if server_factory is None:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            address = IPv4Address("TCP", host, port)
            client_address = self._client_address("127.0.0.1")
            client = factory.buildProtocol(address)
            server = server_factory.buildProtocol(client_address)
            self._connect(server, client, address, client_address)
        return moved

    def settle(self) -> None:
        """Run what is due now and move every byte, until nothing changes."""
        for _ in range(10_000):
            self.reactor.advance(0)
            moved = self._complete_connections()
            for pump in list(self.pumps):
                moved = pump.flush() or moved
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self.pumps.remove(pump)
            if not moved:
                return
        raise AssertionError("the appliance never settled")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, then settle."""
        self.reactor.advance(seconds)
        self.settle()

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.config)

    def spooled(self) -> list[str]:
        """What the spool holds, accepted or being received."""
        spool = self.config.spool.directory
        return entries_on_disk(spool)


class ThreadsMemoryReactor(MemoryReactorClock):
    """A memory reactor with ``callFromThread``: the call runs at the next ``advance``."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out

