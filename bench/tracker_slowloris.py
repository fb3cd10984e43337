"""
A byte-at-a-time attack on the tracker, and whether a normal click still gets answered.

One tracker server (the appliance's tracker site with its shipped limits,
writing real events) runs in a child process on loopback. The attacker opens
``--connections`` connections, spread over ``--addresses`` loopback source
addresses (127.0.0.2 and up), and sends one byte of a request line that
never ends on each every ``--interval`` seconds, reopening any the server closes
(at most ``--reopen`` a second). Meanwhile a normal client clicks a real link
from 127.0.0.1 twice a second, each on a new connection with a 5 s timeout.
The tracker runs with ``--fd-limit`` open files (default 1024, a daemon's
usual limit), as the appliance's SMTP side and spool share them. Printed at
the end: how many attack connections the server held (its open file
descriptors), how many normal clicks were answered, and their latency.

    python bench/tracker_slowloris.py [--connections 2000] [--addresses 1] [--duration 30]

Bounded: at most ``--duration`` seconds (default 30) and ``--connections``
sockets; loopback only. Needs ``ulimit -n`` above the connection count.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appliance.links import Keyring, LinkCodec, LinkData  # noqa: E402
from tests.ports import free_port  # noqa: E402

KEYRING = Keyring(((1, b"b" * 32),))


def click_path() -> str:
    token = LinkCodec(KEYRING).encode(LinkData(
        "click", int(time.time()) + 86400, "00a1b2c3d4e5f6a7b8c9", "84813762132582711",
        "someone@example.com", "Spring sale", (), None, "Hero image", "https://shop.example/"))
    return f"/f/a/{token}"


def serve(port: int, directory: str, fd_limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
    from twisted.internet import reactor

    from appliance.events import EventLog
    from appliance.tracker import make_site

    events = EventLog(os.path.join(directory, "events.jsonl"), "bench", clock=reactor)
    events.startService()
    reactor.listenTCP(port, make_site(LinkCodec(KEYRING), events, reactor=reactor),
                      interface="127.0.0.1", backlog=1024)
    print("ready", flush=True)
    reactor.run()


class Attack:
    """Many connections, each sending a byte of a request head that never ends."""

    def __init__(self, port: int, count: int, addresses: int, interval: float, reopen: int) -> None:
        self.port, self.count, self.interval, self.reopen = port, count, interval, reopen
        self.sources = [f"127.0.0.{2 + i % 250}" if i < 250 else f"127.0.{1 + i // 250}.{2 + i % 250}"
                        for i in range(addresses)]
        self.socks: list[socket.socket] = []
        self.opened = 0
        self.closed_by_server = 0
        self.stop = threading.Event()

    def _open(self) -> None:
        s = socket.socket()
        s.bind((self.sources[self.opened % len(self.sources)], 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.socks.append(s)
        self.opened += 1

    def run(self) -> None:
        while len(self.socks) < self.count and not self.stop.is_set():
            self._open()
        while not self.stop.wait(self.interval):
            alive = []
            for s in self.socks:
                try:
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_by_server += 1
                    s.close()
                    continue
                try:
                    s.send(b"G")  # a request line that never ends
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_by_server += 1
                    s.close()
                    continue
                alive.append(s)
            self.socks = alive
            for _ in range(min(self.reopen, self.count - len(self.socks))):
                self._open()
        for s in self.socks:
            s.close()


def click(port: int, path: str) -> float | None:
    """Seconds until a normal click's 302 arrived, or ``None`` if it did not within 5 s."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(4096)
    except OSError:
        return None
    return time.monotonic() - start if data.startswith(b"HTTP/1.1 302") else None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--addresses", type=int, default=1, help="loopback source addresses")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between bytes")
    parser.add_argument("--reopen", type=int, default=200, help="reopened connections a round")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--fd-limit", type=int, default=1024,
                        help="the tracker's open file limit (a daemon's usual default)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.directory, args.fd_limit)
        return 0
    args.duration = min(args.duration, 120.0)
    args.connections = min(args.connections, 10_000)

    directory = tempfile.mkdtemp(prefix="tracker-slowloris-")
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port),
                             "--directory", directory, "--fd-limit", str(args.fd_limit)],
                            stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the tracker did not start")
        path = click_path()
        idle = [click(port, path) for _ in range(5)]
        attack = Attack(port, args.connections, args.addresses, args.interval, args.reopen)
        thread = threading.Thread(target=attack.run, daemon=True)
        thread.start()
        latencies: list[float | None] = []
        fds: list[int] = []
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            time.sleep(0.5)
            latencies.append(click(port, path))
            fds.append(open_fds(proc.pid))
        attack.stop.set()
        thread.join()
    finally:
        proc.terminate()
        proc.wait()
    answered = [x for x in latencies if x is not None]
    print(f"attack: {args.connections} connections from {args.addresses} address(es), a byte every "
          f"{args.interval:g} s, {args.duration:g} s; {attack.opened} opened, "
          f"{attack.closed_by_server} closed by the tracker")
    print(f"tracker open file descriptors (limit {args.fd_limit}): "
          f"median {statistics.median(fds):.0f}, max {max(fds)}")
    base = [x for x in idle if x is not None]
    if base:
        print(f"normal click before the attack: median {statistics.median(base) * 1000:.1f} ms")
    print(f"normal clicks during the attack: {len(answered)} of {len(latencies)} answered"
          + (f", median {statistics.median(answered) * 1000:.1f} ms, max {max(answered) * 1000:.1f} ms"
             if answered else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
