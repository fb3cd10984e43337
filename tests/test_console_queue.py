"""``engage-appliance queue``: the command against a running appliance's queue API, on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import guard, resource, server
from zope.interface import implementer

from appliance import console
from appliance.admin.queue import QueueResource
from appliance.console_queue import relative, table
from tests.helpers import RunningAppliance, in_thread, queue_on_dead_route, wait_until
from tests.ports import free_port
from tests.test_admin_queue import MESSAGE, mounted

TOKEN = "s3cret-token"


@implementer(IRealm)
class _Realm:
    def __init__(self, root: resource.Resource) -> None:
        self.root = root

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return resource.IResource, self.root, lambda: None


def run_console(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = console.main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            status = int(e.code or 0)
    return status, out.getvalue(), err.getvalue()


class PureTests(SynchronousTestCase):
    def test_relative(self) -> None:
        self.assertEqual([relative(s) for s in (0, 59, 60, 3599, 3600, 86400 * 3 + 5)],
                         ["0s", "59s", "1m", "59m", "1h", "3d"])

    def test_table(self) -> None:
        copy = {"transmission_id": "111", "message_id": "abc", "age": 7300, "attempts": 3,
                "next_attempt": "1970-01-01T00:20:00Z", "held": False, "recipient": "a@x.test",
                "last_error": "421 4.4.1 [internal]\n no answer", "state": "waiting"}
        held = dict(copy, message_id="abd", held=True, next_attempt=None, last_error="", state="held")
        text = table([copy, held], now=600)
        lines = text.splitlines()
        self.assertEqual(lines[0].split(), ["TRANSMISSION", "MESSAGE", "ID", "AGE", "TRIES", "NEXT",
                                            "RECIPIENT"])
        self.assertEqual(lines[1].split(), ["111", "abc", "2h", "3", "in", "10m", "a@x.test"])
        self.assertEqual(lines[2].strip(), "(421 4.4.1 [internal] no answer)")
        self.assertEqual(lines[3].split(), ["111", "abd", "2h", "3", "held", "a@x.test"])
        self.assertEqual(lines[4], "-- 2 copies of 1 message, 1 held")
        self.assertEqual(table([], 0), "the queue is empty\n")


class QueueCommandTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = os.path.abspath(self.mktemp())
        self.running = RunningAppliance(self.directory, delivery={
            "routes": {"dead.test": "127.0.0.1:9"}, "retry_initial": "1h"})
        yield self.running.start()
        self.addCleanup(self.running.stop)
        root = mounted(QueueResource(self.running.appliance.delivery, reactor))
        checker = InMemoryUsernamePasswordDatabaseDontUse(admin=TOKEN.encode())
        wrapper = guard.HTTPAuthSessionWrapper(Portal(_Realm(root), [checker]),
                                               [guard.BasicCredentialFactory(b"engage-appliance")])
        self.port = reactor.listenTCP(0, server.Site(wrapper), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.token_file = os.path.join(self.directory, "admin.token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        self.config = self.write_config(self.port.getHost().port, self.token_file)

    def write_config(self, port: int, token_file: str) -> str:
        path = os.path.join(self.directory, f"appliance-{port}.toml")
        with open(path, "w") as f:
            f.write(f'[admin]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
                    f"token_file = {json.dumps(token_file)}\n")
        return path

    def queue(self, *argv: str, config: str | None = None) -> defer.Deferred:
        return in_thread(run_console, "queue", *argv, "--config", config or self.config)

    def inject(self, recipients: list[str]) -> defer.Deferred:
        # Queued once its first attempt has failed (nothing listens on port 9).
        return queue_on_dead_route(self.running, recipients, MESSAGE)

    @defer.inlineCallbacks
    def test_list_show_hold_release_flush_delete(self) -> Any:
        tid = yield self.inject(["a@dead.test", "b@dead.test"])
        status, out, err = yield self.queue("list")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("a@dead.test", out)
        self.assertIn("in 59m", out)  # retry_initial 1h, after the first attempt
        self.assertIn("refused", out.lower())  # the last error under its copy
        self.assertIn("-- 2 copies of 1 message", out)
        status, out, _ = yield self.queue("list", "--json", "--domain", "dead.test")
        self.assertEqual([c["recipient"] for c in json.loads(out)], ["a@dead.test", "b@dead.test"])
        status, out, _ = yield self.queue("list", "--domain", "elsewhere.test")
        self.assertEqual((status, out), (0, "the queue is empty\n"))

        status, out, _ = yield self.queue("show", tid)
        self.assertEqual(status, 0)
        self.assertIn(f"transmission_id: {tid}", out)
        self.assertEqual(out.count("recipient:"), 2)

        status, out, _ = yield self.queue("hold", tid)
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("held: 2 copies\n"), out)
        self.assertEqual({c.held for c in self.running.appliance.delivery.listing()}, {True})
        status, out, _ = yield self.queue("release", "--all")
        self.assertTrue(out.startswith("released: 2 copies\n"), out)
        status, out, _ = yield self.queue("flush", "--domain", "dead.test")
        self.assertTrue(out.startswith("flushed (to be tried now): 2 copies\n"), out)
        mid = self.running.appliance.delivery.listing()[0].message_id
        status, out, _ = yield self.queue("delete", mid)
        self.assertEqual((status, out), (0, "deleted: 1 copy\n"))
        yield wait_until(lambda: len(self.running.appliance.delivery.listing()) == 1)
        self.assertEqual([e["bounce_class"] for e in self.running.events() if e["type"] == "bounce"], ["25"])

    @defer.inlineCallbacks
    def test_unknown_id_is_exit_1_and_says_not_found(self) -> Any:
        status, out, err = yield self.queue("show", "404404")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("not found in the queue: 404404", err)
        status, _, err = yield self.queue("delete", "404404")
        self.assertEqual(status, 1)
        self.assertIn("404404", err)

    @defer.inlineCallbacks
    def test_wrong_token_missing_token_no_appliance(self) -> Any:
        yield self.inject(["a@dead.test"])
        wrong = os.path.join(self.directory, "wrong.token")
        with open(wrong, "w") as f:
            f.write("guess\n")
        status, _, err = yield self.queue("list", config=self.write_config(self.port.getHost().port, wrong))
        self.assertEqual(status, 1)
        self.assertIn("refused the token in " + wrong, err)
        missing = self.write_config(self.port.getHost().port, os.path.join(self.directory, "none"))
        status, _, err = yield self.queue("list", config=missing)
        self.assertEqual(status, 1)
        self.assertIn("admin.token_file: no such file: ", err)
        status, _, err = yield self.queue("delete", "--domain", "dead.test",
                                          config=self.write_config(free_port(), self.token_file))
        self.assertEqual(status, 1)
        self.assertIn("admin listener not reachable at", err)
        # None of it touched the queue.
        [copy] = self.running.appliance.delivery.listing()
        self.assertFalse(copy.held)

    @defer.inlineCallbacks
    def test_usage_errors(self) -> Any:
        status, _, err = yield self.queue("hold")
        self.assertEqual(status, 2)
        self.assertIn("give one of ID ..., --domain D", err)
        status, _, err = yield self.queue("hold", "1", "--domain", "x.test")
        self.assertEqual(status, 2)
        status, _, err = yield self.queue("delete", "--all")
        self.assertEqual(status, 2)  # argparse: delete takes no --all
        self.assertIn("unrecognized arguments: --all", err)
        status, _, err = yield self.queue("list", config=os.path.join(self.directory, "missing.toml"))
        self.assertEqual(status, 2)
        self.assertIn("cannot read", err)
