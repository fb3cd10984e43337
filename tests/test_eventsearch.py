"""Searching the event log and its rotated files, without a reactor."""

from __future__ import annotations

import gzip
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from appliance import eventsearch
from tests import eventgen


class EventSearchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "events.jsonl")
        self.lines = eventgen.lines(300, seed=5)
        # logrotate's numbering: .3.gz is the oldest; all with one mtime, so the number decides.
        with gzip.open(self.path + ".3.gz", "wb") as f:
            f.writelines(self.lines[:100])
        with gzip.open(self.path + ".2.gz", "wb") as f:
            f.writelines(self.lines[100:150])
        with open(self.path + ".1", "wb") as f:
            f.writelines(self.lines[150:200])
        with open(self.path, "wb") as f:
            f.writelines(self.lines[200:] + [b"not json\n", b'{"type":"delivery"'])  # junk, cut line
        for name in (".3.gz", ".2.gz", ".1"):
            os.utime(self.path + name, (100, 100))
        with open(os.path.join(self.dir, "other.jsonl"), "wb") as f:
            f.writelines(self.lines[:5])  # not the log's: never read

    def test_files_oldest_first_and_every_whole_event(self) -> None:
        names = [os.path.basename(n) for n in eventsearch.log_files(self.path)]
        self.assertEqual(names, ["events.jsonl.3.gz", "events.jsonl.2.gz", "events.jsonl.1",
                                 "events.jsonl"])
        found = [line for _, line in eventsearch.search(self.path, eventsearch.Filters())]
        self.assertEqual(found, self.lines)

    def test_pages_newest_first_cover_every_match_once(self) -> None:
        filters = eventsearch.Filters.of(types=["injection", "delivery"])
        want = [e["event_id"] for e in map(json.loads, self.lines)
                if e["type"] in ("injection", "delivery")]
        seen: list[str] = []
        after = None
        while True:
            events, total, after = eventsearch.page(self.path, filters, 7, after)
            self.assertEqual(total, len(want))
            seen += [e["event_id"] for e in events]
            if after is None:
                break
        self.assertEqual(seen, list(reversed(want)))
        self.assertRaises(KeyError, eventsearch.page, self.path, filters, 7, "no-such-event")

    def test_filters_all_must_match(self) -> None:
        events = [json.loads(line) for line in self.lines]
        some = events[120]
        filters = eventsearch.Filters.of(recipients=[some["rcpt_to"].upper()],
                                         campaigns=[some["campaign_id"]],
                                         since=int(some["timestamp"]), until=int(some["timestamp"]) + 1)
        found = [e for e, _ in eventsearch.search(self.path, filters)]
        self.assertIn(some, found)
        self.assertTrue(all(e["rcpt_to"] == some["rcpt_to"] and e["timestamp"] == some["timestamp"]
                            for e in found))
