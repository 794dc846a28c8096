"""Cluster nodes as real processes for the fault tests, a paced load, and the checks.

Each node is ``python -m engine serve --broker ...`` (tests/integration/service_proc.py)
in its own process group, with the chaos suite's recording handler writing to a
directory of its own, so every delivery is known with its node, process and
time.  The load runs on a thread with its own event loop and records what was
acknowledged (accepted = in Redis); the checker then compares deliveries with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from engine.broker.partitions import Keys
from engine.client.aio import AsyncClient
from tests.broker.redis_proc import RedisServer
from tests.chaos import recorder
from tests.chaos.checker import DeliveryCheck, check
from tests.chaos.recorder import ANSWERED, DELIVERED, Delivery
from tests.integration.service_proc import ServiceProc, start_service

PARTITIONS = 16
TTL_S = 1.0


def partition_of(recipient: str, partitions: int = PARTITIONS) -> int:
    return zlib.crc32(recipient.encode()) % partitions


@dataclass
class Cluster:
    """Nodes of one namespace on one Redis; every node is stopped (or killed) at the end."""

    tmp: Path
    redis: RedisServer
    namespace: str = "rw"
    ttl_s: float = TTL_S
    nodes: dict[str, ServiceProc] = field(default_factory=dict)
    handler: str = "tests.chaos.handlers:record"

    def __post_init__(self) -> None:
        self.keys = Keys(self.namespace, PARTITIONS)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def record_dir(self, node: str) -> Path:
        d = self.tmp / "records" / node
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self, node: str, **env: str) -> ServiceProc:
        svc = start_service(
            self.tmp,
            ENGINE_BROKER=self.redis.url,
            ENGINE_NAMESPACE=self.namespace,
            ENGINE_PARTITIONS=str(PARTITIONS),
            ENGINE_LEASE_TTL_S=str(self.ttl_s),
            ENGINE_NODE_ID=node,
            ENGINE_WORKERS="2",
            ENGINE_HANDLER=self.handler,
            ENGINE_SHUTDOWN_TIMEOUT_S="20",
            ENGINE_STALL_TIMEOUT_S="60",
            CHAOS_RECORD_DIR=str(self.record_dir(node)),
            **env,
        )
        self.nodes[node] = svc
        return svc

    def close(self) -> None:
        for svc in self.nodes.values():
            if svc.proc.poll() is None:
                with_signal(svc, signal.SIGCONT)
                svc.stop(timeout=30)

    def owners(self) -> dict[int, str]:
        """Who holds each partition's lease now (from Redis)."""
        with self.client() as r:
            values = r.mget(self.keys.leases)
        return {p: v.decode().rpartition("/")[0] for p, v in enumerate(values) if v}

    def epochs(self) -> dict[int, int]:
        with self.client() as r:
            values = r.mget(self.keys.epochs)
        return {p: int(v or 0) for p, v in enumerate(values)}

    def wait_balanced(self, nodes: list[str], timeout: float = 30.0) -> dict[int, str]:
        """Until every partition is held and each of ``nodes`` holds its fair share."""
        deadline = time.monotonic() + timeout
        share = PARTITIONS // len(nodes)
        while True:
            owners = self.owners()
            counts = {n: sum(1 for o in owners.values() if o == n) for n in nodes}
            if len(owners) == PARTITIONS and all(c >= share for c in counts.values()):
                return owners
            if time.monotonic() > deadline:
                raise AssertionError(f"not balanced over {nodes} in {timeout}s: {owners}")
            time.sleep(0.05)

    def deliveries(self) -> list[tuple[str, Delivery]]:
        """(node, delivery) for every recorded handler call, in time order."""
        out: list[tuple[str, Delivery]] = []
        for node in self.nodes:
            out += [(node, d) for d in recorder.read_all(self.record_dir(node))]
        out.sort(key=lambda nd: nd[1].t_ns)
        return out

    def wait_delivered(self, expected: dict[int, tuple[str, int]], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if sum(recorder.count_all(self.record_dir(n)) for n in self.nodes) >= len(expected):
                seen = {d.uid for _, d in self.deliveries() if d.kind in (DELIVERED, ANSWERED)}
                if all(uid in seen for uid in expected):
                    return
            if time.monotonic() > deadline:
                return  # the checker reports what is missing
            time.sleep(0.1)


def with_signal(svc: ServiceProc, sig: int) -> None:
    """Send ``sig`` to the node's whole process group (dispatcher, monitor, workers)."""
    try:
        os.killpg(svc.proc.pid, sig)
    except ProcessLookupError:
        return


def verdict(expected: dict[int, tuple[str, int]], got: list[tuple[str, Delivery]]) -> DeliveryCheck:
    return check(expected, [d for _, d in got])


def owner_runs(got: list[tuple[str, Delivery]]) -> dict[int, int]:
    """Per partition: how many runs of one node its deliveries form, in time order.

    Two owners at once would interleave; each run needs its own lease acquisition,
    so runs <= acquisitions (the epoch counter) proves one owner at a time.
    """
    last: dict[int, str] = {}
    runs: dict[int, int] = defaultdict(int)
    for node, d in got:
        if d.kind not in (DELIVERED, ANSWERED):
            continue
        p = partition_of(d.recipient)
        if last.get(p) != node:
            runs[p] += 1
            last[p] = node
    return dict(runs)


class Load:
    """Sends ``n`` messages [uid, seq] to ``recipients`` through one node, paced, on a thread."""

    def __init__(
        self, url: str, n: int, recipients: int = 40, rate: float = 4000, frame: int = 100
    ):
        self.url = url
        self.n = n
        self.recipients = [f"R{i}" for i in range(recipients)]
        self.rate = rate
        self.frame = frame
        self.accepted: dict[int, tuple[str, int]] = {}
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.started = 0.0

    def start(self) -> Load:
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load did not finish"

    def _run(self) -> None:
        asyncio.run(self._send())

    async def _send(self) -> None:
        seqs: dict[str, int] = defaultdict(int)
        self.started = time.monotonic()
        async with AsyncClient(self.url) as client:
            for start in range(0, self.n, self.frame):
                batch: list[tuple[str, Any]] = []
                meta = []
                for uid in range(start, min(self.n, start + self.frame)):
                    r = self.recipients[uid % len(self.recipients)]
                    seq = seqs[r]
                    seqs[r] += 1
                    batch.append((r, [uid, seq]))
                    meta.append((uid, r, seq))
                try:
                    await client.submit_many(batch)
                except Exception as exc:  # the test asserts on these
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                for uid, r, seq in meta:
                    self.accepted[uid] = (r, seq)
                due = self.started + (start + self.frame) / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
