"""The admin listener on a real loopback port: Basic auth, /healthz, /metrics, the API mount, the client."""

from __future__ import annotations

import base64
import json
import os
import smtplib
import stat
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from appliance.admin.client import AdminClient, AdminError
from appliance.admin.responses import results
from appliance.config import AdminConfig
from tests.helpers import RunningAppliance, in_thread, port_of, wait_until
from tests.ports import free_port

MESSAGE = b"From: <a@example.net>\r\nSubject: hello\r\n\r\nHello.\r\n"


def fetch(url: str, password: str | None = None, user: str = "admin") -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a GET; errors are answers too."""
    request = urllib.request.Request(url)
    if password is not None:
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {credentials}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Echo(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return results(request, {"path": [p.decode() for p in request.postpath]})


class AdminListenerTests(TestCase):
    timeout = 60

    def setUp(self) -> defer.Deferred:
        self.running = RunningAppliance(self.mktemp())
        self.addCleanup(self.running.stop)
        self.url = f"http://127.0.0.1:{port_of(self.running.config.admin.endpoint)}"
        with open(self.running.config.admin.token_file) as f:
            self.token = f.read().strip()
        return self.running.start()

    def get(self, path: str, password: str | None = None, user: str = "admin") -> defer.Deferred:
        return in_thread(fetch, self.url + path, password, user)

    def test_the_token_file_is_made_private(self) -> None:
        mode = stat.S_IMODE(os.stat(self.running.config.admin.token_file).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertGreaterEqual(len(self.token), 40)

    @defer.inlineCallbacks
    def test_everything_but_healthz_needs_the_token(self) -> defer.Generator:
        for path in ("/", "/metrics", "/api/v1/", "/api/v1/queue", "/nothing"):
            for password, user in ((None, "admin"), ("wrong", "admin"), (self.token, "root"),
                                   (self.token + "x", "admin")):
                status, headers, body = yield self.get(path, password, user)
                self.assertEqual(status, 401, (path, password, user))
                self.assertEqual(headers["www-authenticate"], 'basic realm="engage-appliance"')
                self.assertNotIn(b"admin", body)
                self.assertNotIn(self.token.encode(), body)
        status, _, body = yield self.get("/healthz")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_index_page_and_json_404(self) -> defer.Generator:
        self.running.appliance.admin_site.mount(b"echo", Echo())
        status, headers, body = yield self.get("/api/v1/", self.token)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        for path in (b"/healthz", b"/metrics", b"/api/v1/echo"):
            self.assertIn(b'<a href="' + path + b'">', body)
        status, headers, body = yield self.get("/api/v1/nothing", self.token)
        self.assertEqual((status, json.loads(body)), (404, {"errors": [{"message": "no such resource"}]}))
        status, _, body = yield self.get("/api/v1/echo/a/b", self.token)
        self.assertEqual((status, json.loads(body)), (200, {"results": {"path": ["a", "b"]}}))

    @defer.inlineCallbacks
    def test_the_apis_are_mounted_behind_the_token(self) -> defer.Generator:
        """Each API answers in SparkPost's shape through the real listener, and only with the token."""
        now = time.strftime("%Y-%m-%dT%H:%M", time.gmtime())
        paths = {
            "/api/v1/suppression-list": 200,
            "/api/v1/queue": 200,
            "/api/v1/events/message": 200,
            f"/api/v1/metrics/deliverability?from=2020-01-01T00:00&to={now}&metrics=count_injected": 200,
            "/api/v1/metrics/deliverability?metrics=count_injected": 400,  # from is required
        }
        status, _, body = yield self.get("/api/v1/", self.token)
        for path in ("/api/v1/suppression-list", "/api/v1/events/message",
                     "/api/v1/metrics/deliverability"):
            self.assertIn(f'<a href="{path}">'.encode(), body)
        for path, expected in paths.items():
            status, _, body = yield self.get(path)
            self.assertEqual(status, 401, path)
            status, _, body = yield self.get(path, self.token)
            self.assertEqual(status, expected, (path, body))
            self.assertIn("results" if expected == 200 else "errors", json.loads(body), path)

    @defer.inlineCallbacks
    def test_the_dashboard_shows_mail_sent_through_the_appliance(self) -> defer.Generator:
        """Real mail in, the statistics store counts it, the dashboard at / shows it."""
        port = self.running.smtp_port
        message = MESSAGE.replace(b"Subject:", b'X-MSYS-API: {"campaign_id": "autumn-sale"}\r\nSubject:', 1)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.sendmail("a@example.net", ["x@example.test", "y@example.test", "z@example.test"], message)

        yield in_thread(send)
        yield wait_until(lambda: len([e for e in self.running.events() if e["type"] == "delivery"]) == 3)
        status, _, body = yield self.get("/")
        self.assertEqual(status, 401)

        def counted() -> defer.Deferred:
            return self.get("/?period=24h", self.token)

        found = []

        def shows_three() -> bool:
            return bool(found) and b"autumn-sale" in found[-1][2]

        deadline = time.monotonic() + 30
        while not shows_three() and time.monotonic() < deadline:
            found.append((yield counted()))
            if not shows_three():
                yield deferLater(reactor, 0.2, lambda: None)
        status, headers, body = found[-1]
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/html"))
        page = body.decode()
        self.assertIn("autumn-sale", page)
        row = page[page.index("autumn-sale"):]
        self.assertIn(">3<", row[:2000])  # three injected, three delivered
        status, _, body = yield self.get("/events", self.token)
        self.assertEqual(status, 200)
        self.assertIn(b"delivery", body)
        self.assertIn(b"x@example.test", body)
        status, _, body = yield self.get("/campaign?name=autumn-sale&period=24h", self.token)
        self.assertEqual(status, 200)
        self.assertIn(b"<svg", body)

    @defer.inlineCallbacks
    def test_healthz_names_what_is_down(self) -> defer.Generator:
        status, headers, body = yield self.get("/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body), {"results": {"status": "ok", "checks": [
            "spool", "events", "smtp:default", "tracker"]}})
        # The event log fails a write for real: its file is replaced by one that takes no writes.
        events = self.running.appliance.events
        events._file.close()
        events._file = open(os.devnull, "rb", buffering=0)
        with self.assertRaises(OSError):
            events.emit("injection")
        yield self.running.appliance.tracker.stopService()
        status, _, body = yield self.get("/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body), {"errors": [{"message":
                         "events: writes are failing (1 event(s) lost); tracker: not listening"}]})
        self.flushLoggedErrors()
        # A write that succeeds again clears the event log's.
        events._file = open(events.path, "ab", buffering=0)
        events.emit("injection")
        status, _, body = yield self.get("/healthz")
        self.assertEqual((status, json.loads(body)),
                         (503, {"errors": [{"message": "tracker: not listening"}]}))

    @defer.inlineCallbacks
    def test_metrics_count_events_and_read_the_parts(self) -> defer.Generator:
        port = self.running.smtp_port

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.sendmail("a@example.net", ["x@example.test", "y@example.test"], MESSAGE)

        yield in_thread(send)
        yield self.running.sink.wait_for(1)
        yield wait_until(lambda: len([e for e in self.running.events() if e["type"] == "delivery"]) == 2)
        yield in_thread(fetch, f"http://127.0.0.1:{self.running.http_port}/robots.txt")
        status, headers, body = yield self.get("/metrics", self.token)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain; version="))
        found = samples(body.decode())
        self.assertEqual(found[("engage_messages_injected_total", ())], 2)
        self.assertEqual(found[("engage_messages_delivered_total", ())], 2)
        self.assertEqual(found[("engage_event_log_lost_total", ())], 0)
        self.assertEqual(found[("engage_event_log_failing", ())], 0)
        self.assertEqual(found[("engage_tracker_answer_seconds_count", ())], 1)
        self.assertEqual(found[("engage_smtp_auth_failed_total", ())], 0)
        self.assertEqual(found[("engage_smtp_auth_refused_total", (("reason", "busy"),))], 0)
        self.assertEqual(found[("engage_smtp_connections", (("listener", "default"),))], 0)
        self.assertEqual(found[("engage_tracker_connections_refused_total", ())], 0)
        self.assertNotIn("python_gc_objects_collected_total", body.decode())  # never the global registry

    @defer.inlineCallbacks
    def test_client_against_the_listener(self) -> defer.Generator:
        self.running.appliance.admin_site.mount(b"echo", Echo())
        client = AdminClient.from_config(self.running.config.admin)
        answer = yield in_thread(client.get, "/api/v1/echo/x", {"a": "1"})
        self.assertEqual(answer, {"results": {"path": ["x"]}})
        missing = yield self.assertFailure(in_thread(client.get, "/api/v1/none"), AdminError)
        self.assertEqual((str(missing), missing.status), ("no such resource", 404))
        wrong = AdminClient(client.url, "not-the-token", token_file="/t")
        refused = yield self.assertFailure(in_thread(wrong.post, "/api/v1/echo", {}), AdminError)
        self.assertEqual(refused.status, 401)
        self.assertIn("refused the token in /t", str(refused))

    @defer.inlineCallbacks
    def test_client_of_a_listener_that_is_not_there(self) -> defer.Generator:
        port = free_port()
        config = AdminConfig(endpoint=f"tcp:{port}:interface=127.0.0.1",
                             token_file=self.running.config.admin.token_file)
        failure = yield self.assertFailure(in_thread(AdminClient.from_config(config).get, "/x"), AdminError)
        self.assertIn(f"admin listener not reachable at http://127.0.0.1:{port}", str(failure))


class AdminOffTests(TestCase):
    def test_an_empty_endpoint_runs_no_listener_and_makes_no_token(self) -> None:
        running = RunningAppliance(self.mktemp(), admin={"endpoint": ""})
        self.addCleanup(running.sink_port.stopListening)
        self.assertIsNone(running.appliance.admin_listener)
        self.assertFalse(os.path.exists(running.config.admin.token_file))
        # Health and metrics are kept all the same, for whoever mounts them.
        self.assertEqual(running.appliance.health.names[:2], ["spool", "events"])
        with self.assertRaises(AdminError) as caught:
            AdminClient.from_config(running.config.admin)
        self.assertIn("admin.endpoint is empty", str(caught.exception))

    def test_client_without_the_token_file(self) -> None:
        with self.assertRaises(AdminError) as caught:
            AdminClient.from_config(AdminConfig(token_file="/nonexistent/admin.token"))
        self.assertEqual(str(caught.exception), "admin.token_file: no such file: /nonexistent/admin.token")


