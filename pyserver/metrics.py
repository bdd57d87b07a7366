"""Prometheus metrics of one process: requests, latency, connections, cache and store.

Each process keeps its own registry (tests run several servers in one process).
The HTTP side that serves them is pyserver.httpapi.

May import: nothing of pyserver.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

# Loopback request/reply sits in tens of microseconds; durable writes in milliseconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
)  # fmt: skip


class _CacheCollector(Collector):
    """Reads the mailbox's cache figures at scrape time, so the hot path records nothing."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(
                f"pyserver_cache_{name}", f"User-image cache {name}", value=stats.get(name, 0)
            )
        yield GaugeMetricFamily(
            "pyserver_cache_hit_rate", "User-image cache hit rate", value=stats.get("hit_rate", 0)
        )
        yield GaugeMetricFamily(
            "pyserver_cache_users", "User images cached", value=stats.get("users", 0)
        )
        # Reads answered from the reply table (native code): not in pyserver_requests,
        # whose latency histogram covers the requests that run in Python.
        yield CounterMetricFamily(
            "pyserver_table_replies",
            "Cached reads answered from the reply table",
            value=stats.get("table_replies", 0),
        )


class _RequestCollector(Collector):
    """Request counts and latency histograms kept in plain dicts, exposed at scrape time.

    A prometheus_client Counter or Histogram takes a lock on every update; on the
    request path (tens of thousands a second on one core) that was a tenth of the
    cost of a cached read. The event loop is one thread, so plain dicts suffice.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        # op -> [count per bucket (the last is +Inf), sum of seconds]
        self.latency: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, op_name: str, seconds: float, code: str) -> None:
        key = (op_name, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        histogram = self.latency.get(op_name)
        if histogram is None:
            histogram = self.latency[op_name] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        histogram[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[1][0] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "pyserver_requests", "Requests by operation and outcome", labels=["op", "code"]
        )
        for (op_name, code), count in sorted(self.counts.items()):
            requests.add_metric([op_name, code], count)
        yield requests
        latency = HistogramMetricFamily(
            "pyserver_request_seconds", "Request latency by operation", labels=["op"]
        )
        for op_name, (buckets, total) in sorted(self.latency.items()):
            cumulative = list(itertools.accumulate(buckets))
            bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
            latency.add_metric([op_name], list(zip(bounds, cumulative, strict=True)), total[0])
        yield latency


class _OutboxCollector(Collector):
    """Mail out (pyserver.app.outbox), read at scrape time: copies settled by outcome,
    retries, and mails waiting."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        settled = CounterMetricFamily(
            "pyserver_outbound_settled",
            "Outgoing mail copies settled, by outcome",
            labels=["outcome"],
        )
        for outcome in ("sent", "failed"):
            settled.add_metric([outcome], stats.get(outcome, 0))
        yield settled
        yield CounterMetricFamily(
            "pyserver_outbound_retries", "Outgoing mail copies deferred and tried again",
            value=stats.get("retries", 0),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pyserver_outbound_waiting", "Outgoing mails queued or being sent",
            value=stats.get("waiting", 0),
        )  # fmt: skip


class _SmsCollector(Collector):
    """The SMS gateway (pyserver.sms), read at scrape time: each SMSC session's binds,
    window and traffic, the texts filed, and how long receipts take."""

    _SESSION_COUNTERS = ("binds", "drops", "submits", "throttled", "refused", "delivers")
    _GATEWAY_COUNTERS = ("texts_from_users", "texts_from_phones", "replies", "receipts",
                         "incomplete", "not_stored", "unknown_short_code")  # fmt: skip

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        bound = GaugeMetricFamily(
            "pyserver_sms_bound", "1 while bound to the SMSC", labels=["smsc"]
        )
        window = GaugeMetricFamily(
            "pyserver_sms_window_in_use", "submit_sm sent and not answered", labels=["smsc"]
        )
        counters = {
            name: CounterMetricFamily(f"pyserver_sms_{name}", f"SMPP {name}", labels=["smsc"])
            for name in self._SESSION_COUNTERS
        }
        for smsc, session in stats.get("smsc", {}).items():
            bound.add_metric([smsc], 1 if session.get("bound") else 0)
            window.add_metric([smsc], session.get("in_window", 0))
            for name, family in counters.items():
                family.add_metric([smsc], session.get(name, 0))
        yield bound
        yield window
        yield from counters.values()
        texts = CounterMetricFamily(
            "pyserver_sms_texts", "Texts filed and receipts taken, by kind", labels=["kind"]
        )
        gateway = stats.get("gateway", {})
        for name in self._GATEWAY_COUNTERS:
            texts.add_metric([name], gateway.get(name, 0))
        yield texts
        receipts = stats.get("receipts", {})
        yield SummaryMetricFamily(
            "pyserver_sms_receipt_seconds",
            "From the SMSC taking a text to its delivery receipt",
            count_value=receipts.get("count", 0),
            sum_value=receipts.get("seconds", 0.0),
        )


class _NodeCollector(Collector):
    """An app server of a cell: its share of the ring, whether it serves, its ZooKeeper
    session (read at scrape time)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "pyserver_ring_share",
            "Share of the cell's ring this node owns (0 to 1)",
            value=stats.get("ring_share", 0.0),
        )
        yield GaugeMetricFamily(
            "pyserver_node_serving",
            "1 while the node serves the users its ring share gives it",
            value=1.0 if stats.get("serving") else 0.0,
        )
        session = GaugeMetricFamily(
            "pyserver_zookeeper_session", "The ZooKeeper session's state (1)", labels=["state"]
        )
        session.add_metric([str(stats.get("zookeeper", "unknown"))], 1.0)
        yield session


class _InfoCollector(Collector):
    """`pyserver_info{role, version, ...} 1`: what the process is."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "pyserver_info", "What this process is (always 1)", labels=sorted(self.labels)
        )
        info.add_metric([self.labels[name] for name in sorted(self.labels)], 1.0)
        yield info


class Metrics:
    """The process's metrics. `observe` is the dispatcher's RequestObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.store_seconds = Histogram(
            "pyserver_store_seconds", "Store call latency by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.connections = Gauge(
            "pyserver_connections", "Open client connections", registry=self.registry
        )
        self._info: _InfoCollector | None = None

    def observe(self, op_name: str, seconds: float, error_code: str | None) -> None:
        self._requests.observe(op_name, seconds, error_code or "OK")

    def watch_cache(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_CacheCollector(stats))

    def watch_outbox(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_OutboxCollector(stats))

    def watch_sms(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_SmsCollector(stats))

    def watch_node(self, stats: Callable[[], dict[str, Any]]) -> None:
        """An app server's ring share, serving and ZooKeeper state ("ring_share", "serving",
        "zookeeper" of `stats()`)."""
        self.registry.register(_NodeCollector(stats))

    def describe(self, **labels: str) -> None:
        """Say what the process is (`role`, `version`, `cell`, `node`...) as `pyserver_info`;
        a second call adds to or replaces the labels."""
        if self._info is None:
            self._info = _InfoCollector({})
            self.registry.register(self._info)
        self._info.labels = {**self._info.labels, **{k: str(v) for k, v in labels.items()}}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TimedStore:
    """A store whose coroutine methods report their latency; everything else passes through."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attribute):
            return attribute
        histogram = self._metrics.store_seconds.labels(name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attribute(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        # Kept on the instance, so __getattr__ runs once per method, not once per call.
        setattr(self, name, timed)
        return timed
