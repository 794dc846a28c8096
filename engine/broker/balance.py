"""Heartbeats, leases and balance: which partitions this node owns, and for how long surely.

Every tick (a quarter of the lease TTL, at most 0.5 s) a node:

1. announces itself (`scripts.HEARTBEAT`: a zset of nodes scored by expiry in
   Redis time, which also returns the live nodes);
2. renews the leases it holds, in one pipeline;
3. computes the fair assignment over the live nodes (`partitions.assignment`),
   takes the partitions assigned to it whose leases are free, and gives back
   those assigned elsewhere once it has settled and acknowledged what it read
   of them.  It never takes a lease another node holds, so a partition has one
   owner at a time, and a handover waits for the old owner's last ack, so first
   deliveries keep their order.

How long a lease surely holds is `lease.Lease`'s story.  A renewal that
arrives after the old deadline cannot revive the lease: a worker may already
have dropped a message on the deadline, so the epoch is given up (never
acknowledged again) and the partition taken afresh, with a new epoch, from
its pending entries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from engine.broker import scripts
from engine.broker.connection import TRANSIENT
from engine.broker.lease import Lease, margin_ms, tick_s
from engine.broker.partitions import assignment
from ipc.fence import now_ms

if TYPE_CHECKING:
    from engine.broker.host import Host

log = logging.getLogger("engine.broker")


class Balancer:
    """Runs the heartbeat/renew/balance tick of one node."""

    def __init__(self, node: Host) -> None:
        self.node = node
        cfg = node.config
        self.ttl_ms = int(cfg.lease_ttl_s * 1000)
        self.margin_ms = margin_ms(self.ttl_ms)
        self.tick = tick_s(cfg.lease_ttl_s)
        self.leases: dict[int, Lease] = {}
        self.live: list[str] = []
        self.redis_now_ms = 0
        self.acquiring = True  # False once the node stops: hold what it has, take nothing
        self.task: asyncio.Task[None] | None = None
        self.leaving_tasks: set[asyncio.Task[None]] = set()
        self.counts = {"acquired": 0, "lost": 0, "given_back": 0, "renew_failures": 0}
        self.connected = True
        self.last_error = ""

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await self.step()
                self.connected = True
            except TRANSIENT as exc:
                if self.connected:
                    log.warning("redis unavailable for heartbeat and leases: %s", exc)
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.expire_overdue()
            except Exception as exc:
                # A bug or an unexpected answer must not end the ticks: leases would lapse
                # silently. Say it loudly, and let the deadlines close what is overdue.
                log.exception("balance tick failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.expire_overdue()
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self.tick - elapsed))

    async def step(self) -> None:
        """One tick: heartbeat, renew, then take and give back partitions."""
        await self.heartbeat()
        await self.renew()
        if not self.acquiring:
            return
        wanted = {p for p, n in assignment(self.live, self.node.keys.partitions).items()
                  if n == self.node.node_id}  # fmt: skip
        for p, lease in list(self.leases.items()):
            if p not in wanted and not lease.leaving and not lease.lost:
                self.give_back(lease)
        free = sorted(p for p in wanted if p not in self.leases and self.node.may_acquire(p))
        if free:
            await self.acquire(free)

    async def heartbeat(self) -> None:
        node, keys = self.node, self.node.keys
        info = json.dumps(node.announcement())
        out = await scripts.heartbeat(
            node.client,
            [keys.nodes, keys.node_info(node.node_id)],
            [node.node_id, self.ttl_ms, info],
        )
        self.redis_now_ms = int(out[0])
        self.live = sorted(x.decode() for x in out[1:])
        if node.node_id not in self.live:  # our own heartbeat is in there by construction
            self.live.append(node.node_id)

    async def renew(self) -> None:
        held = [lease for lease in self.leases.values() if not lease.lost]
        if not held:
            return
        keys, client = self.node.keys, self.node.client
        pipe = client.pipeline(transaction=False)
        for lease in held:
            p = lease.partition
            pipe.evalsha(
                scripts.renew.sha, 2, keys.leases[p], keys.epochs[p],
                lease.token, lease.epoch, self.ttl_ms,
            )  # fmt: skip
        sent = now_ms()
        results = await pipe.execute(raise_on_error=False)
        if any(_noscript(r) for r in results):
            await scripts.load_all(client)
            return  # renewed on the next tick (well inside the lease)
        for lease, result in zip(held, results, strict=True):
            if isinstance(result, Exception):
                self.counts["renew_failures"] += 1
                self.last_error = f"renew of partition {lease.partition}: {result}"
                continue
            if result == 0:
                self.lose(lease, "another node holds it (or it expired and was taken)")
                continue
            self.extend(lease, sent + self.ttl_ms - self.margin_ms)
        self.expire_overdue()

    def extend(self, lease: Lease, deadline: int) -> None:
        """Publish the new deadline, then check the old one had not passed meanwhile.

        Written first, checked second: a worker that read the old word before this
        store did so before now, so if now is still before the old deadline no
        worker has dropped a message of this epoch.  A worker that did drop one
        keeps refusing the partition for this generation (`ipc.fence.FenceReader`),
        so the moment the new deadline is visible cannot reorder anything.
        """
        old = lease.deadline_ms
        self.node.fence.open_until(lease.partition, lease.epoch, deadline)
        if now_ms() >= old:
            self.lose(lease, "renewed only after the lease's deadline had passed")
            return
        lease.deadline_ms = deadline

    def expire_overdue(self) -> None:
        for lease in list(self.leases.values()):
            if not lease.lost and now_ms() >= lease.deadline_ms:
                self.lose(lease, "not renewed in time")

    def lose(self, lease: Lease, why: str) -> None:
        """Give up an epoch at once: workers drop its messages, nothing more is acked."""
        if lease.lost:
            return
        lease.lost = True
        self.node.fence.close_partition(lease.partition)
        if self.leases.get(lease.partition) is lease:
            del self.leases[lease.partition]
        self.counts["lost"] += 1
        log.warning("lost partition %d (epoch %d): %s", lease.partition, lease.epoch, why)
        self.node.partition_lost(lease)
        self.node.spawn(self._release(lease))

    async def acquire(self, partitions: list[int]) -> None:
        keys, client, node = self.node.keys, self.node.client, self.node
        pipe = client.pipeline(transaction=False)
        for p in partitions:
            pipe.evalsha(
                scripts.acquire.sha, 2, keys.leases[p], keys.epochs[p], node.node_id, self.ttl_ms
            )
        sent = now_ms()
        results = await pipe.execute(raise_on_error=False)
        if any(_noscript(r) for r in results):
            await scripts.load_all(client)
            return
        for p, result in zip(partitions, results, strict=True):
            if isinstance(result, Exception):
                self.last_error = f"acquire of partition {p}: {result}"
                continue
            epoch = int(result[0])
            if epoch == 0:
                holder = result[1].decode()
                if holder.rpartition("/")[0] == node.node_id:
                    # Our own lease from an earlier life of this node id: an epoch we no
                    # longer track. Let it go so the partition is taken afresh.
                    node.spawn(self._release_token(p, holder))
                continue
            deadline = sent + self.ttl_ms - self.margin_ms
            if now_ms() >= deadline:
                continue  # the reply came too late to use; it expires and is taken next tick
            lease = Lease(p, epoch, f"{node.node_id}/{epoch}", deadline)
            self.leases[p] = lease
            self.node.fence.open_until(p, epoch, deadline)
            self.counts["acquired"] += 1
            node.partition_acquired(lease)

    def give_back(self, lease: Lease) -> None:
        lease.leaving = True
        task = asyncio.get_running_loop().create_task(self._give_back(lease))
        self.leaving_tasks.add(task)
        task.add_done_callback(self.leaving_tasks.discard)

    async def _give_back(self, lease: Lease) -> None:
        await self.node.partition_finish(lease)
        if lease.lost:
            return
        self.node.fence.close_partition(lease.partition)
        lease.lost = True
        if self.leases.get(lease.partition) is lease:
            del self.leases[lease.partition]
        self.counts["given_back"] += 1
        await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        await self._release_token(lease.partition, lease.token)

    async def _release_token(self, p: int, token: str) -> None:
        try:
            await scripts.release(self.node.client, [self.node.keys.leases[p]], [token])
        except TRANSIENT as exc:
            log.info("release of partition %d left to expiry: %s", p, exc)

    async def release_all(self) -> None:
        """Node stop: every partition given back (settled and acked first)."""
        self.acquiring = False
        for lease in list(self.leases.values()):
            if not lease.leaving and not lease.lost:
                self.give_back(lease)
        while self.leaving_tasks:
            await asyncio.gather(*self.leaving_tasks, return_exceptions=True)

    def owned(self) -> list[int]:
        return sorted(p for p, lease in self.leases.items() if not lease.lost)

    def snapshot(self) -> dict[str, Any]:
        return {
            "live_nodes": list(self.live),
            "owned": self.owned(),
            "leaving": sorted(p for p, lease in self.leases.items() if lease.leaving),
            "connected": self.connected,
            "last_error": self.last_error,
            **self.counts,
        }


def _noscript(result: object) -> bool:
    return isinstance(result, NoScriptError)


def default_node_id() -> str:
    """host-pid, with anything a key or channel name should not hold replaced."""
    host = os.uname().nodename or "node"
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in host)
    return f"{safe}-{os.getpid()}"
