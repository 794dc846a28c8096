"""``--plot PATH.png``: throughput, latency and queue depth over the run (matplotlib).

matplotlib is the optional ``plot`` extra, imported only here and only when a
plot is asked for, so ``engine stress`` runs without it.  The figure is built
with `matplotlib.figure.Figure` (no pyplot): no GUI backend, no global state.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from engine.stress.report import StressReport

INSTALL_HINT = "pip install 'ringway[plot]'"


class PlotUnavailable(RuntimeError):
    """Raised when --plot is given but matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail before the run, not after it, if the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed ({exc}); install it with:"
            f" {INSTALL_HINT}"
        ) from None


def write_plot(report: StressReport, path: str | Path) -> None:
    require_matplotlib()
    from matplotlib.figure import Figure

    pts = report.series
    t = [p.t_s for p in pts[1:]]
    rate = [
        (b.settled - a.settled) / (b.t_s - a.t_s) if b.t_s > a.t_s else 0.0
        for a, b in itertools.pairwise(pts)
    ]
    offered = [
        (b.generated - a.generated) / (b.t_s - a.t_s) if b.t_s > a.t_s else 0.0
        for a, b in itertools.pairwise(pts)
    ]
    nan = math.nan
    p50 = [nan if p.p50_s is None else p.p50_s * 1e3 for p in pts[1:]]
    p99 = [nan if p.p99_s is None else p.p99_s * 1e3 for p in pts[1:]]
    depth = [p.queue_depth for p in pts[1:]]
    kills = [b.t_s for a, b in itertools.pairwise(pts) if b.kills > a.kills]

    fig = Figure(figsize=(10, 8), layout="constrained")
    ax_rate, ax_lat, ax_depth = fig.subplots(3, 1, sharex=True)
    s = report.settings
    fig.suptitle(
        f"engine stress {s.scenario}: {report.generated:,} messages,"
        f" {report.throughput_msgs_per_s:,.0f} msg/s, {s.workers} workers"
    )
    ax_rate.plot(t, rate, label="settled")
    ax_rate.set_ylabel("settled msg/s")
    # A fixed-count run generates everything in a burst: its own axis keeps "settled" legible.
    ax_gen = ax_rate.twinx()
    ax_gen.plot(t, offered, color="tab:orange", alpha=0.6, label="generated")
    ax_gen.set_ylabel("generated msg/s", color="tab:orange")
    lines = ax_rate.get_lines() + ax_gen.get_lines()
    ax_rate.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    # Settle latency of the deliveries reported in each interval (gaps: no new report).
    ax_lat.plot(t, p50, label="p50", marker=".", linestyle="-")
    ax_lat.plot(t, p99, label="p99", marker=".", linestyle="-")
    ax_lat.set_ylabel("settle latency (ms)")
    ax_lat.legend(loc="upper right")
    ax_depth.plot(t, depth, color="tab:gray")
    ax_depth.set_ylabel("queue depth")
    ax_depth.set_xlabel("seconds since the first submit")
    for ax in (ax_rate, ax_lat, ax_depth):
        ax.grid(True, alpha=0.3)
        for k in kills:
            ax.axvline(k, color="tab:red", alpha=0.3, linewidth=1)
    fig.savefig(str(path), dpi=100)
