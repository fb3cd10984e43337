"""
``GET /metrics``: the appliance in Prometheus's text format, from its own registry.

Two kinds of figures. Counts of what happened (messages injected, delivered,
bounced and delayed by bounce class, opens, clicks) are counted from the
events as the event log writes them (``EventCounters``, an ``EventLog``
observer), so they agree with the log. Levels (the queue by destination,
open connections, webhook backlogs) and the counters other parts keep
(event-log losses, tracker and AUTH refusals) are read when the scraper asks
(``Readings``), so nothing is kept twice. The registry is the appliance's
own, never ``prometheus_client``'s global one: two appliances in one process
(tests) each count their own.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger
from twisted.web import resource, server

from appliance.admin.responses import error

log = Logger()

PREFIX = "engage_"

# Seconds from a tracker request to its answer: a pixel or a redirect takes well under a millisecond.
TRACKER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EventCounters:
    """Counts each event the log has written, by type (and bounce class for bounces and delays)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, text, labels, registry=registry)

        self.injected = counter("messages_injected", "Recipient copies accepted (injection events).")
        self.policy_rejected = counter("messages_policy_rejected",
                                       "Recipients refused by the policy hook (policy_rejection events).")
        self.delivered = counter("messages_delivered", "Copies delivered (delivery events).")
        self.delayed = counter("messages_delayed", "Delivery attempts deferred (delay events).",
                               ("bounce_class",))
        self.bounced = counter("messages_bounced", "Copies bounced (bounce events).", ("bounce_class",))
        self.opens = counter("opens", "Opens (open events).")
        self.initial_opens = counter("initial_opens", "Opens of the top pixel (initial_open events).")
        self.clicks = counter("clicks", "Clicks (click events).")
        self.unsubscribes = counter("link_unsubscribes", "Unsubscribe link clicks (link_unsubscribe events).")
        # The bound ``inc`` of each, found by one dict lookup per event.
        self._plain: dict[object, Callable[[], None]] = {
            "injection": self.injected.inc, "policy_rejection": self.policy_rejected.inc,
            "delivery": self.delivered.inc, "open": self.opens.inc, "initial_open": self.initial_opens.inc,
            "click": self.clicks.inc, "link_unsubscribe": self.unsubscribes.inc,
        }
        # Bounce classes are a small fixed set (appliance.bounces): a child per class, kept.
        self._by_class: dict[object, tuple[Counter, dict[object, Callable[[], None]]]] = {
            "delay": (self.delayed, {}), "bounce": (self.bounced, {})}

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        inc = self._plain.get(kind)
        if inc is not None:
            inc()
            return
        by_class = self._by_class.get(kind)
        if by_class is not None:
            counter, children = by_class
            bounce_class = event.get("bounce_class", "")
            inc = children.get(bounce_class)
            if inc is None:
                inc = children[bounce_class] = counter.labels(str(bounce_class)).inc
            inc()


def tracker_latency(registry: CollectorRegistry) -> TrackerLatency:
    """``tracker_answer_seconds``: ``observe`` each answer; tracker processes' counts are added."""
    latency = TrackerLatency()
    registry.register(latency)
    return latency


# Counts per bucket (the last past every bound) and the sum of the seconds: how a tracker
# process reports its answers (``appliance.tracker.child``), added to this process's own.
LatencyCounts = tuple[Sequence[int], float]


class TrackerLatency(Collector):
    """
    Seconds from a whole tracker request to its whole answer, a histogram of
    ``TRACKER_BUCKETS``: those this process answered, plus what each source given to ``add``
    reports (the tracker processes, which count in the same buckets).
    """

    name = PREFIX + "tracker_answer_seconds"
    text = "Seconds from a whole tracker request to its whole answer."

    def __init__(self, buckets: Sequence[float] = TRACKER_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._sources: list[Callable[[], LatencyCounts]] = []

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def add(self, source: Callable[[], LatencyCounts]) -> None:
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self.counts), self.sum
        for source in self._sources:
            try:
                more, seconds = source()
            except Exception:
                log.failure("reading the metric {name} failed", name=self.name)
                continue
            for i, n in enumerate(more[:len(counts)]):
                counts[i] += n
            total += seconds
        cumulative = list(itertools.accumulate(counts))
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.text, buckets=list(zip(bounds, cumulative, strict=True)),
                                    sum_value=total)

    def describe(self) -> Iterator[Metric]:
        return iter(())


# What a reading returns: one value, or values by one label's values.
Reading = Callable[[], float | Mapping[str, float]]


class Readings(Collector):
    """Figures read at scrape time from the parts that keep them; register each with one call."""

    def __init__(self) -> None:
        self._metrics: list[tuple[type[Metric], str, str, str, Reading]] = []

    def gauge(self, name: str, text: str, read: Reading, label: str = "") -> None:
        """A level; ``label`` names the key when ``read`` returns a mapping."""
        self._metrics.append((GaugeMetricFamily, PREFIX + name, text, label, read))

    def counter(self, name: str, text: str, read: Reading, label: str = "") -> None:
        """A count since the start (``_total`` is added to ``name``)."""
        self._metrics.append((CounterMetricFamily, PREFIX + name, text, label, read))

    def collect(self) -> Iterator[Metric]:
        for family, name, text, label, read in self._metrics:
            try:
                value = read()
            except Exception:
                log.failure("reading the metric {name} failed", name=name)
                continue
            if isinstance(value, Mapping):
                metric = family(name, text, labels=[label])
                for key, v in sorted(value.items()):
                    metric.add_metric([key], v)
            else:
                metric = family(name, text, value=value)
            yield metric

    def describe(self) -> Iterator[Metric]:
        """Nothing: registering must not read the parts (they may not be started)."""
        return iter(())


class MetricsResource(resource.Resource):
    """The registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        try:
            body = generate_latest(self.registry)
        except Exception:
            log.failure("the metrics could not be collected")
            return error(request, 500, "the metrics could not be collected; see the appliance's log")
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return body
