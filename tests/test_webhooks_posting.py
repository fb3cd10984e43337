"""Poster on its own: the order batches are posted in, and what a stop leaves behind."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.spool import run_synchronously
from appliance.webhooks import Batch, Poster, QueueDirectory, envelope_line
from tests.test_webhooks import START, FakeAgent, config, event


class PosterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.agent = FakeAgent()
        self.queue = QueueDirectory(self.mktemp())
        os.makedirs(self.queue.path)
        self.poster = Poster(config(), self.queue, self.clock, self.agent, run_synchronously,
                             lambda d: d, b"engage-appliance")
        self.addCleanup(self.poster.stop)

    def batch(self, seq: int) -> Batch:
        """A sealed batch file of one event, numbered ``seq``."""
        batch_id = f"00000000-0000-0000-0000-{seq:012d}"
        path = self.queue.batch_path(seq, int(START), batch_id)
        with open(path, "wb") as f:
            f.write(envelope_line(event(n=seq)))
        return Batch(seq, int(START), batch_id, path)

    def test_batches_added_meanwhile_wait_in_order(self) -> None:
        """One batch in flight; those sealed meanwhile follow in order, whatever order they came in."""
        first, second, third = self.batch(5), self.batch(6), self.batch(7)
        self.poster.start([first])
        self.poster.add(third)
        self.poster.add(second)
        self.assertEqual([r.batch_id for r in self.agent.requests], [first.batch_id])
        self.assertEqual(self.poster.batches, [first, second, third])
        self.agent.last.answer(200)
        self.assertFalse(os.path.exists(first.path))
        self.assertEqual([r.batch_id for r in self.agent.requests], [first.batch_id, second.batch_id])

    def test_stop_cancels_the_attempt_and_start_posts_it_again(self) -> None:
        batch = self.batch(1)
        self.poster.start([batch])
        request = self.agent.last
        self.poster.stop()
        self.assertTrue(request.cancelled)
        self.assertEqual((self.poster.batches, self.poster.failures), ([batch], 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(os.path.exists(batch.path))
        self.poster.start(self.poster.batches)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.agent.last.batch_id, batch.batch_id)

    def test_stop_ends_the_back_off(self) -> None:
        self.poster.start([self.batch(1)])
        self.agent.last.answer(500)
        self.assertEqual(self.poster.failures, 1)
        [retry] = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime(), START + 30)
        self.poster.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(30)
        self.assertEqual(len(self.agent.requests), 1)
