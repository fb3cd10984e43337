"""
The admin API's suppression list in SparkPost's shape, served by ``Site(resource)`` on loopback.
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from appliance.admin.suppressions import SuppressionList
from appliance.console_suppressions import main as suppressions_main
from appliance.spool import run_synchronously
from appliance.suppression import Change, SuppressionService, SuppressionStore
from tests.helpers import in_thread


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


class ApiTests(unittest.TestCase):
    def setUp(self) -> None:
        root = self.mktemp()
        os.makedirs(root)
        self.clock = Clock()
        self.clock.advance(1767225600)
        self.service = SuppressionService(os.path.join(root, "s.sqlite3"), os.path.join(root, "events.jsonl"),
                                          self.clock, run_synchronously, now=self.clock.seconds)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        top = resource.Resource()
        api = resource.Resource()
        v1 = resource.Resource()
        top.putChild(b"api", api)
        api.putChild(b"v1", v1)
        v1.putChild(b"suppression-list", SuppressionList(self.service))
        site = server.Site(top)
        site.log = lambda request: None  # type: ignore[method-assign]
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    def api(self, method: str, path: str, body: Any = None) -> defer.Deferred:
        return in_thread(call, self.port, method, "/api/v1/suppression-list" + path, body)

    @defer.inlineCallbacks
    def test_put_get_delete(self) -> defer.Generator:
        status, body = yield self.api("PUT", "/Ann%40Example.TEST", {"type": "non_transactional",
                                                                      "description": "Asked"})
        self.assertEqual((status, body),
                         (200, {"results": {"message": "Suppression list successfully updated"}}))
        self.assertEqual(self.service.list.suppressed("ann@example.test", False), "non_transactional")
        status, body = yield self.api("GET", "/ann@example.test")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"results": [{
            "recipient": "ann@example.test", "type": "non_transactional", "non_transactional": True,
            "source": "Manually Added", "description": "Asked", "created": "2026-01-01T00:00:00+00:00",
            "updated": "2026-01-01T00:00:00+00:00"}], "links": [], "total_count": 1})
        # The deprecated booleans still work.
        status, _ = yield self.api("PUT", "/ann@example.test", {"transactional": True})
        self.assertEqual(status, 200)
        status, body = yield self.api("GET", "/ann@example.test?type=transactional")
        self.assertEqual([e["type"] for e in body["results"]], ["transactional"])
        status, body = yield self.api("DELETE", "/ann@example.test", {"type": "transactional"})
        self.assertEqual((status, body), (204, None))
        self.assertIsNone(self.service.list.suppressed("ann@example.test", True))
        self.assertEqual(self.service.list.suppressed("ann@example.test", False), "non_transactional")
        status, body = yield self.api("DELETE", "/ann@example.test")
        self.assertEqual(status, 204)
        for method in ("GET", "DELETE"):
            status, body = yield self.api(method, "/ann@example.test")
            self.assertEqual((status, body), (404, {"errors": [{"message": "Recipient could not be found"}]}))

    @defer.inlineCallbacks
    def test_bad_requests_change_nothing(self) -> defer.Generator:
        for path, body, message in [
            ("/ann@example.test", {}, "Must supply a suppression type"),
            ("/ann@example.test", {"type": "sometimes"},
             "Type must be one of: 'transactional', 'non_transactional'"),
            ("/ann@example.test", {"type": 1}, "Type must be one of: 'transactional', 'non_transactional'"),
            ("/ann@example.test", {"type": "transactional", "description": 5},
             "description must be a string"),
            ("/ann@example.test", [1], "the request body must be a JSON object"),
            ("/not-an-address", {"type": "transactional"}, "not an email address: 'not-an-address'"),
        ]:
            status, answer = yield self.api("PUT", path, body)
            self.assertEqual((status, answer), (400, {"errors": [{"message": message}]}), body)
        status, _ = yield self.api("PATCH", "/ann@example.test", {"type": "transactional"})
        self.assertEqual(status, 405)
        self.assertEqual(len(self.service.list), 0)
        self.assertEqual(self.successResultOf(self.service.search())[1], 0)

    @defer.inlineCallbacks
    def test_search(self) -> defer.Generator:
        for i in range(5):
            self.clock.advance(60)
            yield self.service.put([Change(f"r{i}@{'a' if i % 2 else 'b'}.test",
                                           "transactional" if i < 3 else "non_transactional",
                                           "Bounce Rule" if i == 4 else "Manually Added", f"note {i}")])
        status, body = yield self.api("GET", "?per_page=2")
        self.assertEqual((status, body["total_count"], [e["recipient"] for e in body["results"]]),
                         (200, 5, ["r4@b.test", "r3@a.test"]))
        self.assertEqual([link["rel"] for link in body["links"]], ["first", "next", "last"])
        self.assertIn("page=2", body["links"][1]["href"])
        status, body = yield self.api("GET", "?per_page=2&page=3")
        self.assertEqual(([e["recipient"] for e in body["results"]], [link["rel"] for link in body["links"]]),
                         (["r0@b.test"], ["first", "previous", "last"]))
        _, body = yield self.api("GET", "?types=non_transactional")
        self.assertEqual(body["total_count"], 2)
        _, body = yield self.api("GET", "?sources=Bounce%20Rule")
        self.assertEqual([e["recipient"] for e in body["results"]], ["r4@b.test"])
        _, body = yield self.api("GET", "?domain=a.test&description=NOTE")
        self.assertEqual(body["total_count"], 2)
        _, body = yield self.api("GET", "?from=2026-01-01T00:03:00Z&to=2026-01-01T00:04:00%2B00:00")
        self.assertEqual([e["recipient"] for e in body["results"]], ["r3@a.test", "r2@b.test"])
        for query, message in [("?from=yesterday", "from must be a valid date"),
                               ("?per_page=0", "per_page must be between 1 and 10000"),
                               ("?types=sometimes", "types must be one of: 'transactional', "
                                                    "'non_transactional'"),
                               ("?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
                                "from must be before to")]:
            status, body = yield self.api("GET", query)
            self.assertEqual((status, body), (400, {"errors": [{"message": message}]}), query)


class CommandTests(SynchronousTestCase):
    """``engage-appliance suppressions`` against a database, the appliance not running."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.db = os.path.join(self.root, "s.sqlite3")
        self.config = os.path.join(self.root, "appliance.toml")
        with open(self.config, "w") as f:
            f.write('[smtp.listeners.default]\nendpoint = "tcp:0"\n[suppression]\n'
                    f'database = {json.dumps(self.db)}\n')

    def run_command(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = suppressions_main(["-c", self.config, *argv])
        return status, out.getvalue(), err.getvalue()

    def entries(self) -> set[tuple[str, str, str]]:
        store = SuppressionStore(self.db)
        try:
            return {(e.recipient, e.type, e.description) for e in store}
        finally:
            store.close()

    def test_add_list_remove(self) -> None:
        self.assertEqual(self.run_command("add", "ann@example.test")[:2],
                         (0, "suppressed ann@example.test (transactional, non_transactional)\n"))
        status, out, _ = self.run_command("list", "--type", "transactional")
        self.assertEqual((status, out.split("\t")[:3]),
                         (0, ["ann@example.test", "transactional", "Manually Added"]))
        self.assertEqual(self.run_command("list", "--recipient", "Ann@example.test")[1].count("\n"), 2)
        self.assertEqual(self.run_command("remove", "ann@example.test", "--type", "transactional")[0], 0)
        self.assertEqual(self.entries(), {("ann@example.test", "non_transactional", "")})
        status, _, err = self.run_command("add", "nobody")
        self.assertEqual((status, err),
                         (1, "engage-appliance suppressions: not an email address: 'nobody'\n"))

    def test_import(self) -> None:
        path = os.path.join(self.root, "export.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("recipient,type,description\nann@example.test,transactional,From SparkPost\n"
                    "bob@example.test,non_transactional,\n")
        self.assertEqual(self.run_command("import", path)[:2], (0, f"imported 2 entries from {path}\n"))
        self.assertEqual(self.entries(), {("ann@example.test", "transactional", "From SparkPost"),
                                          ("bob@example.test", "non_transactional", "")})

    def test_a_bad_file_imports_nothing(self) -> None:
        path = os.path.join(self.root, "bad.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("recipient,type\ncarl@example.test,transactional\nnobody,transactional\n")
        status, out, err = self.run_command("import", path)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, f"{path}: line 3: not an email address: 'nobody'\n"
                              "nothing imported: correct the lines above and import again\n")
        self.assertEqual(self.entries(), set())
        status, _, err = self.run_command("import", os.path.join(self.root, "missing.csv"))
        self.assertEqual(status, 1)
        self.assertIn("cannot read", err)

    def test_a_bad_configuration_is_reported(self) -> None:
        with open(self.config, "a") as f:
            f.write("check_interval = \"0s\"\n")
        status, _, err = self.run_command("list")
        self.assertEqual(status, 2)
        self.assertIn("suppression.check_interval: must be more than 0 seconds", err)
