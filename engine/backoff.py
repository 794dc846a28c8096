"""The one exponential backoff of the engine: worker retries, respawns, restarts, reconnects.

Every retry loop in Ringway waits ``min(max_s, base_s * 2**attempt)``, shaped by
a jitter mode: ``full`` (uniform in [0, ceiling], the AWS architecture blog's
choice for many competing clients), ``equal`` (half fixed, half random: never
retries at once) or ``none`` (deterministic, for a single supervisor).
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["full", "equal", "none"]
_MAX_SHIFT = 64  # past this the ceiling is max_s anyway; avoids building huge ints


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    *,
    jitter: Jitter = "full",
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    ceiling = max_s if attempt >= _MAX_SHIFT else min(max_s, base_s * (1 << attempt))
    if jitter == "none":
        return ceiling
    uniform = (rng or random).uniform
    if jitter == "equal":
        return ceiling / 2 + uniform(0.0, ceiling / 2)
    return uniform(0.0, ceiling)
