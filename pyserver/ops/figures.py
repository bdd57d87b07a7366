"""The figures of one process, from two readings of its Prometheus `/metrics` text.

`Reading.parse(text, at)` keeps what the operators' views need of a scrape;
`figures(now, before)` turns a reading (and the one before it, for rates and
recent percentiles) into plain numbers: requests a second, p50/p99 per
operation, errors, cache users and hit rate, store latency, ring share,
ZooKeeper session state, version. Percentiles come from the histogram
buckets: over the requests between the two readings when there were any, else
over all the process's life.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Reading", "figures", "quantile"]

# histogram: (upper bound, cumulative count) per bucket, +Inf last
Buckets = list[tuple[float, float]]


@dataclass
class Reading:
    """One scrape of one process, reduced to what the views use."""

    at: float
    # (op, code) -> requests
    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    # op -> request latency buckets
    latency: dict[str, Buckets] = field(default_factory=dict)
    # store method -> call latency buckets
    store: dict[str, Buckets] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    zookeeper: str | None = None

    @classmethod
    def parse(cls, text: str, at: float) -> Reading:
        """The reading of a `/metrics` text; ValueError if it is not Prometheus text."""
        reading = cls(at)
        latency: dict[str, dict[float, float]] = {}
        store: dict[str, dict[float, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == "pyserver_requests_total" or name == "pyserver_requests":
                    reading.requests[(labels.get("op", "?"), labels.get("code", "?"))] = value
                elif name == "pyserver_request_seconds_bucket":
                    latency.setdefault(labels.get("op", "?"), {})[float(labels["le"])] = value
                elif name == "pyserver_store_seconds_bucket":
                    store.setdefault(labels.get("method", "?"), {})[float(labels["le"])] = value
                elif name == "pyserver_info":
                    reading.info = dict(labels)
                elif name == "pyserver_zookeeper_session":
                    reading.zookeeper = labels.get("state")
                elif not labels and not name.endswith(("_created", "_bucket", "_count", "_sum")):
                    reading.gauges[name.removesuffix("_total")] = value
        reading.latency = {op: sorted(b.items()) for op, b in latency.items()}
        reading.store = {method: sorted(b.items()) for method, b in store.items()}
        return reading


def quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile (0..1) of a histogram's cumulative buckets, interpolated linearly in
    the bucket it falls in (the last finite bound for +Inf); None with no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    wanted = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= wanted and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            share = (wanted - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        if not math.isinf(bound):
            lower_bound = bound
        lower_count = count
    return lower_bound


def _minus(now: Buckets, before: Buckets | None) -> Buckets:
    if not before or len(before) != len(now):
        return now
    return [(bound, count - old) for (bound, count), (_, old) in zip(now, before, strict=True)]


def _merge(histograms: list[Buckets]) -> Buckets:
    merged: dict[float, float] = {}
    for buckets in histograms:
        for bound, count in buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    return sorted(merged.items())


def _window(now: Buckets, before: Buckets | None) -> Buckets:
    """The buckets of the requests between two readings, or all of them when there were
    none in between (an idle process still shows its latencies)."""
    recent = _minus(now, before)
    return recent if recent and recent[-1][1] > 0 else now


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def figures(now: Reading, before: Reading | None = None) -> dict[str, Any]:
    """The process's figures (module docstring); rates are None without an earlier reading."""
    span = now.at - before.at if before is not None and now.at > before.at else 0.0

    def rate(current: float, previous: float | None) -> float | None:
        if not span or previous is None:
            return None
        return round(max(current - previous, 0.0) / span, 2)

    ops: dict[str, dict[str, Any]] = {}
    for op in sorted({op for op, _ in now.requests} | set(now.latency)):
        count = sum(v for (name, _), v in now.requests.items() if name == op)
        earlier = (
            sum(v for (name, _), v in before.requests.items() if name == op)
            if before is not None
            else None
        )
        buckets = _window(now.latency.get(op, []), before.latency.get(op) if before else None)
        ops[op] = {
            "count": int(count),
            "per_s": rate(count, earlier),
            "p50_ms": _ms(quantile(buckets, 0.5)),
            "p99_ms": _ms(quantile(buckets, 0.99)),
        }
    total = sum(now.requests.values())
    errors_by_code: dict[str, int] = {}
    for (_, code), value in now.requests.items():
        if code != "OK" and value:
            errors_by_code[code] = errors_by_code.get(code, 0) + int(value)
    errors = sum(errors_by_code.values())
    earlier_total = sum(before.requests.values()) if before is not None else None
    earlier_errors = (
        sum(v for (_, code), v in before.requests.items() if code != "OK")
        if before is not None
        else None
    )
    store_now = _merge(list(now.store.values()))
    store_before = _merge(list(before.store.values())) if before is not None else None
    store_window = _window(store_now, store_before)
    slowest_store = sorted(
        (
            {
                "method": method,
                "p99_ms": _ms(
                    quantile(_window(b, before.store.get(method) if before else None), 0.99)
                ),
                "calls": int(b[-1][1]) if b else 0,
            }
            for method, b in now.store.items()
        ),
        key=lambda entry: -(entry["p99_ms"] or 0.0),
    )
    slowest_ops = sorted(
        ({"op": op, **values} for op, values in ops.items() if values["p99_ms"] is not None),
        key=lambda entry: -(entry["p99_ms"] or 0.0),
    )[:5]
    gauges = now.gauges
    hits, misses = gauges.get("pyserver_cache_hits"), gauges.get("pyserver_cache_misses")
    hit_rate = None
    if hits is not None and misses is not None:
        if before is not None:  # over the window, when the cache was asked in it
            recent_hits = hits - before.gauges.get("pyserver_cache_hits", 0.0)
            recent_misses = misses - before.gauges.get("pyserver_cache_misses", 0.0)
            if recent_hits + recent_misses > 0:
                hits, misses = recent_hits, recent_misses
        hit_rate = round(hits / (hits + misses), 4) if hits + misses > 0 else None
    return {
        "version": now.info.get("version"),
        "role": now.info.get("role"),
        "ops_per_s": rate(total, earlier_total),
        "requests": int(total),
        "errors": errors,
        "errors_per_s": rate(errors, earlier_errors),
        "errors_by_code": errors_by_code,
        "ops": ops,
        "slowest_ops": slowest_ops,
        "users_cached": _int(gauges.get("pyserver_cache_users")),
        "cache_hit_rate": hit_rate,
        "store_p50_ms": _ms(quantile(store_window, 0.5)),
        "store_p99_ms": _ms(quantile(store_window, 0.99)),
        "slowest_store_calls": slowest_store,
        "ring_share": gauges.get("pyserver_ring_share"),
        "serving": None
        if "pyserver_node_serving" not in gauges
        else bool(gauges["pyserver_node_serving"]),
        "zookeeper": now.zookeeper,
        "connections": _int(gauges.get("pyserver_connections")),
    }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
