"""The partition consumer: one owned partition's stream into this node's rings, acked after settle.

The consumer name in the group is the partition's (``p<i>``), not the node's,
so a new owner finds its predecessor's unacknowledged entries as its own: it
reads the group's pending entries for that name from id ``0`` (in id order)
before it switches to ``>``.  Entries left under other names are claimed
first (XAUTOCLAIM as a janitor).  An entry already delivered
ENGINE_POISON_MAX_CRASHES times to owners that never acknowledged it goes to
the dead-letter stream (``worker_crash``) instead.

Reading: one read at a time (its own pooled connection), at most
ENGINE_BROKER_READ_COUNT entries, and no more than a window of entries
unacknowledged.  The group read is fenced like every other write
(`scripts.READ`); when it finds nothing new, a plain blocking XREAD, which
changes nothing in Redis, waits for the next entry.  Each read becomes a
group: its messages are queued with `Dispatcher.enqueue_many` (one coroutine
per partition, so entries keep their id order and every recipient its order)
and the ring marks they must settle past are kept.  The acker waits for the
oldest group's marks, then acks in one fenced script (`scripts.SETTLE`) every
settled group, with the dead letters and settle notices they produced and a
trim of the stream below the oldest entry still unacknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from engine.broker import scripts
from engine.broker.connection import retrying
from engine.broker.dlq import letter_fields
from engine.broker.entries import BadEntry, clock_offset_ns, decode_entry, messages_of
from engine.broker.partitions import GROUP
from engine.broker.replies import settled_notice
from engine.errors import EngineClosed
from ipc.codec import Message
from ipc.records import DeadLetter

if TYPE_CHECKING:
    from engine.broker.host import Host
    from engine.broker.lease import Lease

log = logging.getLogger("engine.broker")
BLOCK_MS = 500  # a blocked read ends this often, so a give-back never waits longer
ACK_MAX_IDS = 1000  # entry ids per SETTLE call
WINDOW_READS = 2  # unacknowledged entries per partition: this many reads' worth


class LeaseLost(Exception):
    """The lease ended (fenced, expired, or given up) while this consumer used it."""


@dataclass(eq=False)
class Group:
    """The entries of one read, acknowledged together once their messages settled."""

    ids: list[bytes]
    marks: list[tuple[int, int, int]]
    messages: int
    letters: list[list[Any]] = field(default_factory=list)
    notices: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)


class PartitionConsumer:
    """Feeds one owned partition to the local engine and acknowledges what settled."""

    def __init__(self, node: Host, lease: Lease) -> None:
        self.node = node
        self.lease = lease
        self.p = lease.partition
        keys = node.keys
        self.stream = keys.streams[self.p]
        self.name = keys.consumers[self.p]
        self.read_count = node.config.broker_read_count
        self.window = max(1, WINDOW_READS * self.read_count)
        self.groups: deque[Group] = deque()
        self.unacked = 0  # entries read and not yet acknowledged
        self.dead: list[list[Any]] = []  # dead letters of this partition, for the next ack
        self.last_read = b""
        self.stopping = False
        self.changed = asyncio.Event()  # a group was added or acked, or stopping
        self.reader: asyncio.Task[None] | None = None
        self.feeding: asyncio.Future[None] | None = None  # the feed in progress, if any
        self.acker: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read_loop())
        self.acker = loop.create_task(self._ack_loop())
        self.reader.add_done_callback(self._task_done)
        self.acker.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if task is self.acker and not self.done.done():
                self.done.set_result(None)
            return
        if isinstance(exc, (LeaseLost, EngineClosed)):
            reason = str(exc) or type(exc).__name__
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("partition %d consumer failed", self.p, exc_info=exc)
        self.node.on_consumer_lost(self.lease, reason)

    def abort(self) -> None:
        """The lease is gone: stop at once, acknowledge nothing more (the next owner redelivers)."""
        self.stopping = True
        for task in (self.reader, self.acker):
            if task is not None and not task.done():
                task.cancel()
        if not self.done.done():
            self.done.set_result(None)

    async def finish(self) -> None:
        """Stop reading, then return once everything read was settled and acknowledged."""
        self.stopping = True
        self.changed.set()
        await asyncio.shield(self.done)

    # -- reading ----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        await self._claim_strays()
        poison = await self._poison_ids()
        cursor = b"0"  # the pending entries of this partition's consumer first, in id order
        while not self.stopping:
            while self.unacked >= self.window and not self.stopping:
                self.changed.clear()
                await self.changed.wait()
            if self.stopping:
                break
            live = cursor == b">"
            entries = await self._read(cursor, BLOCK_MS if live else None)
            if not live:
                if not entries:
                    cursor = b">"
                    continue
                cursor = entries[-1][0]
            if entries:
                # Shielded: an abort must not leave messages in the rings without their
                # group's marks (the node waits for those before taking the partition again).
                self.feeding = asyncio.ensure_future(self._feed(entries, poison))
                await asyncio.shield(self.feeding)
        self.changed.set()

    async def _read(self, cursor: bytes, block: int | None) -> list[tuple[bytes, Any]]:
        """One fenced group read; when it finds nothing and ``block`` is set, wait for an entry.

        Never a blocking XREADGROUP: one sent before a pause and served after the
        lease passed on would move new entries into the pending list behind the
        successor's back (see `scripts.READ`).  Returns [] after a wait; the
        caller reads again.
        """
        client, lease, keys = self.node.reader, self.lease, self.node.keys
        script_keys = [self.stream, keys.leases[self.p], keys.epochs[self.p]]
        args = [lease.token, lease.epoch, GROUP, self.name, self.read_count, cursor]

        async def op() -> Any:
            try:
                return await scripts.read(client, script_keys, args)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.node.create_group(self.p)  # Redis lost it (restart without data)
                return [0, b"0-0"]

        what = f"the read of partition {self.p}"
        resp = await retrying(op, what, lambda: not lease.valid())
        if resp == -1:
            raise LeaseLost(f"partition {self.p} was fenced: another node holds it now")
        found, body = resp
        if found:
            return [(eid, _fields(flat)) for eid, flat in body]
        if block is not None:
            await retrying(
                lambda: client.xread({self.stream: body}, count=1, block=block),
                f"the wait for entries of partition {self.p}",
                lambda: not lease.valid(),
            )
        return []

    async def _claim_strays(self) -> None:
        """Entries pending under other consumer names become this partition's own."""
        client, lease = self.node.client, self.lease
        summary = await retrying(
            lambda: client.xpending(self.stream, GROUP), "XPENDING", lambda: not lease.valid()
        )
        mine = self.name.encode()
        strays = [c["name"] for c in summary.get("consumers", []) if c["name"] != mine]
        for stray in strays:
            start: bytes | str = "0-0"
            while True:
                out = await retrying(
                    lambda s=start: client.xautoclaim(  # type: ignore[misc]
                        self.stream, GROUP, self.name, 0, start_id=s, count=1000, justid=True
                    ),
                    "XAUTOCLAIM",
                    lambda: not lease.valid(),
                )
                start = out[0]
                if start in (b"0-0", "0-0"):
                    break
            left = await client.xpending_range(self.stream, GROUP, "-", "+", 1, stray)
            if not left:  # never delete a consumer that still has pending entries
                await client.xgroup_delconsumer(self.stream, GROUP, stray)
            log.info("partition %d: took over entries pending under %r", self.p, stray)

    async def _poison_ids(self) -> dict[bytes, int]:
        """Pending entries already delivered ENGINE_POISON_MAX_CRASHES times: id -> deliveries."""
        client, lease = self.node.client, self.lease
        limit = self.node.config.poison_max_crashes
        out: dict[bytes, int] = {}
        start: bytes | str = "-"
        while True:
            page: Any = await retrying(
                lambda s=start: client.xpending_range(  # type: ignore[misc]
                    self.stream, GROUP, s, "+", 1000, self.name
                ),
                "XPENDING",
                lambda: not lease.valid(),
            )
            for item in page:
                if item["times_delivered"] >= limit:
                    out[item["message_id"]] = item["times_delivered"]
            if len(page) < 1000:
                return out
            start = b"(" + page[-1]["message_id"]

    async def _feed(self, entries: list[tuple[bytes, Any]], poison: dict[bytes, int]) -> None:
        node = self.node
        d = node.dispatcher()
        offset = clock_offset_ns()
        ids: list[bytes] = []
        outs: list[tuple[int, str, int, bytes]] = []
        letters: list[list[Any]] = []
        notices: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
        limit = d.builder.max_message_bytes
        for eid, fields in entries:
            ids.append(eid)
            if not fields:
                continue  # trimmed or deleted since it was delivered: nothing to do
            if eid in poison:
                error = (
                    f"stream entry {eid.decode()} was delivered {poison[eid]} times to owners "
                    f"that died before acknowledging it"
                )
                letters += self._letters(messages_of(fields), "worker_crash", error)
                continue
            try:
                decoded = decode_entry(fields, offset)
            except BadEntry as exc:
                letters.append(self._letter(Message(id=0, recipient=""), "malformed", str(exc)))
                continue
            requester = decoded.header.node
            for routed in decoded.messages:
                data = routed[3]
                if len(data) > limit:
                    msg = Message(id=routed[0], recipient=routed[1])
                    error = f"{len(data):,} bytes; this node's rings take {limit:,} per message"
                    letters.append(self._letter(msg, "too_large", error))
                    continue
                outs.append(routed)
            for cid in decoded.requests:
                self._track_request(cid, requester)
            if decoded.header.notify:
                notices[requester].append((self.p, eid))
        self.last_read = ids[-1]
        marks: list[tuple[int, int, int]] = []
        if outs:
            await d.enqueue_many(outs)
            marks = await d.settle_marks(outs)
        node.counts["fed"] += len(outs)
        self.groups.append(Group(ids, marks, len(outs), letters, dict(notices)))
        self.unacked += len(ids)
        self.changed.set()

    def _track_request(self, cid: int, requester: str) -> None:
        """A request: its answer goes back to the requesting node (see replies.py)."""
        futures = self.node.dispatcher().futures
        if cid in futures:
            return  # delivered here before and still unanswered: that answer will do
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        futures[cid] = fut
        lease = self.lease
        fut.add_done_callback(lambda f: self.node.spawn(self.node.replies.send_reply(
            requester, cid, f, lease)))  # fmt: skip

    def _letter(self, msg: Message, reason: str, error: str) -> list[Any]:
        return letter_fields(DeadLetter(msg, reason, 0, error), self.p, self.node.node_id)

    def _letters(self, msgs: list[Message], reason: str, error: str) -> list[list[Any]]:
        if not msgs:
            return [self._letter(Message(id=0, recipient=""), reason, error)]
        return [self._letter(m, reason, error) for m in msgs]

    def add_dead_letter(self, dl: DeadLetter) -> None:
        """A message of this partition was dead-lettered here: it goes out with the next ack."""
        self.dead.append(letter_fields(dl, self.p, self.node.node_id))

    # -- acknowledging ------------------------------------------------------------------
    async def _ack_loop(self) -> None:
        d = self.node.dispatcher()
        while True:
            if not self.groups:
                if self.stopping and (self.reader is None or self.reader.done()):
                    if self.dead:
                        await self._ack([])  # letters of messages whose entries were acked
                    return
                self.changed.clear()
                await self.changed.wait()
                continue
            first = self.groups[0]
            if first.marks:
                await d.wait_settled(first.marks)
            batch = [self.groups.popleft()]
            count = len(batch[0].ids)
            while self.groups and count < ACK_MAX_IDS and _settled(d.acked, self.groups[0].marks):
                g = self.groups.popleft()
                batch.append(g)
                count += len(g.ids)
            await self._ack(batch)
            self.unacked -= count
            self.changed.set()

    async def _ack(self, batch: list[Group]) -> None:
        lease, node, keys = self.lease, self.node, self.node.keys
        if not lease.valid():
            raise LeaseLost(f"lease of partition {self.p} ended before its entries were acked")
        ids = [eid for g in batch for eid in g.ids]
        letters = [f for g in batch for f in g.letters] + self.dead
        self.dead = []
        notices: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
        for g in batch:
            for requester, entries in g.notices.items():
                notices[requester] += entries
        if self.groups:
            minid = self.groups[0].ids[0]
        elif self.last_read:
            minid = _successor(self.last_read)
        else:
            minid = b""
        args: list[Any] = [
            lease.token, lease.epoch, GROUP, minid, node.config.dlq_max, len(ids), *ids,
            len(letters),
        ]  # fmt: skip
        for fields in letters:
            args += [len(fields), *fields]
        args.append(len(notices))
        for requester, entries in notices.items():
            args += [keys.replies(requester), settled_notice(entries)]
        stream_keys = [self.stream, keys.leases[self.p], keys.epochs[self.p], keys.dlq]
        result = await retrying(
            lambda: scripts.settle(node.client, stream_keys, args),
            f"the ack of partition {self.p}",
            lambda: not lease.valid(),
        )
        if result == -1:
            raise LeaseLost(f"partition {self.p} was fenced: another node holds it now")
        node.counts["acked_entries"] += len(ids)
        node.counts["acked_messages"] += sum(g.messages for g in batch)
        node.counts["dlq_written"] += len(letters)

    async def stale_marks(self) -> list[tuple[int, int, int]]:
        """After an abort: the ring marks every message this consumer fed is behind.

        Until the local engine has settled past them, messages of the lost epoch may
        still wait in the rings (the fence drops them as they come); a new epoch of
        the partition on this node must not start before, or an old message could be
        delivered after a newer one's re-read copy.
        """
        if self.feeding is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(self.feeding)
        return [m for g in self.groups for m in g.marks]

    async def wait_stopped(self) -> None:
        for task in (self.reader, self.acker):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _settled(acked: list[list[int]], marks: list[tuple[int, int, int]]) -> bool:
    return all(acked[s][lane] >= pos for s, lane, pos in marks)


def _fields(flat: list[bytes] | None) -> dict[bytes, bytes] | None:
    """A script's flat [field, value, ...] list as redis-py's stream replies give it.

    None for an entry deleted since it was delivered (its pending id remains).
    """
    if flat is None:
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _successor(eid: bytes) -> bytes:
    """The smallest stream id after ``eid``: trimming to it removes ``eid`` and older."""
    ms, _, seq = eid.partition(b"-")
    return ms + b"-" + str(int(seq) + 1).encode()
