"""``--plot PATH.png``: rates, failures, latency and queue depth over the run (matplotlib).

matplotlib is the optional ``plot`` extra, imported only here and only when a
plot is asked for, so ``engine stress`` runs without it.  The figure is built
with `matplotlib.figure.Figure` (no pyplot): no GUI backend, no global state.
"""

from __future__ import annotations

from itertools import pairwise
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


def _rates(values: list[tuple[float, float]]) -> list[float]:
    """Per-second rates between consecutive (t, cumulative count) points."""
    return [(b - a) / (tb - ta) if tb > ta else 0.0 for (ta, a), (tb, b) in pairwise(values)]


def write_plot(report: StressReport, path: str | Path) -> None:
    """Four panels on one time axis: rates, retries and dead letters, latency, queue depth.

    Every axis starts at zero.  A fixed-count run generates its messages in a
    burst far above what settles; the rate axis is sized to the settled rate and
    the clipped spike is labelled with its height instead of flattening the rest.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    pts = report.series
    t = [p.t_s for p in pts[1:]]
    settled = _rates([(p.t_s, p.settled) for p in pts])
    offered = _rates([(p.t_s, p.generated) for p in pts])
    failed = _rates([(p.t_s, p.failed_attempts) for p in pts])
    dead = _rates([(p.t_s, p.dead_lettered) for p in pts])
    depth = [p.queue_depth for p in pts[1:]]
    kills = [b.t_s for a, b in pairwise(pts) if b.kills > a.kills]

    fig = Figure(figsize=(10, 10), layout="constrained")
    ax_rate, ax_fail, ax_lat, ax_depth = fig.subplots(4, 1, sharex=True)
    s = report.settings
    title = (
        f"engine stress {s.scenario}: {report.generated:,} messages, {s.workers} workers;"
        f" {report.throughput_msgs_per_s:,.0f} msg/s average,"
        f" {report.peak_throughput_msgs_per_s:,.0f} peak\n"
        f"mock core: each attempt succeeds with p={s.success_rate:g};"
        f" delivered after retries: {report.success_rate:.2%} of messages"
    )
    if report.too_short:
        title += "\n(too short to trust: " + report.too_short.split(" is too short")[0] + ")"
    fig.suptitle(title)

    ax_rate.plot(t, settled, label="settled", color="tab:blue")
    ax_rate.plot(t, offered, label="generated", color="tab:orange", alpha=0.7)
    top = max([*settled, 1.0]) * 1.25
    ax_rate.set_ylim(0, top)
    spikes = [(x, y) for x, y in zip(t, offered, strict=True) if y > top]
    if spikes:
        x, y = max(spikes, key=lambda p: p[1])
        ax_rate.annotate(
            f"generated: {y:,.0f} msg/s (off the scale)",
            xy=(x, top),
            xytext=(6, -14),
            textcoords="offset points",
            color="tab:orange",
            fontsize=8,
        )
    ax_rate.set_ylabel("msg/s")
    ax_rate.legend(loc="upper right")

    ax_fail.plot(t, failed, label="failed attempts", color="tab:red")
    ax_fail.plot(t, dead, label="dead-lettered", color="black", linestyle="--")
    ax_fail.set_ylim(bottom=0)
    ax_fail.set_ylabel("per second")
    ax_fail.legend(loc="upper right")

    # One point per new monitor report (ENGINE_STATS_INTERVAL_S): an interval without
    # a new report has no latency of its own and is skipped, not drawn as a gap.
    for name, key, color in (("p50", "p50_s", "tab:green"), ("p99", "p99_s", "tab:purple")):
        xs = [p.t_s for p in pts[1:] if getattr(p, key) is not None]
        ys = [getattr(p, key) * 1e3 for p in pts[1:] if getattr(p, key) is not None]
        ax_lat.plot(xs, ys, label=name, marker=".", color=color)
    ax_lat.set_ylim(bottom=0)
    ax_lat.set_ylabel("settle latency (ms)")
    ax_lat.legend(loc="upper right", title="per monitor report", title_fontsize=8)

    ax_depth.plot(t, depth, color="tab:gray")
    ax_depth.set_ylim(bottom=0)
    ax_depth.set_ylabel("queue depth")
    ax_depth.set_xlabel("seconds since the first submit")
    for ax in (ax_rate, ax_fail, ax_lat, ax_depth):
        ax.grid(True, alpha=0.3)
        for k in kills:
            ax.axvline(k, color="tab:red", alpha=0.3, linewidth=1)
    fig.savefig(str(path), dpi=100)
