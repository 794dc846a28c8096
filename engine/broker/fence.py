"""Worker side of the lease fence: the node's sink runs inside a check of its lease.

In cluster mode the workers' handler is one of these wrappers around the
configured sink (python handler, mock, inbox, null).  Before each delivery it
reads the partition's deadline from the node's `FenceTable`; once the lease
may be gone the message is dropped here, unseen by the handler, and the node
never acknowledges it (the next owner delivers it).  This is what keeps a
node that was paused past its lease from delivering beside the new owner.

Workers import this module (the wrapper travels to them pickled by
reference), so it imports nothing else of ``engine.broker``.
"""

from __future__ import annotations

import zlib
from typing import Any

from engine.config import Config
from engine.worker.sinks import Sink, make_sink
from ipc.codec import Message
from ipc.fence import FenceReader, FenceTable, now_ms

_CACHE_MAX = 1 << 16


class FencedDelivery:
    """A sync sink behind the fence (see the module docstring); built in each worker."""

    def __init__(self, table_name: str, partitions: int, config: Config, handler: Any) -> None:
        self.table_name = table_name
        self.partitions = partitions
        self.config = config
        self.handler = handler
        self._table: FenceTable | None = None
        self._reader: FenceReader | None = None
        self._sink: Sink | None = None
        self._partition_of: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_table=None, _reader=None, _sink=None, _partition_of={})
        return state

    def _inner(self) -> Sink:
        if self._sink is None:
            self._table = FenceTable.attach(self.table_name, self.partitions)
            self._reader = FenceReader(self._table)
            self._sink = make_sink(self.config, self.handler)
        return self._sink

    def allowed(self, msg: Message) -> bool:
        """True while this node's lease on the message's partition surely holds."""
        cache = self._partition_of
        p = cache.get(msg.recipient)
        if p is None:
            p = zlib.crc32(msg.recipient.encode("utf-8", "surrogatepass")) % self.partitions
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[msg.recipient] = p
        reader = self._reader
        assert reader is not None
        return reader.allows(p, now_ms())

    def __call__(self, msg: Message) -> Any:
        sink = self._inner()
        if self.allowed(msg):
            return sink.deliver(msg)
        return None


class FencedAsyncDelivery(FencedDelivery):
    """The same for sinks whose deliveries are awaitables (async handlers, a delayed mock)."""

    async def __call__(self, msg: Message) -> Any:
        sink = self._inner()
        if self.allowed(msg):
            return await sink.deliver(msg)
        return None


def fenced_handler(table_name: str, partitions: int, config: Config, handler: Any) -> Any:
    """The workers' handler for a node: the configured sink behind the fence.

    The sink is built here once to learn whether it is async and to fail the
    start with its own error (a handler that cannot be imported), then again
    inside each worker.
    """
    probe = make_sink(config, handler)
    try:
        cls = FencedAsyncDelivery if probe.is_async else FencedDelivery
    finally:
        probe.close()
    return cls(table_name, partitions, config, handler)
