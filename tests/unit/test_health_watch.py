"""The failure watch behind "degraded", and the per-interval latency of the dashboard."""

from __future__ import annotations

from engine.service.health import FailureWatch
from engine.service.live import interval_histogram
from ipc.control import Histogram, MonitorReport

S = 1_000_000_000


def report(at_s: float, failed: int, delivered: int) -> MonitorReport:
    counters = {"failed_attempts": failed, "delivered": delivered}
    return MonitorReport(1, [], counters, Histogram(), Histogram(), int(at_s * S))


def test_degraded_above_the_threshold_over_the_window_with_enough_attempts() -> None:
    w = FailureWatch(threshold=0.5, stats_interval_s=1.0)
    assert w.problem() == ""
    w.observe(report(0, 0, 0))
    w.observe(report(1, 3, 0))
    assert w.problem() == ""  # 3 attempts: too few to say
    w.observe(report(2, 10, 0))
    assert w.problem().startswith("handler failing: 100% of 10 delivery attempts failed")
    w.observe(report(2, 10, 0))  # the same report again changes nothing
    assert w.ratio() == (1.0, 10)
    # Successes for longer than the 5 s window: no longer degraded.
    for t in range(3, 10):
        w.observe(report(t, 10, 100 * (t - 2)))
    assert w.problem() == ""
    assert w.ratio()[0] == 0.0


def test_a_restarted_monitor_starts_the_window_over() -> None:
    w = FailureWatch(threshold=0.5, stats_interval_s=1.0)
    w.observe(report(0, 100, 100))
    w.observe(report(1, 2, 0))  # counters went down: a new monitor
    assert w.ratio() == (0.0, 0)
    w.observe(report(2, 12, 0))
    assert w.ratio() == (1.0, 10)


def test_interval_histogram_is_the_difference_or_all_after_a_reset() -> None:
    before = Histogram()
    for ns in (10, 10, 1000):
        before.record(ns)
    now = Histogram(list(before.buckets), before.max_ns, before.sum_ns)
    now.record(5000)
    diff = interval_histogram(now, before)
    assert diff.count == 1 and diff.sum_ns == 5000
    fresh = Histogram()
    fresh.record(7)
    assert interval_histogram(fresh, now) is fresh  # counts went down: a reset
