"""What the balancer and the partition consumers need of their node, as a Protocol.

`engine.broker.node.ClusterNode` is the one implementation; this seam keeps
the node's parts from importing the node that assembles them.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from engine.broker.lease import Lease
    from engine.broker.partitions import Keys
    from engine.broker.replies import Replies
    from engine.config import Config
    from engine.core.dispatcher import Dispatcher
    from ipc.fence import FenceTable


class Host(Protocol):
    node_id: str
    config: Config
    keys: Keys
    client: Redis
    reader: Redis  # for blocking reads only
    fence: FenceTable
    replies: Replies
    counts: dict[str, int]

    def dispatcher(self) -> Dispatcher: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def announcement(self) -> dict[str, Any]: ...

    async def create_group(self, p: int) -> None: ...

    def partition_acquired(self, lease: Lease) -> None: ...

    def partition_lost(self, lease: Lease) -> None: ...

    def may_acquire(self, p: int) -> bool: ...

    async def partition_finish(self, lease: Lease) -> None: ...

    def on_consumer_lost(self, lease: Lease, reason: str) -> None: ...
