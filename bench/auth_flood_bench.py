"""
A trusted injection's 250 while a public listener is flooded with failed logins.

The appliance (twistd, the shipped configuration with a certificate, a users
file at the default scrypt cost and a second, public listener whose clients
may not relay) runs on loopback. A separate process opens ATTACKERS
connections to the public listener, each looping STARTTLS, EHLO and a wrong
AUTH PLAIN, reconnecting whenever the server closes. Meanwhile this process
injects one message at a time on the trusted listener and times each from
the final "." to the 250 (and the whole session, connect to 250). Printed:
the same figures with no attack first, then under attack, and how many
logins the attackers got answered.

    .venv/bin/python bench/auth_flood_bench.py [--attackers 150] [--seconds 20] [--interval 0.25]

Bounded: the attack lasts --seconds, every process listens on 127.0.0.1 only,
and everything lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from appliance.tls import write_pair  # noqa: E402
from appliance.users import set_user  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402

BODY = (b"From: bench@example.net\r\nTo: r@example.test\r\nSubject: bench\r\n\r\n"
        + b"".join(b"Line %d of a plain message body.\r\n" % i for i in range(40)))
WRONG = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n"


def appliance_config(directory: str, trusted: int, public: int, sink: int) -> str:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    write_pair(cert, key, "localhost", 30)
    users = os.path.join(directory, "users")
    set_user(users, "alice", b"secret")  # the default cost, as an operator's file has it
    with open(os.path.join(REPO, "etc", "appliance.toml")) as f:
        text = f.read()
    text = text.replace('"tcp:2525:interface=127.0.0.1"', f'"tcp:{trusted}:interface=127.0.0.1"')
    text = text.replace('"tcp:8080:interface=127.0.0.1"', f'"tcp:{free_port()}:interface=127.0.0.1"')
    text = text.replace('"127.0.0.1:2526"', f'"127.0.0.1:{sink}"')
    text = text.replace('"var/', f'"{directory}/var/')
    text = text.replace('\ntls_certificate = ""\n', f'\ntls_certificate = "{cert}"\n', 1)
    text = text.replace('\ntls_key = ""\n', f'\ntls_key = "{key}"\n', 1)
    text = text.replace('\nusers_file = ""\n', f'\nusers_file = "{users}"\n', 1)
    text += (f'\n[smtp.listeners.public]\nendpoint = "tcp:{public}:interface=127.0.0.1"\n'
             'relay_networks = []\n')
    path = os.path.join(directory, "appliance.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- the attackers (a process of their own) --------------------------------------


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError
        if line[3:4] != b"-":
            return line


async def _attacker(port: int, until: float, answered: list[int]) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reply(reader)
            writer.write(b"EHLO attacker\r\nSTARTTLS\r\n")
            await _reply(reader)
            if not (await _reply(reader)).startswith(b"220"):
                raise ConnectionError
            await writer.start_tls(context)
            writer.write(b"EHLO attacker\r\n")
            await _reply(reader)
            while time.monotonic() < until:
                writer.write(WRONG)
                line = await _reply(reader)
                answered[0] += 1
                if line.startswith(b"421"):
                    break
            writer.close()
        except (ConnectionError, OSError, ssl.SSLError):
            await asyncio.sleep(0.05)


async def _attack(port: int, attackers: int, seconds: float) -> None:
    until = time.monotonic() + seconds
    answered = [0]
    tasks = [asyncio.create_task(_attacker(port, until, answered)) for _ in range(attackers)]
    await asyncio.wait(tasks, timeout=seconds + 30)
    print(answered[0], flush=True)


# -- the trusted client -----------------------------------------------------------------


def _expect(f: socket.SocketIO | object, code: bytes) -> None:
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"unexpected {line!r}")
            return


def inject(port: int) -> tuple[float, float]:
    """One message on the trusted listener: seconds from "." to 250, and for the whole session."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _expect(f, b"220")
        for line, code in ((b"EHLO trusted\r\n", b"250"), (b"MAIL FROM:<bench@example.net>\r\n", b"250"),
                           (b"RCPT TO:<r@example.test>\r\n", b"250"), (b"DATA\r\n", b"354")):
            s.sendall(line)
            _expect(f, code)
        s.sendall(BODY)
        dot = time.perf_counter()
        s.sendall(b".\r\n")
        _expect(f, b"250")
        end = time.perf_counter()
        s.sendall(b"QUIT\r\n")
    return end - dot, end - start


def measure(port: int, seconds: float, interval: float) -> list[tuple[float, float]]:
    out = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        out.append(inject(port))
        time.sleep(interval)
    return out


def summary(name: str, samples: list[tuple[float, float]]) -> str:
    dots = sorted(d for d, _ in samples)
    whole = sorted(w for _, w in samples)

    def ms(values: list[float], q: float) -> str:
        return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:8.1f}"

    return (f"  {name:<14} n={len(samples):3d}   dot->250 median {statistics.median(dots) * 1000:8.1f} ms"
            f"  p95 {ms(dots, 0.95)} ms  max {dots[-1] * 1000:8.1f} ms"
            f"   session median {statistics.median(whole) * 1000:8.1f} ms  max {whole[-1] * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--attack-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack_port:
        asyncio.run(_attack(args.attack_port, args.attackers, args.seconds))
        return
    env = {**os.environ, "PYTHONPATH": REPO}
    with tempfile.TemporaryDirectory() as tmp:
        trusted, public, sink = free_port(), free_port(), free_port()
        procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "bare_smtp.py"), str(sink)],
                                  env=env)]
        procs.append(subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-l", os.path.join(tmp, "twistd.log"),
             "-n", "--pidfile=", "engage-appliance", "-c", appliance_config(tmp, trusted, public, sink)],
            env=env, cwd=tmp))
        try:
            wait_for_port(sink, procs[0])
            wait_for_port(trusted, procs[1])
            measure(trusted, 1.0, 0.05)  # warm-up
            quiet = measure(trusted, 5.0, args.interval)
            attack = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--attack-port", str(public),
                 "--attackers", str(args.attackers), "--seconds", str(args.seconds)],
                env=env, stdout=subprocess.PIPE, text=True)
            procs.append(attack)
            time.sleep(min(3.0, args.seconds / 4))  # let the flood build up
            flooded = measure(trusted, args.seconds - min(3.0, args.seconds / 4), args.interval)
            out, _ = attack.communicate(timeout=args.seconds + 60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
    print(f"trusted injections, one at a time every {args.interval} s; "
          f"{args.attackers} connections looping STARTTLS + failed AUTH PLAIN on a public listener")
    print(summary("no attack", quiet))
    print(summary("under attack", flooded))
    print(f"  logins answered to the attackers in {args.seconds:.0f} s: {out.strip()}")


if __name__ == "__main__":
    main()
