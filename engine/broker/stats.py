"""Cluster stats: the nodes, who owns each partition, backlog and pending per partition.

Read from Redis in one pipeline (heartbeat zset and node announcements, each
partition's lease holder and ``XINFO GROUPS``, the DLQ length), so any node
shows the same cluster.  ``backlog`` is the group's ``lag``: entries past the
last one delivered to an owner; ``pending`` is delivered but unacknowledged.
A stream entry holds a batch of messages, so both count entries.
``Engine.stats()`` is synchronous: it shows the last snapshot and starts a
refresh when that is older than ``REFRESH_S``; ``GET /stats`` waits for a
fresh one.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from engine.broker.connection import TRANSIENT
from engine.broker.partitions import GROUP, Keys

REFRESH_S = 0.5


class ClusterStats:
    """The latest cluster snapshot and the refresh that replaces it."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.snapshot: dict[str, Any] = {}
        self.taken = 0.0
        self.error = ""
        self._refresh: asyncio.Task[None] | None = None

    def stale(self) -> bool:
        return time.monotonic() - self.taken > REFRESH_S

    def refresh_soon(self) -> None:
        if self.stale() and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(keys.nodes, 0, -1, withscores=True)
        pipe.time()
        for p in range(keys.partitions):
            pipe.get(keys.leases[p])
            pipe.xinfo_groups(keys.streams[p])
            pipe.xlen(keys.streams[p])
        pipe.xlen(keys.dlq)
        try:
            out = await pipe.execute(raise_on_error=False)
        except TRANSIENT as exc:  # Redis away: keep the last snapshot and say why
            self.error = f"{type(exc).__name__}: {exc}"
            return
        nodes_scored, (secs, micros) = out[0], out[1]
        redis_ms = int(secs) * 1000 + int(micros) // 1000
        names = [n.decode() for n, _ in nodes_scored] if isinstance(nodes_scored, list) else []
        infos: list[Any] = []
        if names:
            infos = await self.client.mget([keys.node_info(n) for n in names])
        owners: dict[str, list[int]] = {n: [] for n in names}
        table = []
        backlog = pending = 0
        for p in range(keys.partitions):
            holder, groups, length = out[2 + 3 * p : 5 + 3 * p]
            owner, epoch = "", 0
            if isinstance(holder, bytes):
                owner, _, e = holder.decode().rpartition("/")
                epoch = int(e) if e.isdigit() else 0
                owners.setdefault(owner, []).append(p)
            lag, pend = _group_figures(groups)
            backlog += lag
            pending += pend
            table.append(
                {
                    "partition": p,
                    "owner": owner,
                    "epoch": epoch,
                    "backlog": lag,
                    "pending": pend,
                    "length": length if isinstance(length, int) else 0,
                }
            )
        nodes = []
        scores = dict(nodes_scored) if isinstance(nodes_scored, list) else {}
        for name, raw in zip(names, infos, strict=True):
            info = json.loads(raw) if raw else {}
            expiry = scores.get(name.encode(), 0)
            nodes.append(
                {
                    "node": name,
                    "partitions": owners.get(name, []),
                    "heartbeat_expires_in_s": round((float(expiry) - redis_ms) / 1000, 3),
                    **info,
                }
            )
        dlq = out[-1] if isinstance(out[-1], int) else 0
        self.snapshot = {
            "nodes": nodes,
            "partition_table": table,
            "backlog": backlog,
            "pending": pending,
            "dlq_length": dlq,
            "unowned": [row["partition"] for row in table if not row["owner"]],
        }
        self.error = ""
        self.taken = time.monotonic()

    def view(self) -> dict[str, Any]:
        age = time.monotonic() - self.taken if self.taken else None
        return {**self.snapshot, "snapshot_age_s": age, "snapshot_error": self.error}


def _group_figures(groups: Any) -> tuple[int, int]:
    """(lag, pending) of the ringway group; lag None (after deletions) counts as unknown: 0."""
    if not isinstance(groups, list):
        return 0, 0
    for g in groups:
        name = g.get("name")
        if name in (GROUP, GROUP.encode()):
            lag = g.get("lag")
            return int(lag) if lag is not None else 0, int(g.get("pending", 0))
    return 0, 0
