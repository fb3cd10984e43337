"""
Tracked mail at Postfix's pace: the appliance against a private Postfix relaying the same message.

Both sides get the same message from the same load generator (Postfix's
smtp-source, SESSIONS parallel sessions that each reuse their connection) and
deliver to the same receiver (Postfix's smtp-sink) on loopback. The appliance
gives every recipient its own copy with signed click-tracked links and open
pixels (tracking is switched on by the message's X-MSYS-API header) and stores
each message durably before its 250; the private Postfix stores and relays the
message unchanged (its relayhost is the sink, no DNS). Runs alternate
appliance, Postfix and a bare Twisted ESMTP server that discards
(bench/bare_smtp.py); figures are medians of the rounds:

  relay       msgs/s from the first connection until the sink has every copy
  CPU         user+system seconds per 1,000 messages: the appliance's process tree; every
              process of the private Postfix (master, daemons, reaped daemons)
  acceptance  msgs/s until smtp-source has its last 250 (the appliance delivers meanwhile)
  dot -> 250  one session with TCP_NODELAY: from the final "." to the 250, per message

(smtp-source and smtp-sink are the same on both sides and their CPU is not counted)

next to this machine's fsync floor (write a file, fsync it, rename it, fsync the
directory), which bounds every durable 250 from below.

Requirements (the bench installs nothing): Debian's postfix package, which gives
postfix, smtp-source and smtp-sink (apt-get install postfix); root, because
postfix start needs it; and a writable /etc/postfix/main.cf, where the bench
lists its private configuration directory in alternate_config_directories for
the length of the run (postfix -c DIR refuses any other). It stops with a
message where one of these is missing. Everything listens on 127.0.0.1 and
lives in a temporary directory that is removed at the end, Ctrl-C included.

Run it with the project's Python (the twistd next to it starts the appliance):

    .venv/bin/python bench/relay_bench.py [--messages 1000] [--rounds 3] [--sessions 10]
        [--recipients 1] [--size 6700 --links 80 | --message FILE] [--dkim]
        [--connection-reuse-time 0s]

--profile runs the appliance alone (no root, no Postfix) under a sampling
profiler for one relay run of the same load and prints its top entries:
py-spy when it is on PATH (pip install py-spy), else cProfile through twistd
--profile (slower, and it counts only the reactor thread).

The default message is bench/newsletter.eml, written by
``python bench/relay_bench.py --write-message bench/newsletter.eml``.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import math
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from relay_processes import (  # noqa: E402
    Postfix,
    Sink,
    Unavailable,
    profiler_command,
    require_programs,
    run_source,
    source_command,
    start,
    stop,
    stop_profiled,
    top_entries,
    tree_cpu_seconds,
)

from tests.ports import free_port  # noqa: E402

FIXTURE = os.path.join(HERE, "newsletter.eml")
DEFAULT_SIZE = 6700
DEFAULT_LINKS = 80
POSTFIX_RECIPIENTS_PER_DELIVERY = 50  # Postfix's default_destination_recipient_limit
SETTLE = 1.0  # seconds of quiet after a run, so that its tail of work is counted and done


# -- the message ------------------------------------------------------------------

def newsletter(size: int = DEFAULT_SIZE, links: int = DEFAULT_LINKS) -> bytes:
    """A one-part HTML newsletter: ``size`` bytes of HTML (CRLF counted) with ``links`` links.

    Tracking is switched on by its X-MSYS-API header, not by configuration, as
    a sending application would do it. Line ends are LF, as smtp-source wants.
    """
    head = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Winter news</title></head>\n'
            '<body style="margin:0;padding:0;font-family:Arial,sans-serif">\n'
            '<img src="https://shop.example.com/img/logo.png" alt="Shop" width="120">\n'
            "<h1>Winter news</h1>\n")
    rows = [f'<a href="https://shop.example.com/p/{i}?utm_source=news">Product {i}</a><br>\n'
            for i in range(max(links - 1, 0))]
    tail = ('<p><a href="https://shop.example.com/unsubscribe?u=1" data-msys-unsubscribe="1">'
            "Unsubscribe</a></p>\n</body></html>\n")
    if links == 0:
        tail = "<p>Reply to this message to unsubscribe.</p>\n</body></html>\n"
    filler = "Fresh arrivals for the season, hand-picked for you by our buyers."

    def length() -> int:
        return sum(len(x) + x.count("\n") for x in (head, *rows, tail))

    at = 0
    while length() + 2 * (len(filler) + 9) <= size:  # 9: "<p>", "</p>", CRLF
        at = (at + 4) % (len(rows) + 1)
        rows.insert(at, f"<p>{filler}</p>\n")
        at += 1
    rest = size - length() - 9
    if rest > 0:
        rows.append(f"<p>{(filler + ' ' + filler)[:rest]}</p>\n")
    headers = (
        "From: Shop <news@shop.example.com>\n"
        "To: reader@example.test\n"
        "Subject: Winter news\n"
        "Date: Tue, 1 Dec 2026 09:00:00 +0000\n"
        "Message-ID: <winter-news@shop.example.com>\n"
        'X-MSYS-API: {"campaign_id":"winter-news","options":{"open_tracking":true,'
        '"click_tracking":true}}\n'
        "MIME-Version: 1.0\n"
        "Content-Type: text/html; charset=utf-8\n"
        "Content-Transfer-Encoding: 7bit\n\n")
    return (headers + head + "".join(rows) + tail).encode()


def on_the_wire(message: bytes) -> bytes:
    """The DATA that smtp-source sends for ``message``: CRLF line ends, dot-stuffed, no final dot."""
    lines = message.rstrip(b"\n").split(b"\n")
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)


def count_links(message: bytes, tracking_domain: str) -> tuple[int, int, int]:
    """(tracked click links, open pixels, untracked https links) in a delivered copy's HTML."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    html = ""
    for part in parsed.walk():
        if part.get_content_type() == "text/html":
            html += part.get_content()
    return (html.count(f"//{tracking_domain}/f/"), html.count(f"//{tracking_domain}/q/"),
            html.count('href="https://shop.example.com/'))


# -- the appliance -------------------------------------------------------------------

def appliance_config(directory: str, smtp_port: int, tracker_port: int, sink_port: int,
                     sessions: int, dkim_key: str | None, reuse_time: str | None = None) -> str:
    """A configuration of its own for this run; nothing is taken from etc/appliance.toml."""
    text = f"""
[node]
name = "relaybench"
hostname = "relay-bench.test"

[smtpapi]
tracking_domain = "127.0.0.1:{tracker_port}"

[smtp]
relay_networks = ["127.0.0.0/8"]
max_connections = {max(200, sessions + 10)}
max_connections_per_client = {max(20, sessions + 5)}

[smtp.listeners.default]
endpoint = "tcp:{smtp_port}:interface=127.0.0.1"

[spool]
directory = "{directory}/spool"

[delivery]
routes = {{ "example.test" = "127.0.0.1:{sink_port}" }}
tls = "none"
{f'connection_reuse_time = "{reuse_time}"' if reuse_time is not None else ""}

[tracker]
endpoint = "tcp:{tracker_port}:interface=127.0.0.1"

[links]
keys_file = "{directory}/links.keys"
create_keys_file = true

[events]
log_file = "{directory}/events.jsonl"

[admin]
endpoint = ""
"""
    if dkim_key:
        text += (f'\n[dkim]\ndomain = "shop.example.com"\nselector = "bench"\n'
                 f'key_file = "{dkim_key}"\n')
    path = os.path.join(directory, "appliance.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def make_dkim_key(directory: str) -> str:
    from appliance.dkim import new_key, write_key

    path = os.path.join(directory, "dkim.pem")
    write_key(path, new_key("rsa"))
    return path


def twistd_command(directory: str, config: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
            "-l", os.path.join(directory, "twistd.log"), "engage-appliance", "-c", config]


# -- measurements ----------------------------------------------------------------------

def filesystem_type(directory: str) -> str:
    """The type of the file system ``directory`` is on, as mounted (``stat -f`` calls ext4 "ext2/ext3")."""
    path = os.path.realpath(directory)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def fsync_floor(directory: str, size: int, rounds: int = 50) -> float:
    """Median seconds of one durable file: write, fsync, rename, fsync the directory."""
    data = os.urandom(size)
    times = []
    fd_dir = os.open(directory, os.O_RDONLY)
    try:
        for i in range(rounds):
            temp, final = os.path.join(directory, f"f{i}.tmp"), os.path.join(directory, f"f{i}")
            t0 = time.perf_counter()
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, final)
            os.fsync(fd_dir)
            times.append(time.perf_counter() - t0)
            os.unlink(final)
    finally:
        os.close(fd_dir)
    return statistics.median(times)


def _reply(stream: BinaryIO, expect: bytes) -> bytes:
    while True:
        line = stream.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        if line[3:4] != b"-":
            if not line.startswith(expect):
                raise RuntimeError(f"expected {expect.decode()}, got {line!r}")
            return line


def dot_latency(port: int, data: bytes, messages: int) -> float:
    """Median seconds from sending the final "." to reading the 250, over one session."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = s.makefile("rb")
        _reply(stream, b"220")
        s.sendall(b"EHLO relay-bench.test\r\n")
        _reply(stream, b"250")
        for _ in range(messages):
            for command, expect in ((b"MAIL FROM:<news@shop.example.com>", b"250"),
                                    (b"RCPT TO:<reader@example.test>", b"250"), (b"DATA", b"354")):
                s.sendall(command + b"\r\n")
                _reply(stream, expect)
            s.sendall(data)
            t0 = time.perf_counter()
            s.sendall(b".\r\n")
            _reply(stream, b"250")
            times.append(time.perf_counter() - t0)
        s.sendall(b"QUIT\r\n")
        _reply(stream, b"221")
    return statistics.median(times)


@dataclass
class Run:
    accepted: float  # seconds until smtp-source had its last 250
    relayed: float  # seconds until the sink had every copy (0: not measured)
    cpu: float  # CPU seconds of the measured process tree


def measure(sink: Sink, source: list[str], copies: int, cpu: Callable[[], float],
            timeout: float) -> Run:
    """One run of smtp-source; ``copies`` is what the sink must receive (0: wait for nothing)."""
    target = sink.count + copies
    before = cpu()
    start = time.perf_counter()
    accepted = run_source(source, timeout)
    relayed = 0.0
    if copies:
        if not sink.wait_for(target, timeout - accepted):
            raise RuntimeError(f"only {copies - (target - sink.count)} of {copies} copies reached "
                               f"the sink within {timeout:.0f} s")
        relayed = time.perf_counter() - start
    time.sleep(SETTLE)
    return Run(accepted, relayed, cpu() - before)


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# -- the report ------------------------------------------------------------------------

def rate_line(name: str, values: list[float], messages: int, cpu: list[float] | None) -> str:
    rates = [messages / v for v in values]
    line = f"  {name:<16} {median_of(rates):8.1f} msgs/s"
    if cpu is not None:
        line += f"   CPU {median_of([c / messages * 1000 for c in cpu]):6.2f} s per 1,000 msgs"
    return line + f"   (runs: {', '.join(f'{r:.0f}' for r in rates)})"


@contextlib.contextmanager
def terminated_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that every cleanup runs."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message (default 1)")
    parser.add_argument("--size", type=int, help=f"bytes of HTML (default {DEFAULT_SIZE}: the fixture)")
    parser.add_argument("--links", type=int, help=f"links in the HTML (default {DEFAULT_LINKS})")
    parser.add_argument("--message", help="send this file instead (LF line ends)")
    parser.add_argument("--dkim", action="store_true",
                        help="the appliance DKIM-signs every copy (RSA-2048); Postfix never signs")
    parser.add_argument("--latency-messages", type=int, default=200,
                        help="messages per dot -> 250 run (default 200)")
    parser.add_argument("--connection-reuse-time", metavar="DURATION",
                        help="the appliance's delivery.connection_reuse_time (default: its default; "
                             '"0s" closes each connection once its copies are sent)')
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take (default 600)")
    parser.add_argument("--directory", help="where the temporary directory goes (default: $TMPDIR)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the appliance alone for one relay run and print its top entries")
    parser.add_argument("--profiler", choices=("py-spy", "cprofile"),
                        help="default: py-spy if on PATH, else cprofile")
    parser.add_argument("--top", type=int, default=25, help="profile entries printed (default 25)")
    parser.add_argument("--profile-output", metavar="FILE",
                        help="also keep the profile: py-spy's collapsed stacks or cProfile's stats")
    parser.add_argument("--write-message", metavar="FILE",
                        help="write the message that --size/--links describe to FILE and stop")
    args = parser.parse_args(argv)
    if args.message and (args.size is not None or args.links is not None):
        parser.error("--message excludes --size and --links")
    if not 1 <= args.sessions <= 100:
        parser.error("--sessions must be between 1 and 100 (Postfix's smtpd process limit)")
    if not 1 <= args.recipients <= 1000:
        parser.error("--recipients must be between 1 and 1000 (the appliance's max_recipients)")
    for name in ("messages", "rounds", "latency_messages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_message(args: argparse.Namespace) -> tuple[bytes, str]:
    if args.message:
        with open(args.message, "rb") as f:
            return f.read().replace(b"\r\n", b"\n"), args.message
    if args.size is None and args.links is None:
        with open(FIXTURE, "rb") as f:
            return f.read(), os.path.relpath(FIXTURE)
    size = DEFAULT_SIZE if args.size is None else args.size
    links = DEFAULT_LINKS if args.links is None else args.links
    return newsletter(size, links), f"generated ({size} bytes of HTML, {links} links)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_message:
        with open(args.write_message, "wb") as f:
            f.write(newsletter(args.size or DEFAULT_SIZE,
                               DEFAULT_LINKS if args.links is None else args.links))
        return 0
    try:
        if args.profile:
            require_programs("smtp-source", "smtp-sink")
        else:
            Postfix.check_possible()
        with terminated_on_signals(), contextlib.ExitStack() as stack:
            directory = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="relay-bench-", dir=args.directory))
            os.chmod(directory, 0o755)  # Postfix's daemons run as postfix
            bench = Bench(args, directory, stack)
            if args.profile:
                bench.profile()
            else:
                bench.compare()
    except Unavailable as e:
        print(f"relay_bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relay_bench: interrupted; everything stopped and removed", file=sys.stderr)
        return 130
    return 0


class Bench:
    """The processes of one bench run, stopped by ``stack`` however the run ends."""

    def __init__(self, args: argparse.Namespace, directory: str, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.directory = directory
        self.stack = stack
        self.message, self.message_name = load_message(args)
        self.message_file = os.path.join(directory, "message.eml")
        with open(self.message_file, "wb") as f:
            f.write(self.message)
        self.sink = Sink(free_port(), os.path.join(directory, "sink"))
        stack.callback(self.sink.stop)
        self.tracker_port = free_port()
        self.app_port = free_port()
        dkim_key = make_dkim_key(directory) if args.dkim else None
        self.config = appliance_config(directory, self.app_port, self.tracker_port, self.sink.port,
                                       args.sessions, dkim_key, args.connection_reuse_time)

    def source(self, port: int, messages: int) -> list[str]:
        a = self.args
        return source_command(port, self.message_file, messages, a.sessions, a.recipients)

    def header(self) -> None:
        a = self.args
        links = count_links(self.message, "")[2]
        runs = "one profiled run" if a.profile else f"{a.rounds} alternations"
        print(f"relay bench: {a.messages} messages per run, {runs}, "
              f"{a.sessions} sessions, {a.recipients} recipient(s) per message")
        dkim = "on (RSA-2048, the appliance only)" if a.dkim else "off"
        print(f"message: {self.message_name}, {len(on_the_wire(self.message))} bytes on the wire, "
              f"{links} links, tracking on via X-MSYS-API, DKIM {dkim}")
        fs = filesystem_type(self.directory)
        print(f"directory: {self.directory} ({fs}); {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f} at start (a shared machine makes every figure noisy)")

    def check_copies(self, what: str, expect_tracked: bool) -> str:
        """Read the copies in the sink: the appliance's must be tracked, Postfix's unchanged."""
        names = sorted(os.listdir(self.sink.directory))
        if not names:
            raise RuntimeError(f"{what}: no copy in the sink")
        with open(os.path.join(self.sink.directory, names[-1]), "rb") as f:
            copy = f.read()
        tracked, pixels, plain = count_links(copy, f"127.0.0.1:{self.tracker_port}")
        wanted = count_links(self.message, "")[2]
        if expect_tracked and (tracked == 0 or plain):
            raise RuntimeError(f"{what}: the delivered copy is not tracked "
                               f"({tracked} tracked links, {plain} plain ones)")
        if not expect_tracked and plain != wanted:
            raise RuntimeError(f"{what}: the delivered copy has {plain} of {wanted} links")
        signed = b"\nDKIM-Signature:" in b"\n" + copy.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        if signed != (expect_tracked and self.args.dkim):
            raise RuntimeError(f"{what}: the delivered copy is {'' if signed else 'not '}DKIM-signed")
        self.sink.clear()
        if expect_tracked:
            return f"{tracked} tracked links, {pixels} open pixels{', a DKIM-Signature' * signed}"
        return f"{plain} links as sent"

    def compare(self) -> None:
        a = self.args
        self.header()
        app = start(twistd_command(self.directory, self.config), self.app_port, self.directory, REPO)
        self.stack.callback(stop, app)
        bare_port = free_port()
        bare = start([sys.executable, os.path.join(HERE, "bare_smtp.py"), str(bare_port)], bare_port,
                     self.directory, REPO)
        self.stack.callback(stop, bare)
        postfix = Postfix(os.path.join(self.directory, "postfix"), free_port(), self.sink.port)
        self.stack.callback(postfix.stop)
        postfix.start()

        floor = fsync_floor(self.directory, len(on_the_wire(self.message)))
        print(f"fsync floor (write {len(on_the_wire(self.message))} bytes, fsync, rename, "
              f"fsync directory): {floor * 1000:.2f} ms")

        app_copies = a.recipients
        pf_copies = math.ceil(a.recipients / POSTFIX_RECIPIENTS_PER_DELIVERY)
        app_cpu = lambda: tree_cpu_seconds(app.pid)  # noqa: E731
        pf_cpu = lambda: tree_cpu_seconds(postfix.master_pid())  # noqa: E731
        bare_cpu = lambda: tree_cpu_seconds(bare.pid)  # noqa: E731
        warm = min(a.messages, 100)
        measure(self.sink, self.source(self.app_port, warm), warm * app_copies, app_cpu, a.timeout)
        print(f"warm-up: appliance copies carry {self.check_copies('appliance', True)}; ", end="")
        measure(self.sink, self.source(postfix.port, warm), warm * pf_copies, pf_cpu, a.timeout)
        print(f"Postfix copies carry {self.check_copies('postfix', False)}")
        measure(self.sink, self.source(bare_port, warm), 0, bare_cpu, a.timeout)

        runs: dict[str, list[Run]] = {"appliance": [], "postfix": [], "bare": []}
        latency: dict[str, list[float]] = {"appliance": [], "postfix": [], "bare": []}
        ports = {"appliance": self.app_port, "postfix": postfix.port, "bare": bare_port}
        data = on_the_wire(self.message)
        for round_ in range(1, a.rounds + 1):
            runs["appliance"].append(measure(self.sink, self.source(self.app_port, a.messages),
                                             a.messages * app_copies, app_cpu, a.timeout))
            self.sink.clear()
            runs["postfix"].append(measure(self.sink, self.source(postfix.port, a.messages),
                                           a.messages * pf_copies, pf_cpu, a.timeout))
            self.sink.clear()
            runs["bare"].append(measure(self.sink, self.source(bare_port, a.messages), 0, bare_cpu,
                                        a.timeout))
            for name, port in ports.items():
                latency[name].append(dot_latency(port, data, a.latency_messages))
                time.sleep(SETTLE)
            self.sink.clear()
            r = {name: values[-1] for name, values in runs.items()}
            print(f"round {round_}: relay appliance {a.messages / r['appliance'].relayed:.0f}, "
                  f"postfix {a.messages / r['postfix'].relayed:.0f} msgs/s; acceptance appliance "
                  f"{a.messages / r['appliance'].accepted:.0f}, bare {a.messages / r['bare'].accepted:.0f}, "
                  f"postfix {a.messages / r['postfix'].accepted:.0f} msgs/s; dot -> 250 "
                  + ", ".join(f"{n} {v[-1] * 1000:.2f}" for n, v in latency.items()) + " ms")
        self.report(runs, latency, floor)

    def report(self, runs: dict[str, list[Run]], latency: dict[str, list[float]],
               floor: float) -> None:
        a = self.args
        n = a.messages

        def med(name: str, field: str) -> float:
            return median_of([n / getattr(r, field) for r in runs[name]])

        def cpu(name: str) -> float:
            return median_of([r.cpu / n * 1000 for r in runs[name]])

        print(f"\ninject -> track -> deliver, to the same sink (medians of {a.rounds}):")
        print(rate_line("appliance", [r.relayed for r in runs["appliance"]], n,
                        [r.cpu for r in runs["appliance"]]))
        print(rate_line("private postfix", [r.relayed for r in runs["postfix"]], n,
                        [r.cpu for r in runs["postfix"]]))
        print(f"  appliance / postfix: {med('appliance', 'relayed') / med('postfix', 'relayed'):.3f} "
              f"x the msgs/s, {cpu('appliance') / cpu('postfix'):.2f} x the CPU per message")
        print(f"\nSMTP acceptance, until smtp-source has its last 250 (medians of {a.rounds}):")
        print(rate_line("appliance", [r.accepted for r in runs["appliance"]], n, None)
              + "  (delivering at the same time)")
        print(rate_line("bare twisted", [r.accepted for r in runs["bare"]], n,
                        [r.cpu for r in runs["bare"]]))
        print(rate_line("private postfix", [r.accepted for r in runs["postfix"]], n, None))
        print(f"  appliance / bare twisted: {med('appliance', 'accepted') / med('bare', 'accepted'):.3f}"
              f" x the msgs/s")
        print(f"\nfinal dot -> 250, one session, TCP_NODELAY (medians of {a.rounds} runs of "
              f"{a.latency_messages} messages):")
        for name, label in (("appliance", "appliance"), ("bare", "bare twisted"),
                            ("postfix", "private postfix")):
            print(f"  {label:<16} {median_of(latency[name]) * 1000:8.2f} ms   (runs: "
                  + ", ".join(f"{v * 1000:.2f}" for v in latency[name]) + ")")
        print(f"  fsync floor      {floor * 1000:8.2f} ms   (one file: write, fsync, rename, "
              f"fsync directory); load average {os.getloadavg()[0]:.2f} at the end")
        if a.recipients > 1:
            print(f"\na message is one injection with {a.recipients} recipients: the appliance "
                  f"delivers {a.recipients} copies of it, Postfix "
                  f"{math.ceil(a.recipients / POSTFIX_RECIPIENTS_PER_DELIVERY)} transaction(s)")

    def profile(self) -> None:
        a = self.args
        self.header()
        name, command, output = profiler_command(a.profiler, self.directory,
                                                 twistd_command(self.directory, self.config))
        app = start(command, self.app_port, self.directory, REPO)
        self.stack.callback(stop, app)
        print(f"profiler: {name} (its overhead slows the appliance: these msgs/s are not a result)")
        warm = min(a.messages, 100)
        measure(self.sink, self.source(self.app_port, warm), warm * a.recipients, lambda: 0.0,
                a.timeout)
        run = measure(self.sink, self.source(self.app_port, a.messages), a.messages * a.recipients,
                      lambda: 0.0, a.timeout)
        print(f"profiled relay run: {a.messages / run.relayed:.0f} msgs/s, acceptance "
              f"{a.messages / run.accepted:.0f} msgs/s")
        stop_profiled(name, app)
        print(top_entries(name, output, a.top, REPO))
        if a.profile_output:
            shutil.copyfile(output, a.profile_output)
            print(f"\nprofile kept in {a.profile_output}")


if __name__ == "__main__":
    sys.exit(main())
