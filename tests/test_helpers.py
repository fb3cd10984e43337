"""
Helper processes (``[appliance] helpers``): real child processes, killed for real.

The pure parts (frames, the cache mirror, the setting) are tested without
processes; the pool with its children on the real reactor.
"""

from __future__ import annotations

import os
import quopri
import re
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.config import ConfigError, parse_config
from appliance.copywork import Kit, PreparedCache, prepare_message
from appliance.delivery.copies import CopyMaker
from appliance.dkim import Signer, SigningKey, verify
from appliance.helpers import HelperCrashed, HelperJobFailed, HelperPool
from appliance.helpers.frames import FrameReader, frame
from appliance.helpers.pool import WINDOW, _Helper
from appliance.links import Keyring, LinkCodec
from appliance.reactors import thread_runner
from appliance.rewrite import Identity
from tests.helpers import RunningAppliance, base_toml, in_thread, merge, port_of, wait_until
from tests.test_admin import fetch, samples
from tests.test_dkim import fresh_rsa, record_of
from tests.test_rewrite import ALTERNATIVE_IN_MIXED, BOTH, CODEC, ID, OFF, Queued

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FrameTests(SynchronousTestCase):
    def test_frames_cut_anywhere_come_out_whole(self) -> None:
        values = [("job", 1, "sign", (b"x" * 70000,)), (2, True, b""), ("settings", None)]
        stream = b"".join(frame(v) for v in values)
        for step in (1, 3, 4, 5, 4096, len(stream)):
            reader = FrameReader()
            out = []
            for i in range(0, len(stream), step):
                out += reader.feed(stream[i:i + step])
            self.assertEqual(out, values)


class PreparedCacheTests(SynchronousTestCase):
    def test_the_owners_mirror_follows_the_helpers_cache(self) -> None:
        """Same steps, same sizes: the mirror (sizes only) holds exactly what the helper holds."""
        helper, mirror = PreparedCache(3, 100), PreparedCache(3, 100)
        steps = [("a", 10), ("b", 60), ("a", 0), ("c", 20), ("d", 50), ("a", 0), ("e", 5), ("f", 1)]
        for key, size in steps:
            for cache in (helper, mirror):
                if key in cache:
                    cache.use(key)
                else:
                    cache.put(key, size, object() if cache is helper else None)
            self.assertEqual(list(helper.held), list(mirror.held))
        self.assertEqual(list(mirror.held), ["a", "e", "f"])  # "b" and "d" over 100 bytes, "c" over 3

    def test_one_entry_over_the_bound_is_still_held(self) -> None:
        cache = PreparedCache(3, 100)
        cache.put("big", 500)
        self.assertIn("big", cache)


class DispatchOrderTests(SynchronousTestCase):
    """A copy is sent before preparations that waited longer: its message is held by the helper now."""

    def setUp(self) -> None:
        self.pool = HelperPool(1, reactor, thread_runner(reactor), CODEC)  # type: ignore[arg-type]
        self.readers: dict[int, FrameReader] = {}

    def helper(self) -> _Helper:
        helper = _Helper(self.pool, CODEC.keyring.keys, PreparedCache(64, 1 << 30))
        helper.transport = StringTransport()  # type: ignore[assignment]
        self.pool.helpers.append(helper)
        self.readers[id(helper)] = FrameReader()
        return helper

    def sent(self, helper: _Helper) -> list[tuple[str, str]]:
        """The jobs written to ``helper`` since the last look: (name, message key)."""
        jobs = self.readers[id(helper)].feed(helper.transport.value())  # type: ignore[attr-defined]
        helper.transport.clear()  # type: ignore[attr-defined]
        return [(name, args[0]) for _, _, name, args in jobs]

    @staticmethod
    def answer(helper: _Helper, value: Any = None) -> None:
        helper.outReceived(frame((helper.in_flight[0].number, True, value)))

    def copy(self, key: str) -> defer.Deferred:
        return self.pool.copy(key, 10, ID, BOTH, lambda: defer.succeed(b"text"))

    def test_a_copy_goes_before_the_preparations_queued_ahead_of_it(self) -> None:
        helper = self.helper()
        for n in range(WINDOW + 3):
            self.pool.prepare(f"m{n}", b"text", 10, [])
        self.assertEqual(self.sent(helper), [("prepare", f"m{n}") for n in range(WINDOW)])
        copied = self.copy("m0")
        self.assertEqual((self.sent(helper), self.pool.waiting), ([], 4))  # the window is full
        self.answer(helper)
        self.assertEqual(self.sent(helper), [("copy", "m0")])  # without its message: the helper has it
        self.answer(helper)
        self.assertEqual(self.sent(helper), [("prepare", f"m{WINDOW}")])
        for _ in range(2):
            self.answer(helper)
        self.answer(helper, b"the copy")
        self.assertEqual(self.successResultOf(copied), b"the copy")

    def test_a_preparation_is_passed_over_a_few_copies_at_most(self) -> None:
        """A new message is neither announced nor delivered until prepared: copies cannot hold it for ever."""
        helper = self.helper()
        for n in range(WINDOW):
            self.pool.prepare(f"m{n}", b"text", 10, [])
        self.pool.prepare("late", b"text", 10, [])
        self.sent(helper)
        order = []
        for _ in range(2 * WINDOW + 2):
            self.copy("m0")  # a steady stream: one more copy for each answer
            self.answer(helper)
            order += self.sent(helper)
        self.assertIn(("prepare", "late"), order)
        self.assertEqual(order.index(("prepare", "late")), WINDOW)  # after PASS_OVER copies

    def test_a_preparation_goes_to_a_free_helper_while_the_copy_waits_for_its_own(self) -> None:
        x, y = self.helper(), self.helper()
        for n in range(2 * WINDOW):  # both windows full; x holds m0
            self.pool.prepare(f"m{n}", b"text", 10, [])
        self.assertIn(("prepare", "m0"), self.sent(x))
        self.sent(y)
        self.pool.prepare("next", b"text", 10, [])
        self.copy("m0")  # due first, but x's window is full
        self.answer(y)
        self.assertEqual((self.sent(y), self.sent(x)), ([("prepare", "next")], []))
        self.answer(x)
        self.assertEqual(self.sent(x), [("copy", "m0")])


class SettingTests(SynchronousTestCase):
    def config(self, value: Any) -> Any:
        return parse_config(merge(base_toml(), {"appliance": {"helpers": value}}))

    def test_default_is_none_and_auto_is_one_less_than_the_cores(self) -> None:
        self.assertEqual(parse_config(base_toml()).appliance.helper_count(8), 0)
        auto = self.config("auto").appliance
        self.assertEqual([auto.helper_count(cores) for cores in (1, 2, 8)], [0, 1, 7])
        self.assertEqual(self.config(3).appliance.helper_count(1), 3)
        self.assertEqual(self.config(0).appliance.helper_count(8), 0)

    def test_bad_values_name_the_key(self) -> None:
        for bad in ("many", -1, 65, True, 1.5):
            e = self.assertRaises(ConfigError, self.config, bad)
            self.assertEqual([p for p, _ in e.problems], ["appliance.helpers"], bad)
        e = self.assertRaises(ConfigError, parse_config,
                              merge(base_toml(), {"appliance": {"helper": 1}}))
        self.assertEqual(e.problems, [("appliance.helper", "unknown key")])


class KillingPool(HelperPool):
    """A pool whose helpers are killed (SIGKILL) while they hold a job of ``victim``'s name."""

    victim = "prepare"
    kills = 0

    def _send(self, helper: Any, job: Any) -> None:
        super()._send(helper, job)
        if job.name == self.victim and self.kills:
            self.kills -= 1
            os.kill(helper.pid, signal.SIGKILL)


class PoolTests(TestCase):
    def pool(self, count: int = 1, kind: type[HelperPool] = HelperPool, **kwargs: Any) -> Any:
        pool = kind(count, reactor, thread_runner(reactor), CODEC, **kwargs)
        pool.startService()
        self.addCleanup(pool.stopService)
        return pool

    @defer.inlineCallbacks
    def test_copies_are_what_the_threads_make(self) -> Any:
        """Prepared and kept in one helper, its copies made there: byte for byte the in-process copy."""
        pool = self.pool(2)
        reads: list[int] = []
        source = self.source(reads)
        other = Identity("m2", "t1", "r2@x.test")
        facts = yield pool.prepare("t1", ALTERNATIVE_IN_MIXED, 100, [(ID, BOTH), (other, OFF)])
        here = prepare_message("t1", ALTERNATIVE_IN_MIXED, 100)
        self.assertEqual(facts.notes, {ID.message_id: here.tracking_notes(CODEC, ID, BOTH),
                                       "m2": []})
        self.assertEqual([facts.dkim_broken(t) for t in (BOTH, OFF)], [False, False])
        copies = yield defer.gatherResults([pool.copy("t1", 100, ID, BOTH, source) for _ in range(3)])
        local = Kit.local(CODEC, None, None)
        self.assertEqual(copies, [local.copy("t1", ALTERNATIVE_IN_MIXED, 100, ID, BOTH)] * 3)
        self.assertEqual(reads, [])  # the helper that prepared it made them
        self.assertEqual(sorted("t1" in h.cache for h in pool.helpers), [False, True])

    def source(self, reads: list[int]) -> Any:
        def read() -> defer.Deferred:
            reads.append(1)
            return defer.succeed(ALTERNATIVE_IN_MIXED)

        return read

    @defer.inlineCallbacks
    def test_a_helper_without_the_message_gets_it_once(self) -> Any:
        pool = self.pool()
        reads: list[int] = []
        local = Kit.local(CODEC, None, None).copy("t1", ALTERNATIVE_IN_MIXED, 100, ID, BOTH)
        # Never prepared (a restart): read once for the copies asked meanwhile, then held.

        def slow_read() -> defer.Deferred:
            reads.append(1)
            d: defer.Deferred = defer.Deferred()
            reactor.callLater(0, d.callback, ALTERNATIVE_IN_MIXED)
            return d

        copies = yield defer.gatherResults([pool.copy("t1", 100, ID, BOTH, slow_read) for _ in range(3)])
        self.assertEqual(copies, [local] * 3)
        self.assertEqual((yield pool.copy("t1", 100, ID, BOTH, self.source(reads))), local)
        self.assertEqual(len(reads), 1)
        # The owner's estimate says the helper holds one it does not: it answers Missing.
        pool.helpers[0].cache.put("t2", 1)
        copy = yield pool.copy("t2", 100, ID, BOTH, self.source(reads))
        self.assertEqual(copy, Kit.local(CODEC, None, None).copy("t2", ALTERNATIVE_IN_MIXED, 100, ID, BOTH))
        self.assertEqual(len(reads), 2)

    @defer.inlineCallbacks
    def test_copies_are_signed_in_the_helper(self) -> Any:
        key = fresh_rsa()
        pool = self.pool(signer=Signer([SigningKey("example.net", "s1", key)]))
        message = b"From: a@example.net\r\nTo: b@x\r\n\r\nhi\r\n"
        facts = yield pool.prepare("t1", message, 100, [(ID, BOTH)])
        self.assertTrue(facts.resigned)
        copy = yield pool.copy("t1", 100, ID, BOTH, lambda: defer.succeed(message))
        signed = yield pool.sign(b"From: a@example.net\r\nTo: b@x\r\n\r\nplain\r\n")
        for data in (copy, signed):
            results = verify(data, lambda d, s: record_of(key) if (d, s) == ("example.net", "s1") else None)
            self.assertEqual([(r.selector, r.ok) for r in results], [("s1", True)])

    @defer.inlineCallbacks
    def test_new_link_keys_reach_the_helpers(self) -> Any:
        codec = LinkCodec(Keyring(((1, b"a" * 32),)))
        pool = HelperPool(1, reactor, thread_runner(reactor), codec)
        pool.startService()
        self.addCleanup(pool.stopService)
        yield pool.prepare("t1", ALTERNATIVE_IN_MIXED, 100, [])
        codec.use(Keyring(((2, b"b" * 32), (1, b"a" * 32))))  # what SIGHUP does
        copy = yield pool.copy("t1", 100, ID, BOTH, self.source([]))
        self.assertEqual(copy, Kit.local(codec, None, None).copy("t1", ALTERNATIVE_IN_MIXED, 100, ID, BOTH))

    @defer.inlineCallbacks
    def test_a_job_that_fails_in_the_helper_fails_alone(self) -> Any:
        pool = self.pool()
        with self.assertRaises(HelperJobFailed) as caught:
            yield pool.submit("no such job", ())
        self.assertIn("ValueError", str(caught.exception))
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.assertEqual(pool.started, 1)  # the helper lives on
        self.assertEqual((yield pool.sign(b"x")), b"x")

    @defer.inlineCallbacks
    def test_a_helper_killed_mid_job_is_replaced_and_the_job_done_once(self) -> Any:
        pool = self.pool(kind=KillingPool)
        pool.kills = 1
        answers: list[Any] = []
        d = pool.prepare("t1", ALTERNATIVE_IN_MIXED, 100, [(ID, BOTH)]).addCallback(answers.append)
        also = pool.sign(b"behind it")  # sent to the same helper: it is sent again, not lost
        yield d
        self.assertEqual((yield also), b"behind it")
        self.assertEqual(len(answers), 1)
        here = prepare_message("t1", ALTERNATIVE_IN_MIXED, 100)
        self.assertEqual(answers[0].notes, {ID.message_id: here.tracking_notes(CODEC, ID, BOTH)})
        self.assertEqual((pool.started, len(pool.helpers)), (2, 1))

    @defer.inlineCallbacks
    def test_a_job_that_kills_two_helpers_fails_and_the_pool_goes_on(self) -> Any:
        pool = self.pool(kind=KillingPool)
        pool.kills = 2
        with self.assertRaises(HelperCrashed) as caught:
            yield pool.prepare("t1", ALTERNATIVE_IN_MIXED, 100, [])
        self.assertIn("signal 9, signal 9", str(caught.exception))
        self.assertEqual((pool.started, len(pool.helpers)), (3, 1))
        self.assertEqual((yield pool.sign(b"next")), b"next")
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @defer.inlineCallbacks
    def test_a_copy_that_kills_two_helpers_is_not_made(self) -> Any:
        """The copy maker's Deferred fails: delivery defers that copy (a ``delay`` event)."""
        pool = self.pool(kind=KillingPool)
        pool.victim, pool.kills = "copy", 2
        maker = CopyMaker(lambda q: ALTERNATIVE_IN_MIXED, CODEC, run=thread_runner(reactor), helpers=pool,
                          now=lambda: 0)  # links carry send time 0, as the Identity below
        queued = Queued("t1")
        yield maker.prepare_later(queued)
        with self.assertRaises(HelperCrashed):
            yield maker(queued, 0)
        self.assertEqual((yield maker(queued, 1)), Kit.local(CODEC, None, None).copy(  # made as ever
            "t1", ALTERNATIVE_IN_MIXED, 100, Identity("m1", "t1", "r1@x.test"), BOTH))

    @defer.inlineCallbacks
    def test_copies_made_in_a_helper_carry_the_send_time_and_the_trap_link(self) -> Any:
        """What the copy maker decides per copy (send time, trap link) reaches the helper's render."""
        pool = self.pool()
        maker = CopyMaker(lambda q: ALTERNATIVE_IN_MIXED, CODEC, run=thread_runner(reactor), helpers=pool,
                          now=lambda: 1234567, trap_links=True)
        queued = Queued("t1")
        yield maker.prepare_later(queued)
        copy = yield maker(queued, 0)
        text = quopri.decodestring(copy)  # the HTML part is quoted-printable
        self.assertIn(b'aria-hidden="true"', text)
        tokens = re.findall(rb"/f/[^/\s\"]+/([A-Za-z0-9_~-]+)", text)
        self.assertGreaterEqual(len(tokens), 4)
        for token in tokens:
            self.assertEqual(CODEC.decode(token).issued, 1234567)

    @defer.inlineCallbacks
    def test_helpers_that_cannot_start_leave_the_work_to_threads(self) -> Any:
        """A broken install: each helper exits at once; jobs run in the owner, helpers are retried later."""
        pool = self.pool(command=[sys.executable, "-c", "raise SystemExit(3)"])
        self.assertEqual((yield pool.sign(b"done here")), b"done here")
        self.assertEqual(pool.helpers, [])
        self.assertIsNotNone(pool._respawn)  # another try, after a pause
        yield pool.prepare("t1", ALTERNATIVE_IN_MIXED, 100, [(ID, BOTH)])
        copy = yield pool.copy("t1", 100, ID, BOTH, self.source([]))
        self.assertEqual(copy, Kit.local(CODEC, None, None).copy("t1", ALTERNATIVE_IN_MIXED, 100, ID, BOTH))

    @defer.inlineCallbacks
    def test_helpers_ignore_sigint_and_sighup(self) -> Any:
        pool = self.pool()
        yield pool.sign(b"started")
        for sig in (signal.SIGINT, signal.SIGHUP):
            os.kill(pool.helpers[0].pid, sig)
        self.assertEqual((yield pool.sign(b"still there")), b"still there")
        self.assertEqual(pool.started, 1)

    @defer.inlineCallbacks
    def test_stopping_answers_what_was_sent_and_ends_the_helpers(self) -> Any:
        pool = HelperPool(2, reactor, thread_runner(reactor), CODEC)
        pool.startService()
        pids = [h.pid for h in pool.helpers]
        jobs = [pool.sign(b"%d" % i) for i in range(12)]  # more than their windows: some wait
        yield pool.stopService()
        self.assertEqual((yield defer.gatherResults(jobs)), [b"%d" % i for i in range(12)])
        self.assertEqual(pool.helpers, [])
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)


OWNER = """
import sys
from twisted.internet import reactor
from appliance.helpers import HelperPool
from appliance.links import Keyring, LinkCodec
pool = HelperPool(2, reactor, None, LinkCodec(Keyring(((1, b"k" * 32),))))
def started():
    pool.startService()
    jobs = [pool.sign(b"x"), pool.sign(b"y")]  # one each: both helpers are up once answered
    from twisted.internet.defer import gatherResults
    gatherResults(jobs).addCallback(
        lambda _: print(" ".join(str(h.pid) for h in pool.helpers), flush=True))
reactor.callWhenRunning(started)
reactor.run()
"""


class OwnerDeathTests(TestCase):
    @defer.inlineCallbacks
    def test_no_helper_outlives_an_owner_killed_with_sigkill(self) -> Any:
        owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.PIPE)
        self.addCleanup(owner.wait)
        self.addCleanup(owner.kill)
        line = yield wait_for_line(owner)
        pids = [int(p) for p in line.split()]
        self.assertEqual(len(pids), 2)
        owner.kill()
        owner.wait()
        yield wait_until(lambda: not any(alive(pid) for pid in pids), timeout=20)


def wait_for_line(process: subprocess.Popen) -> defer.Deferred:
    from twisted.internet import threads
    assert process.stdout is not None
    return threads.deferToThread(process.stdout.readline)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def tracked_message() -> bytes:
    return (b"From: news@shop.example\r\nTo: ann@example.test\r\nSubject: Sale\r\n"
            b'X-MSYS-API: {"options": {"open_tracking": true, "click_tracking": true}}\r\n'
            b"Content-Type: text/html; charset=utf-8\r\n\r\n"
            b'<html><body><a href="https://shop.example/sale">Sale</a></body></html>\r\n')


def send(port: int, data: bytes) -> Any:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("news@shop.example", ["ann@example.test"], data)


class ApplianceHelperTests(TestCase):
    """The appliance with one helper, whose copy jobs are killed on their way."""

    def setUp(self) -> Any:
        self.kills = 0
        real_send = HelperPool._send

        def killing_send(pool: HelperPool, helper: Any, job: Any) -> None:
            real_send(pool, helper, job)
            if job.name == "copy" and self.kills:
                self.kills -= 1
                os.kill(helper.pid, signal.SIGKILL)

        self.patch(HelperPool, "_send", killing_send)
        self.running = RunningAppliance(self.mktemp(), appliance={"helpers": 1},
                                        delivery={"retry_initial": "60s"})
        return self.running.start()

    def tearDown(self) -> Any:
        return self.running.stop()

    def metrics(self) -> defer.Deferred:
        """The helper samples of the real /metrics, by name and labels."""
        with open(self.running.config.admin.token_file) as f:
            token = f.read().strip()
        url = f"http://127.0.0.1:{port_of(self.running.config.admin.endpoint)}/metrics"
        d = in_thread(fetch, url, token)
        return d.addCallback(lambda answer: {k: v for k, v in samples(answer[2].decode()).items()
                                             if k[0].startswith("engage_helper")})

    @defer.inlineCallbacks
    def test_a_copy_whose_helper_is_killed_is_delivered_once(self) -> Any:
        self.kills = 1
        yield in_thread(send, self.running.smtp_port, tracked_message())
        yield self.running.sink.wait_for(1)
        yield wait_until(self.running.settled)
        self.assertEqual(self.running.appliance.helpers.started, 2)
        self.assertEqual(len(self.running.sink.messages), 1)
        self.assertIn(b"/f/", self.running.sink.messages[0].data)  # tracked, in the new helper
        self.assertEqual([e["type"] for e in self.running.events()], ["injection", "delivery"])
        found = yield self.metrics()
        self.assertEqual(found, {
            ("engage_helper_processes", ()): 1,
            ("engage_helper_restarts_total", ()): 1,
            # prepared at injection; the copy sent to the killed helper, then to its replacement
            ("engage_helper_jobs_total", (("kind", "prepare"),)): 1,
            ("engage_helper_jobs_total", (("kind", "copy"),)): 2,
            ("engage_helper_jobs_waiting", ()): 0,
        })

    @defer.inlineCallbacks
    def test_a_copy_that_kills_two_helpers_is_delayed(self) -> Any:
        self.kills = 2
        yield in_thread(send, self.running.smtp_port, tracked_message())
        yield wait_until(lambda: "delay" in [e["type"] for e in self.running.events()])
        delay = [e for e in self.running.events() if e["type"] == "delay"][0]
        self.assertIn("could not make the copy: helper processes ended 2 times on it (signal 9, "
                      "signal 9)", delay["reason"])
        self.assertEqual(self.running.sink.messages, [])
        self.assertEqual(len(self.running.appliance.helpers.helpers), 1)  # replaced, serving
        self.assertEqual(len(self.flushLoggedErrors(HelperCrashed)), 1)
        found = yield self.metrics()
        self.assertEqual(found[("engage_helper_job_failures_total", (("reason", "crashed"),))], 1)
        self.assertEqual(found[("engage_helper_restarts_total", ())], 2)
