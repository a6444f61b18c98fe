"""Prometheus metrics for one bot, on a registry of its own.

Counts that the pipeline keeps anyway (receiver, sequencer, dispatcher) are
read at scrape time, so the hot path pays nothing for them. Latencies are
counted as they happen into plain per-bucket integers (:class:`Latencies`)
and turned into Prometheus histograms only when scraped. Labels are bounded:
outcomes and reasons are fixed words, handlers are the bot's own functions,
never call ids.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .graph._http import RequestStats

__all__ = ["Latencies", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)


class Latencies:
    """Durations counted into fixed buckets; a histogram's worth of plain integers.

    ``observe`` is a bisect and two additions, with no lock: it runs on the
    event loop, and so does the scrape that reads it.
    """

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # counts[i]: durations at most bounds[i] and above the bound before; the last: above all.
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def add_to(
        self, family: HistogramMetricFamily, labelnames: Sequence[str], labels: Sequence[str]
    ) -> None:
        """Add these counts to ``family`` as one series, cumulative as Prometheus has buckets."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts[:-1], strict=True):
            running += count
            buckets.append((repr(bound), float(running)))
        buckets.append(("+Inf", float(running + self.counts[-1])))
        family.add_metric(labels, buckets, self.total)
        # As prometheus_client's own Histogram writes it: when the series started.
        created = dict(zip(labelnames, labels, strict=True))
        family.add_sample(f"{family.name}_created", created, self.created)


class _Sources(Collector):
    def __init__(self) -> None:
        self.notifications: list[Callable[[], Counter[tuple[str, str]]]] = []
        self.dropped: Callable[[], Counter[str]] | None = None
        self.handled: Callable[[], Counter[str]] | None = None
        self.graph: Callable[[], RequestStats] | None = None
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.histograms: list[tuple[str, str, list[str], dict[tuple[str, ...], Latencies]]] = []
        self.counters: dict[str, tuple[str, str, Callable[[], Counter[str]]]] = {}
        """name -> (help, label name, counts by label value)."""

    def collect(self) -> Iterator[Metric]:
        notes = CounterMetricFamily(
            "callbot_notifications",
            "Notifications received, by outcome and reason",
            labels=["outcome", "reason"],
        )
        for source in self.notifications:
            for (outcome, reason), value in sorted(source().items()):
                notes.add_metric([outcome, reason], value)
        if self.dropped is not None:
            for reason in ("duplicate", "stale", "after_end", "roster_full", "call_forgotten"):
                notes.add_metric(["dropped", reason], self.dropped()[reason])
        yield notes
        if self.handled is not None:
            counts = self.handled()
            handled = CounterMetricFamily(
                "callbot_deliveries", "Events run through their handlers", labels=[]
            )
            handled.add_metric([], counts["handled"])
            yield handled
        if self.graph is not None:
            stats = self.graph()
            graph = CounterMetricFamily(
                "callbot_graph_requests",
                "Attempts of requests to Graph, by method and status",
                labels=["method", "status"],
            )
            for (method, status), value in sorted(stats.outcomes.items()):
                graph.add_metric([method, status], value)
            yield graph
            retries = CounterMetricFamily(
                "callbot_graph_retries",
                "Requests to Graph sent again after 429/503/504 or no answer",
            )
            retries.add_metric([], stats.retries)
            yield retries
        for name, (doc, read) in self.gauges.items():
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], read())
            yield gauge
        for name, doc, labelnames, series in self.histograms:
            family = HistogramMetricFamily(name, doc, labels=labelnames)
            for labels, latencies in list(series.items()):
                latencies.add_to(family, labelnames, labels)
            yield family
        for name, (doc, label, count) in self.counters.items():
            counter = CounterMetricFamily(name, doc, labels=[label])
            for label_value, total in sorted(count().items()):
                counter.add_metric([label_value], total)
            yield counter


class Metrics:
    """The bot's metrics; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = _Sources()
        self.ack_seconds = Latencies(_LATENCY_BUCKETS)
        self.sources.histograms.append(
            (
                "callbot_ack_seconds",
                "Time from request start to the 202",
                [],
                {(): self.ack_seconds},
            )
        )
        # One series per (handler, outcome), created on its first observation.
        self._handler_series: dict[tuple[str, ...], Latencies] = {}
        self.sources.histograms.append(
            (
                "callbot_handler_seconds",
                "Handler run time, by handler and outcome",
                ["handler", "outcome"],
                self._handler_series,
            )
        )
        self.registry.register(self.sources)

    def observe_handler(self, handler: str, outcome: str, seconds: float) -> None:
        """Record one handler run."""
        series = self._handler_series.get((handler, outcome))
        if series is None:
            series = self._handler_series[handler, outcome] = Latencies(_HANDLER_BUCKETS)
        series.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
