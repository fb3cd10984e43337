"""
The back-off both retry loops use: delivery (per copy) and webhooks (per receiver).

They differ only in their numbers (delivery: 5 min doubling to 4000 s;
webhooks: 30 s doubling to 30 min, both configurable), so the formula is here once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySchedule:
    initial: float
    maximum: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...): doubling, capped."""
        return min(self.initial * 2.0 ** max(failures - 1, 0), self.maximum)
