"""`Engine.stats()`: the dispatcher's exact settle counts merged with the monitor's report.

Conservation counts (submitted, delivered, dead_lettered, expired, in_flight)
come only from the dispatcher, which learns settlements from FrameDone
records, so ``submitted == delivered + dead_lettered + expired + in_flight``
holds in every snapshot.  Attempt counters, latencies and per-worker process
facts come from the monitor's latest report (at most ENGINE_STATS_INTERVAL_S old).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipc.codec import Priority
from ipc.control import Histogram, MonitorReport

if TYPE_CHECKING:
    from engine.core.dispatcher import Dispatcher

PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))


def latency(h: Histogram) -> dict[str, float | int]:
    out: dict[str, float | int] = {name: h.percentile(q) for name, q in PERCENTILES}
    out["max"] = h.max_ns / 1e9
    out["count"] = h.count
    return out


def build_stats(
    d: Dispatcher,
    report: MonitorReport | None,
    monitor: Any,
    monitor_restarts: int,
    abandoned: int = 0,
) -> dict[str, Any]:
    c = d.counts
    worker_counts = report.counters if report is not None else {}
    depth = {p.name.lower(): d.lane_submitted[p] - d.lane_settled[p] for p in Priority}
    ring_fill = {
        p.name.lower(): max(
            (shard.lanes[p].used_bytes() / shard.lanes[p].capacity for shard in d.shards),
            default=0.0,
        )
        for p in Priority
    }
    batches = c["batches"]
    return {
        "submitted": c["submitted"],
        "delivered": c["delivered"],
        "dead_lettered": c["dead_lettered"],
        "expired": c["expired"],
        "in_flight": d.in_flight(),
        "abandoned": abandoned,  # in flight when the engine stopped: lost (Engine.stop)
        "failed_attempts": worker_counts.get("failed_attempts", 0),
        "retried": worker_counts.get("retried", 0),
        "frames_skipped": worker_counts.get("frames_skipped", 0),  # corrupt headers passed
        "redelivered": c["redelivered"],
        # Out of the rings for a long retry (ENGINE_MAX_RETRY_HOLD_S): held by the
        # dispatcher now (in flight), and handed back by workers in all.
        "deferred": d.deferrals.held,
        "deferrals": c["deferrals"],
        "queue_depth": depth,
        "ring_fill": ring_fill,
        "batches": batches,
        "mean_batch_size": (c["submitted"] - sum(len(b) for s in d.buffers for b in s)) / batches
        if batches
        else 0.0,
        "dead_letters_stored": len(d.dead),
        "dead_letters_dropped": d.dead.dropped,  # evicted from the full store (ENGINE_DLQ_MAX)
        "latency_start_s": latency(report.latency_start if report else Histogram()),
        "latency_settle_s": latency(report.latency_settle if report else Histogram()),
        "workers": [
            {
                "worker": w.worker,
                "pid": w.pid,
                "alive": w.alive,
                "restarts": w.restarts,
                "cpu_percent": w.cpu_percent,
                "rss_bytes": w.rss_bytes,
                "delivered": w.delivered,
                "heartbeat_age_s": w.beat_age_s,
                "recycled": w.recycled,
                "error": w.error,
                "last_error": w.error or d.returns.last_error[w.worker],
            }
            for w in (report.workers if report else [])
        ],
        "top_recipients": [
            {"recipient": recipient, "held": held}
            for recipient, held in (report.backlog if report else [])
        ],
        "monitor": {
            "pid": getattr(monitor, "pid", None),
            "alive": monitor is not None and monitor.exitcode is None,
            "restarts": monitor_restarts,
        },
    }
