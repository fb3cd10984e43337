"""``/api/v1/queue`` over HTTP on loopback, against a running appliance's delivery queue."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from appliance.admin.queue import ACTIONS, BadRequest, QueueResource, selection
from tests.helpers import RunningAppliance, queue_on_dead_route, wait_until

MESSAGE = b"From: sender@example.net\r\nSubject: queued\r\n\r\nHello.\r\n"


def mounted(queue_resource: resource.Resource) -> resource.Resource:
    """The resource where the admin listener mounts it."""
    root, api, v1 = resource.Resource(), resource.Resource(), resource.Resource()
    root.putChild(b"api", api)
    api.putChild(b"v1", v1)
    v1.putChild(b"queue", queue_resource)
    return root


class SelectionTests(SynchronousTestCase):
    def test_each_form(self) -> None:
        self.assertEqual(selection(b'{"ids": ["1", "2"]}', ACTIONS["hold"]), (["1", "2"], None))
        self.assertEqual(selection(b'{"domain": "x.test"}', ACTIONS["delete"]), ([], "x.test"))
        self.assertEqual(selection(b'{"all": true}', ACTIONS["flush"]), ([], None))

    def test_bad_bodies_say_why(self) -> None:
        cases = [
            (b"", ACTIONS["flush"], "JSON object"),
            (b"{", ACTIONS["flush"], "not JSON"),
            (b"[1]", ACTIONS["flush"], "JSON object"),
            (b"{}", ACTIONS["flush"], "exactly one"),
            (b'{"ids": ["1"], "domain": "x"}', ACTIONS["flush"], "exactly one"),
            (b'{"all": true}', ACTIONS["delete"], "unknown field(s) all"),
            (b'{"all": true}', ACTIONS["hold"], "unknown field(s) all"),
            (b'{"all": 1}', ACTIONS["flush"], '"all" must be true'),
            (b'{"ids": []}', ACTIONS["hold"], "non-empty list"),
            (b'{"ids": "1"}', ACTIONS["hold"], "non-empty list"),
            (b'{"ids": [1]}', ACTIONS["hold"], "non-empty list"),
            (b'{"domain": ""}', ACTIONS["hold"], "domain name"),
            (b'{"id": ["1"]}', ACTIONS["hold"], "unknown field(s) id"),
        ]
        for body, allowed, message in cases:
            e = self.assertRaises(BadRequest, selection, body, allowed)
            self.assertIn(message, str(e), body)


class QueueApiTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.running = RunningAppliance(self.mktemp(), delivery={
            "routes": {"dead.test": "127.0.0.1:9"}, "retry_initial": "1h"})
        yield self.running.start()
        self.addCleanup(self.running.stop)
        site = server.Site(mounted(QueueResource(self.running.appliance.delivery, reactor)))
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def call(self, method: bytes, path: str, body: bytes | None = None) -> Any:
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method, url, Headers({b"Content-Type": [b"application/json"]}),
                                            producer)
        data = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response.code, json.loads(data)

    def inject(self, recipients: list[str]) -> defer.Deferred:
        # Queued once its first attempt has failed (nothing listens on port 9).
        return queue_on_dead_route(self.running, recipients, MESSAGE)

    @defer.inlineCallbacks
    def test_list_show_and_filter(self) -> Any:
        tid = yield self.inject(["a@dead.test", "b@dead.test"])
        code, body = yield self.call(b"GET", "/api/v1/queue")
        self.assertEqual(code, 200)
        copies = body["results"]
        self.assertEqual([c["recipient"] for c in copies], ["a@dead.test", "b@dead.test"])
        self.assertEqual(set(copies[0]), {"message_id", "transmission_id", "recipient", "domain",
                                          "received_at", "age", "attempts", "next_attempt",
                                          "last_error", "held", "state"})
        first = copies[0]
        self.assertEqual((first["attempts"], first["state"], first["held"]), (1, "waiting", False))
        code, body = yield self.call(b"GET", "/api/v1/queue?domain=other.test")
        self.assertEqual((code, body), (200, {"results": []}))
        code, body = yield self.call(b"GET", f"/api/v1/queue/{tid}")
        self.assertEqual((code, len(body["results"])), (200, 2))
        mid = copies[1]["message_id"]
        code, body = yield self.call(b"GET", f"/api/v1/queue/{mid}")
        self.assertEqual([c["recipient"] for c in body["results"]], ["b@dead.test"])

    @defer.inlineCallbacks
    def test_hold_release_flush_delete(self) -> Any:
        tid = yield self.inject(["a@dead.test", "b@dead.test"])
        code, body = yield self.call(b"POST", "/api/v1/queue/hold", b'{"domain": "dead.test"}')
        self.assertEqual((code, body["results"]["action"], body["results"]["count"]), (200, "hold", 2))
        self.assertEqual({c["state"] for c in body["results"]["copies"]}, {"held"})
        code, body = yield self.call(b"POST", "/api/v1/queue/release", b'{"all": true}')
        self.assertEqual({c["held"] for c in body["results"]["copies"]}, {False})
        code, body = yield self.call(b"POST", "/api/v1/queue/flush", json.dumps({"ids": [tid]}).encode())
        self.assertEqual((code, body["results"]["count"]), (200, 2))
        code, body = yield self.call(b"POST", "/api/v1/queue/delete", json.dumps({"ids": [tid]}).encode())
        self.assertEqual((code, body["results"]["count"]), (200, 2))
        yield wait_until(lambda: not self.running.spooled())
        bounces = [e for e in self.running.events() if e["type"] == "bounce"]
        self.assertEqual([b["bounce_class"] for b in bounces], ["25", "25"])
        code, body = yield self.call(b"GET", "/api/v1/queue")
        self.assertEqual(body, {"results": []})

    @defer.inlineCallbacks
    def test_bad_requests(self) -> Any:
        tid = yield self.inject(["a@dead.test"])
        cases = [
            (b"GET", "/api/v1/queue/404404", None, 404, "not found in the queue: 404404"),
            (b"POST", "/api/v1/queue/hold", b'{"ids": ["404404"]}', 404, "404404"),
            (b"POST", "/api/v1/queue/delete", b'{"ids": ["' + tid.encode() + b'", "9"]}', 404, ": 9"),
            (b"POST", "/api/v1/queue/delete", b'{"all": true}', 400, "unknown field(s) all"),
            (b"POST", "/api/v1/queue/flush", b"not json", 400, "not JSON"),
            (b"GET", "/api/v1/queue?domian=x", None, 400, "unknown query parameter(s) domian"),
            (b"GET", "/api/v1/queue/hold", None, 405, "POST"),
            (b"POST", "/api/v1/queue", b"{}", 405, "POST is not allowed"),
            (b"DELETE", f"/api/v1/queue/{tid}", None, 405, "DELETE is not allowed"),
        ]
        for method, path, body, status, message in cases:
            code, answer = yield self.call(method, path, body)
            self.assertEqual(code, status, (method, path))
            [problem] = answer["errors"]
            self.assertIn(message, problem["message"], (method, path))
        # None of it changed the queue.
        [copy] = self.running.appliance.delivery.listing()
        self.assertEqual((copy.held, copy.attempts), (False, 1))
        self.assertEqual([e for e in self.running.events() if e["type"] == "bounce"], [])
