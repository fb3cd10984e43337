"""
Upgrade in place: this code started on the spool and webhook queue an older appliance left.

The state is ``tests/fixtures/upgrade/``, written by a running appliance of
commit e4ad139 (``tests/fixtures/make_upgrade_fixture.py``), and never by the
code under test: whatever the formats become, what was on disk when an
operator upgraded must still be delivered and posted, once. ``manifest.json``
says what the fixture holds, so nothing here reads the old formats itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from appliance.links import LinkCodec, LinkData, read_keyring
from tests.helpers import RunningAppliance, wait_until

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "upgrade")


class Receiver(resource.Resource):
    """A webhook receiver that takes every POST and keeps its batch id and events."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, list[dict[str, Any]]]] = []

    def render_POST(self, request: server.Request) -> bytes:
        batch_id = request.getHeader("X-MessageSystems-Batch-ID") or ""
        events = [next(iter(e["msys"].values())) for e in json.loads(request.content.read())]
        self.posts.append((batch_id, events))
        return b""

    def event_ids(self) -> list[str]:
        return [e["event_id"] for _, events in self.posts for e in events]


class UpgradeInPlaceTests(unittest.TestCase):
    def setUp(self) -> defer.Deferred:
        with open(os.path.join(FIXTURE, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        directory = os.path.abspath(self.mktemp())
        shutil.copytree(FIXTURE, directory)
        with open(os.path.join(directory, "events.jsonl"), "rb") as f:
            self.old_log = f.read()
        self.receiver = Receiver()
        port = reactor.listenTCP(0, server.Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # The fixture is older than any lifetime: only its format is under test, not its age.
        self.running = RunningAppliance(
            directory,
            links={"create_keys_file": False},
            delivery={"max_queue_lifetime": "3650d"},
            webhooks=[{"name": self.manifest["webhook"],
                       "target": f"http://127.0.0.1:{port.getHost().port}/hooks",
                       "batch_interval": "100ms", "retry_initial": "200ms", "retry_lifetime": "3650d"}],
        )
        self.queue = os.path.join(self.running.config.spool.directory, "webhooks", self.manifest["webhook"])
        self.codec = LinkCodec(read_keyring(self.running.config.links.keys_file))
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    def deliveries(self) -> list[dict[str, Any]]:
        return [e for e in self.running.events() if e["type"] == "delivery"
                and e["message_id"] == self.manifest["tracked"]["message_id"]]

    def links(self, data: bytes) -> list[LinkData]:
        domain = re.escape(self.manifest["tracked"]["tracking_domain"].encode())
        token = re.compile(rb"https?://" + domain + rb"/(?:f/[^/]+|q)/([A-Za-z0-9_-]+)")
        return [self.codec.decode(t) for t in token.findall(data.replace(b"=\r\n", b""))]

    @defer.inlineCallbacks
    def test_waiting_copy_is_delivered_once_with_its_links(self) -> defer.Generator:
        tracked, delivered = self.manifest["tracked"], self.manifest["delivered"]
        (copy,) = yield self.running.sink.wait_for(1)
        self.assertEqual(copy.rcpt_to, [tracked["rcpt_to"]])
        links = self.links(copy.data)
        self.assertEqual(sorted(d.kind for d in links), ["click", "click", "initial_open", "open"])
        for d in links:
            self.assertEqual((d.message_id, d.rcpt_to, d.campaign_id, d.tags, d.metadata),
                             (tracked["message_id"], tracked["rcpt_to"], tracked["campaign_id"],
                              tuple(tracked["tags"]), tracked["metadata"]))
        self.assertEqual(sorted(d.target for d in links if d.kind == "click"),
                         ["https://shop.example/p?id=1", "https://shop.example/t"])

        # Its outcome is final: the entry leaves the spool, and the copy's delivery event
        # carries what its injection event did.
        yield wait_until(lambda: self.deliveries() and self.running.settled())
        (event,) = self.deliveries()
        self.assertEqual((event["transmission_id"], event["campaign_id"], event["rcpt_meta"],
                          event["rcpt_tags"], event["num_retries"]),
                         (self.manifest["transmission_id"], tracked["campaign_id"], tracked["metadata"],
                          tracked["tags"], "1"))
        # The copy the journal calls delivered is not sent again, and the log is appended to.
        self.assertEqual(len(self.running.sink.messages), 1)
        events = self.running.events()
        self.assertEqual([e for e in events if e["message_id"] == delivered["message_id"]],
                         [e for e in events[:self.manifest["events_logged"]]
                          if e["message_id"] == delivered["message_id"]])
        with open(self.running.config.events.log_file, "rb") as f:
            self.assertTrue(f.read().startswith(self.old_log))

    @defer.inlineCallbacks
    def test_queued_webhook_events_are_posted(self) -> defer.Generator:
        batch_ids = self.manifest["batch_event_ids"]
        open_ids = self.manifest["open_event_ids"]
        yield wait_until(lambda: set(batch_ids + open_ids) <= set(self.receiver.event_ids()))
        # The sealed batch goes out as it was sealed: same id, same events.
        sealed_id = self.manifest["batch"].split(".")[2]
        posts = [(batch_id, [e["event_id"] for e in events]) for batch_id, events in self.receiver.posts]
        self.assertIn((sealed_id, batch_ids), posts)
        # The tracked copy's delivery is posted after them, and nothing is posted twice.
        yield wait_until(lambda: self.deliveries() and self.deliveries()[0]["event_id"]
                         in self.receiver.event_ids() and self.running.settled())
        posted = self.receiver.event_ids()
        self.assertEqual(len(posted), len(set(posted)))
        self.assertEqual(posted[:len(batch_ids) + len(open_ids)], batch_ids + open_ids)
        yield wait_until(lambda: not [f for f in os.listdir(self.queue) if f.endswith(".batch")])
