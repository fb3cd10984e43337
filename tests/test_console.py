"""``engage-appliance``: webhooks list and test, the older commands as subcommands, the entry point."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tomllib
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance import console
from appliance.eventtypes import EVENT_TYPES
from appliance.webhooks import QueueDirectory, envelope_line
from appliance.webhooks.samples import sample_events
from tests.helpers import REPO
from tests.test_webhooks import START, FakeAgent, config, event


def toml_text(directory: str, webhooks: str = "") -> str:
    """A configuration file the console can read, its files under ``directory``."""
    def q(value: str) -> str:
        return json.dumps(value)

    return f"""
[node]
name = "node-a"
hostname = "localhost"
[smtpapi]
tracking_domain = "track.test:8080"
[smtp.listeners.default]
endpoint = "tcp:0:interface=127.0.0.1"
[tracker]
endpoint = "tcp:0:interface=127.0.0.1"
[spool]
directory = {q(os.path.join(directory, "spool"))}
[events]
log_file = {q(os.path.join(directory, "events.jsonl"))}
[links]
keys_file = {q(os.path.join(directory, "links.keys"))}
{webhooks}
"""


class ConsoleTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write_config(self, webhooks: str = "") -> str:
        path = os.path.join(self.directory, "appliance.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(toml_text(self.directory, webhooks))
        return path

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = console.main(list(argv))
            except SystemExit as e:  # argparse: --help, a usage error
                status = int(e.code or 0)
        return status, out.getvalue(), err.getvalue()


class WebhooksListTests(ConsoleTestCase):
    HOOKS = """
[[webhooks]]
name = "hooks"
target = "https://ann:hunter2@hooks.example/anymail/sparkpost/tracking/"
events = ["click", "bounce"]

[[webhooks]]
name = "quiet"
target = "http://127.0.0.1:9/events"
"""

    def test_each_webhook_its_queue_and_last_answer(self) -> None:
        path = self.write_config(self.HOOKS)
        queue = QueueDirectory(os.path.join(self.directory, "spool", "webhooks", "hooks"))
        os.makedirs(queue.path)
        now = START + 2 * 3600 + 5 * 60
        for seq, sealed_at, lines in ((3, START + 3600, 1), (2, START, 2)):
            batch_id = f"{seq:08d}-0000-4000-8000-000000000000"
            with open(queue.batch_path(seq, int(sealed_at), batch_id), "wb") as f:
                f.write(b"".join(envelope_line(event("click", n)) for n in range(lines)))
        with open(queue.open_path(4), "wb") as f:
            f.write(envelope_line(event("bounce")))
        queue.write_last_answer({"time": int(now) - 30, "batch_id": "00000002-0000-4000-8000-000000000000",
                                 "accepted": False, "answer": "HTTP 503 Service Unavailable"})
        self.patch(console.time, "time", lambda: now)
        status, out, err = self.run_main("webhooks", "list", "--config", path)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, (
            "hooks\n"
            "  target:      https://hooks.example/anymail/sparkpost/tracking/ (auth: basic)\n"
            "  events:      bounce, click\n"  # in the order of a message's life
            "  queue:       2 batch(es), 3 event(s); oldest sealed 2023-11-14 22:13:20Z (2h05m ago); "
            "1 event(s) collecting\n"
            "  last answer: HTTP 503 Service Unavailable (not accepted, batch "
            "00000002-0000-4000-8000-000000000000, 2023-11-15 00:17:50Z (0m30s ago))\n"
            "quiet\n"
            "  target:      http://127.0.0.1:9/events (auth: none)\n"
            f"  events:      {', '.join(EVENT_TYPES)}\n"
            "  queue:       0 batch(es), 0 event(s); 0 event(s) collecting\n"
            "  last answer: none yet\n"))
        self.assertNotIn("hunter2", out)
        # Reading changed nothing.
        self.assertEqual(len(os.listdir(queue.path)), 4)

    def test_no_webhooks(self) -> None:
        path = self.write_config()
        self.assertEqual(self.run_main("webhooks", "list", "-c", path), (0, f"no webhooks in {path}\n", ""))

    def test_a_bad_configuration_is_named(self) -> None:
        path = self.write_config('[[webhooks]]\ntarget = "ftp://x/"\n')
        status, out, err = self.run_main("webhooks", "list", "--config", path)
        self.assertEqual((status, out), (2, ""))
        self.assertIn("webhooks[0].target", err)
        missing = os.path.join(self.directory, "missing.toml")
        status, _, err = self.run_main("webhooks", "list", "--config", missing)
        self.assertEqual(status, 2)
        self.assertIn(f"cannot read {missing}", err)

    def test_test_names_an_unknown_webhook(self) -> None:
        path = self.write_config(self.HOOKS)
        status, out, err = self.run_main("webhooks", "test", "nope", "--config", path)
        self.assertEqual((status, out), (2, ""))
        self.assertIn("no webhook named 'nope' (hooks, quiet)", err)

    def test_test_reads_the_secret_files_of_that_webhook_only(self) -> None:
        path = self.write_config(self.HOOKS + '\n[[webhooks]]\nname = "other"\ntarget = "http://h/"\n'
                                 'auth_username = "u"\nauth_password_file = "/nonexistent/password"\n')
        calls: list[Any] = []
        self.patch(console, "_react", lambda run: calls.append(run) or 0)
        self.assertEqual(self.run_main("webhooks", "test", "quiet", "--config", path), (0, "", ""))
        self.assertEqual(len(calls), 1)
        status, _, err = self.run_main("webhooks", "test", "other", "--config", path)
        self.assertEqual(status, 2)
        self.assertIn("webhooks[2].auth_password_file: cannot read /nonexistent/password", err)


class WebhooksTestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.agent = FakeAgent()
        self.said: list[str] = []

    def test(self, **changes: Any) -> Any:
        return console.webhooks_test(config(**changes), self.agent, self.clock, "node-a", self.said.append)

    def test_posts_the_samples_with_the_credentials_and_prints_the_answer(self) -> None:
        d = self.test(events=frozenset({"click", "bounce"}), auth_type="basic", auth_username="ann",
                      auth_password="pw")
        request = self.agent.last
        self.assertEqual(request.uri, b"http://127.0.0.1:9/events")
        self.assertEqual(request.header(b"Authorization"), "Basic YW5uOnB3")
        self.assertEqual([list(e["msys"].values())[0]["type"] for e in request.events], ["bounce", "click"])
        self.assertEqual(request.events[0]["msys"]["message_event"]["campaign_id"], "Example Campaign Name")
        request.answer(200, b"thanks\n")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.said, [
            "posting 2 sample event(s) to http://127.0.0.1:9/events (auth: basic)",
            f"HTTP 200 OK (batch {request.batch_id}, 2 event(s))",
            "thanks",
        ])

    def test_a_refusal_fails_the_command(self) -> None:
        d = self.test()
        self.agent.last.answer(500, b"no")
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.said[1:], [f"HTTP 500 Internal Server Error (batch {self.agent.last.batch_id}, "
                                         f"{len(EVENT_TYPES)} event(s))", "no"])

    def test_no_token_no_post(self) -> None:
        d = self.test(auth_type="oauth2", auth_token_url="https://auth.example/token", auth_client_id="c",
                      auth_client_secret="s")
        self.agent.last.answer(401, b'{"error": "invalid_client"}')
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.said[-1], "no answer: no access token from https://auth.example/token: "
                                        "HTTP 401: invalid_client")
        self.assertEqual(len(self.agent.requests), 1)

    def test_samples_carry_the_fields_of_their_type(self) -> None:
        from appliance.eventtypes import FIELDS

        samples = sample_events(EVENT_TYPES, START, "node-a")
        self.assertEqual([e["type"] for e in samples], list(EVENT_TYPES))
        for sample in samples:
            self.assertEqual(list(sample), list(FIELDS[sample["type"]]))
            self.assertEqual((sample["rcpt_to"], sample["campaign_id"]),
                             ("recipient@example.com", "Example Campaign Name"))


class SubcommandTests(ConsoleTestCase):
    def test_the_older_commands_run_as_they_did(self) -> None:
        keys = os.path.join(self.directory, "links.keys")
        status, out, _ = self.run_main("keys", "--file", keys, "create")
        self.assertEqual((status, out), (0, "1  (signs)\n"))
        users = os.path.join(self.directory, "users")
        open(users, "w").close()
        self.assertEqual(self.run_main("users", "--file", users, "list"), (0, "", ""))
        certificate, key = (os.path.join(self.directory, n) for n in ("c.pem", "k.pem"))
        status, out, _ = self.run_main("certificate", "--certificate", certificate, "--key", key)
        self.assertEqual(status, 0)
        self.assertTrue(os.path.exists(certificate))
        dkim = os.path.join(self.directory, "dkim.pem")
        status, out, _ = self.run_main("dkim-key", "create", dkim, "--domain", "example.com",
                                       "--selector", "s1", "--algorithm", "ed25519")
        self.assertEqual(status, 0)
        self.assertIn("v=DKIM1", out)

    def test_every_subcommand_has_help(self) -> None:
        for argv in (["--help"], ["webhooks", "--help"], ["webhooks", "list", "--help"],
                     ["webhooks", "test", "--help"], ["keys", "--help"], ["users", "--help"],
                     ["certificate", "--help"], ["dkim-key", "--help"]):
            status, out, _ = self.run_main(*argv)
            self.assertEqual(status, 0, argv)
            self.assertIn("usage:", out, argv)
        _, out, _ = self.run_main("webhooks", "list", "--help")
        self.assertIn("--config PATH", out)
        self.assertIn("etc/appliance.toml", out)

    def test_the_entry_points(self) -> None:
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        self.assertEqual(scripts["engage-appliance"], "appliance.console:main")
        for old in ("keys", "users", "certificate", "dkim-key"):
            self.assertIn(f"engage-appliance-{old}", scripts)
