"""The named scenarios and suite sizes of ``engine stress``.

A scenario fixes the mock core's behaviour (success rate, delay), the message
types and the retry policy; a suite fixes the size.  Retries are part of the
scenario because the engine's defaults (5 attempts, 0.1 s base backoff) make a
failing recipient hold its lane for tenths of a second: fine in production,
but a ``failure`` run of a few thousand messages would then take minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.stress.generator import MESSAGE_TYPES


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One workload shape: what the mock core does and how the engine retries."""

    name: str
    description: str
    success_rate: float  # ENGINE_MOCK_SUCCESS_RATE
    delay_s: float  # ENGINE_MOCK_DELAY_S
    message_types: tuple[str, ...]
    retry_max_attempts: int  # ENGINE_RETRY_MAX_ATTEMPTS, the first attempt included
    retry_backoff_base_s: float  # ENGINE_RETRY_BACKOFF_BASE_S; doubles per attempt
    retry_backoff_max_s: float  # ENGINE_RETRY_BACKOFF_MAX_S


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="max",
            description="throughput ceiling: every delivery succeeds after 0.1 ms, direct only",
            success_rate=1.0,
            delay_s=0.0001,
            message_types=("direct",),
            retry_max_attempts=5,
            retry_backoff_base_s=0.01,
            retry_backoff_max_s=1.0,
        ),
        Scenario(
            name="realistic",
            description="5% of deliveries fail and are retried, 1 ms each, all four types",
            success_rate=0.95,
            delay_s=0.001,
            message_types=MESSAGE_TYPES,
            retry_max_attempts=5,
            retry_backoff_base_s=0.01,
            retry_backoff_max_s=1.0,
        ),
        Scenario(
            name="failure",
            description="20% of deliveries fail, 5 ms each, 3 attempts then the dead-letter queue",
            success_rate=0.80,
            delay_s=0.005,
            message_types=MESSAGE_TYPES,
            retry_max_attempts=3,
            retry_backoff_base_s=0.005,
            retry_backoff_max_s=0.05,
        ),
    )
}

# Messages each agent sends (a broadcast counts once here and fans out to every agent).
SUITES: dict[str, int] = {"small": 1_000, "medium": 10_000, "large": 100_000}
DEFAULT_AGENTS = 9
