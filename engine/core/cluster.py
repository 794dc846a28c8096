"""The seam between the embedded `Engine` and cluster mode (``ENGINE_BROKER``).

With a broker URL configured, an `Engine` is a cluster node: its local
dispatcher, monitor and workers deliver what the node's partitions hold, and
its submit, request, drain, stats and dead-letter calls go through the node
(Redis Streams) instead of straight into the rings.  This module is the
contract the engine sees, so ``engine.core`` never imports the broker package
(``engine.broker`` builds on the core): the ``engine`` package, above both,
registers the node's factory here, and the factory imports the broker (and
redis) only when a node starts, so an embedded engine never loads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import EngineStartError

if TYPE_CHECKING:
    from engine.core.deadletters import DeadLetterView, ReplayReport

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

    async def dead_letters(self) -> list[tuple[tuple[int, int], DeadLetterView]]:
        """(position, letter) of the DLQ stream, oldest first; positions only grow."""
        ...

    async def replay_dead_letters(self) -> ReplayReport: ...


_factory: Callable[[Any], Cluster] | None = None


def register(factory: Callable[[Any], Cluster]) -> None:
    """Install what builds a node for an engine (the ``engine`` package does, at import)."""
    global _factory  # noqa: PLW0603 - one process-wide seam, set once at import
    _factory = factory


def load_cluster(engine: Any) -> Cluster:
    """The node for ``engine`` (not started); it wraps the workers' sink in its lease fence."""
    if _factory is None:
        raise EngineStartError(
            "ENGINE_BROKER is set but no cluster implementation is registered "
            "(import the engine package: it registers engine.broker)"
        )
    return _factory(engine)
