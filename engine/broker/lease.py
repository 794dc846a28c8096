"""A partition lease as this node holds it, and how long it surely holds.

A renewal sent at local time ``t`` keeps the lease key alive until at least
``t + ttl`` in Redis's clock; the node counts the lease valid until
``t + ttl - margin`` on its own monotonic clock and publishes that deadline to
its workers (`ipc.fence`), so after a pause the node and its workers both see
it passed before another node can have taken the partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipc.fence import now_ms

MARGIN_FRACTION = 0.1  # of the TTL: clock-rate differences and Redis's expiry granularity
MAX_TICK_S = 0.5


@dataclass(eq=False)
class Lease:
    """This node's hold on one partition under one epoch."""

    partition: int
    epoch: int
    token: str  # "node/epoch", the lease key's value
    deadline_ms: int  # local monotonic ms until which the lease surely holds
    lost: bool = False
    leaving: bool = False  # being given back: settle, ack, release

    def valid(self) -> bool:
        return not self.lost and now_ms() < self.deadline_ms


def tick_s(ttl_s: float) -> float:
    """How often a node heartbeats, renews and balances: well inside the TTL."""
    return min(ttl_s / 4, MAX_TICK_S)


def margin_ms(ttl_ms: int) -> int:
    return max(5, int(ttl_ms * MARGIN_FRACTION))
