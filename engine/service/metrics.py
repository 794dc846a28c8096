"""Prometheus exposition of the engine's aggregate stats (``GET /metrics``).

A custom collector reads the stats at scrape time, so nothing is counted twice
and the hot path never touches prometheus_client.  Names follow Prometheus
conventions: prefix ``engine_``, counters end in ``_total``, durations are
``_seconds`` histograms, per-worker series carry a ``worker`` label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ipc.control import Histogram, bucket_bounds

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Histogram bucket bounds in seconds: 50 us .. 60 s covers a no-op handler to a slow API call.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_COUNTERS = (
    ("messages_submitted", "submitted", "Messages accepted by the dispatcher."),
    ("messages_delivered", "delivered", "Messages the handler accepted."),
    ("messages_dead_lettered", "dead_lettered", "Messages given up on (dead letters)."),
    ("messages_expired", "expired", "Messages dropped because their TTL passed."),
    ("messages_redelivered", "redelivered", "Deliveries repeated after a worker died."),
    ("delivery_failed_attempts", "failed_attempts", "Handler attempts that raised."),
    ("delivery_retries", "retried", "Attempts scheduled again after a failure."),
    ("batches", "batches", "Batch frames written to the rings."),
    (
        "dead_letters_dropped",
        "dead_letters_dropped",
        "Dead letters evicted from the full store (ENGINE_DLQ_MAX).",
    ),
)


@dataclass
class Snapshot:
    """What one scrape reads: the stats dict, the raw histograms and the service's counters."""

    stats: dict[str, Any]
    latency_start: Histogram
    latency_settle: Histogram
    service: dict[str, int]
    users: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per user: messages admitted and refusals by the rate limit (engine.service.ratelimit)."""


def prometheus_buckets(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs and the sum in seconds of an engine histogram.

    A fine bucket counts under the first bound at or above its upper edge; the
    fine buckets are at most 1/16 wide, so a count lands at most one bound late.
    """
    counts = [0] * len(LATENCY_BUCKETS_S)
    over = 0
    bounds_ns = [b * 1e9 for b in LATENCY_BUCKETS_S]
    for i, n in enumerate(h.buckets):
        if not n:
            continue
        upper = bucket_bounds(i)[1]
        for j, b in enumerate(bounds_ns):
            if upper <= b:
                counts[j] += n
                break
        else:
            over += n
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(LATENCY_BUCKETS_S, counts, strict=True):
        running += n
        out.append((repr(bound), float(running)))
    out.append(("+Inf", float(running + over)))
    return out, h.sum_ns / 1e9


class EngineCollector(Collector):
    """Turns a `Snapshot` into metric families at scrape time."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        s = snap.stats
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(f"engine_{name}", doc, value=s[key])
        yield GaugeMetricFamily(
            "engine_in_flight_messages", "Submitted and not yet settled.", value=s["in_flight"]
        )
        yield GaugeMetricFamily(
            "engine_deferred_messages",
            "Held by the dispatcher out of the rings for a long retry (in flight).",
            value=s.get("deferred", 0),
        )
        depth = GaugeMetricFamily(
            "engine_queue_depth_messages", "Unsettled messages per lane.", labels=["lane"]
        )
        fill = GaugeMetricFamily(
            "engine_ring_fill_ratio", "Fullest ring of each lane (0..1).", labels=["lane"]
        )
        for lane, value in s["queue_depth"].items():
            depth.add_metric([lane], value)
            fill.add_metric([lane], s["ring_fill"][lane])
        yield depth
        yield fill
        backlog = GaugeMetricFamily(
            "engine_recipient_backlog_messages",
            "Messages held by the workers per recipient, for the ENGINE_BACKLOG_TOP largest only.",
            labels=["recipient"],
        )
        for top in s.get("top_recipients", []):
            backlog.add_metric([top["recipient"]], top["held"])
        yield backlog
        yield GaugeMetricFamily(
            "engine_dead_letters_stored", "Dead letters held.", value=s["dead_letters_stored"]
        )
        for name, h, doc in (
            ("start", snap.latency_start, "Submit to handler start."),
            ("settle", snap.latency_settle, "Submit to settled (delivered or given up)."),
        ):
            buckets, total = prometheus_buckets(h)
            yield HistogramMetricFamily(
                f"engine_delivery_{name}_latency_seconds", doc, buckets=buckets, sum_value=total
            )
        yield from _worker_metrics(s["workers"])
        monitor = s["monitor"]
        yield GaugeMetricFamily(
            "engine_monitor_up", "1 while the monitor runs.", value=int(monitor["alive"])
        )
        yield CounterMetricFamily(
            "engine_monitor_restarts", "Monitor restarts.", value=monitor["restarts"]
        )
        yield from _cache_metrics(s)
        yield from _user_metrics(snap.users)
        for key, value in snap.service.items():
            name = f"engine_{key}"
            if key.endswith("_total"):
                yield CounterMetricFamily(name[: -len("_total")], f"Service {key}.", value=value)
            else:
                yield GaugeMetricFamily(name, f"Service {key}.", value=value)


def _worker_metrics(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    specs = (
        ("engine_worker_up", GaugeMetricFamily, "alive", "1 while the worker is ready."),
        ("engine_worker_restarts", CounterMetricFamily, "restarts", "Respawns of this worker."),
        ("engine_worker_recycled", CounterMetricFamily, "recycled", "Graceful restarts."),
        ("engine_worker_delivered", CounterMetricFamily, "delivered", "Messages delivered."),
        ("engine_worker_cpu_percent", GaugeMetricFamily, "cpu_percent", "CPU use, %."),
        ("engine_worker_rss_bytes", GaugeMetricFamily, "rss_bytes", "Resident memory."),
        (
            "engine_worker_heartbeat_age_seconds",
            GaugeMetricFamily,
            "heartbeat_age_s",
            "Time since the last heartbeat.",
        ),
    )
    for name, cls, key, doc in specs:
        family = cls(name, doc, labels=["worker"])
        for w in workers:
            family.add_metric([str(w["worker"])], float(w[key]))
        yield family


# (metric name, key in stats["cache"] or stats["dedup"], help); the names issue 13 asked for.
_CACHE_COUNTERS = (
    ("engine_cache_hits", "cache", "hits", "Cacheable requests answered from the cache."),
    ("engine_cache_misses", "cache", "misses", "Cacheable requests that ran the handler."),
    (
        "engine_requests_deduplicated",
        "cache",
        "deduplicated",
        "Cacheable requests that joined an identical running one.",
    ),
    ("engine_cache_evictions", "cache", "evicted", "Entries dropped by ENGINE_CACHE_SIZE."),
    ("engine_cache_expirations", "cache", "expired", "Entries dropped when their TTL passed."),
    (
        "engine_messages_deduplicated",
        "dedup",
        "suppressed",
        "Submits acked with an earlier message's id (dedup_key seen in the window).",
    ),
    (
        "engine_dedup_evictions",
        "dedup",
        "evicted",
        "dedup_keys forgotten before their window ended (ENGINE_DEDUP_MAX).",
    ),
)


def _cache_metrics(s: dict[str, Any]) -> Iterator[Metric]:
    for name, part, key, doc in _CACHE_COUNTERS:
        yield CounterMetricFamily(name, doc, value=s[part][key])
    yield GaugeMetricFamily(
        "engine_cache_entries", "Responses in the cache.", value=s["cache"]["entries"]
    )
    yield GaugeMetricFamily("engine_dedup_keys", "dedup_keys remembered.", value=s["dedup"]["keys"])


def _user_metrics(users: dict[str, dict[str, int]]) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        "engine_user_messages", "Messages and requests a user sent.", labels=["user"]
    )
    limited = CounterMetricFamily(
        "engine_user_rate_limited",
        "Frames or HTTP bodies of a user refused by ENGINE_RATE_LIMIT.",
        labels=["user"],
    )
    for user, counts in users.items():
        messages.add_metric([user], counts["messages"])
        limited.add_metric([user], counts["rate_limited"])
    yield messages
    yield limited


def render(source: Callable[[], Snapshot]) -> bytes:
    """The Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(source))
    return generate_latest(registry)
