"""Recipient -> shard routing with a stable hash (never Python's salted ``hash()``).

The same recipient must land on the same worker in every process and every
run, or per-recipient order would break across a restart.
"""

from __future__ import annotations

import zlib

_CACHE_MAX = 1 << 20


class Sharder:
    """Maps recipients to shards with crc32, caching recent answers."""

    __slots__ = ("cache", "shards")

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self.cache: dict[str, int] = {}

    def __call__(self, recipient: str) -> int:
        shard = self.cache.get(recipient)
        if shard is None:
            shard = stable_shard(recipient, self.shards)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()  # bounded memory with millions of recipients
            self.cache[recipient] = shard
        return shard


def stable_shard(recipient: str, shards: int) -> int:
    return zlib.crc32(recipient.encode("utf-8", "surrogatepass")) % shards
