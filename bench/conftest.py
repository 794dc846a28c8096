"""Collects each transport's median rate during the run and prints the ring's ratios.

The ratios go to pytest's terminal summary so they are visible without ``-s``,
also under ``--benchmark-only`` and ``-q``, next to pytest-benchmark's own table.
"""

from __future__ import annotations

import pytest

from bench.baselines import Medians, ratio_lines

RESULTS = pytest.StashKey[Medians]()


@pytest.fixture(scope="session")
def transport_results(pytestconfig: pytest.Config) -> Medians:
    """Where benchmarks put their median msgs/s, keyed by table title and case."""
    return pytestconfig.stash.setdefault(RESULTS, {})


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    for title, medians in config.stash.get(RESULTS, {}).items():
        terminalreporter.write_sep("-", f"ring-transport: {title}")
        for line in ratio_lines(medians):
            terminalreporter.write_line(line)
