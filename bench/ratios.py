"""Side-by-side runs and the Ringway / baseline ratio tables of the newer groups.

Every group measures Ringway and its baselines in the same test, round by round
with the order rotating (``side_by_side``), so a noisy spell on this shared
machine hits all sides alike; ``record_rates`` puts the medians in
``extra_info`` and, with benchmarks enabled, in a ``GroupTable`` that
bench/conftest.py prints in the terminal summary next to the older tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

RINGWAY = "ringway"  # the side every ratio is taken against


class Rated(Protocol):
    """Any timed run: an EngineRun, a BaselineRun."""

    @property
    def msgs_per_s(self) -> float: ...


R = TypeVar("R", bound=Rated)


@dataclass
class GroupTable:
    """One group's medians: case -> side -> msgs/s, plus free-form lines (latencies, lost)."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Tables = dict[str, GroupTable]  # group title -> table, in the order the groups ran


def side_by_side(
    benchmark: BenchmarkFixture, sides: Mapping[str, Callable[[], R]], rounds: int
) -> dict[str, list[R]]:
    """Run each side once per round under ``benchmark.pedantic``, rotating the order.

    No side always runs first (warm caches, a neighbour's burst): what one round
    does to one side it does, on average, to all.
    """
    names = list(sides)
    runs: dict[str, list[R]] = {name: [] for name in names}
    done = [0]

    def one_round() -> None:
        k = done[0] % len(names)
        done[0] += 1
        for name in names[k:] + names[:k]:
            runs[name].append(sides[name]())

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)  # type: ignore[no-untyped-call]
    return runs


def record_rates(
    benchmark: BenchmarkFixture,
    tables: Tables,
    title: str,
    case: str,
    runs: Mapping[str, list[R]],
    **extra: Any,
) -> dict[str, float]:
    """Medians into ``extra_info`` (``msgs_per_s`` is Ringway's) and, when enabled, the table.

    Returns the medians by side.  Smoke-size figures stay out of the table: they
    would only be noise in a test run's summary.
    """
    medians = {side: statistics.median(r.msgs_per_s for r in rs) for side, rs in runs.items()}
    ring = medians.get(RINGWAY, 0.0)
    ratios = {side: ring / rate for side, rate in medians.items() if side != RINGWAY and rate > 0}
    benchmark.extra_info.update(
        msgs_per_s=ring,
        baseline_msgs_per_s={s: v for s, v in medians.items() if s != RINGWAY},
        ratio=ratios,
        msgs_per_s_rounds={side: [r.msgs_per_s for r in rs] for side, rs in runs.items()},
        **extra,
    )
    if benchmark.enabled:
        tables.setdefault(title, GroupTable()).rows[case] = medians
    cells = ", ".join(f"{s} {v:,.0f}" for s, v in medians.items())
    print(f"\n{title} {case}: msgs/s {cells}; " + ", ".join(_ratio_texts(ratios)))
    return medians


def note(benchmark: BenchmarkFixture, tables: Tables, title: str, line: str) -> None:
    """A line printed under the group's table (and now, for -s), e.g. latencies or lost."""
    print(f"\n{title}: {line}")
    if benchmark.enabled:
        tables.setdefault(title, GroupTable()).notes.append(line)


def _ratio_texts(ratios: Mapping[str, float]) -> list[str]:
    return [f"{RINGWAY}/{side} {r:.2f}x" for side, r in ratios.items()]


def table_lines(table: GroupTable) -> list[str]:
    """The medians as columns, each baseline cell with Ringway's ratio to it."""
    sides = list(dict.fromkeys(s for row in table.rows.values() for s in row))
    sides.sort(key=lambda s: s != RINGWAY)  # Ringway first, the baselines in run order
    width = max([len(c) for c in table.rows] + [4])
    cell = max(len(s) for s in sides) + 2 if sides else 0
    cell = max(cell, 20)
    lines = [f"  {'case':<{width}} " + " ".join(f"{s:>{cell}}" for s in sides)] if sides else []
    for case, row in table.rows.items():
        ring = row.get(RINGWAY)
        cells = []
        for side in sides:
            rate = row.get(side)
            if rate is None:
                text = "-"
            elif side == RINGWAY or not ring or rate <= 0:
                text = f"{rate:,.0f}"
            else:
                text = f"{rate:,.0f} ({ring / rate:.2f}x)"
            cells.append(f"{text:>{cell}}")
        lines.append(f"  {case:<{width}} " + " ".join(cells))
    lines += [f"  {line}" for line in table.notes]
    if table.rows:
        lines.append(
            "  msgs/s medians; (N.NNx) = Ringway / that baseline, measured side by side;"
            " reported, never asserted"
        )
    return lines
