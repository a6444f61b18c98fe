"""Prometheus metrics for one bot, on a registry of its own.

Counts that the pipeline keeps anyway (receiver, sequencer, dispatcher) are
read at scrape time, so the hot path pays nothing for them; only latencies
are observed as they happen. Labels are bounded: outcomes and reasons are
fixed words, handlers are the bot's own functions, never call ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .graph._http import RequestStats

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)


class _Sources(Collector):
    def __init__(self) -> None:
        self.notifications: list[Callable[[], Counter[tuple[str, str]]]] = []
        self.dropped: Callable[[], Counter[str]] | None = None
        self.handled: Callable[[], Counter[str]] | None = None
        self.graph: Callable[[], RequestStats] | None = None
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
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
            for reason in ("duplicate", "stale", "after_end"):
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
        for name, (doc, label, count) in self.counters.items():
            family = CounterMetricFamily(name, doc, labels=[label])
            for label_value, total in sorted(count().items()):
                family.add_metric([label_value], total)
            yield family


class Metrics:
    """The bot's metrics; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = _Sources()
        self.registry.register(self.sources)
        self.ack_seconds = Histogram(
            "callbot_ack_seconds",
            "Time from request start to the 202",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "callbot_handler_seconds",
            "Handler run time, by handler and outcome",
            labelnames=["handler", "outcome"],
            buckets=_HANDLER_BUCKETS,
            registry=self.registry,
        )
        # labels() validates and hashes its arguments on every call; each pair's child is kept.
        self._handler_children: dict[tuple[str, str], Histogram] = {}

    def observe_handler(self, handler: str, outcome: str, seconds: float) -> None:
        """Record one handler run."""
        child = self._handler_children.get((handler, outcome))
        if child is None:
            child = self._handler_children[handler, outcome] = self.handler_seconds.labels(
                handler, outcome
            )
        child.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
