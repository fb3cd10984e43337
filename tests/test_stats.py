"""The statistics store: its figures against a plain count of the log, crashes, rebuilds."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from appliance.follower import Cursor, load_cursor
from appliance.spool import run_synchronously
from appliance.stats import METRICS, StatsService, StatsStore, StoreError, open_or_rebuild
from appliance.stats.store import connect, query_links, query_metrics, rebuild
from tests import eventgen

ALL = list(METRICS)
HARD, BLOCK, ADMIN = {10, 30, 90}, set(range(50, 55)), {25}
SOFT, UNDETERMINED = {20, 21, 22, 23, 24, 40, 60, 70, 100}, {1}
FOREVER = (0, 2**40)


def expected(lines: Iterable[bytes], since: int = 0, until: int = 2**40) -> dict[str, int]:
    """The metrics counted straight from the log's lines, the way an operator would with jq."""
    events = [json.loads(line) for line in lines]
    count: Counter[str] = Counter()
    firsts: dict[tuple[str, str], int] = {}

    def first(kind: str, e: dict[str, Any]) -> None:
        firsts.setdefault((kind, e["message_id"]), int(e["timestamp"]))

    for e in events:
        prefetched = (e.get("user_agent_parsed") or {}).get("is_prefetched") is True
        if e["type"] in ("open", "initial_open", "click"):
            first("opened", e)
            if not prefetched:
                first("opened_np", e)
        if e["type"] == "open":
            first("rendered", e)
        if e["type"] == "click":
            first("clicked", e)
        if not since <= int(e["timestamp"]) < until:
            continue
        t = e["type"]
        count["count_injected"] += t == "injection"
        count["count_policy_rejection"] += t == "policy_rejection"
        count["count_delivered"] += t == "delivery"
        count["count_delivered_first"] += t == "delivery" and e["num_retries"] == "0"
        count["count_delayed"] += t == "delay"
        count["count_bounce"] += t == "bounce"
        if t == "bounce":
            c = int(e["bounce_class"])
            count["count_hard_bounce"] += c in HARD
            count["count_soft_bounce"] += c in SOFT
            count["count_block_bounce"] += c in BLOCK
            count["count_admin_bounce"] += c in ADMIN
            count["count_undetermined_bounce"] += c in UNDETERMINED
        count["count_rendered"] += t == "open"
        count["count_nonprefetched_rendered"] += t == "open" and not prefetched
        count["count_initial_rendered"] += t == "initial_open"
        count["count_clicked"] += t == "click"
        count["count_nonprefetched_clicked"] += t == "click" and not prefetched
    names = {"opened": "count_unique_confirmed_opened", "opened_np":
             "count_nonprefetched_unique_confirmed_opened", "rendered": "count_unique_rendered",
             "clicked": "count_unique_clicked"}
    for (kind, _), ts in firsts.items():
        if since <= ts < until:
            count[names[kind]] += 1
    return {name: count[name] for name in ALL}


def write(path: str, lines: Iterable[bytes], gz: bool = False) -> None:
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(b"".join(lines))


class Figures(SynchronousTestCase):
    """The store's figures equal a count of the event log's lines."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.db_path = os.path.join(self.dir, "stats.sqlite3")
        self.log_path = os.path.join(self.dir, "events.jsonl")
        self.lines = eventgen.lines(4000, seed=7)

    def query(self, since: int = 0, until: int = 2**40, **kwargs: Any) -> list[dict[str, Any]]:
        db = connect(self.db_path, read_only=True)
        self.addCleanup(db.close)
        return query_metrics(db, ALL, since, until, **kwargs)

    def test_batches_equal_a_count_of_the_lines(self) -> None:
        store = StatsStore(self.db_path)
        store.open()
        self.addCleanup(store.close)
        for i in range(0, len(self.lines), 333):
            store.apply(self.lines[i:i + 333], b"c")
        [got] = self.query()
        self.assertEqual(got, expected(self.lines))
        self.assertGreater(got["count_unique_confirmed_opened"], 100)
        self.assertGreater(got["count_hard_bounce"], 10)

    def test_an_hour_window_counts_the_first_occurrences_in_it(self) -> None:
        store = StatsStore(self.db_path)
        store.open()
        self.addCleanup(store.close)
        store.apply(self.lines, b"c")
        since = eventgen.START - eventgen.START % 3600 + 7200
        until = since + 5 * 3600
        [got] = self.query(since, until)
        self.assertEqual(got, expected(self.lines, since, until))
        self.assertLess(got["count_injected"], expected(self.lines)["count_injected"])

    def test_a_window_of_whole_days_and_odd_hours_each_side(self) -> None:
        store = StatsStore(self.db_path)
        store.open()
        self.addCleanup(store.close)
        store.apply(self.lines, b"c")
        day = eventgen.START - eventgen.START % 86400 + 86400
        since, until = day - 3 * 3600, day + 86400 + 5 * 3600  # 3 hours, a day, 5 hours
        [got] = self.query(since, until)
        self.assertEqual(got, expected(self.lines, since, until))
        # A window inside the hour is widened to it: the same figures as the whole hour.
        self.assertEqual(self.query(day + 600, day + 1200), self.query(day, day + 3600))

    def test_per_campaign_rows_sum_to_the_campaigns_total(self) -> None:
        write(self.log_path, self.lines)
        rebuild(self.db_path, self.log_path)
        rows = self.query(by_campaign=True)
        self.assertEqual([r["campaign_id"] for r in rows], [f"campaign-{i}" for i in range(5)])
        campaign = [json.dumps(e).encode() for e in map(json.loads, self.lines)
                    if e["campaign_id"] == "campaign-2"]
        self.assertEqual(rows[2], {"campaign_id": "campaign-2", **expected(campaign)})
        [only] = self.query(campaigns=["campaign-2"])
        self.assertEqual(only, expected(campaign))

    def test_rebuild_reads_rotated_and_gzip_files(self) -> None:
        write(self.log_path + ".2.gz", self.lines[:1000], gz=True)
        write(self.log_path + ".1", self.lines[1000:2500])
        write(self.log_path, self.lines[2500:] + [b'{"type":"injection","timestamp":"1'])  # cut
        os.utime(self.log_path + ".2.gz", (1, 1))
        os.utime(self.log_path + ".1", (2, 2))
        counted, cursor = rebuild(self.db_path, self.log_path)
        [got] = self.query()
        self.assertEqual(got, expected(self.lines))
        assert cursor is not None
        st = os.stat(self.log_path)
        self.assertEqual(Cursor.decode(cursor),
                         Cursor(st.st_dev, st.st_ino, sum(len(x) for x in self.lines[2500:])))

    def test_clicks_per_link_keep_the_anchor_text(self) -> None:
        write(self.log_path, self.lines)
        rebuild(self.db_path, self.log_path)
        db = connect(self.db_path, read_only=True)
        self.addCleanup(db.close)
        links = query_links(db, *FOREVER, campaigns=["campaign-1"])
        clicks = [e for e in map(json.loads, self.lines)
                  if e["type"] == "click" and e["campaign_id"] == "campaign-1"]
        by_url = Counter(e["target_link_url"] for e in clicks)
        self.assertEqual({row["target_link_url"]: row["count_clicked"] for row in links}, by_url)
        shop = [row for row in links if row["target_link_name"] == "shop"][0]
        self.assertEqual(shop["target_link_anchor"], "Shop now")
        self.assertEqual(shop["count_unique_clicked"], len({e["message_id"] for e in clicks
                                                            if e["target_link_name"] == "shop"}))

    def test_lines_that_are_not_events_are_skipped(self) -> None:
        store = StatsStore(self.db_path)
        store.open()
        self.addCleanup(store.close)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertEqual(store.apply([b"not json\n", b"[1]\n", *self.lines[:10]], b"c"), 10)
        [got] = self.query()
        self.assertEqual(got, expected(self.lines[:10]))
        self.assertTrue(any("not JSON objects" in str(e.get("log_format")) for e in logged))


class CrashSafety(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.db_path = os.path.join(self.dir, "stats.sqlite3")
        self.log_path = os.path.join(self.dir, "events.jsonl")

    def test_a_failed_batch_leaves_counts_and_cursor_as_they_were(self) -> None:
        store = StatsStore(self.db_path)
        store.open()
        self.addCleanup(store.close)
        lines = eventgen.lines(50)
        store.apply(lines[:20], b"first")

        def exploding() -> Iterable[bytes]:
            yield from lines[20:40]
            raise sqlite3.OperationalError("disk I/O error")

        self.assertRaises(sqlite3.OperationalError, store.apply, exploding(), b"second")
        self.assertEqual(store.cursor(), b"first")
        db = connect(self.db_path, read_only=True)
        self.addCleanup(db.close)
        self.assertEqual(query_metrics(db, ALL, *FOREVER), [expected(lines[:20])])

    def test_a_corrupt_store_is_rebuilt_with_a_line_in_the_log(self) -> None:
        lines = eventgen.lines(300)
        write(self.log_path, lines)
        with open(self.db_path, "wb") as f:
            f.write(b"SQLite format 3\x00" + b"\xff" * 4096)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        store = StatsStore(self.db_path)
        cursor = open_or_rebuild(store, self.log_path)
        self.addCleanup(store.close)
        self.assertIsNotNone(cursor)
        db = connect(self.db_path, read_only=True)
        self.addCleanup(db.close)
        self.assertEqual(query_metrics(db, ALL, *FOREVER), [expected(lines)])
        why = [e for e in logged if "rebuilding" in str(e.get("log_format"))]
        self.assertEqual(len(why), 1)
        self.assertIn("unusable", why[0]["why"])

    def test_a_store_of_another_schema_is_refused(self) -> None:
        db = sqlite3.connect(self.db_path)
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("INSERT INTO meta VALUES ('version', 99)")
        db.commit()
        db.close()
        store = StatsStore(self.db_path)
        e = self.assertRaises(StoreError, store.open)
        self.assertIn("schema version 99", str(e))


class Service(SynchronousTestCase):
    """The store as a follower: counting as the log grows, and restarts that count nothing twice."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.db_path = os.path.join(self.dir, "stats.sqlite3")
        self.log_path = os.path.join(self.dir, "events.jsonl")
        self.lines = eventgen.lines(600)

    def service(self) -> StatsService:
        svc = StatsService(self.db_path, self.log_path, Clock(), run=run_synchronously,
                           poll_interval=0)
        svc.startService()
        return svc

    def append(self, lines: Iterable[bytes]) -> None:
        with open(self.log_path, "ab") as f:
            f.write(b"".join(lines))

    def figures(self) -> dict[str, int]:
        db = connect(self.db_path, read_only=True)
        try:
            [row] = query_metrics(db, ALL, *FOREVER)
        finally:
            db.close()
        return row

    def stop(self, svc: StatsService) -> None:
        self.successResultOf(defer.maybeDeferred(svc.stopService))

    def test_counts_what_was_there_and_what_comes(self) -> None:
        self.append(self.lines[:200])
        svc = self.service()  # a new store: rebuilt from the log already written
        self.assertEqual(self.figures(), expected(self.lines[:200]))
        self.append(self.lines[200:400])
        svc.wake()
        self.assertEqual(self.figures(), expected(self.lines[:400]))
        self.stop(svc)

    def test_a_restart_after_the_cursor_file_lagged_counts_nothing_twice(self) -> None:
        svc = self.service()
        self.append(self.lines[:300])
        svc.wake()
        lagging = load_cursor(svc.cursor_path)
        self.stop(svc)
        # A crash between the store's commit and the cursor file's rename: the file is behind.
        with open(svc.cursor_path, "wb") as f:
            f.write(Cursor(lagging.dev, lagging.ino, 0, "").encode())  # type: ignore[union-attr]
        self.append(self.lines[300:])
        svc = self.service()
        self.assertEqual(self.figures(), expected(self.lines))
        self.stop(svc)

    def test_a_store_deleted_while_stopped_is_rebuilt_at_start(self) -> None:
        svc = self.service()
        self.append(self.lines)
        svc.wake()
        self.stop(svc)
        os.unlink(self.db_path)
        svc = self.service()
        self.assertEqual(self.figures(), expected(self.lines))
        self.stop(svc)


class InTheAppliance(SynchronousTestCase):
    """The appliance's own stats step: mail sent through it is counted, and a stop stops it."""

    def test_injections_and_deliveries_are_counted(self) -> None:
        from tests.memory import MemoryAppliance, sendmail

        running = MemoryAppliance(self.mktemp())
        running.start()
        self.addCleanup(running.stop)
        message = (b"From: a@example.com\r\nTo: b@example.test\r\nSubject: hi\r\n"
                   b"X-MSYS-API: {\"campaign_id\": \"spring\"}\r\n\r\nHello\r\n")
        replies = sendmail(running.smtp(), "a@example.com", ["b@example.test", "c@example.test"],
                           message)
        self.assertEqual(replies[-2][0], 250)
        running.settle()
        running.advance(1)
        db = connect(running.config.stats.database, read_only=True)
        self.addCleanup(db.close)
        [row] = query_metrics(db, ["count_injected", "count_delivered"], *FOREVER, by_campaign=True)
        self.assertEqual(row, {"campaign_id": "spring", "count_injected": 2, "count_delivered": 2})
        self.assertEqual(len([e for e in running.events() if e["type"] in ("injection", "delivery")]), 4)
        stats = running.appliance.stats
        assert stats is not None
        running.stop()
        self.assertFalse(stats.running)
        self.assertIsNone(stats.store.db)

    def test_disabled_nothing_follows_the_log(self) -> None:
        from tests.memory import MemoryAppliance

        running = MemoryAppliance(self.mktemp(), stats={"enabled": False})
        running.start()
        self.addCleanup(running.stop)
        self.assertIsNone(running.appliance.stats)
        self.assertNotIn("stats", [s.name for s in running.appliance])
        self.assertFalse(os.path.exists(running.config.stats.database))


class Unbuildable(SynchronousTestCase):
    def test_a_store_that_cannot_be_made_is_logged_and_mail_goes_on(self) -> None:
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "stats.sqlite3"))  # a directory where the file should be
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        svc = StatsService(os.path.join(directory, "stats.sqlite3"),
                           os.path.join(directory, "events.jsonl"), Clock(), run=run_synchronously,
                           poll_interval=0)
        svc.startService()
        self.assertIsNone(svc.follower)
        svc.wake()  # nothing to wake, and no error
        failures = [e for e in logged if "could not be opened or rebuilt" in str(e.get("log_format"))]
        self.assertEqual(len(failures), 1)
        self.flushLoggedErrors()
        self.successResultOf(defer.maybeDeferred(svc.stopService))
