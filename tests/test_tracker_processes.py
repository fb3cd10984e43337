"""
``[tracker] processes``: children answering hits beside the appliance, with real processes.

The pure parts (the wire, the relay's batches and drops, the id bits, the
configuration) are tested without a reactor; the rest runs real tracker
processes on loopback, and a real ``twistd`` for the owner killed with ``-9``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.config import ConfigError, TrackerLimits, parse_config
from appliance.config.values import tcp_listen_address
from appliance.events import IdGenerator
from appliance.links import Keyring, LinkCodec, LinkData, write_keyring
from appliance.tracker.child import EventRelay
from appliance.tracker.processes import share
from appliance.tracker.wire import Decoder, WireError, encode, keyring_from, keys_message
from tests.crash_durability import TWISTD
from tests.helpers import REPO, RunningAppliance, base_toml, deferred_sleep, merge
from tests.ports import free_port, wait_for_port

PROCESS_SHIFT = 20 - IdGenerator.PROCESS_BITS


def process_of(event_id: str) -> int:
    """The tracker process that made an event, from its id's bits."""
    return (int(event_id) >> PROCESS_SHIFT) & (IdGenerator.MAX_PROCESSES - 1)


def click(codec: LinkCodec, n: int) -> str:
    token = codec.encode(LinkData(
        "click", int(time.time()) + 86400, "00a1b2c3d4e5f6a7b8c9", "4711", f"r{n}@example.test",
        "campaign", (), {}, "link", f"https://shop.example/p/{n}"))
    return f"/f/a/{token}"


def get(port: int, path: str, timeout: float = 20.0, agent: str | None = None) -> int:
    """One GET on a new connection: the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": agent} if agent else {})
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


# -- pure parts -------------------------------------------------------------------------


class WireTests(SynchronousTestCase):
    def test_messages_survive_any_chunking(self) -> None:
        messages = [{"batch": [["192.0.2.1", "tok", [{"type": "click", "x": "é" * n}]]]}
                    for n in range(5)]
        data = b"".join(encode(m) for m in messages)
        decoder = Decoder()
        got = []
        for i in range(0, len(data), 7):
            got.extend(decoder.feed(data[i:i + 7]))
        self.assertEqual(got, messages)

    def test_a_broken_stream_is_an_error(self) -> None:
        with self.assertRaises(WireError):
            list(Decoder().feed(b"\x00\x00\x00\x02[]"))
        with self.assertRaises(WireError):
            list(Decoder().feed(b"\x00\x00\x00\x03{x}"))
        with self.assertRaises(WireError):
            list(Decoder().feed(b"\xff\xff\xff\xff"))

    def test_keys_cross_whole(self) -> None:
        keyring = Keyring(((3, b"s" * 32), (2, b"o" * 32)))
        self.assertEqual(keyring_from(keys_message(keyring)), keyring)


class IdBitsTests(SynchronousTestCase):
    def test_each_process_has_its_own_ids(self) -> None:
        now = lambda: 1_700_000_000.0  # noqa: E731 - one millisecond for all
        ids = {p: IdGenerator("n", now, process=p) for p in (0, 1, 63)}
        made = {p: {g.event_id() for _ in range(1000)} for p, g in ids.items()}
        self.assertEqual(sum(len(s) for s in made.values()), 3000)
        for p, s in made.items():
            self.assertEqual({process_of(i) for i in s}, {p})

    def test_an_index_out_of_range_is_refused(self) -> None:
        self.assertRaises(ValueError, IdGenerator, "n", process=64)
        self.assertRaises(ValueError, IdGenerator, "n", process=-1)


class EventRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sent: list[dict[str, Any]] = []
        self.relay = EventRelay(2, "node", "1", self.sent.append, self.clock, max_buffered=10,
                                batch_size=4, interval=0.01, window=2)

    def hit(self, n: int = 1) -> None:
        self.relay.hit([self.relay.make("click", n=i) for i in range(n)], "192.0.2.1", b"tok")

    def test_events_leave_in_batches_after_the_interval_or_when_a_batch_is_full(self) -> None:
        self.hit()
        self.assertEqual(self.sent, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.sent), 1)
        [[address, token, events]] = self.sent[0]["batch"]
        self.assertEqual((address, token, events[0]["type"]), ("192.0.2.1", "tok", "click"))
        self.assertEqual(process_of(events[0]["event_id"]), 2)
        self.hit(4)
        self.assertEqual(len(self.sent), 2)  # full: at once

    def test_the_window_holds_events_back_until_acks_come(self) -> None:
        for _ in range(3):
            self.hit(4)
        self.assertEqual(len(self.sent), 2)
        self.assertEqual(self.relay.buffered, 4)
        self.relay.ack()
        self.assertEqual(len(self.sent), 3)
        self.assertEqual(self.relay.buffered, 0)

    def test_past_the_buffer_events_are_dropped_counted_and_logged(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(2):
            self.hit(4)  # in flight
        for _ in range(3):
            self.hit(4)  # 8 wait, the third is dropped
        self.assertEqual((self.relay.buffered, self.relay.dropped), (8, 4))
        self.assertEqual([e["count"] for e in logged if "dropped" in e.get("log_format", "")], [4])
        # The appliance takes them again: what waited goes, nothing is lost twice.
        self.relay.ack()
        self.relay.ack()
        self.assertEqual(sum(len(h[2]) for m in self.sent for h in m["batch"]), 16)

    def test_drain_waits_for_every_ack(self) -> None:
        self.hit(2)
        drained = self.relay.drain()
        self.assertNoResult(drained)
        self.relay.ack()
        self.successResultOf(drained)


class ConfigTests(SynchronousTestCase):
    def config(self, **tracker: Any) -> Any:
        return parse_config(merge(base_toml(), {"tracker": tracker}), "test")

    def test_default_is_one_process(self) -> None:
        self.assertEqual(self.config().tracker.processes, 1)

    def test_a_count_and_auto(self) -> None:
        self.assertEqual(self.config(processes=3).tracker.processes, 3)
        auto = self.config(processes="auto").tracker.processes
        self.assertEqual(auto, min(64, len(os.sched_getaffinity(0))))
        # auto on an endpoint that cannot be shared is one process
        self.assertEqual(self.config(processes="auto", endpoint="unix:/tmp/t.sock").tracker.processes, 1)

    def test_bad_values_name_the_key(self) -> None:
        for value in (0, 65, "two", True, 1.5):
            e = self.assertRaises(ConfigError, self.config, processes=value)
            self.assertIn("tracker.processes", str(e))
        e = self.assertRaises(ConfigError, self.config, processes=2, endpoint="ssl:443")
        self.assertIn("tracker.processes", str(e))
        self.assertIn("tcp:", str(e))

    def test_listen_addresses(self) -> None:
        self.assertEqual(tcp_listen_address("tcp:8080:interface=127.0.0.1"), ("127.0.0.1", 8080, 50))
        self.assertEqual(tcp_listen_address("tcp6:80:interface=\\:\\:1:backlog=9"), ("::1", 80, 9))
        self.assertEqual(tcp_listen_address("tcp:port=81"), ("0.0.0.0", 81, 50))
        for bad in ("ssl:443", "tcp:80:interface=localhost", "tcp:x", "tcp:80:reuse=1", "unix:/s"):
            self.assertIsNone(tcp_listen_address(bad))

    def test_connection_limits_are_shared(self) -> None:
        limits = share(TrackerLimits(max_connections=512, max_connections_per_address=31), 2)
        self.assertEqual((limits.max_connections, limits.max_connections_per_address), (256, 16))
        self.assertEqual(share(TrackerLimits(), 1), TrackerLimits())


class LatencyTests(SynchronousTestCase):
    def test_other_processes_counts_are_added_bucket_by_bucket(self) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        from appliance.admin.metrics import tracker_latency

        registry = CollectorRegistry(auto_describe=False)
        latency = tracker_latency(registry)
        latency.observe(0.0002)
        latency.observe(3.0)
        latency.add(lambda: ([2] + [0] * (len(latency.buckets) - 1) + [1], 4.5))
        text = generate_latest(registry).decode()
        self.assertIn('engage_tracker_answer_seconds_bucket{le="0.0005"} 3.0', text)
        self.assertIn('engage_tracker_answer_seconds_bucket{le="2.5"} 3.0', text)
        self.assertIn('engage_tracker_answer_seconds_bucket{le="+Inf"} 5.0', text)
        self.assertIn("engage_tracker_answer_seconds_count 5.0", text)
        [total] = [float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("engage_tracker_answer_seconds_sum ")]
        self.assertAlmostEqual(total, 7.5002)


# -- real processes ---------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it has ended, its parent just has not asked)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TrackerProcessesTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        networks = os.path.join(directory, "egress.csv")
        with open(networks, "w") as f:
            f.write("127.0.0.0/8,US,US-CA,Cupertino,\n")  # loopback stands for Apple's relays here
        self.running = RunningAppliance(directory, tracker={"processes": 3, "event_rate_limit": 2},
                                        engagement_tracker={"prefetch_networks_file": networks})
        yield self.running.start()
        self.appliance = self.running.appliance
        self.pool = self.appliance.tracker_processes
        self.stopped = False
        self.addCleanup(lambda: None if self.stopped else self.running.stop())
        self.port = self.running.http_port
        yield self.until(lambda: len(self.pool.children) == 2 and all(
            c.ready for c in self.pool.children.values()))

    @defer.inlineCallbacks
    def until(self, predicate: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s")
            yield deferred_sleep(0.05)

    def clicks(self, paths: list[str]) -> defer.Deferred:
        """GET each path on a new connection, from a thread (the reactor answers meanwhile)."""
        return threads.deferToThread(lambda: [get(self.port, p) for p in paths])

    @defer.inlineCallbacks
    def test_hits_answered_by_children_are_in_the_log_with_unique_ids(self) -> None:
        codec = self.appliance.links
        paths = [click(codec, n) for n in range(300)]
        statuses = yield self.clicks(paths)
        self.assertEqual(set(statuses), {302})
        yield self.until(lambda: len(self.clicks_logged()) == 300)
        events = self.clicks_logged()
        self.assertEqual(len({e["event_id"] for e in events}), 300)
        self.assertEqual(sorted(e["rcpt_to"] for e in events),
                         sorted(f"r{n}@example.test" for n in range(300)))
        by_process = {p: sum(1 for e in events if process_of(e["event_id"]) == p) for p in range(3)}
        # The kernel spreads connections over the three sockets: each takes a fair part.
        self.assertTrue(all(count >= 40 for count in by_process.values()), by_process)

    @defer.inlineCallbacks
    def test_children_classify_hits_as_the_owner_does(self) -> None:
        """Every process parses user agents and reads the same prefetch networks file."""
        codec = self.appliance.links
        expires = int(time.time()) + 86400
        opens = ["/q/" + codec.encode(LinkData("open", expires, "00a1b2c3d4e5f6a7b8c9", "4711",
                                               f"r{n}@example.test", "campaign", (), {}, "", ""))
                 for n in range(120)]
        statuses = yield threads.deferToThread(
            lambda: [get(self.port, p, agent="Mozilla/5.0") for p in opens])
        self.assertEqual(set(statuses), {200})
        yield self.until(lambda: len([e for e in self.running.events() if e["type"] == "open"]) == 120)
        events = [e for e in self.running.events() if e["type"] == "open"]
        self.assertEqual({process_of(e["event_id"]) for e in events}, {0, 1, 2})
        for e in events:  # Apple's prefetch: the networks and the bare agent, in every process
            self.assertTrue(e["user_agent_parsed"]["is_prefetched"], e)
            self.assertTrue(e["user_agent_parsed"]["is_proxy"], e)

    @defer.inlineCallbacks
    def test_the_limit_counts_hits_of_every_process_once(self) -> None:
        path = click(self.appliance.links, 1)
        statuses = yield self.clicks([path] * 30)
        self.assertEqual(set(statuses), {302})
        yield self.until(lambda: self.appliance.tracker_site.limiter.suppressed == 28)
        self.assertEqual(len(self.clicks_logged()), 2)  # event_rate_limit, across all processes

    @defer.inlineCallbacks
    def test_a_killed_child_is_replaced_and_the_listener_keeps_answering(self) -> None:
        victim = self.pool.children[1]
        pid = victim.process_id
        os.kill(pid, signal.SIGKILL)
        codec = self.appliance.links
        # Asked at once: what reaches the dead child's socket waits for its replacement.
        statuses = yield self.clicks([click(codec, n) for n in range(60)])
        self.assertEqual(set(statuses), {302})
        yield self.until(lambda: 1 in self.pool.children
                         and self.pool.children[1].process_id not in (None, pid))
        self.assertFalse(alive(pid))
        self.assertEqual(self.pool.restarts, 1)
        yield self.until(lambda: len(self.clicks_logged()) == 60)
        statuses = yield self.clicks([click(codec, n) for n in range(60, 90)])
        self.assertEqual(set(statuses), {302})

    @defer.inlineCallbacks
    def test_keys_reach_the_children(self) -> None:
        new = Keyring(((9, b"n" * 32),))
        self.appliance.links.use(new)
        self.pool.send_keys()
        yield deferred_sleep(0.3)  # the keys message is ahead of any request made after it
        old_path = click(LinkCodec(Keyring(((1, b"x" * 32),))), 1)
        new_path = click(LinkCodec(new), 2)
        statuses = yield self.clicks([new_path] * 20 + [old_path] * 20)
        self.assertEqual(statuses, [302] * 20 + [404] * 20)

    @defer.inlineCallbacks
    def test_metrics_add_up_the_children(self) -> None:
        yield self.clicks([click(self.appliance.links, n) for n in range(30)])
        body = self.appliance.metrics
        yield self.until(lambda: b"engage_clicks_total 30.0" in generate_latest(body))
        text = generate_latest(body).decode()
        self.assertIn("engage_tracker_processes 3.0", text)
        # Every answer is in the histogram, whichever process gave it.
        yield self.until(lambda: b"engage_tracker_answer_seconds_count 30.0" in generate_latest(body))
        by_process = [c.latency[0] for c in self.pool.children.values()]
        self.assertTrue(all(sum(counts) > 0 for counts in by_process), by_process)
        self.assertIn("engage_tracker_events_dropped_total 0.0", text)

    @defer.inlineCallbacks
    def test_stop_ends_every_child(self) -> None:
        pids = [c.process_id for c in self.pool.children.values()]
        self.stopped = True
        yield self.running.stop()
        self.assertEqual(self.pool.children, {})
        self.assertEqual([p for p in pids if alive(p)], [])

    @defer.inlineCallbacks
    def test_a_child_that_sends_nonsense_is_ended_and_replaced(self) -> None:
        child = self.pool.children[2]
        pid = child.process_id
        child.outReceived(encode({"batch": [["192.0.2.1"]]}))  # as if it had sent it
        yield self.until(lambda: 2 in self.pool.children and self.pool.children[2] is not child
                         and self.pool.children[2].ready)
        self.assertFalse(alive(pid))
        self.assertEqual(self.clicks_logged(), [])
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])

    def clicks_logged(self) -> list[dict[str, Any]]:
        return [e for e in self.running.events() if e["type"] == "click"]


class OwnerNotTakingTests(TestCase):
    """While the appliance takes no events, a tracker process answers on and drops past its buffer."""

    timeout = 120

    @defer.inlineCallbacks
    def test_a_child_answers_buffers_and_reports_what_it_dropped(self) -> None:
        from appliance.tracker.processes import TrackerChild

        running = RunningAppliance(os.path.abspath(self.mktemp()), tracker={"processes": 2})
        pool = running.appliance.tracker_processes
        pool.max_buffered = 3
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        taken: list[Any] = []
        original = TrackerChild.handle
        # The appliance reads the batches but neither writes nor acknowledges them.
        self.patch(TrackerChild, "handle",
                   lambda child, m: taken.append(m) if "batch" in m else original(child, m))
        yield running.start()
        self.addCleanup(running.stop)
        yield TrackerProcessesTests.until(self, lambda: 1 in pool.children and pool.children[1].ready)
        codec = running.appliance.links
        statuses = yield threads.deferToThread(
            lambda: [get(running.http_port, click(codec, n)) for n in range(200)])
        self.assertEqual(set(statuses), {302})
        answered_by_child = 200 - len([e for e in running.events() if e["type"] == "click"])
        self.assertGreater(answered_by_child, 20)
        # Four batches went (the window) and three events wait; the rest were dropped, and said so.
        sent = sum(len(hit[2]) for m in taken for hit in m["batch"])
        yield TrackerProcessesTests.until(
            self, lambda: pool.total("dropped") + sent + pool.total("waiting") == answered_by_child)
        self.assertEqual(len(taken), 4)
        self.assertEqual(pool.total("waiting"), 3)
        self.assertGreater(pool.total("dropped"), 0)
        text = generate_latest(running.appliance.metrics).decode()
        self.assertIn(f"engage_tracker_events_dropped_total {float(pool.total('dropped'))}", text)
        yield TrackerProcessesTests.until(self, lambda: any("event(s) dropped" in e.get("line", "")
                                                           for e in logged))


class TwistdTests(TestCase):
    """A real ``twistd engage-appliance`` with three tracker processes."""

    timeout = 120

    def start(self) -> tuple[subprocess.Popen, list[int]]:
        self.workdir = workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.port = free_port()
        self.keys = os.path.join(workdir, "links.keys")
        write_keyring(self.keys, Keyring(((1, b"k" * 32),)))
        config = os.path.join(workdir, "appliance.toml")
        with open(config, "w") as f:
            f.write(f"""
[smtp]
create_certificate = false
[smtp.listeners.default]
endpoint = "tcp:{free_port()}:interface=127.0.0.1"
[tracker]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
processes = 3
[spool]
directory = "spool"
[events]
log_file = "events.jsonl"
[links]
keys_file = "links.keys"
[admin]
endpoint = ""
""")
        proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "-l", "twistd.log", "engage-appliance", "-c",
                                          config], cwd=workdir, env={**os.environ, "PYTHONPATH": REPO},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        wait_for_port(self.port, proc)
        deadline = time.monotonic() + 60
        children: list[int] = []
        while len(children) < 2 or "tracker process 2: TrackerSite starting" not in self.log():
            self.assertLess(time.monotonic(), deadline, "the tracker processes did not start")
            time.sleep(0.05)
            children = children_of(proc.pid)
        self.addCleanup(lambda: [os.kill(p, signal.SIGKILL) for p in children if alive(p)])
        return proc, children

    def log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "twistd.log"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_gone(self, pids: list[int]) -> None:
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids):
            self.assertLess(time.monotonic(), deadline, f"still running: {pids}")
            time.sleep(0.05)

    def clicks(self) -> list[dict[str, Any]]:
        with open(os.path.join(self.workdir, "events.jsonl"), "rb") as f:
            return [e for e in map(json.loads, f) if e["type"] == "click"]

    def test_children_end_when_the_owner_is_killed(self) -> None:
        proc, children = self.start()
        path = click(LinkCodec(Keyring(((1, b"k" * 32),))), 1)
        self.assertEqual({get(self.port, path) for _ in range(20)}, {302})
        proc.kill()
        proc.wait()
        self.wait_gone(children)

    def test_sighup_keys_reach_every_process_and_sigterm_ends_them_with_their_events(self) -> None:
        proc, children = self.start()
        new = Keyring(((2, b"n" * 32),))
        write_keyring(self.keys, new)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "link keys re-read" not in self.log():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        time.sleep(0.5)  # the keys message reaches the children well before this
        # Each request on a new connection: the kernel sends them to every process.
        new_path, old_path = click(LinkCodec(new), 1), click(LinkCodec(Keyring(((1, b"k" * 32),))), 2)
        self.assertEqual([get(self.port, p) for p in [new_path] * 30 + [old_path] * 30],
                         [302] * 30 + [404] * 30)
        statuses = [get(self.port, click(LinkCodec(new), n)) for n in range(100, 160)]
        self.assertEqual(set(statuses), {302})
        proc.terminate()
        proc.wait(30)  # twistd ends by the signal it was stopped with, once its stop is done
        self.assertIn("Main loop terminated.", self.log())
        self.wait_gone(children)
        clicks = self.clicks()
        # Nothing a child answered was lost at the stop: the 60 different links, and of the
        # one link hit 30 times the 10 the event limit lets through, across every process.
        self.assertEqual(len(clicks), 70)
        self.assertEqual(len({process_of(e["event_id"]) for e in clicks}), 3)


def children_of(pid: int) -> list[int]:
    """The tracker processes ``pid`` started."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == pid and b"appliance.tracker.child" in command:
            found.append(int(name))
    return found


del reactor  # imported for trial's reactor only
