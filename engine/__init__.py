"""Ringway: a multiprocess message delivery engine over shared-memory rings.

Kept import-light: ``Engine`` (which pulls in the process machinery) loads on
first use, so ``engine --help`` and config checks start fast.
"""

from typing import TYPE_CHECKING, Any

from engine.batches import BatchRequest, BatchResult, BatchResults
from engine.config import Config, ConfigError
from engine.core import cluster as _cluster
from engine.errors import (
    DrainTimeout,
    EngineClosed,
    EngineError,
    EngineStartError,
    QueueFull,
    RateLimited,
    Reject,
    RequestFailed,
    RequestTimeout,
    Retry,
)
from ipc.codec import Kind, Message, Priority

if TYPE_CHECKING:
    from engine.core.engine import Engine
    from engine.core.sync import SyncEngine

__version__ = "0.1.0"

__all__ = [
    "BatchRequest",
    "BatchResult",
    "BatchResults",
    "Config",
    "ConfigError",
    "DrainTimeout",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineStartError",
    "Kind",
    "Message",
    "Priority",
    "QueueFull",
    "RateLimited",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Retry",
    "SyncEngine",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.core.engine import Engine

        return Engine
    if name == "SyncEngine":
        from engine.core.sync import SyncEngine

        return SyncEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def _cluster_node(engine: Any) -> Any:
    """Cluster mode's node for ``engine``: imported only when a broker URL is configured."""
    from engine.broker.node import ClusterNode

    return ClusterNode(engine)


# The package sits above both engine.core and engine.broker, so it wires them here.
_cluster.register(_cluster_node)
