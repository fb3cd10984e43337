"""The one back-off formula, with the numbers delivery and webhooks each use by default."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from appliance.config import DeliveryConfig, WebhookConfig
from appliance.retry import RetrySchedule
from appliance.webhooks import posting


class RetryScheduleTests(SynchronousTestCase):
    def test_delivery_defaults(self) -> None:
        c = DeliveryConfig()
        schedule = RetrySchedule(c.retry_initial, c.retry_max)
        self.assertEqual([schedule.delay(n) for n in range(1, 7)], [300, 600, 1200, 2400, 4000, 4000])

    def test_webhook_defaults(self) -> None:
        c = WebhookConfig(name="h", target="http://127.0.0.1/")
        schedule = RetrySchedule(c.retry_initial, c.retry_max)
        self.assertEqual([schedule.delay(n) for n in range(1, 9)],
                         [30, 60, 120, 240, 480, 960, 1800, 1800])

    def test_before_any_failure_the_first_delay(self) -> None:
        self.assertEqual(RetrySchedule(5, 100).delay(0), 5)

    def test_webhooks_use_this_schedule(self) -> None:
        self.assertIs(posting.RetrySchedule, RetrySchedule)
