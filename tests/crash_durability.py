"""
Crash durability: a ``250`` is a promise the appliance keeps, even through ``kill -9``.

Starts the real appliance as a separate ``twistd`` process and the real sink
(``python -m tests.sink``) behind it, injects messages with several concurrent
SMTP clients, kills the appliance with SIGKILL at random moments (while
messages are being received, committed and delivered), restarts it, and at the
end lets it drain to the sink. Then it checks, from the clients' own
bookkeeping (every message carries a unique ``X-Crash-Id``):

- every message that got a ``250`` arrived at the sink at least once (lost = 0);
- every copy that arrived is byte for byte what the client sent (no spool
  file was delivered half-written);
- no message that was refused (every tenth carries a bare LF and must get
  ``554``) arrived or was reported with an ``injection`` event, and no
  ``injection`` event names a message that never got a ``250`` and whose
  outcome the client did not lose with its connection;
- every accepted message has its ``injection`` event (written after the
  ``250``, so a kill in between leaves it owed to the next start), and only
  one unless its client sent it again; the spool is empty.

With ``--helpers N`` the appliance runs N helper processes and, with
``--dkim``, signs every copy in them; ``--helper-kills`` then also kills a
helper (SIGKILL) at random moments: its job goes to the replacement and no
copy is lost or sent twice for it. With ``--tracker-processes N`` the
tracker runs on N processes while a client keeps asking it for pages, and
``--tracker-kills`` kills a tracker child (SIGKILL) at random moments: mail is
untouched, the child is replaced and the tracker answers again. After every
kill of the appliance itself, none of its children (helpers, tracker
processes) may outlive it for more than a few seconds.

A client whose connection dies before the reply cannot know whether the
message was taken: it sends it again, as a real MTA would, so such messages
may arrive twice (the "duplicates" count; RFC 5321 §6.1 accepts that).

By hand, larger::

    python -m tests.crash_durability --messages 500 --kills 10

CI runs it small through ``tests/test_crash_durability.py``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.ports import free_port, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twistd, run by this interpreter (the same code as the installed "twistd" script).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; "
          "from twisted.scripts.twistd import run; run()"]
POISON_EVERY = 10  # every tenth message has a bare LF and must be refused


def message_bytes(n: int, seed: int) -> bytes:
    """Message ``n``: a unique id, and a body of varied size (some large, to widen the commit window)."""
    rng = random.Random(seed * 1_000_003 + n)
    size = rng.choice([200, 2_000, 20_000, 200_000])
    lines = [base64.b64encode(rng.randbytes(57)) for _ in range(size // 78 + 1)]
    body = b"\r\n".join(lines) + b"\r\n"
    if n % POISON_EVERY == POISON_EVERY - 1:
        body = b"bare\nnewline\r\n" + body
    return (f"From: <client@example.net>\r\nTo: <rcpt@example.test>\r\nSubject: crash {n}\r\n"
            f"X-Crash-Id: {n}\r\nMessage-ID: <crash-{n}-{seed}@example.net>\r\n\r\n").encode() + body


def is_poison(n: int) -> bool:
    return n % POISON_EVERY == POISON_EVERY - 1


@dataclass
class Book:
    """The clients' bookkeeping, shared between their threads."""

    accepted: Counter = field(default_factory=Counter)  # id -> number of 250s seen
    refused: dict[int, int] = field(default_factory=dict)  # id -> final 5xx code
    in_doubt: set[int] = field(default_factory=set)  # connection lost before the reply
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> int:
        with self.lock:
            return len(self.accepted) + len(self.refused)


def client(port: int, work: queue.Queue, book: Book, seed: int, stop: threading.Event) -> None:
    """Send messages from ``work`` until it is empty; each until it gets a 250 or a 5xx."""
    while not stop.is_set():
        try:
            n = work.get_nowait()
        except queue.Empty:
            return
        data = message_bytes(n, seed)
        while not stop.is_set():
            with book.lock:
                book.attempts += 1
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
                    smtp.sendmail("client@example.net", ["rcpt@example.test"], data)
                with book.lock:
                    book.accepted[n] += 1
                break
            except smtplib.SMTPResponseException as e:
                if 500 <= e.smtp_code < 600:
                    with book.lock:
                        book.refused[n] = e.smtp_code
                    break
                time.sleep(0.05)  # 4xx: try again
            except smtplib.SMTPRecipientsRefused as e:
                codes = [code for code, _ in e.recipients.values()]
                if all(500 <= c < 600 for c in codes):
                    with book.lock:
                        book.refused[n] = codes[0]
                    break
                time.sleep(0.05)
            except ConnectionRefusedError:
                time.sleep(0.05)  # down: being restarted
            except (smtplib.SMTPException, OSError):
                with book.lock:
                    book.in_doubt.add(n)  # the reply was lost with the connection
                time.sleep(0.05)


class Appliance:
    """The appliance as its own ``twistd`` process."""

    def __init__(self, workdir: str, config: str) -> None:
        self.workdir = workdir
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": REPO}
        log = open(os.path.join(self.workdir, "appliance.log"), "ab")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "engage-appliance", "-c", self.config],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def write_config(workdir: str, smtp_port: int, sink_port: int, helpers: int | None = None,
                 dkim: bool = False, tracker_port: int | None = None,
                 tracker_processes: int | None = None) -> str:
    path = os.path.join(workdir, "appliance.toml")
    extra = "" if helpers is None else f"[appliance]\nhelpers = {helpers}\n"
    tracker_port = tracker_port or free_port()
    processes = "" if tracker_processes is None else f"processes = {tracker_processes}"
    if dkim:
        from appliance.dkim import new_key, write_key

        write_key(os.path.join(workdir, "dkim.pem"), new_key("rsa"))
        extra += '[dkim]\ndomain = "example.net"\nselector = "crash"\nkey_file = "dkim.pem"\n'
    with open(path, "w") as f:
        f.write(extra)
        f.write(f"""
[node]
name = "crash1"
[smtp]
max_message_size = "10M"
[smtp.listeners.default]
endpoint = "tcp:{smtp_port}:interface=127.0.0.1"
[spool]
directory = "spool"
[delivery]
routes = {{ "example.test" = "127.0.0.1:{sink_port}" }}
retry_initial = "1s"
retry_max = "2s"
[tracker]
endpoint = "tcp:{tracker_port}:interface=127.0.0.1"
{processes}
[events]
log_file = "events.jsonl"
[admin]
endpoint = "tcp:{free_port()}:interface=127.0.0.1"
token_file = "admin.token"
""")
    return path


@dataclass
class Result:
    accepted: int
    delivered: int
    duplicates: int
    lost: int
    refused: int
    in_doubt: int
    kills: int
    problems: list[str]
    helper_kills: int = 0
    tracker_kills: int = 0
    hits_answered: int = 0
    hits_failed: int = 0

    def line(self) -> str:
        return (f"accepted={self.accepted} delivered={self.delivered} duplicates={self.duplicates} "
                f"lost={self.lost} refused={self.refused} in_doubt={self.in_doubt} kills={self.kills} "
                f"helper_kills={self.helper_kills} tracker_kills={self.tracker_kills} "
                f"hits_answered={self.hits_answered} hits_failed={self.hits_failed}")


HELPER, TRACKER = b"appliance.helpers.child", b"appliance.tracker.child"
FINAL_HITS = 40  # hits that must all be answered once the killed tracker processes are replaced


def child_pids(owner: int, kind: bytes | None = None) -> list[int]:
    """The appliance's children (``kind``: only those whose command line names that module)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                if ppid != owner:
                    continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    command = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if kind is None or kind in command.split(b"\0"):
                pids.append(int(name))
    return pids


def orphans_of(owner: int, timeout: float = 10.0) -> list[int]:
    """
    The children of a killed owner (now re-parented) still running after ``timeout``.

    Found by their command line, so a child forked but not yet executing its
    module when the owner died is not seen (it has the owner's command line).
    """
    mine = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    command = f.read().split(b"\0")
            except OSError:
                continue
            # Both kinds of child are started with the owner's pid as their last argument.
            if (HELPER in command or TRACKER in command) and str(owner).encode() in command:
                mine.append(int(name))
    deadline = time.monotonic() + timeout
    while mine and time.monotonic() < deadline:
        time.sleep(0.05)
        mine = [pid for pid in mine if _running(pid)]
    return mine


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@dataclass
class Hits:
    answered: int = 0
    failed: int = 0


def hitter(port: int, hits: Hits, stop: threading.Event) -> None:
    """Ask the tracker for a page, over and over, each on a new connection (spread over its processes)."""
    request = b"GET /robots.txt HTTP/1.1\r\nHost: crash.test\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                answer = s.recv(64)
            if answer.startswith(b"HTTP/1.1 200"):
                hits.answered += 1
            else:
                hits.failed += 1
        except OSError:
            hits.failed += 1  # the owner is down, or a child died holding this connection
        time.sleep(0.01)


def run(messages: int, kills: int, clients: int, seed: int, workdir: str,
        drain_timeout: float = 60.0, helpers: int | None = None, dkim: bool = False,
        helper_kills: int = 0, tracker_processes: int | None = None,
        tracker_kills: int = 0) -> Result:
    rng = random.Random(seed)
    smtp_port, sink_port = free_port(), free_port()
    sink_dir = os.path.join(workdir, "sink")
    os.makedirs(sink_dir)
    sink_log = open(os.path.join(workdir, "sink.log"), "wb")
    sink = subprocess.Popen([sys.executable, "-m", "tests.sink", "--port", str(sink_port),
                             "--directory", sink_dir], cwd=REPO, stdout=sink_log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": REPO})
    tracker_port = free_port()
    appliance = Appliance(workdir, write_config(workdir, smtp_port, sink_port, helpers, dkim,
                                                tracker_port, tracker_processes))
    book = Book()
    hits = Hits()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    killed = helpers_killed = trackers_killed = 0
    orphans: list[int] = []
    answered = failed = trackers_now = 0  # at the end: the last hits answered and failed, tracker children
    try:
        wait_for_port(sink_port, sink)
        appliance.start()
        assert appliance.proc is not None
        wait_for_port(smtp_port, appliance.proc)
        work: queue.Queue = queue.Queue()
        for n in range(messages):
            work.put(n)
        for _ in range(clients):
            t = threading.Thread(target=client, args=(smtp_port, work, book, seed, stop), daemon=True)
            t.start()
            threads.append(t)
        if tracker_processes is not None:
            threading.Thread(target=hitter, args=(tracker_port, hits, stop), daemon=True).start()
        # Kill at random points of the injection, each a few milliseconds after the mark is passed.
        marks = sorted([(rng.uniform(0.05, 0.95) * messages, "owner") for _ in range(kills)]
                       + [(rng.uniform(0.05, 0.95) * messages, "helper") for _ in range(helper_kills)]
                       + [(rng.uniform(0.05, 0.95) * messages, "tracker") for _ in range(tracker_kills)])
        for mark, whom in marks:
            while book.done() < mark and any(t.is_alive() for t in threads):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            if whom in ("helper", "tracker"):
                kind = HELPER if whom == "helper" else TRACKER
                pids = child_pids(appliance.proc.pid, kind)
                deadline = time.monotonic() + 5  # just restarted: its children are starting
                while not pids and time.monotonic() < deadline:
                    time.sleep(0.05)
                    pids = child_pids(appliance.proc.pid, kind)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    if whom == "helper":
                        helpers_killed += 1
                    else:
                        trackers_killed += 1
                continue
            owner = appliance.proc.pid
            appliance.kill()
            killed += 1
            orphans += orphans_of(owner)
            appliance.start()
            wait_for_port(smtp_port, appliance.proc)
        for t in threads:
            t.join(timeout=300)
        # Drain: every copy delivered and the spool empty.
        active = os.path.join(workdir, "spool", "active")
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and os.listdir(active):
            time.sleep(0.1)
        if tracker_processes is not None:  # every child killed was replaced, and they answer
            wanted = tracker_processes - 1
            deadline = time.monotonic() + 30
            while (time.monotonic() < deadline
                   and len(child_pids(appliance.proc.pid, TRACKER)) < wanted):
                time.sleep(0.1)
            # Then every hit is answered: the kernel spreads new connections over every
            # process's socket, so a replacement that never took over its socket would leave
            # about 1/N of them waiting until the hitter gives up on them (a failure).
            answered, failed = hits.answered, hits.failed
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and hits.answered < answered + FINAL_HITS:
                time.sleep(0.05)
            answered, failed = hits.answered - answered, hits.failed - failed
            trackers_now = len(child_pids(appliance.proc.pid, TRACKER))
    finally:
        stop.set()
        appliance.stop()
        sink.terminate()
        sink.wait(30)
        sink_log.close()
    result = check(workdir, sink_dir, book, messages, seed, killed)
    result.helper_kills = helpers_killed
    result.tracker_kills = trackers_killed
    result.hits_answered, result.hits_failed = hits.answered, hits.failed
    if orphans:
        result.problems.append(f"children outlived a killed appliance: {orphans}")
    if tracker_processes is not None:
        if trackers_now != tracker_processes - 1:
            result.problems.append(f"{trackers_now} tracker processes at the end, not "
                                   f"{tracker_processes - 1}")
        if answered < FINAL_HITS or failed:
            result.problems.append(f"after the kills the tracker answered {answered} hits and failed "
                                   f"{failed}, where {FINAL_HITS} had to be answered and none fail")
    return result


def check(workdir: str, sink_dir: str, book: Book, messages: int, seed: int, killed: int) -> Result:
    problems: list[str] = []
    arrived: Counter = Counter()
    for name in sorted(os.listdir(sink_dir)):
        with open(os.path.join(sink_dir, name), "rb") as f:
            data = f.read()
        n = _crash_id(data)
        if n is None or not 0 <= n < messages:
            problems.append(f"{name}: not one of the messages sent")
            continue
        arrived[n] += 1
        data = without_signatures(data)
        if not (data.startswith(b"Received: ") and data.endswith(message_bytes(n, seed))):
            problems.append(f"{name}: message {n} arrived altered or half-written")
    injected: Counter = Counter()
    with open(os.path.join(workdir, "events.jsonl"), "rb") as f:
        for line in f:
            event = json.loads(line)
            if event["type"] == "injection":
                injected[int(event["subject"].split()[-1])] += 1
    accepted = set(book.accepted)
    lost = sorted(accepted - set(arrived))
    if lost:
        problems.append(f"accepted but never delivered: {lost[:20]}")
    for n in sorted(set(arrived) | set(injected)):
        if n in book.refused or is_poison(n):
            problems.append(f"message {n} was refused ({book.refused.get(n)}) yet arrived or was injected")
        elif n not in accepted and n not in book.in_doubt:
            problems.append(f"message {n} never got a 250 yet arrived or was injected")
    missing = sorted(accepted - set(injected))
    if missing:
        problems.append(f"accepted without an injection event: {missing[:20]}")
    # Events owed after a 250 are written at the next start, once: a message sent once
    # (its client was never in doubt) has one injection event, whenever the kill came.
    twice = sorted(n for n, count in injected.items() if count > 1 and n not in book.in_doubt)
    if twice:
        problems.append(f"injection event written more than once: {twice[:20]}")
    wrong = sorted(n for n, code in book.refused.items() if not is_poison(n) or code != 554)
    if wrong:
        problems.append(f"refused although valid, or refused with the wrong code: {wrong[:20]}")
    unfinished = sorted(set(range(messages)) - accepted - set(book.refused))
    if unfinished:
        problems.append(f"clients never finished: {unfinished[:20]}")
    spool_left = os.listdir(os.path.join(workdir, "spool", "active"))
    if spool_left:
        problems.append(f"{len(spool_left)} spool entries left after draining")
    corrupt = [n for n in os.listdir(os.path.join(workdir, "spool")) if n.startswith("corrupt-")]
    if corrupt:
        problems.append(f"spool entries found broken after a crash: {corrupt[:5]}")
    return Result(
        accepted=len(accepted),
        delivered=len(set(arrived) & accepted),
        duplicates=sum(arrived.values()) - len(arrived),
        lost=len(lost),
        refused=len(book.refused),
        in_doubt=len(book.in_doubt),
        kills=killed,
        problems=problems,
    )


def without_signatures(data: bytes) -> bytes:
    """The copy without the DKIM-Signature fields the appliance put on top (``--dkim``)."""
    while data.startswith(b"DKIM-Signature:"):
        end = data.index(b"\r\n")
        while data[end + 2:end + 3] in (b" ", b"\t"):
            end = data.index(b"\r\n", end + 2)
        data = data[end + 2:]
    return data


def _crash_id(data: bytes) -> int | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.startswith(b"X-Crash-Id: "):
            try:
                return int(line[12:])
            except ValueError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kill -9 the appliance under load; count what survives")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--helpers", type=int, default=None,
                        help="[appliance] helpers (default: the appliance's default)")
    parser.add_argument("--dkim", action="store_true", help="sign every copy (in the helpers, if any)")
    parser.add_argument("--helper-kills", type=int, default=0, help="helper processes to kill -9")
    parser.add_argument("--tracker-processes", type=int, default=None,
                        help="[tracker] processes (default: the appliance's default)")
    parser.add_argument("--tracker-kills", type=int, default=0, help="tracker processes to kill -9")
    parser.add_argument("--workdir", default=None,
                        help="keep everything here (default: a temporary directory)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"seed={seed} messages={args.messages} kills={args.kills} clients={args.clients}", flush=True)
    options = {"helpers": args.helpers, "dkim": args.dkim, "helper_kills": args.helper_kills,
               "tracker_processes": args.tracker_processes, "tracker_kills": args.tracker_kills}
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=False)
        result = run(args.messages, args.kills, args.clients, seed, os.path.abspath(args.workdir),
                     **options)
    else:
        with tempfile.TemporaryDirectory(prefix="crash-durability-") as workdir:
            result = run(args.messages, args.kills, args.clients, seed, workdir, **options)
    print(result.line())
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
