"""
The appliance's memory with many tracked copies queued for a route that never answers.

The appliance (twistd, the shipped configuration) runs on loopback with a
route for ``unreachable.test`` to a port nothing listens on. This script
injects MESSAGES tracked messages (open and click tracking switched on by
X-MSYS-API, with metadata and tags, bench/newsletter.eml's HTML) of
RECIPIENTS recipients each on the trusted listener, waits until every copy
has had its first attempt (a ``delay`` event each), and prints the process's
resident memory (VmRSS) and its peak (VmHWM) from /proc. While the delays
are written, a probe connects to the SMTP listener every 20 ms and times its
greeting: the longest wait says how long the reactor stalled.

    .venv/bin/python bench/queue_memory_bench.py [--messages 100] [--recipients 100]

Bounded: MESSAGES x RECIPIENTS copies (default 10,000), at most --timeout
seconds of waiting; loopback only; everything lives in a temporary directory
removed at the end. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests.ports import free_port, wait_for_port  # noqa: E402

API = json.dumps({"options": {"open_tracking": True, "click_tracking": True},
                  "campaign_id": "memory-bench", "metadata": {"customer": "c-1042", "tier": "gold"},
                  "tags": ["winter", "newsletter"]})


def appliance_config(directory: str, smtp_port: int, dead_port: int, extra: str = "") -> str:
    with open(os.path.join(REPO, "etc", "appliance.toml")) as f:
        text = f.read()
    text = text.replace('"tcp:2525:interface=127.0.0.1"', f'"tcp:{smtp_port}:interface=127.0.0.1"')
    text = text.replace('"tcp:8080:interface=127.0.0.1"', f'"tcp:{free_port()}:interface=127.0.0.1"')
    text = text.replace('routes = { "example.test" = "127.0.0.1:2526" }',
                        f'routes = {{ "unreachable.test" = "127.0.0.1:{dead_port}" }}')
    text = text.replace('"var/', f'"{directory}/var/')
    text = text.replace('\ncreate_certificate = true', '\ncreate_certificate = false', 1)
    text += extra
    path = os.path.join(directory, "appliance.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def message() -> bytes:
    with open(os.path.join(HERE, "newsletter.eml"), "rb") as f:
        text = f.read()
    head, sep, body = text.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"x-msys-api:")]
    text = b"\n".join(lines) + b"\nX-MSYS-API: " + API.encode() + sep + body
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def inject(port: int, messages: int, recipients: int, sessions: int = 4) -> None:
    data = message()
    todo = list(range(messages))
    lock = threading.Lock()
    errors: list[Exception] = []

    def worker() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                while True:
                    with lock:
                        if not todo or errors:
                            return
                        n = todo.pop()
                    rcpts = [f"r{n}-{i}@unreachable.test" for i in range(recipients)]
                    client.sendmail("bench@example.net", rcpts, data)
        except Exception as e:  # noqa: BLE001 - reported once the others have stopped
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"injection failed: {errors[0]!r}")


def count_delays(log: str) -> int:
    try:
        with open(log, "rb") as f:
            return f.read().count(b'"type":"delay"')
    except FileNotFoundError:
        return 0


def memory(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) // 1024  # MiB
    return out


class GreetingProbe(threading.Thread):
    """Times the SMTP greeting every 20 ms until stopped: a stalled reactor greets late."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.waits: list[float] = []
        self.stalls: list[tuple[float, float]] = []  # (when, seconds) of each wait over 100 ms
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            start = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    s.recv(512)
                    self.waits.append(time.perf_counter() - start)
                    if self.waits[-1] > 0.1:
                        self.stalls.append((time.monotonic(), self.waits[-1]))
                    s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            time.sleep(0.02)


def run(messages: int, recipients: int, timeout: float, extra: str = "") -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": REPO}
    with tempfile.TemporaryDirectory() as tmp:
        port, dead = free_port(), free_port()
        log = os.path.join(tmp, "var", "log", "events.jsonl")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        proc = subprocess.Popen([twistd, "-l", os.path.join(tmp, "twistd.log"), "-n", "--pidfile=",
                                 "engage-appliance", "-c", appliance_config(tmp, port, dead, extra)],
                                env=env, cwd=tmp)
        try:
            wait_for_port(port, proc)
            idle = memory(proc.pid)["VmRSS"]
            probe = GreetingProbe(port)
            probe.start()
            started = time.monotonic()
            inject(port, messages, recipients)
            injected = time.monotonic() - started
            copies = messages * recipients
            deadline = time.monotonic() + timeout
            while count_delays(log) < copies and time.monotonic() < deadline:
                time.sleep(0.2)
            delayed = count_delays(log)
            time.sleep(1.0)
            probe.stopped.set()
            probe.join()
            mem = memory(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
    waits = probe.waits or [0.0]
    return {"copies": copies, "delayed": delayed, "idle": idle, "rss": mem["VmRSS"],
            "peak": mem["VmHWM"], "inject_s": injected, "greeting_median_ms": statistics.median(waits) * 1000,
            "greeting_max_ms": max(waits) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--recipients", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    r = run(args.messages, args.recipients, args.timeout)
    print(f"{r['copies']} tracked copies ({args.messages} messages x {args.recipients} recipients) "
          f"queued for an unreachable route; {r['delayed']} delay events written")
    print(f"  RSS idle {r['idle']} MiB   RSS with the queue {r['rss']} MiB   peak {r['peak']} MiB")
    print(f"  injection {r['inject_s']:.1f} s; SMTP greeting while delays were written: "
          f"median {r['greeting_median_ms']:.1f} ms, max {r['greeting_max_ms']:.1f} ms")


if __name__ == "__main__":
    main()
