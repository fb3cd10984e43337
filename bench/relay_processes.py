"""
The processes bench/relay_bench.py runs and measures: a private Postfix
instance, Postfix's test programs smtp-sink and smtp-source, the servers under
test, a profiler around the appliance, and CPU accounting from /proc.

Nothing here installs anything. Debian's ``postfix`` package provides
``postfix``, ``smtp-source`` and ``smtp-sink``; ``postfix start`` needs root
and a line in the default ``/etc/postfix/main.cf`` naming the private
configuration directory (``alternate_config_directories``), which the
instance adds for its lifetime and removes when it stops.
"""

from __future__ import annotations

import os
import pstats
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

from tests.ports import wait_for_port  # relay_bench.py puts the repository on sys.path

DEFAULT_MAIN_CF = "/etc/postfix/main.cf"
DEFAULT_MASTER_CF = "/etc/postfix/master.cf"
# Marks the lines this bench adds to the default main.cf, so that only they are removed.
MARKER = "# added by bench/relay_bench.py for its private instance; removed when it stops"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
IDLE_WAIT = "Condition.wait (threading.py"


class Unavailable(Exception):
    """What this machine lacks for a part of the bench, said so that an operator can fix it."""


def require_programs(*names: str) -> None:
    # Debian installs postfix, smtp-source and smtp-sink in /usr/sbin, often not on a user's PATH.
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(path + [d for d in SBIN if d not in path])
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise Unavailable(
            f"{', '.join(missing)} not found on PATH. Debian's postfix package provides postfix, "
            "smtp-source and smtp-sink: apt-get install postfix (the bench installs nothing itself).")


# -- CPU of a process tree ----------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime+stime+cutime+cstime in ticks) of one process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ")".
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def _all_stats() -> dict[int, tuple[int, int]]:
    stats: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                stats[int(name)] = stat
    return stats


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    return [child for child, (ppid, _) in _all_stats().items() if ppid == pid]


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of ``root`` and every live descendant, reaped children included.

    A child's time moves into its parent's cutime/cstime when it is reaped, so
    the sum stays right when Postfix's daemons exit between two readings.
    """
    stats = _all_stats()
    tree: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        tree.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            ticks += stats[pid][1]
            todo.extend(tree.get(pid, ()))
    return ticks / CLOCK_TICKS


# -- smtp-sink and smtp-source --------------------------------------------------

class Sink:
    """smtp-sink on a loopback port: receives both sides' deliveries and counts them.

    Every transaction is also written to a file in ``directory`` (one per
    message, as a receiving MX would store it), so the copies can be checked.
    """

    def __init__(self, port: int, directory: str) -> None:
        self.port = port
        self.directory = directory
        self._count = 0
        self._changed = threading.Condition()
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o777)  # smtp-sink writes as nobody
        command = ["smtp-sink", "-c", "-d", os.path.join(directory, "%H%M%S."), "-m", "500"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        self.process = subprocess.Popen(command + [f"127.0.0.1:{port}", "500"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            wait_for_port(port, timeout=30)
        except RuntimeError:
            self.stop()
            raise

    def _read(self) -> None:
        # -c prints "sess=S quit=Q mesg=M" and a carriage return after each event.
        assert self.process.stdout is not None
        buffer = b""
        while chunk := self.process.stdout.read1(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\r")
            counts = [int(m.group(1)) for line in lines if (m := re.search(rb"mesg=(\d+)", line))]
            if counts:
                with self._changed:
                    self._count = counts[-1]
                    self._changed.notify_all()

    @property
    def count(self) -> int:
        """Messages received since the sink started."""
        with self._changed:
            return self._count

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once ``count`` messages have arrived, False if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def clear(self) -> None:
        """Delete the stored copies (the count goes on)."""
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def source_command(port: int, message_file: str, messages: int, sessions: int,
                   recipients: int) -> list[str]:
    """smtp-source sending ``message_file`` (LF line ends: it adds the CR) over reused sessions."""
    return ["smtp-source", "-4", "-d", "-s", str(sessions), "-m", str(messages),
            "-r", str(recipients), "-M", "relay-bench.test", "-f", "news@shop.example.com",
            "-t", "reader@example.test", "-F", message_file, f"127.0.0.1:{port}"]


def run_source(command: list[str], timeout: float) -> float:
    """Run smtp-source to its end; the seconds it took. It stops at the first reply not 2xx/3xx."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return elapsed


# -- server processes ----------------------------------------------------------------

def start(command: list[str], port: int, cwd: str, pythonpath: str) -> subprocess.Popen:
    """Start a server process and wait until it listens on ``port``; its errors if it does not."""
    # Its output goes to a file: a pipe nobody reads during the run could fill and stop it.
    output = os.path.join(cwd, f"{os.path.basename(command[0])}-{port}.out")
    with open(output, "wb") as f:
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": pythonpath},
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, 60)
    except RuntimeError:
        stop(proc)
        with open(output, errors="replace") as f:
            raise RuntimeError(f"{' '.join(command)} did not start:\n{f.read()}") from None
    return proc


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, and SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the profile ----------------------------------------------------------------------

def profiler_command(choice: str | None, directory: str,
                     twistd: list[str]) -> tuple[str, list[str], str]:
    """(profiler, command running the appliance under it, the file it writes)."""
    if choice is None:
        choice = "py-spy" if shutil.which("py-spy") else "cprofile"
    if choice == "py-spy":
        if shutil.which("py-spy") is None:
            raise Unavailable("py-spy is not on PATH: pip install py-spy, or --profiler cprofile")
        output = os.path.join(directory, "profile.txt")
        # Every thread (DKIM signs in worker threads), by function, without pausing the process.
        return choice, ["py-spy", "record", "--format", "raw", "--function", "--nonblocking",
                        "--rate", "250", "--output", output, "--", *twistd], output
    output = os.path.join(directory, "profile.pstats")
    return choice, [twistd[0], f"--profile={output}", "--profiler=cprofile", "--savestats",
                    *twistd[1:]], output


def stop_profiled(name: str, proc: subprocess.Popen) -> None:
    """Stop the appliance so that the profiler writes its file: py-spy writes when its child exits."""
    if name == "py-spy":
        for child in children(proc.pid):
            os.kill(child, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            stop(proc)
    else:
        stop(proc, timeout=120)


def _short(path: str, repo: str) -> str:
    if path.startswith(repo + os.sep):
        return path[len(repo) + 1 :]
    return re.sub(r".*/(site-packages|python3\.\d+)/", "", path)


def top_entries(name: str, output: str, top: int, repo: str) -> str:
    """The ``top`` functions by their own time, with the time spent below them."""
    if not os.path.exists(output):
        raise RuntimeError(f"{name} wrote no profile ({output})")
    rows = []
    if name == "py-spy":
        own: Counter[str] = Counter()
        below: Counter[str] = Counter()
        total = idle = 0
        with open(output) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                frames = stack.split(";")
                if frames[-1].startswith(IDLE_WAIT):
                    # py-spy cannot always tell that a thread is idle: pool threads waiting for work.
                    idle += int(count)
                    continue
                total += int(count)
                own[frames[-1]] += int(count)
                for frame in set(frames):
                    below[frame] += int(count)
        for frame, samples in own.most_common(top):
            function, _, where = frame.partition(" (")
            rows.append(f"  {samples / total:6.1%} {below[frame] / total:7.1%}   {function}"
                        f" ({_short(where.rstrip(')'), repo)})")
        head = (f"py-spy: {total} samples of every thread ({idle} more of idle threads waiting in "
                "threading.Condition.wait left out); own and inclusive share of the samples")
        return "\n".join([f"\n{head}", "     own   incl.   function", *rows])
    stats = pstats.Stats(output)
    entries = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    for (path, line, function), (_, calls, own_s, cumulative, _) in entries[:top]:
        rows.append(f"  {own_s:7.2f} {own_s / stats.total_tt:6.1%} {cumulative:8.2f} {calls:9d}   "  # type: ignore[attr-defined]
                    f"{function} ({_short(path, repo)}:{line})")
    head = f"cProfile (reactor thread only): {stats.total_tt:.2f} s in all"  # type: ignore[attr-defined]
    return "\n".join([f"\n{head}", "   own s   own%    cum s     calls   function", *rows])


# -- the private instance --------------------------------------------------------

@dataclass
class Postfix:
    """A Postfix instance of its own under ``directory``, relaying everything to the sink."""

    directory: str
    port: int
    sink_port: int
    started: bool = False
    _main_cf_line: str = ""

    @staticmethod
    def check_possible() -> None:
        """Stop with a clear message where ``postfix -c DIR start`` cannot work."""
        require_programs("postfix", "postconf", "smtp-source", "smtp-sink")
        if os.geteuid() != 0:
            raise Unavailable(
                "postfix start needs root: run the bench as root (or with sudo), or use "
                "--profile, which runs the appliance alone.")
        if not os.access(DEFAULT_MAIN_CF, os.W_OK):
            raise Unavailable(
                f"{DEFAULT_MAIN_CF} is missing or not writable: postfix -c DIR start only accepts "
                "a DIR listed in alternate_config_directories there, and the bench adds that "
                "line for the length of the run.")

    @property
    def config_directory(self) -> str:
        return os.path.join(self.directory, "etc")

    @property
    def queue_directory(self) -> str:
        return os.path.join(self.directory, "queue")

    def write_config(self) -> None:
        for sub in ("etc", "queue", "data"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        shutil.chown(os.path.join(self.directory, "data"), "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_directory,
            "data_directory": os.path.join(self.directory, "data"),
            "maillog_file": os.path.join(self.directory, "maillog"),
            "maillog_file_prefixes": self.directory,
            "myhostname": "relay-bench.test",
            "mydomain": "relay-bench.test",
            "myorigin": "relay-bench.test",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
        }
        with open(os.path.join(self.config_directory, "main.cf"), "w") as f:
            f.writelines(f"{key} = {value}\n" for key, value in main.items())
        with open(DEFAULT_MASTER_CF) as f:
            master = f.read().splitlines()
        lines = []
        for line in master:
            fields = line.split()
            if line[:1].isspace() or line.startswith("#") or len(fields) < 8:
                lines.append(line)
                continue
            if fields[:2] == ["smtp", "inet"]:
                fields[0] = f"127.0.0.1:{self.port}"
            elif fields[1] == "inet":
                lines.append("#" + line)  # no other listener (submission, smtps...)
                continue
            fields[4] = "n"  # no chroot: the instance's directory has no chroot files
            lines.append("  ".join(fields))
        with open(os.path.join(self.config_directory, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _allow_directory(self) -> None:
        """List the private directory in the default main.cf, keeping what is listed there."""
        listed = subprocess.run(["postconf", "-h", "alternate_config_directories"],
                                capture_output=True, text=True, check=True).stdout.strip()
        self._main_cf_line = (f"alternate_config_directories = {listed} {self.config_directory}"
                              .replace("=  ", "= "))
        with open(DEFAULT_MAIN_CF, "a") as f:
            f.write(f"{MARKER}\n{self._main_cf_line}\n")

    def _disallow_directory(self) -> None:
        if not self._main_cf_line:
            return
        with open(DEFAULT_MAIN_CF) as f:
            text = f.read()
        text = text.replace(f"{MARKER}\n{self._main_cf_line}\n", "")
        with open(DEFAULT_MAIN_CF, "w") as f:
            f.write(text)
        self._main_cf_line = ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", self.config_directory, *args],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self.write_config()
        self._allow_directory()
        result = self._postfix("start")
        if result.returncode != 0:
            raise Unavailable(f"postfix -c {self.config_directory} start failed:\n"
                              f"{result.stdout}{result.stderr}")
        self.started = True
        wait_for_port(self.port)

    def master_pid(self) -> int:
        with open(os.path.join(self.queue_directory, "pid", "master.pid")) as f:
            return int(f.read().strip())

    def stop(self) -> None:
        """Stop the master and every daemon, and take the line out of the default main.cf."""
        try:
            if self.started:
                pid = self.master_pid()
                self._postfix("stop")
                deadline = time.monotonic() + 10
                while _stat(pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _stat(pid) is not None:
                    self._postfix("abort")
                self.started = False
        finally:
            self._disallow_directory()
