"""
A trusted injection's dot -> 250 while each attack of issue #14 runs in turn, on loopback.

The appliance (twistd, the shipped configuration with a certificate, a users
file at the default scrypt cost, a second, public listener whose clients may
not relay, a route for example.test to a discarding SMTP server and one for
unreachable.test to a port nothing listens on) runs on 127.0.0.1. For each
attack a separate process attacks for --seconds while this process injects one
message at a time on the trusted listener every --interval seconds and times
each from the final "." to the 250. The baseline is the same measurement with
no attack, in the same run, first. Printed: a table of median and p95 per
attack, the ratio of each median to the baseline's, and how many trusted
injections failed (timed out or were refused).

The attacks, scaled down from the issue so the whole run takes a few minutes:

  slowloris      1,000 tracker connections, each sending one byte of a never-ending
                 request line every second, from 10 source addresses (issue: 20,000)
  huge-ua        4 keep-alive connections of clicks with a 16,000-byte User-Agent
  auth-flood     50 connections looping STARTTLS + a failed AUTH PLAIN on the public
                 listener (issue: 150)
  idle-public    20 idle connections from each of 10 addresses on the public listener
  metadata-inf   messages with X-MSYS-API metadata {"a": 1e999}, back to back
  link-heavy     a 2 MB text part of "http://a" lines, click tracking on, 6 recipients,
                 back to back (issue: 8.3 MB)
  folded-subject a 1 MB folded Subject to 100 recipients, back to back
  unreachable    messages of 1,000 recipients to the unreachable route, back to back
                 (issue: 100 messages)
  60k-rcpt       sessions of 60,000 pipelined RCPTs
  bare-lf        sessions of 1,000 pipelined bare-LF messages
  noop-flood     sessions of 1,000,000 pipelined NOOPs (issue: one session of 1M)

    .venv/bin/python bench/attack_bench.py [--seconds 8] [--interval 0.1] [--only NAME ...]

Bounded: each attack lasts --seconds (at most 60) and is stopped; at most
1,000 attack connections at once; everything listens on 127.0.0.1 only and
lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from auth_flood_bench import _attacker, inject  # noqa: E402

from appliance.links import Keyring, LinkCodec, LinkData, write_keyring  # noqa: E402
from appliance.tls import write_pair  # noqa: E402
from appliance.users import set_user  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402

KEYRING = Keyring(((1, b"k" * 32),))


# -- the appliance -------------------------------------------------------------------------


class Ports:
    def __init__(self) -> None:
        self.trusted, self.public, self.tracker, self.sink, self.dead = (free_port() for _ in range(5))


def appliance_config(directory: str, ports: Ports) -> str:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    write_pair(cert, key, "localhost", 30)
    users = os.path.join(directory, "users")
    set_user(users, "alice", b"secret")  # the default scrypt cost, as an operator's file has it
    os.makedirs(os.path.join(directory, "var", "keys"), exist_ok=True)
    write_keyring(os.path.join(directory, "var", "keys", "links.keys"), KEYRING)
    with open(os.path.join(REPO, "etc", "appliance.toml")) as f:
        text = f.read()
    text = text.replace('"tcp:2525:interface=127.0.0.1"', f'"tcp:{ports.trusted}:interface=127.0.0.1"')
    text = text.replace('"tcp:8080:interface=127.0.0.1"', f'"tcp:{ports.tracker}:interface=127.0.0.1"')
    text = text.replace('routes = { "example.test" = "127.0.0.1:2526" }',
                        f'routes = {{ "example.test" = "127.0.0.1:{ports.sink}", '
                        f'"unreachable.test" = "127.0.0.1:{ports.dead}" }}')
    text = text.replace('"var/', f'"{directory}/var/')
    text = text.replace('\ntls_certificate = ""\n', f'\ntls_certificate = "{cert}"\n', 1)
    text = text.replace('\ntls_key = ""\n', f'\ntls_key = "{key}"\n', 1)
    text = text.replace('\nusers_file = ""\n', f'\nusers_file = "{users}"\n', 1)
    text += (f'\n[smtp.listeners.public]\nendpoint = "tcp:{ports.public}:interface=127.0.0.1"\n'
             'relay_networks = []\n')
    path = os.path.join(directory, "appliance.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- the attacks (each in a process of its own, until its deadline) -------------------------


def _reply(f: object) -> bytes:
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


def _session(port: int, until: float, body: Callable[[socket.socket, object], None]) -> None:
    """Open SMTP sessions one after the other until ``until``, running ``body`` in each."""
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                f = s.makefile("rb")
                _reply(f)
                s.sendall(b"EHLO attacker.test\r\n")
                _reply(f)
                body(s, f)
        except (OSError, ConnectionError):
            time.sleep(0.05)


def _send_message(s: socket.socket, f: object, rcpts: list[str], data: bytes) -> None:
    """One pipelined transaction (the listener offers PIPELINING); reads every reply."""
    s.sendall(b"MAIL FROM:<attacker@example.net>\r\n"
              + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
    replies = [_reply(f) for _ in range(len(rcpts) + 2)]
    if replies[-1].startswith(b"354"):
        s.sendall(data + b".\r\n")
        _reply(f)
    else:
        s.sendall(b"RSET\r\n")
        _reply(f)


def _messages(port: int, until: float, rcpts: list[str], data: bytes, threads: int = 2) -> None:
    def loop(s: socket.socket, f: object) -> None:
        while time.monotonic() < until:
            _send_message(s, f, rcpts, data)

    workers = [threading.Thread(target=_session, args=(port, until, loop)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _headed(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + body


def attack_metadata_inf(ports: Ports, until: float) -> None:
    api = '{"metadata": {"a": 1e999}, "options": {"open_tracking": true}}'
    data = _headed(f"From: a@example.net\nSubject: inf\nX-MSYS-API: {api}\n", b"Hello.\r\n")
    _messages(ports.trusted, until, ["r@example.test"], data)


def attack_link_heavy(ports: Ports, until: float) -> None:
    body = b"http://a\r\n" * (2 * 1024 * 1024 // 10)
    api = '{"options": {"click_tracking": true, "open_tracking": true}}'
    data = _headed(f"From: a@example.net\nSubject: links\nX-MSYS-API: {api}\n", body)
    _messages(ports.trusted, until, [f"r{i}@example.test" for i in range(6)], data, threads=1)


def attack_folded_subject(ports: Ports, until: float) -> None:
    subject = "\n ".join("word" * 15 for _ in range(1024 * 1024 // 62))
    data = _headed(f"From: a@example.net\nSubject: {subject}\n", b"Hello.\r\n")
    _messages(ports.trusted, until, [f"r{i}@example.test" for i in range(100)], data, threads=1)


def attack_unreachable(ports: Ports, until: float) -> None:
    api = '{"options": {"click_tracking": true, "open_tracking": true}, "metadata": {"c": "x"}}'
    data = _headed(f"From: a@example.net\nSubject: dead\nX-MSYS-API: {api}\nContent-Type: text/html\n",
                   b'<p><a href="https://shop.example/x">Shop</a></p>\r\n')
    counter = iter(range(10**9))

    def loop(s: socket.socket, f: object) -> None:
        while time.monotonic() < until:
            n = next(counter)
            _send_message(s, f, [f"r{n}-{i}@unreachable.test" for i in range(1000)], data)

    _session(ports.trusted, until, loop)


def attack_many_rcpts(ports: Ports, until: float) -> None:
    def loop(s: socket.socket, f: object) -> None:
        s.sendall(b"MAIL FROM:<a@example.net>\r\n"
                  + b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(60_000)))
        while _reply(f):  # until the server has answered or closed
            pass

    _session(ports.trusted, until, loop)


def attack_bare_lf(ports: Ports, until: float) -> None:
    one = b"MAIL FROM:<a@example.net>\nRCPT TO:<r@example.test>\nDATA\nSubject: lf\n\nbare\n.\n"

    def loop(s: socket.socket, f: object) -> None:
        s.sendall(one * 1000)
        while _reply(f):
            pass

    _session(ports.trusted, until, loop)


def attack_noop_flood(ports: Ports, until: float) -> None:
    chunk = b"NOOP\r\n" * 10_000

    def loop(s: socket.socket, f: object) -> None:
        for _ in range(100):  # 1,000,000 NOOPs, unless the server hangs up first
            if time.monotonic() >= until:
                return
            s.sendall(chunk)

    _session(ports.trusted, until, loop)


def attack_idle_public(ports: Ports, until: float) -> None:
    socks = []
    for address in range(10):
        for _ in range(20):
            try:
                s = socket.socket()
                s.bind((f"127.0.0.{2 + address}", 0))
                s.connect(("127.0.0.1", ports.public))
                s.sendall(b"EHLO idle.test\r\n")
                socks.append(s)
            except OSError:
                pass
    while time.monotonic() < until:
        time.sleep(0.2)
    for s in socks:
        s.close()


def attack_slowloris(ports: Ports, until: float) -> None:
    socks: list[socket.socket] = []
    opened = 0
    while time.monotonic() < until:
        while len(socks) < 1000 and time.monotonic() < until:
            s = socket.socket()
            s.bind((f"127.0.0.{2 + opened % 10}", 0))
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", ports.tracker))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                break
            socks.append(s)
            opened += 1
        time.sleep(1.0)
        alive = []
        for s in socks:
            try:
                s.send(b"G")
                alive.append(s)
            except BlockingIOError:
                alive.append(s)
            except OSError:
                s.close()
        socks = alive
    for s in socks:
        s.close()


def attack_huge_ua(ports: Ports, until: float) -> None:
    token = LinkCodec(KEYRING).encode(LinkData(
        "click", int(time.time()) + 86400, "00a1b2c3d4e5f6a7b8c9", "84813762132582711",
        "someone@example.com", "Spring sale", (), None, "Hero", "https://shop.example/"))
    request = (f"GET /f/a/{token} HTTP/1.1\r\nHost: x\r\nUser-Agent: {'U' * 16000}\r\n"
               f"Accept-Language: {'l' * 4000}\r\n\r\n").encode()

    def loop() -> None:
        while time.monotonic() < until:
            try:
                with socket.create_connection(("127.0.0.1", ports.tracker), timeout=10) as s:
                    f = s.makefile("rb")
                    while time.monotonic() < until:
                        s.sendall(request)
                        status = f.readline()
                        if not status:
                            break
                        length, close = 0, False
                        while (line := f.readline()) not in (b"\r\n", b""):
                            name, _, value = line.partition(b":")
                            if name.lower() == b"content-length":
                                length = int(value)
                            close = close or (name.lower() == b"connection" and b"close" in value.lower())
                        f.read(length)
                        if close:
                            break
            except OSError:
                time.sleep(0.05)

    workers = [threading.Thread(target=loop) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def attack_auth_flood(ports: Ports, until: float) -> None:
    async def flood() -> None:
        tasks = [asyncio.create_task(_attacker(ports.public, until, [0])) for _ in range(50)]
        await asyncio.wait(tasks, timeout=max(1.0, until - time.monotonic()) + 30)

    asyncio.run(flood())


ATTACKS: dict[str, Callable[[Ports, float], None]] = {
    "slowloris": attack_slowloris,
    "huge-ua": attack_huge_ua,
    "auth-flood": attack_auth_flood,
    "idle-public": attack_idle_public,
    "metadata-inf": attack_metadata_inf,
    "link-heavy": attack_link_heavy,
    "folded-subject": attack_folded_subject,
    "unreachable": attack_unreachable,
    "60k-rcpt": attack_many_rcpts,
    "bare-lf": attack_bare_lf,
    "noop-flood": attack_noop_flood,
}


# -- the measurement ---------------------------------------------------------------------------


def measure(port: int, seconds: float, interval: float) -> tuple[list[float], int]:
    """Trusted injections for ``seconds``: each dot -> 250 in seconds, and how many failed."""
    samples, failed = [], 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            samples.append(inject(port)[0])
        except (OSError, RuntimeError, ConnectionError):
            failed += 1
        time.sleep(interval)
    return samples, failed


def row(name: str, samples: list[float], failed: int, baseline: float | None) -> str:
    if not samples:
        return f"  {name:<15} {'-':>5} {'-':>9} {'-':>9} {'-':>7} {failed:>7}"
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    ratio = f"{median / baseline:6.1f}x" if baseline else "      -"
    return f"  {name:<15} {len(samples):>5} {median * 1000:>8.1f}  {p95 * 1000:>8.1f}  {ratio} {failed:>7}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each attack's length")
    parser.add_argument("--interval", type=float, default=0.1, help="between trusted injections")
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run only these attacks")
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seconds = min(args.seconds, 60.0)
    if args.attack:
        ports = Ports()
        ports.__dict__.update(json.loads(args.ports))
        ATTACKS[args.attack](ports, time.monotonic() + args.seconds)
        return
    env = {**os.environ, "PYTHONPATH": REPO}
    ramp = 1.5  # seconds for an attack to build up before the measurement starts
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ports = Ports()
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "bare_smtp.py"), str(ports.sink)],
                                  env=env)]
        procs.append(subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-l", os.path.join(tmp, "twistd.log"),
             "-n", "--pidfile=", "engage-appliance", "-c", appliance_config(tmp, ports)],
            env=env, cwd=tmp))
        try:
            wait_for_port(ports.sink, procs[0])
            wait_for_port(ports.trusted, procs[1])
            measure(ports.trusted, 1.0, 0.05)  # warm-up
            quiet, failed = measure(ports.trusted, args.seconds, args.interval)
            baseline = statistics.median(quiet)
            lines.append(row("no attack", quiet, failed, None))
            for name in args.only or ATTACKS:
                attacker = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--attack", name, "--seconds",
                     str(args.seconds + ramp), "--ports", json.dumps(ports.__dict__)],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(ramp)
                    samples, failed = measure(ports.trusted, args.seconds, args.interval)
                finally:
                    try:
                        attacker.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        attacker.kill()
                        attacker.wait()
                lines.append(row(name, samples, failed, baseline))
                print(lines[-1], flush=True)
                if procs[1].poll() is not None:
                    lines.append("  the appliance exited")
                    break
                time.sleep(2.0)  # let the appliance settle before the next attack
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
    print(f"\ntrusted injections, one every {args.interval} s for {args.seconds:.0f} s per attack "
          f"(after {ramp} s of build-up); dot -> 250 in ms")
    print(f"  {'attack':<15} {'n':>5} {'median':>9} {'p95':>9} {'ratio':>7} {'failed':>7}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
