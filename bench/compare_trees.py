"""Side by side: ``bench/cpu_per_message.py`` for an old tree and this one, rounds alternating.

Each round runs every case once for each tree, in a fresh subprocess with that
tree first on ``PYTHONPATH`` (the order of the two trees alternates round by
round, so a noisy spell on a shared machine hits both alike), then prints, per
case, the medians of msgs/s and of engine CPU µs per delivered message (total
and per role) for each tree, and new/old ratios.  ``--json`` prints every
round's figures instead::

    git worktree add /tmp/ringway-old <commit>
    python3 -m bench.compare_trees /tmp/ringway-old --rounds 5
    python3 -m bench.compare_trees /tmp/ringway-old --cases noop async_1ms --messages 400000
    python3 -m bench.compare_trees /tmp/ringway-old --cases noop --broker redis://127.0.0.1:6379/0

Every subprocess reports the ``engine`` file it measured; a run whose file is not
under the tree it was given fails the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from bench.cpu_per_message import CASES, HERE_TREE

SCRIPT = os.path.join(HERE_TREE, "bench", "cpu_per_message.py")
ROLES = ("total", "dispatcher", "workers", "monitor")
# Default sizes per case: about a second each here.
DEFAULT_MESSAGES = {"noop": 400_000, "async_1ms": 150_000, "cpu_50us": 30_000}


def run_once(tree: str, case: str, messages: int, workers: int, broker: str = "") -> dict[str, Any]:
    """One cpu_per_message run of ``tree`` in its own process; its JSON figures."""
    cmd = [sys.executable, SCRIPT, "--case", case, "--messages", str(messages)]
    cmd += ["--workers", str(workers), "--tree", tree]
    if broker:
        cmd += ["--broker", broker]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ENGINE_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["engine_file"].startswith(os.path.join(tree, "")):
        raise RuntimeError(f"{tree}: the run measured {result['engine_file']}")
    return result


def compare(
    old: str,
    new: str,
    cases: list[str],
    rounds: int,
    messages: int | None,
    workers: int,
    broker: str = "",
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every round's figures: {case: {"old": [...], "new": [...]}}."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"old": [], "new": []} for c in cases}
    for r in range(rounds):
        order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        for case in cases:
            n = messages or DEFAULT_MESSAGES[case]
            for side, tree in order:
                runs[case][side].append(run_once(tree, case, n, workers, broker))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return runs


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median msgs/s, CPU µs per message per role, load average of one side's runs."""
    out = {"msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs)}
    for role in ROLES:
        out[role] = statistics.median(r["cpu_us_per_msg"][role] for r in runs)
    out["load_avg_1m"] = statistics.median(r["load_avg_1m"] for r in runs)
    out["others_cores"] = statistics.median(r["others_cores"] for r in runs)
    return out


def table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """The medians of both sides and new/old per case, as a Markdown table."""
    lines = [
        "| case | tree | msgs/s | CPU µs/msg total | dispatcher | workers | monitor | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, sides in runs.items():
        med = {side: medians(r) for side, r in sides.items()}
        for side in ("old", "new"):
            m = med[side]
            lines.append(
                f"| {case} | {side} | {m['msgs_per_s']:,.0f} | {m['total']:.2f} |"
                f" {m['dispatcher']:.2f} | {m['workers']:.2f} | {m['monitor']:.2f} |"
                f" {m['load_avg_1m']:.2f} |"
            )
        o, n = med["old"], med["new"]
        # A role under one psutil tick per run on the old side has no ratio ("-").
        ratio = [f"{n[k] / o[k]:.2f}x" if o[k] else "-" for k in ("msgs_per_s", *ROLES)]
        lines.append(f"| {case} | new/old | {' | '.join(ratio)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the old source tree (e.g. a git worktree of main)")
    parser.add_argument("--new", default=HERE_TREE, help="the new tree (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["noop", "async_1ms"])
    parser.add_argument("--messages", type=int, default=None, help="per run (default per case)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print every round's figures")
    parser.add_argument(
        "--broker", default="", help="Redis URL: both trees run as one cluster node on it"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.messages is not None and args.messages < 1:
        parser.error("--messages must be at least 1")
    old, new = os.path.abspath(args.old), os.path.abspath(args.new)
    for tree in (old, new):
        if not os.path.isfile(os.path.join(tree, "engine", "__init__.py")):
            parser.error(f"{tree} holds no engine package")
    runs = compare(old, new, args.cases, args.rounds, args.messages, args.workers, args.broker)
    if args.json:
        json.dump(runs, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        mode = f"cluster node on {args.broker}" if args.broker else "embedded"
        print(f"old: {old}\nnew: {new}\n{mode}; rounds: {args.rounds}, medians\n")
        print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
