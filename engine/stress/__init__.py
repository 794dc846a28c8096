"""The stress harness behind ``engine stress``: agents, four message types, the mock core.

`StressTestRunner` drives a real engine (dispatcher here, monitor and workers
as processes) with a streaming `MessageGenerator` and the engine's ``mock``
sink, samples it into a `MetricsCollector` (counters, histograms, a bounded
time series; never per-message records) and returns a `StressReport` whose
checks say whether every generated message was delivered, dead-lettered or
expired.
"""

from engine.stress.generator import MESSAGE_TYPES, GeneratedMessage, MessageGenerator
from engine.stress.metrics import GaugeStats, MetricsCollector
from engine.stress.report import Check, StressReport
from engine.stress.runner import StressTestRunner
from engine.stress.scenarios import SCENARIOS, SUITES, Scenario

__all__ = [
    "MESSAGE_TYPES",
    "SCENARIOS",
    "SUITES",
    "Check",
    "GaugeStats",
    "GeneratedMessage",
    "MessageGenerator",
    "MetricsCollector",
    "Scenario",
    "StressReport",
    "StressTestRunner",
]
