"""Collects each benchmark's medians during the run and prints the ratios at the end.

The ratios go to pytest's terminal summary so they are visible without ``-s``,
also under ``--benchmark-only`` and ``-q``, next to pytest-benchmark's own table:
the ring's and the engine workloads' own tables, then one Ringway / baseline
table per newer group (bench.ratios).
"""

from __future__ import annotations

import pytest

from bench.baselines import Medians, ratio_lines
from bench.engine_baselines import EngineSummary, summary_lines
from bench.ratios import Tables, table_lines

RESULTS = pytest.StashKey[Medians]()
ENGINE_RESULTS = pytest.StashKey[EngineSummary]()
GROUP_RESULTS = pytest.StashKey[Tables]()


@pytest.fixture(scope="session")
def transport_results(pytestconfig: pytest.Config) -> Medians:
    """Where benchmarks put their median msgs/s, keyed by table title and case."""
    return pytestconfig.stash.setdefault(RESULTS, {})


@pytest.fixture(scope="session")
def engine_summary(pytestconfig: pytest.Config) -> EngineSummary:
    """Where the engine-workloads benchmarks put their medians, latency and RSS."""
    return pytestconfig.stash.setdefault(ENGINE_RESULTS, EngineSummary())


@pytest.fixture(scope="session")
def group_tables(pytestconfig: pytest.Config) -> Tables:
    """Where the scaling, priority, latency and recovery groups put their medians."""
    return pytestconfig.stash.setdefault(GROUP_RESULTS, {})


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    for title, medians in config.stash.get(RESULTS, {}).items():
        terminalreporter.write_sep("-", f"ring-transport: {title}")
        for line in ratio_lines(medians):
            terminalreporter.write_line(line)
    engine = config.stash.get(ENGINE_RESULTS, None)
    if engine is not None and (engine.rates or engine.latency):
        terminalreporter.write_sep("-", "engine-workloads: median msgs/s, side by side")
        for line in summary_lines(engine):
            terminalreporter.write_line(line)
    for title, table in config.stash.get(GROUP_RESULTS, {}).items():
        terminalreporter.write_sep("-", f"{title}: median msgs/s, Ringway / baseline")
        for line in table_lines(table):
            terminalreporter.write_line(line)
