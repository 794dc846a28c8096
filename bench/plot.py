"""Plot saved benchmark runs: ``python3 -m bench.plot RUN.json [RUN.json ...] -o OUT.png``.

Reads pytest-benchmark JSON (``--benchmark-autosave`` writes it under
``.benchmarks/``, ``--benchmark-json=FILE`` anywhere) and draws the groups of
bench_scaling.py and bench_priority_latency.py: msgs/s against workers, batch
size and delivery concurrency, Ringway next to its baselines, and p50/p99
latency against offered load.  A later file's case replaces an earlier one's,
so several partial runs combine into one figure.  Needs matplotlib (the
``plot`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RINGWAY = "ringway"
COLORS = {  # one colour per side in every panel
    RINGWAY: "black",
    "sequential": "tab:blue",
    "asyncio_5x20x10": "tab:orange",
    "mpqueue": "tab:green",
    "process_pool": "tab:red",
}
Case = dict[str, Any]  # one benchmark entry of the JSON: group, params, extra_info


def load(paths: Iterable[Path]) -> dict[tuple[str, str], Case]:
    """Benchmarks by (group, test name); later files win."""
    out: dict[tuple[str, str], Case] = {}
    for path in paths:
        for bench in json.loads(path.read_text())["benchmarks"]:
            if bench.get("extra_info", {}).get("msgs_per_s") is not None:
                out[bench["group"] or "", bench["name"]] = bench
    return out


def series(cases: list[Case], param: str) -> tuple[list[float], dict[str, list[float]]]:
    """x = the ``param`` of each case (sorted); y per side = its median msgs/s."""
    cases = sorted(cases, key=lambda c: c["params"][param])
    xs = [c["params"][param] for c in cases]
    sides: dict[str, list[float]] = {RINGWAY: [c["extra_info"]["msgs_per_s"] for c in cases]}
    for c in cases:
        for side in c["extra_info"].get("baseline_msgs_per_s", {}):
            sides.setdefault(side, [])
    for side in list(sides)[1:]:
        sides[side] = [
            c["extra_info"]["baseline_msgs_per_s"].get(side, float("nan")) for c in cases
        ]
    return xs, sides


def _throughput(ax: Any, cases: list[Case], param: str, title: str, log_x: bool) -> None:
    if not cases:
        ax.set_title(f"{title}\n(not in these runs)")
        ax.axis("off")
        return
    xs, sides = series(cases, param)
    for side, ys in sides.items():
        style = {"linewidth": 2.5} if side == RINGWAY else {"linestyle": "--"}
        ax.plot(xs, ys, marker="o", label=side, color=COLORS.get(side), **style)
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(param.replace("_", " "))
    ax.set_ylabel("msgs/s (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _latency(ax: Any, case: Case | None, title: str) -> None:
    if case is None:
        ax.set_title(f"{title}\n(not in these runs)")
        ax.axis("off")
        return
    for side, steps in case["extra_info"]["steps"].items():
        xs = [100 * s["fraction"] for s in steps]
        for q, dash in (("p50_s", ":"), ("p99_s", "-")):
            ys = [1e3 * s[q] for s in steps]
            ax.plot(xs, ys, dash, marker="o", label=f"{side} {q[:3]}", color=COLORS.get(side))
    ax.set_yscale("log")
    ax.set_xlabel("offered load, % of that side's saturation")
    ax.set_ylabel("submit -> settle, ms")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def plot(benches: dict[tuple[str, str], Case], out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(name: str, **params: Any) -> list[Case]:
        return [
            c
            for (g, _), c in benches.items()
            if g == name and all(c["params"].get(k) == v for k, v in params.items())
        ]

    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    _throughput(axes[0][0], group("worker-scaling", workload="noop_python"), "workers",
                "worker scaling, no-op handler", log_x=False)  # fmt: skip
    _throughput(axes[0][1], group("worker-scaling", workload="cpu_50us"), "workers",
                "worker scaling, ~50 µs CPU handler", log_x=False)  # fmt: skip
    _throughput(axes[0][2], group("batch-size"), "batch", "batch size, no-op handler", log_x=True)
    _throughput(axes[1][0], group("delivery-concurrency"), "concurrency",
                "delivery concurrency, 1 ms async handler", log_x=True)  # fmt: skip
    for ax, workload in zip(axes[1][1:], ("noop_python", "cpu_50us"), strict=True):
        found = group("latency-under-load", workload=workload)
        _latency(ax, found[0] if found else None, f"latency under load, {workload}")
    fig.suptitle(f"Ringway and baselines — {subtitle}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("-o", "--out", type=Path, default=Path("bench/plots/ringway.png"))
    parser.add_argument("--title", default="", help="subtitle, e.g. date, commit, cores")
    args = parser.parse_args(argv)
    benches = load(args.runs)
    subtitle = args.title or ", ".join(p.name for p in args.runs)
    plot(benches, args.out, subtitle)
    print(f"wrote {args.out} ({len(benches)} benchmarks from {len(args.runs)} file(s))")


if __name__ == "__main__":
    main()
