"""Partitions: recipient -> partition, the Redis key names, and who should own what.

Recipients map to partitions with the same stable hash as to worker shards
(crc32), so a recipient's messages live in one stream and keep their order.
Every key of one partition carries the hash tag ``{p<i>}``: on Redis Cluster
they share a slot, so the Lua scripts that touch a partition stay legal there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from engine.core.sharding import Sharder

GROUP = "ringway"  # the one consumer group of every partition stream


class Keys:
    """Every Redis key and channel name of one namespace."""

    def __init__(self, namespace: str, partitions: int) -> None:
        ns = namespace
        self.namespace = ns
        self.partitions = partitions
        self.meta = f"{ns}:meta"  # hash: partitions, created
        self.node_seq = f"{ns}:node-seq"  # INCR: a number per node start, for message ids
        self.nodes = f"{ns}:nodes"  # zset: node -> heartbeat expiry (Redis ms)
        self.dlq = f"{ns}:dlq"
        self.streams = [f"{ns}:{{p{i}}}:stream" for i in range(partitions)]
        self.leases = [f"{ns}:{{p{i}}}:lease" for i in range(partitions)]
        self.epochs = [f"{ns}:{{p{i}}}:epoch" for i in range(partitions)]
        self.consumers = [f"p{i}" for i in range(partitions)]

    def node_info(self, node: str) -> str:
        return f"{self.namespace}:node:{node}"

    def replies(self, node: str) -> str:
        """The pub/sub channel where a node receives replies and settle notices."""
        return f"{self.namespace}:replies:{node}"

    def dedup(self, partition: int, recipient: str, key: str) -> bytes:
        """Per recipient: a broadcast with one dedup_key must reach every recipient once."""
        prefix = f"{self.namespace}:{{p{partition}}}:dedup:"
        return prefix.encode() + recipient.encode("utf-8", "surrogatepass") + b"\0" + key.encode()


class Partitioner(Sharder):
    """recipient -> partition; the shard function with the namespace's partition count."""


def _score(node: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{node}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assignment(nodes: Sequence[str], partitions: int) -> dict[int, str]:
    """Who should own each partition: rendezvous hashing with a load cap.

    Each partition goes to its highest-scoring live node that still has fewer than
    ``ceil(P / N)``; every node computes the same answer from the same live set, so
    shares are fair (they differ by at most one) and a node joining or leaving
    moves few partitions (those it takes or gives up, and a few shifted by the cap).
    """
    if not nodes:
        return {}
    live = sorted(set(nodes))
    cap = math.ceil(partitions / len(live))
    load = dict.fromkeys(live, 0)
    owner: dict[int, str] = {}
    for p in range(partitions):
        for node in sorted(live, key=lambda n: _score(n, p), reverse=True):
            if load[node] < cap:
                owner[p] = node
                load[node] += 1
                break
    return owner
