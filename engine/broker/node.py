"""A cluster node: an `Engine` whose messages go through partitioned Redis Streams.

What a node does, and where:

- accepts messages from every ingress and acks them once Redis has them
  (`producer.Producer`), with cluster-unique ids (the node's number from
  ``INCR {ns}:node-seq`` in the high bits);
- owns a fair share of the partitions under fenced leases (`balance.Balancer`)
  and feeds each owned partition into its local rings (`consumer.PartitionConsumer`),
  acknowledging entries only after their messages settled;
- delivers through the lease fence (`fence`), so a paused node's workers
  never deliver beside the partition's new owner;
- sends dead letters to the durable DLQ stream, with the ack that settles them;
- answers requests from any node and waits for answers from any node
  (`replies.Replies`); shows the whole cluster in its stats (`stats.ClusterStats`).

The partition count is stored in ``{ns}:meta`` on first use; a node started
with another ENGINE_PARTITIONS refuses with a clear error, since recipients
would hash to other streams and lose their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import ResponseError

from engine.broker import scripts
from engine.broker.balance import Balancer, default_node_id
from engine.broker.connection import (
    TRANSIENT,
    BrokerError,
    check_server,
    connect,
    redacted,
    retrying,
)
from engine.broker.consumer import PartitionConsumer
from engine.broker.dlq import list_views, read_letters, replay_options
from engine.broker.fence import fenced_handler
from engine.broker.lease import Lease, tick_s
from engine.broker.partitions import GROUP, Keys, Partitioner
from engine.broker.producer import Producer
from engine.broker.replies import Replies
from engine.broker.stats import ClusterStats
from engine.config import ConfigError
from engine.core.deadletters import DeadLetterView, ReplayReport, unreplayable
from engine.errors import EngineClosed, EngineError, RequestTimeout
from ipc.fence import FenceTable
from ipc.records import DeadLetter
from ipc.shm import new_engine_prefix

if TYPE_CHECKING:
    from engine.core.builder import Options, Outgoing
    from engine.core.dispatcher import Dispatcher
    from engine.core.engine import Engine

log = logging.getLogger("engine.broker")
ID_BITS = 40  # message ids: node number << 40 | a per-node counter
MAX_NODE_SEQ = (1 << (63 - ID_BITS)) - 1
_LEAVE_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT, ResponseError)
COMMAND_CONNECTIONS = 16
SUBMIT_CHUNK = 4096  # messages validated and sent at a time, as the embedded engine does
CHUNKS_IN_FLIGHT = 4  # acks, XADDs, leases, stats; the reply channel holds one of them


class ClusterNode:
    """The cluster side of one `Engine` (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        cfg = engine.config
        self.engine = engine
        self.config = cfg
        self.node_id = cfg.node_id or default_node_id()
        self.keys = Keys(cfg.namespace, cfg.partitions)
        self.partition_of = Partitioner(cfg.partitions)
        self.url = redacted(cfg.broker)
        self.fence = FenceTable.create(new_engine_prefix() + "fence", cfg.partitions)
        try:
            # The workers deliver through the fence; the configured sink runs inside it.
            engine.handler = fenced_handler(
                self.fence.segment.name, cfg.partitions, cfg, engine.handler
            )
        except BaseException:
            self.fence.close()
            raise
        engine.config = msgspec.structs.replace(cfg, sink="python")
        self.client = connect(cfg.broker, max_connections=COMMAND_CONNECTIONS)
        # One connection per blocking read: a partition each (a node may briefly hold all).
        self.reader = connect(cfg.broker, max_connections=cfg.partitions)
        self.closed = False
        self.stopping = False
        self.consumers: dict[int, PartitionConsumer] = {}
        # Partitions this node lost, with the marks their stale messages are behind
        # (None while those are being gathered): not taken again before those settled.
        self.quarantine: dict[int, list[tuple[int, int, int]] | None] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.counts = dict.fromkeys(
            ("fed", "acked_entries", "acked_messages", "dlq_written", "abandoned_entries"), 0
        )
        self.node_seq = 0
        self.started_wall = time.time()
        self.server_version = ""
        self.producer = Producer(
            self.client, self.keys, self.node_id, cfg.batch_size, cfg.dedup_window_s, self.is_closed
        )
        self.replies = Replies(self.client, self.keys, self.node_id, self.is_closed)
        self.balancer = Balancer(self)
        self.cluster_stats = ClusterStats(self.client, self.keys)

    def is_closed(self) -> bool:
        return self.closed

    def dispatcher(self) -> Dispatcher:
        d = self.engine.dispatcher
        if d is None or d.closed:
            raise EngineClosed("the engine is not running")
        return d

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster task failed", exc_info=task.exception())

    # -- start / stop ---------------------------------------------------------------
    async def start(self) -> None:
        """Join the cluster; the local engine is running already."""
        self.server_version = await check_server(self.client, self.config.broker)
        await scripts.load_all(self.client)
        await self._namespace()
        d = self.dispatcher()
        d.ids = d.builder.ids = itertools.count((self.node_seq << ID_BITS) | 1)
        d.dead.forward = self.on_dead_letter
        await self.replies.start()
        self.producer.start()
        await self.balancer.heartbeat()  # visible to the others before the first balance
        self.balancer.start()
        log.info(
            "cluster node up",
            extra={
                "node": self.node_id,
                "broker": self.url,
                "namespace": self.config.namespace,
                "partitions": self.config.partitions,
                "redis": self.server_version,
            },
        )

    async def _namespace(self) -> None:
        cfg, keys = self.config, self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hsetnx(keys.meta, "partitions", cfg.partitions)
        pipe.hsetnx(keys.meta, "created_ms", int(time.time() * 1000))
        pipe.hget(keys.meta, "partitions")
        pipe.incr(keys.node_seq)
        _, _, stored, seq = await pipe.execute()
        if int(stored) != cfg.partitions:
            raise ConfigError(
                f"ENGINE_PARTITIONS={cfg.partitions} but namespace {cfg.namespace!r} on "
                f"{self.url} was created with {int(stored)} partitions: recipients would hash "
                f"to other streams. Start with ENGINE_PARTITIONS={int(stored)}, or use another "
                f"ENGINE_NAMESPACE"
            )
        self.node_seq = int(seq)
        if self.node_seq > MAX_NODE_SEQ:
            raise BrokerError(
                f"{keys.node_seq} reached {self.node_seq}: message ids would overflow; "
                f"use a new ENGINE_NAMESPACE"
            )
        for p in range(cfg.partitions):
            await self.create_group(p)

    async def create_group(self, p: int) -> None:
        """The partition's group, reading from the start (a lost group must not skip entries)."""
        try:
            await self.client.xgroup_create(self.keys.streams[p], GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def stop(self, timeout: float, fast: bool) -> None:
        """Leave the cluster: settle and ack what this node holds, then give its partitions back.

        ``fast`` acknowledges nothing more: the fence closes at once (the workers
        drop what they hold) and the leases are released, so the other nodes
        deliver this node's unacknowledged entries again, without waiting for the TTL.
        """
        if self.closed or self.stopping:
            return
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if not fast:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.producer.wait_idle(), timeout)
            self.balancer.acquiring = False
            if fast:
                for lease in list(self.balancer.leases.values()):
                    self.balancer.lose(lease, "the node stops at once")
            else:
                try:
                    await asyncio.wait_for(
                        self.balancer.release_all(), max(0.0, deadline - loop.time())
                    )
                except TimeoutError:
                    log.error(  # noqa: TRY400 - the timeout is the whole story
                        "partitions not settled within %.1fs: released unacked", timeout
                    )
                    for lease in list(self.balancer.leases.values()):
                        self.balancer.lose(lease, "the drain timed out")
        finally:
            await self._close()

    async def _close(self) -> None:
        self.closed = True
        await self.balancer.stop()
        for consumer in list(self.consumers.values()):
            consumer.abort()
        self.consumers.clear()
        await self.producer.close()
        try:
            await scripts.leave(
                self.client, [self.keys.nodes, self.keys.node_info(self.node_id)], [self.node_id]
            )
        except _LEAVE_ERRORS as exc:
            log.info("left without saying so (the heartbeat expires instead): %s", exc)
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for t in pending:
            t.cancel()
        await self.replies.close()
        await self.client.aclose()
        await self.reader.aclose()
        self.fence.close()

    # -- partitions (called by the balancer) --------------------------------------------
    def partition_acquired(self, lease: Lease) -> None:
        consumer = PartitionConsumer(self, lease)
        self.consumers[lease.partition] = consumer
        consumer.start()
        log.info("took partition %d (epoch %d)", lease.partition, lease.epoch)

    def partition_lost(self, lease: Lease) -> None:
        consumer = self.consumers.get(lease.partition)
        if consumer is not None and consumer.lease is lease:
            del self.consumers[lease.partition]
            self.counts["abandoned_entries"] += consumer.unacked
            consumer.abort()
            self.quarantine[lease.partition] = None
            self.spawn(self._quarantine(lease.partition, consumer))

    async def _quarantine(self, p: int, consumer: PartitionConsumer) -> None:
        self.quarantine[p] = await consumer.stale_marks()

    def may_acquire(self, p: int) -> bool:
        """False while messages of an epoch this node lost may still wait in its rings."""
        if p not in self.quarantine:
            return True
        marks = self.quarantine[p]
        d = self.engine.dispatcher
        if marks is None or d is None:
            return False
        if all(d.acked[s][lane] >= pos for s, lane, pos in marks):
            del self.quarantine[p]
            return True
        return False

    async def partition_finish(self, lease: Lease) -> None:
        consumer = self.consumers.get(lease.partition)
        if consumer is None or consumer.lease is not lease:
            return
        await consumer.finish()
        if self.consumers.get(lease.partition) is consumer:
            del self.consumers[lease.partition]
        log.info("gave back partition %d (epoch %d)", lease.partition, lease.epoch)

    def on_consumer_lost(self, lease: Lease, reason: str) -> None:
        self.balancer.lose(lease, reason)

    def on_dead_letter(self, dl: DeadLetter) -> None:
        """The dispatcher's dead-letter hook: the letter goes out with its partition's ack."""
        p = self.partition_of(dl.message.recipient) if dl.message.recipient else -1
        consumer = self.consumers.get(p)
        if consumer is not None and not consumer.lease.lost:
            consumer.add_dead_letter(dl)
        # else: the partition is no longer ours; its next owner delivers the message again

    # -- the engine's API in cluster mode ------------------------------------------------
    async def send(
        self, outs: list[Outgoing], dedup_key: str, settled: bool
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        ids, entries = await self.producer.send(outs, dedup_key, notify=settled)
        marks = [(p, *_split_id(eid)) for p, eid in entries]
        return ids, marks

    async def submit_marked(
        self, items: Iterable[tuple[str, Any]], options: Options, settled: bool, raw_checked: bool
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """``Engine.submit_marked`` in cluster mode: validate and send chunk by chunk.

        Up to CHUNKS_IN_FLIGHT chunks wait for Redis together (their messages make
        fuller stream entries); each is queued, in order, before the next is encoded,
        and the wait for the oldest lets this node's consumers have the loop too.
        """
        d = self.dispatcher()
        sends: list[asyncio.Future[tuple[list[int], list[tuple[int, int, int]]]]] = []
        queued = 0
        it = iter(items)
        try:
            while chunk := list(itertools.islice(it, SUBMIT_CHUNK)):
                try:
                    outs = d.build_many(chunk, options, raw_checked=raw_checked)
                except (ValueError, EngineError) as exc:
                    raise type(exc)(
                        f"{exc} (item {queued} or later; the {queued} items before "
                        f"this chunk of {len(chunk)} were queued, none after)"
                    ) from exc
                queued += len(outs)
                sends.append(asyncio.ensure_future(self.send(outs, options.dedup_key, settled)))
                await asyncio.sleep(0)  # it queues its messages now, before the next chunk
                if len(sends) > CHUNKS_IN_FLIGHT:
                    await sends[-CHUNKS_IN_FLIGHT - 1]
        except BaseException:
            # What was queued goes to Redis anyway; only the waiting for it stops here.
            for waiting in sends:
                waiting.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
            raise
        ids: list[int] = []
        marks: list[tuple[int, int, int]] = []
        for got, entry_marks in await asyncio.gather(*sends):
            ids += got
            marks += entry_marks
        return ids, marks

    async def wait_settled(self, marks: Sequence[tuple[int, int, int]]) -> None:
        await self.replies.wait_settled([(p, f"{ms}-{seq}".encode()) for p, ms, seq in marks])

    async def request(self, out: Outgoing, correlation_id: int, timeout: float) -> Any:
        mid, recipient = out[0], out[1]
        fut = self.replies.expect_reply(correlation_id)

        async def send_and_wait() -> Any:
            await self.producer.send([out], "")
            return await fut

        try:
            return await asyncio.wait_for(send_and_wait(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {recipient!r} within {timeout}s (message {mid})"
            ) from None
        finally:
            self.replies.forget_reply(correlation_id)

    async def drain(self, timeout: float | None) -> bool:
        """Everything this node accepted is in Redis (delivery is the owners' business)."""
        try:
            await asyncio.wait_for(self.producer.wait_idle(), timeout)
        except TimeoutError:
            return False
        return True

    async def dead_letters(self) -> list[tuple[tuple[int, int], DeadLetterView]]:
        return await list_views(self.client, self.keys.dlq, max(1, self.config.dlq_max))

    async def replay_dead_letters(self) -> ReplayReport:
        """Submit every letter of the DLQ stream again (attempts reset), then delete it.

        A letter that cannot be replayed (see `unreplayable`, or a build error) stays in
        the stream; the report counts it under its reason.
        """
        d = self.dispatcher()
        letters = await read_letters(self.client, self.keys.dlq, max(1, self.config.dlq_max))
        done = 0
        kept: dict[str, int] = {}
        for eid, dl in letters:
            why = unreplayable(dl)
            if not why:
                try:
                    out = d.build(dl.message.recipient, dl.message.payload, **replay_options(dl))
                except (EngineError, ValueError, TypeError):
                    why = "rebuild_failed"
            if why:
                kept[why] = kept.get(why, 0) + 1  # it stays listed in the stream
                continue
            await self.producer.send([out], "", dedup=False)
            await retrying(
                lambda e=eid: self.client.xdel(self.keys.dlq, e),  # type: ignore[misc]
                "XDEL of a replayed dead letter",
                self.is_closed,
            )
            done += 1
        return ReplayReport(done, sum(kept.values()), kept)

    # -- stats -------------------------------------------------------------------------
    def announcement(self) -> dict[str, Any]:
        """What this node tells the others in its heartbeat (shown by their stats)."""
        d = self.engine.dispatcher
        delivered = d.counts["delivered"] if d is not None else 0
        return {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "started": round(self.started_wall, 3),
            "accepted": self.producer.counts["accepted"],
            "delivered": delivered,
            "acked_messages": self.counts["acked_messages"],
        }

    def stats(self) -> dict[str, Any]:
        if not self.closed:
            self.cluster_stats.refresh_soon()
        return {
            "node": self.node_id,
            "broker": self.url,
            "namespace": self.config.namespace,
            "partitions": self.config.partitions,
            "lease_ttl_s": self.config.lease_ttl_s,
            "balance_tick_s": tick_s(self.config.lease_ttl_s),
            "redis_version": self.server_version,
            **self.counts,
            "producer": dict(self.producer.counts),
            "replies": dict(self.replies.counts),
            "leases": self.balancer.snapshot(),
            "unacked_entries": sum(c.unacked for c in self.consumers.values()),
            **self.cluster_stats.view(),
        }

    async def refresh_stats(self) -> None:
        if not self.closed:
            await self.cluster_stats.refresh()


def _split_id(eid: bytes) -> tuple[int, int]:
    ms, _, seq = eid.partition(b"-")
    return int(ms), int(seq)
