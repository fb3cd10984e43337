"""``engage-appliance events`` and ``engage-appliance stats``, run as an operator runs them."""

from __future__ import annotations

import gzip
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from appliance import console
from tests import eventgen
from tests.helpers import make_config
from tests.test_stats import expected

TOML = """
[node]
name = "appliance1"
[smtp.listeners.default]
endpoint = "tcp:0:interface=127.0.0.1"
[spool]
directory = "{d}/spool"
[links]
keys_file = "{d}/links.keys"
[events]
log_file = "{d}/events.jsonl"
[stats]
database = "{d}/stats.sqlite3"
"""


class ConsoleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config_path = os.path.join(self.dir, "appliance.toml")
        with open(self.config_path, "w") as f:
            f.write(TOML.format(d=self.dir))
        self.log_path = os.path.join(self.dir, "events.jsonl")
        self.lines = eventgen.lines(1500, seed=11)
        with gzip.open(self.log_path + ".2.gz", "wb") as f:
            f.writelines(self.lines[:500])
        with open(self.log_path + ".1", "wb") as f:
            f.writelines(self.lines[500:1000])
        with open(self.log_path, "wb") as f:
            f.writelines(self.lines[1000:])
        os.utime(self.log_path + ".2.gz", (1, 1))
        os.utime(self.log_path + ".1", (2, 2))

    def run_console(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = console.main([*argv, "--config", self.config_path])
        return code, out.getvalue(), err.getvalue()

    def test_events_traces_a_transmission_across_rotated_files(self) -> None:
        code, out, _ = self.run_console("events", "--transmission-id", "t7", "--json")
        self.assertEqual(code, 0)
        want = [line.decode().rstrip("\n") for line in self.lines
                if json.loads(line)["transmission_id"] == "t7"]
        self.assertGreater(len(want), 5)
        self.assertEqual(out.splitlines(), want)

    def test_events_table_filters_by_type_campaign_and_recipient(self) -> None:
        code, out, _ = self.run_console("events", "--type", "bounce,delay", "--campaign", "campaign-3",
                                        "--rcpt", "USER3@example.com")
        self.assertEqual(code, 0)
        header, *rows = out.splitlines()
        self.assertTrue(header.startswith("time"))
        want = [e for e in map(json.loads, self.lines) if e["type"] in ("bounce", "delay")
                and e["campaign_id"] == "campaign-3" and e["rcpt_to"] == "user3@example.com"]
        self.assertEqual(len(rows), len(want))
        self.assertTrue(all("user3@example.com" in r and "class" in r for r in rows))

    def test_events_follow_reads_across_a_rotation(self) -> None:
        from appliance import console_events

        options = console.parser().parse_args(["events", "--follow", "--json", "--type", "injection"])
        extra = eventgen.lines(40, seed=12, start=eventgen.START + 10**6)
        printed: list[str] = []
        naps: list[float] = []

        def sleep(seconds: float) -> None:
            naps.append(seconds)
            if len(naps) == 1:  # rotation by rename, the writer writes its last line, then reopens
                with open(self.log_path, "ab") as f:
                    f.writelines(extra[:20])
                os.rename(self.log_path, self.log_path + ".0")
                with open(self.log_path + ".0", "ab") as f:
                    f.writelines(extra[20:30])
            elif len(naps) == 2:
                with open(self.log_path, "wb") as f:
                    f.writelines(extra[30:])
            else:
                raise KeyboardInterrupt

        self.assertEqual(console_events.run(options, self.log_path, printed.append, sleep), 0)
        want = [line.decode().rstrip("\n") for line in self.lines + extra
                if json.loads(line)["type"] == "injection"]
        self.assertEqual(printed, want)

    def test_bad_filters_are_refused_with_the_reason(self) -> None:
        code, _, err = self.run_console("events", "--type", "opens")
        self.assertEqual(code, 2)
        self.assertIn("unknown event type(s) opens", err)
        code, _, err = self.run_console("stats", "--since", "a week")
        self.assertEqual(code, 2)
        self.assertIn("--since", err)

    def test_stats_needs_a_store_then_reads_the_rebuilt_one(self) -> None:
        code, _, err = self.run_console("stats")
        self.assertEqual(code, 1)
        self.assertIn("no statistics store", err)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "stats.sqlite3")))
        code, out, _ = self.run_console("stats", "rebuild")
        self.assertEqual(code, 0)
        self.assertIn(f"from {self._counted()} event(s)", out)
        code, out, _ = self.run_console("stats", "--since", "100000d", "--json")
        self.assertEqual(code, 0)
        data = json.loads(out)
        whole = expected(self.lines)
        self.assertEqual({k: data["total"][k] for k in data["total"]},
                         {k: whole[k] for k in data["total"]})
        code, out, _ = self.run_console("stats", "--since", "100000d", "--campaign", "campaign-2")
        self.assertEqual(code, 0)
        self.assertIn("campaign-2", out)
        self.assertIn('"Shop now"', out)

    def _counted(self) -> int:
        counted = {"injection", "policy_rejection", "delivery", "delay", "bounce", "open",
                   "initial_open", "click"}
        return sum(json.loads(line)["type"] in counted for line in self.lines)


class ConfigTests(SynchronousTestCase):
    def test_stats_database_is_read_and_checked(self) -> None:
        config = make_config(self.mktemp())
        self.assertTrue(config.stats.database.endswith("stats.sqlite3"))
        from appliance.config import ConfigError, parse_config
        from tests.helpers import base_toml, merge

        e = self.assertRaises(ConfigError, parse_config, merge(base_toml(), {"stats": {"databse": "x"}}))
        self.assertIn("stats.databse", str(e))
        e = self.assertRaises(ConfigError, parse_config, merge(base_toml(), {"stats": {"database": ""}}))
        self.assertIn("stats.database", str(e))
