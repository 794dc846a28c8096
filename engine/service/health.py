"""Is the handler failing?  The failed share of delivery attempts over the last interval.

A handler that raises on every message keeps the service "up" (processes
alive, rings draining into dead letters) while it does nothing useful; a probe
should say so.  `FailureWatch` keeps the workers' attempt counters as the
monitor reports them (every ENGINE_STATS_INTERVAL_S) and compares the newest
with the one at least ``window_s`` older: above ENGINE_DEGRADED_FAILURE_RATIO
failed, with at least ``MIN_ATTEMPTS`` attempts in between, the service is
degraded.  A pure function of the reports, so ``/healthz`` (and a readiness
probe) can ask it at any time.
"""

from __future__ import annotations

from collections import deque

from ipc.control import MonitorReport

DEGRADED_WINDOW_S = 5.0
"""The interval the ratio is measured over (or one stats interval, if that is longer)."""
MIN_ATTEMPTS = 5
"""Fewer attempts than this in the window say nothing either way."""


class FailureWatch:
    """Failed attempts / attempts over the last window, from successive monitor reports."""

    def __init__(self, threshold: float, stats_interval_s: float) -> None:
        self.threshold = threshold
        self.window_s = max(DEGRADED_WINDOW_S, stats_interval_s)
        # (sent_ns, failed_attempts, delivered) of each distinct report, oldest first.
        self._samples: deque[tuple[int, int, int]] = deque()

    def observe(self, report: MonitorReport | None) -> None:
        """Record ``report`` once (a report seen before is ignored)."""
        if report is None or (self._samples and self._samples[-1][0] == report.sent_ns):
            return
        c = report.counters
        sample = (report.sent_ns, c.get("failed_attempts", 0), c.get("delivered", 0))
        if self._samples and (sample[1] < self._samples[-1][1] or sample[2] < self._samples[-1][2]):
            self._samples.clear()  # a restarted monitor counts from scratch: start over
        self._samples.append(sample)
        horizon = report.sent_ns - int(self.window_s * 1e9)
        # Keep the newest sample at or before the horizon: the window's start.
        while len(self._samples) > 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()

    def ratio(self) -> tuple[float, int]:
        """(failed share, attempts) over the window; (0.0, 0) before two reports."""
        if len(self._samples) < 2:
            return 0.0, 0
        _, failed0, delivered0 = self._samples[0]
        _, failed1, delivered1 = self._samples[-1]
        failed = failed1 - failed0
        attempts = failed + delivered1 - delivered0
        return (failed / attempts if attempts > 0 else 0.0), attempts

    def problem(self) -> str:
        """Why the service is degraded, or "" when it is not."""
        share, attempts = self.ratio()
        if attempts < MIN_ATTEMPTS or share < self.threshold:
            return ""
        span = (self._samples[-1][0] - self._samples[0][0]) / 1e9
        return (
            f"handler failing: {share:.0%} of {attempts:,} delivery attempts failed in the "
            f"last {span:.1f}s (degraded at {self.threshold:.0%}, "
            "ENGINE_DEGRADED_FAILURE_RATIO)"
        )
