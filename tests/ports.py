"""Loopback ports for tests, the crash script and benchmarks; no reactor is imported here."""

from __future__ import annotations

import fcntl
import os
import random
import re
import socket
import subprocess
import tempfile
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
# Ports handed out by every process of this user that uses this module (parallel test
# workers, the crash script, benchmarks): "pid port" lines, read and appended under a lock.
_REGISTRY = os.path.join(tempfile.gettempdir(), f"engage-appliance-test-ports-{os.getuid()}")
_PRUNE_AT = 2000  # lines: then the entries of processes gone are dropped
_ENTRY = re.compile(r"[0-9]+ [0-9]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive all the same
    return True


def free_port() -> int:
    """
    A TCP port nothing listens on now, never handed out before by any process using this.

    Chosen at random below the ephemeral range: a port the kernel picked
    (``bind(0)``) is one it may give the next outgoing connection, of this
    process or of a parallel test worker, before the caller listens on it.
    A registry shared by the processes keeps two test workers from being
    handed the same port between the check here and their listening on it.
    """
    with open(_REGISTRY, "a+") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)
        registry.seek(0)
        entries = [(int(pid), int(port)) for pid, port in
                   (line.split() for line in registry.read().splitlines() if _ENTRY.fullmatch(line))]
        live = {pid: _alive(pid) for pid in {pid for pid, _ in entries}}  # once per process
        taken = _handed | {port for pid, port in entries if live[pid]}
        if len(entries) > _PRUNE_AT and not all(live.values()):
            registry.seek(0)
            registry.truncate()
            registry.writelines(f"{pid} {port}\n" for pid, port in entries if live[pid])
        port = _pick(taken)
        _handed.add(port)
        registry.write(f"{os.getpid()} {port}\n")
        registry.flush()
        return port


def _pick(taken: set[int]) -> int:
    for _ in range(1000):
        port = _rng.randint(*_RANGE)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or in TIME_WAIT
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
