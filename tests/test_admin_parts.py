"""The admin listener's parts without a socket: config, token, health, metrics, the observers they read."""

from __future__ import annotations

import os
import stat

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from appliance.admin.client import AdminError, base_url
from appliance.admin.health import Health, HealthResource
from appliance.admin.metrics import EventCounters, Readings
from appliance.admin.token import prepare_token, read_token
from appliance.build import build
from appliance.config import ConfigError, parse_config
from appliance.events import EventLog
from appliance.smtp.guard import AuthGuard
from tests.helpers import base_toml, make_config, merge
from tests.memory import MemoryAppliance, sendmail


def values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class AdminConfigTests(SynchronousTestCase):
    def problems(self, admin: object) -> list[tuple[str, str]]:
        try:
            parse_config(merge(base_toml(), {"admin": admin}))
        except ConfigError as e:
            return e.problems
        return []

    def test_defaults_and_off(self) -> None:
        data = base_toml()
        del data["admin"]
        config = parse_config(data)
        self.assertEqual(config.admin.endpoint, "tcp:8025:interface=127.0.0.1")
        self.assertEqual(config.admin.token_file, os.path.abspath("var/admin.token"))
        self.assertEqual(parse_config(merge(base_toml(), {"admin": {"endpoint": ""}})).admin.endpoint, "")

    def test_bad_values_are_named(self) -> None:
        self.assertEqual(self.problems({"endpoint": "http:80", "token_file": "", "port": 1}), [
            ("admin.endpoint", "unknown endpoint type 'http' in 'http:80'"),
            ("admin.token_file", "must not be empty"),
            ("admin.port", "unknown key"),
        ])
        self.assertEqual(self.problems({"endpoint": 8025}),
                         [("admin.endpoint", 'expected an endpoint such as "tcp:2525:interface=127.0.0.1", '
                                             "got 8025")])


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "sub", "admin.token")

    def test_made_once_private_then_read(self) -> None:
        old = os.umask(0)
        try:
            token = prepare_token(self.path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(prepare_token(self.path), token)
        self.assertNotEqual(prepare_token(self.path + "2"), token)

    def test_bad_files(self) -> None:
        with self.assertRaises(ValueError) as caught:
            prepare_token(self.path, create=False)
        self.assertEqual(str(caught.exception), f"no such file: {self.path}")
        os.makedirs(os.path.dirname(self.path))
        for text in ("", "two words\n", "\n\n"):
            with open(self.path, "w") as f:
                f.write(text)
            with self.assertRaises(ValueError) as caught:
                read_token(self.path)
            self.assertEqual(str(caught.exception), f"{self.path} must hold one token on one line")

    def test_build_makes_it_only_for_a_listener(self) -> None:
        directory = os.path.abspath(self.mktemp())
        parts = build(make_config(directory))
        with open(os.path.join(directory, "admin.token")) as f:
            self.assertEqual(parts.admin_token, f.read().strip())
        other = os.path.abspath(self.mktemp())
        self.assertIsNone(build(make_config(other, admin={"endpoint": ""})).admin_token)
        self.assertFalse(os.path.exists(os.path.join(other, "admin.token")))

    def test_an_unreadable_token_is_a_configuration_error(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "admin.token"))  # a directory where the file should be
        with self.assertRaises(ConfigError) as caught:
            build(make_config(directory))
        [(key, message)] = caught.exception.problems
        self.assertEqual(key, "admin.token_file")
        self.assertIn("cannot read", message)


class ClientUrlTests(SynchronousTestCase):
    def test_endpoints(self) -> None:
        self.assertEqual(base_url("tcp:8025:interface=127.0.0.1"), "http://127.0.0.1:8025")
        self.assertEqual(base_url("tcp:8025"), "http://127.0.0.1:8025")
        self.assertEqual(base_url("tcp:port=9000:interface=0.0.0.0"), "http://127.0.0.1:9000")
        self.assertEqual(base_url(r"tcp6:8025:interface=\:\:1"), "http://[::1]:8025")
        with self.assertRaises(AdminError):
            base_url("unix:/run/admin.sock")


class HealthTests(SynchronousTestCase):
    def test_ok_and_not(self) -> None:
        health = Health()
        problem: list[str | None] = [None]
        health.add("a", lambda: None)
        health.add("b", lambda: problem[0])
        request = DummyRequest([b""])
        self.assertEqual(HealthResource(health).render_GET(request),
                         b'{"results":{"status":"ok","checks":["a","b"]}}')
        problem[0] = "down"
        request = DummyRequest([b""])
        self.assertEqual(HealthResource(health).render_GET(request),
                         b'{"errors":[{"message":"b: down"}]}')
        self.assertEqual(request.responseCode, 503)

    def test_a_check_that_raises_is_a_problem(self) -> None:
        health = Health()
        health.add("broken", lambda: 1 // 0)  # type: ignore[arg-type,func-returns-value]
        self.assertEqual(health.problems(),
                         {"broken": "the check failed: integer division or modulo by zero"})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class EventCountersTests(SynchronousTestCase):
    def test_counts_by_type_and_bounce_class(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        count = EventCounters(registry)
        for event in ({"type": "injection"}, {"type": "injection"}, {"type": "delivery"},
                      {"type": "bounce", "bounce_class": "10"}, {"type": "bounce", "bounce_class": "50"},
                      {"type": "bounce", "bounce_class": "10"}, {"type": "delay", "bounce_class": "21"},
                      {"type": "open"}, {"type": "initial_open"}, {"type": "click"},
                      {"type": "something_new"}):
            count(event)
        found = values(registry)
        self.assertEqual(found[("engage_messages_injected_total", ())], 2)
        self.assertEqual(found[("engage_messages_delivered_total", ())], 1)
        self.assertEqual(found[("engage_messages_bounced_total", (("bounce_class", "10"),))], 2)
        self.assertEqual(found[("engage_messages_bounced_total", (("bounce_class", "50"),))], 1)
        self.assertEqual(found[("engage_messages_delayed_total", (("bounce_class", "21"),))], 1)
        self.assertEqual(found[("engage_opens_total", ())], 1)
        self.assertEqual(found[("engage_initial_opens_total", ())], 1)
        self.assertEqual(found[("engage_clicks_total", ())], 1)

    def test_counted_as_written_not_when_lost(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "events.jsonl")
        log = EventLog(path, "n", fsync_interval=0, clock=Clock())
        seen: list[str] = []
        log.observe(lambda event: seen.append(event["type"]))
        log.observe(lambda event: 1 // 0)  # type: ignore[func-returns-value]
        log.startService()
        self.addCleanup(log.stopService)
        log.emit("injection")
        log.emit("bad", value=float("nan"))  # not strict JSON: not written, not counted
        self.assertEqual(seen, ["injection"])
        self.assertEqual(log.lost, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(log.failing)  # an event that cannot be encoded is not a failing file

    def test_a_failed_write_sets_failing_until_one_succeeds(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "events.jsonl")
        log = EventLog(path, "n", fsync_interval=0, clock=Clock())
        log.startService()
        self.addCleanup(log.stopService)
        good = log._file
        log._file = open(os.devnull, "rb", buffering=0)
        with self.assertRaises(OSError):
            log.emit("injection")
        self.assertTrue(log.failing)
        log._file.close()
        log._file = good
        log.emit("injection")
        self.assertFalse(log.failing)
        self.assertEqual(log.lost, 1)


class ReadingsTests(SynchronousTestCase):
    def test_scalars_mappings_and_a_failing_reading(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        readings = Readings()
        depth = {"b.example": 2, "a.example": 1}
        readings.gauge("queue_copies", "Copies.", lambda: depth, label="destination")
        readings.counter("lost", "Lost.", lambda: 3)
        readings.gauge("broken", "Broken.", lambda: 1 // 0)
        registry.register(readings)
        found = values(registry)
        self.assertEqual(found[("engage_queue_copies", (("destination", "a.example"),))], 1)
        self.assertEqual(found[("engage_queue_copies", (("destination", "b.example"),))], 2)
        self.assertEqual(found[("engage_lost_total", ())], 3)
        self.assertNotIn(("engage_broken", ()), found)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class GuardCountsTests(SynchronousTestCase):
    def test_refusals_and_failures_are_counted(self) -> None:
        clock = Clock()
        guard = AuthGuard(clock, attempts_per_second=1, backoff=5, backoff_max=60)
        self.assertIsNone(guard.admit("a"))
        self.assertIsNotNone(guard.admit("b"))  # over the rate
        guard.failed("a")
        clock.advance(1)
        self.assertIsNotNone(guard.admit("a"))  # backing off
        self.assertEqual((guard.refused_busy, guard.refused_backing_off, guard.failed_logins), (1, 1, 1))


class QueueDepthTests(SynchronousTestCase):
    def test_copies_by_destination_waiting_or_ready(self) -> None:
        running = MemoryAppliance(self.mktemp(),
                                  delivery={"routes": {"nowhere.test": "127.0.0.1:2600"}})
        running.start()
        self.addCleanup(running.stop)
        replies = sendmail(running.smtp(), "s@example.net",
                           ["a@nowhere.test", "b@nowhere.test", "c@example.test"],
                           b"Subject: x\r\n\r\nx\r\n")
        self.assertEqual(replies[-2][0], 250)
        running.settle()
        # example.test's copy was delivered; nowhere.test's wait for their next attempt.
        self.assertEqual(running.appliance.delivery.depth_by_destination(), {"route 127.0.0.1:2600": 2})
