"""The Metrics and Events API resources, over HTTP on a loopback port as a client would use them."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from appliance.admin.deliverability import DeliverabilityResource
from appliance.admin.events import EventSearchResource
from appliance.admin.query import format_time
from appliance.stats.store import rebuild
from tests import eventgen
from tests.test_stats import ALL, expected


def mount(root: Resource, path: str, leaf: Resource) -> None:
    parts = path.strip("/").split("/")
    node = root
    for part in parts[:-1]:
        child = node.children.get(part.encode())
        if child is None:
            child = Resource()
            node.putChild(part.encode(), child)
        node = child
    node.putChild(parts[-1].encode(), leaf)


class AdminStatsTests(TestCase):
    def setUp(self) -> defer.Deferred | None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.log_path = os.path.join(directory, "events.jsonl")
        self.db_path = os.path.join(directory, "stats.sqlite3")
        self.lines = eventgen.lines(3000, seed=3)
        with open(self.log_path, "wb") as f:
            f.writelines(self.lines)
        rebuild(self.db_path, self.log_path)
        clock = Clock()
        clock.advance(eventgen.START + 4 * 86400)
        root = Resource()
        mount(root, "/api/v1/metrics/deliverability",
              DeliverabilityResource(self.db_path, threads.deferToThread, clock))
        mount(root, "/api/v1/events/message",
              EventSearchResource(self.log_path, threads.deferToThread, clock))
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = Agent(reactor)
        return None

    @defer.inlineCallbacks
    def get(self, path: str, **params: Any) -> Any:
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        if params:
            url += "?" + urlencode(params)
        response = yield self.agent.request(b"GET", url.encode())
        body = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_deliverability_equals_a_count_of_the_log(self) -> Any:
        code, body = yield self.get("/api/v1/metrics/deliverability", **{
            "from": "2026-01-01T00:00", "metrics": ",".join(ALL)})
        self.assertEqual(code, 200)
        self.assertEqual(body, {"results": [expected(self.lines)]})

    @defer.inlineCallbacks
    def test_by_campaign_with_a_campaign_filter(self) -> Any:
        code, body = yield self.get("/api/v1/metrics/deliverability/campaign", **{
            "from": "2026-01-01T00:00", "to": format_time(eventgen.START + 5 * 86400),
            "metrics": "count_injected,count_unique_clicked", "campaigns": "campaign-1,campaign-3"})
        self.assertEqual(code, 200)
        events = [json.loads(line) for line in self.lines]
        want = []
        for campaign in ("campaign-1", "campaign-3"):
            mine = [json.dumps(e).encode() for e in events if e["campaign_id"] == campaign]
            figures = expected(mine)
            want.append({"campaign_id": campaign, "count_injected": figures["count_injected"],
                         "count_unique_clicked": figures["count_unique_clicked"]})
        self.assertEqual(body, {"results": want})

    @defer.inlineCallbacks
    def test_bad_queries_are_400_in_sparkposts_shape(self) -> Any:
        path = "/api/v1/metrics/deliverability"
        cases = [
            ({"metrics": "count_injected"}, "from"),
            ({"from": "2026-01-01T00:00"}, "metrics"),
            ({"from": "2026-01-01", "metrics": "count_injected"}, "from"),
            ({"from": "2026-02-30T00:00", "metrics": "count_injected"}, "from"),
            ({"from": "2026-01-01T00:00", "to": "yesterday", "metrics": "count_injected"}, "to"),
            ({"from": "2026-01-01T00:00", "metrics": "count_injected,count_opens"}, "metrics"),
            ({"from": "2026-01-01T00:00", "metrics": "count_injected", "domains": "x"}, "domains"),
            ({"from": "2026-01-02T00:00", "to": "2026-01-01T00:00", "metrics": "count_injected"},
             "from"),
        ]
        for params, param in cases:
            code, body = yield self.get(path, **params)
            self.assertEqual(code, 400, params)
            [problem] = body["errors"]
            self.assertEqual(problem["param"], param, params)
            self.assertTrue(problem["message"] and problem["description"])
        code, body = yield self.get(path + "/nothing", **{"from": "2026-01-01T00:00",
                                                          "metrics": "count_injected"})
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_a_missing_store_is_503_not_a_crash(self) -> Any:
        os.unlink(self.db_path)
        code, body = yield self.get("/api/v1/metrics/deliverability", **{
            "from": "2026-01-01T00:00", "metrics": "count_injected"})
        self.assertEqual(code, 503)
        self.assertIn("not ready", body["errors"][0]["message"])

    @defer.inlineCallbacks
    def test_event_search_pages_through_a_transmission(self) -> Any:
        events = [json.loads(line) for line in self.lines]
        wanted = [e for e in events if e["transmission_id"] in ("t5", "t9", "t12")
                  and e["type"] in ("delivery", "bounce", "click")]
        seen: list[dict[str, Any]] = []
        params: dict[str, Any] = {"transmissions": "t5,t9,t12", "events": "delivery,bounce,click",
                                  "from": "2026-01-01T00:00", "per_page": 2}
        path = "/api/v1/events/message"
        while True:
            code, body = yield self.get(path, **params)
            self.assertEqual(code, 200, body)
            self.assertEqual(body["total_count"], len(wanted))
            seen += body["results"]
            if "next" not in body["links"]:
                break
            path, params = body["links"]["next"], {}
        self.assertGreater(len(wanted), 4)
        self.assertEqual(sorted(e["event_id"] for e in seen), sorted(e["event_id"] for e in wanted))
        stamps = [int(e["timestamp"]) for e in seen]
        self.assertEqual(stamps, sorted(stamps, reverse=True))

    @defer.inlineCallbacks
    def test_event_search_defaults_to_the_last_day(self) -> Any:
        code, body = yield self.get("/api/v1/events/message", per_page=10000)
        self.assertEqual(code, 200)
        day = [e for e in map(json.loads, self.lines)
               if int(e["timestamp"]) >= eventgen.START + 3 * 86400]
        self.assertEqual(body["total_count"], len(day))
        self.assertEqual(body["links"], {})

    @defer.inlineCallbacks
    def test_event_search_bad_queries(self) -> Any:
        for params, param in [({"events": "opens"}, "events"), ({"per_page": "0"}, "per_page"),
                              ({"cursor": "garbage!"}, "cursor"), ({"recipient": "a@b"}, "recipient"),
                              ({"from": "2026-13-01T00:00"}, "from")]:
            code, body = yield self.get("/api/v1/events/message", **params)
            self.assertEqual(code, 400, params)
            self.assertEqual(body["errors"][0]["param"], param)
