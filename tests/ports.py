"""Loopback ports for tests, the crash script and benchmarks; no reactor is imported here."""

from __future__ import annotations

import random
import socket
import subprocess
import time


def _below_ephemeral() -> tuple[int, int]:
    """Ports below the range the kernel gives outgoing connections (Linux's; 20000-32767 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 20000, 32767
    return (20000, low - 1) if low > 21000 else (low // 2, low - 1)


_RANGE = _below_ephemeral()
_handed: set[int] = set()
_rng = random.SystemRandom()


def free_port() -> int:
    """
    A TCP port nothing listens on now, never handed out before by this process.

    Chosen at random below the ephemeral range: a port the kernel picked
    (``bind(0)``) is one it may give the next outgoing connection, of this
    process or of a parallel test worker, before the caller listens on it.
    A later bind can still race another process, far more rarely.
    """
    for _ in range(1000):
        port = _rng.randint(*_RANGE)
        if port in _handed:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or in TIME_WAIT
        _handed.add(port)
        return port
    with socket.socket() as s:  # the range is full: the kernel's choice, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until something (``proc``, if given) listens on ``port``; fail at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")
