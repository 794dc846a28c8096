"""The seam between the embedded `Engine` and cluster mode (``ENGINE_BROKER``).

With a broker URL configured, an `Engine` is a cluster node: its local
dispatcher, monitor and workers deliver what the node's partitions hold, and
its submit, request, drain, stats and dead-letter calls go through the node
(Redis Streams) instead of straight into the rings.  This module is the
contract the engine sees, so ``engine.core`` never imports the broker package:
the implementation, ``engine.broker.node.ClusterNode``, is looked up by name
only when a node starts, which keeps redis out of every embedded import (and
the package map's arrows pointing down: ``engine.broker`` builds on the core).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from engine.core.deadletters import DeadLetterView

IMPLEMENTATION = "engine.broker.node"

Mark = tuple[int, int, int]
Outgoing = tuple[int, str, int, bytes]


class Cluster(Protocol):
    """What an `Engine` in cluster mode delegates to its node."""

    async def start(self) -> None: ...

    async def stop(self, timeout: float, fast: bool) -> None: ...

    async def send(
        self, outs: list[Outgoing], dedup_key: str, settled: bool
    ) -> tuple[list[int], list[Mark]]: ...

    async def submit_marked(
        self, items: Iterable[tuple[str, Any]], options: Any, settled: bool, raw_checked: bool
    ) -> tuple[list[int], list[Mark]]: ...

    async def wait_settled(self, marks: Sequence[Mark]) -> None: ...

    async def request(self, out: Outgoing, correlation_id: int, timeout: float) -> Any: ...

    async def drain(self, timeout: float | None) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    async def refresh_stats(self) -> None: ...

    async def dead_letters(self) -> list[DeadLetterView]: ...

    async def replay_dead_letters(self) -> int: ...


def load_cluster(engine: Any) -> Cluster:
    """The node for ``engine`` (not started); it wraps the workers' sink in its lease fence."""
    module = importlib.import_module(IMPLEMENTATION)
    node: Cluster = module.ClusterNode(engine)
    return node
