"""Per-user rate limits: a token bucket per user, and the per-user counts ``/metrics`` shows.

``ENGINE_RATE_LIMIT`` messages a second per user (0 = no limit), with bursts
up to ``ENGINE_RATE_BURST`` (0 = one second's worth).  A frame or HTTP body of
n messages (or n batch requests) takes n tokens at once, a request, publish or
broadcast one; one larger than the burst is admitted when
the bucket is full and leaves it in debt, so the long-run rate holds whatever
the frame sizes (a client's natural batches may exceed the burst).  Over the
limit nothing of the frame is queued: HTTP answers 429 with ``Retry-After``,
the binary protocol ``Error(code="rate_limited", retry_after_s)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class UserLimits:
    """The buckets of every user seen, and what each user sent and had refused."""

    def __init__(
        self, rate: float, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"need rate >= 0 and burst >= 0, got {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at)
        self.messages: dict[str, int] = {}  # per user: messages admitted
        self.limited: dict[str, int] = {}  # per user: frames or bodies refused

    def admit(self, user: str, n: int = 1) -> float:
        """Take ``n`` tokens of ``user``'s bucket: 0.0 when admitted, else the seconds to wait."""
        if self.rate:
            now = self.clock()
            tokens, at = self._buckets.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            need = min(float(n), self.burst)
            if tokens < need:
                self._buckets[user] = (tokens, now)
                self.limited[user] = self.limited.get(user, 0) + 1
                return (need - tokens) / self.rate
            self._buckets[user] = (tokens - n, now)
        self.messages[user] = self.messages.get(user, 0) + n
        return 0.0

    def counts(self) -> dict[str, dict[str, int]]:
        """{user: {"messages": admitted, "rate_limited": refusals}} for every user seen."""
        users = set(self.messages) | set(self.limited)
        return {
            u: {"messages": self.messages.get(u, 0), "rate_limited": self.limited.get(u, 0)}
            for u in sorted(users)
        }


def limited_reason(user: str, wait_s: float, rate: float) -> str:
    """The words of a refusal (the same over HTTP and the binary protocol)."""
    who = f"user {user!r}" if user else "this client"
    return f"{who} is over ENGINE_RATE_LIMIT={rate:g} messages/s; retry in {wait_s:.3f}s"
