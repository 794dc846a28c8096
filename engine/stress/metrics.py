"""`MetricsCollector`: what a stress run measured, in bounded memory.

Counters, gauges summarised as peak/average, the engine's merged latency
histograms and a time series for the plot that is thinned (every other point
dropped) whenever it reaches its cap, so a soak of days holds as much as a run
of seconds.  Nothing here is per message.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from ipc.control import Histogram

MAX_POINTS = 1024  # time-series cap; thinned by half when reached


class GaugeStats(msgspec.Struct):
    """Running summary of a sampled value: no samples are kept.

    ``weight`` is what one sample stands for: 1 by default, or the length of
    its interval for a rate, so the average is over time and never above the peak.
    """

    samples: int = 0
    total: float = 0.0
    weights: float = 0.0
    peak: float = 0.0
    last: float = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.samples += 1
        self.total += value * weight
        self.weights += weight
        self.last = value
        self.peak = max(self.peak, value)

    @property
    def average(self) -> float:
        if not self.weights:
            return 0.0
        # A weighted mean of the samples is at most their peak; min() only drops the
        # last-digit rounding of value * weight / weight.
        return min(self.total / self.weights, self.peak)


class SeriesPoint(msgspec.Struct, frozen=True):
    """One sample of the run; counts are cumulative so thinning never skews a rate."""

    t_s: float  # since the first submit
    generated: int
    settled: int  # delivered + dead-lettered + expired
    queue_depth: int  # submitted, not yet settled
    cpu_percent: float  # all engine processes, 100 = one core
    rss_bytes: int  # all engine processes
    kills: int  # chaos kills so far
    p50_s: float | None  # settle latency of the deliveries reported since the last point
    p99_s: float | None
    failed_attempts: int = 0  # cumulative, as the monitor last reported
    dead_lettered: int = 0  # cumulative


class MetricsCollector:
    """Counters, gauges, latency histograms and a bounded series; filled by the sampler."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, GaugeStats] = {}
        self.histograms: dict[str, Histogram] = {}
        self.series: list[SeriesPoint] = []
        self.max_points = max_points
        self._stride = 1  # keep every _stride-th point offered
        self._offered = 0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, value: float, weight: float = 1.0) -> None:
        gauge = self.gauges.get(name)
        if gauge is None:
            gauge = self.gauges[name] = GaugeStats()
        gauge.add(value, weight)

    def gauge(self, name: str) -> GaugeStats:
        return self.gauges.get(name) or GaugeStats()

    def set_histogram(self, name: str, histogram: Histogram) -> None:
        """Keep a copy: the engine's report objects are replaced, never updated, but be safe."""
        self.histograms[name] = Histogram(
            list(histogram.buckets), histogram.max_ns, histogram.sum_ns
        )

    def histogram(self, name: str) -> Histogram:
        return self.histograms.get(name) or Histogram()

    def add_point(self, point: SeriesPoint, *, force: bool = False) -> None:
        """Append a point if it falls on the current stride (``force``: the final one)."""
        self._offered += 1
        if not force and (self._offered - 1) % self._stride:
            return
        if len(self.series) >= self.max_points - 1:
            self.series = self.series[::2]  # thin first, so the point appended now stays
            self._stride *= 2
        self.series.append(point)


def interval_histogram(now: Histogram, before: Histogram | None) -> Histogram:
    """The deliveries recorded between two cumulative snapshots of a merged histogram.

    Bucket counts can shrink when a killed worker's unreported counts vanish, so
    differences are clamped at zero.  ``max_ns`` stays the cumulative maximum: it
    only caps the percentile of the top bucket.
    """
    if before is None:
        return now
    old = before.buckets
    diff = [max(0, n - (old[i] if i < len(old) else 0)) for i, n in enumerate(now.buckets)]
    return Histogram(diff, now.max_ns, max(0, now.sum_ns - before.sum_ns))
