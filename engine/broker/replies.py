"""Request/reply and settle notices across nodes, over one pub/sub channel per node.

A request travels like any message, its entry naming the requesting node. The
partition owner delivers it; the handler's answer comes back on the owner's
return ring (`Dispatcher.futures`), and the owner publishes it, through the
fenced `scripts.REPLY`, on the requester's channel ``{ns}:replies:<node>``.
The requester waits on a future keyed by the correlation id (cluster-unique:
ids carry the node's number), with the request's timeout: if the owner dies,
the next owner delivers the request again and answers if the requester still
waits; otherwise the caller gets RequestTimeout.  Pub/sub is not durable, and
need not be: a reply that finds nobody waiting has no one to go to.

The same channel carries settle notices (``ack="settled"`` submits): the owner
publishes the ids of the entries it acknowledged, in the script that acks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from redis.asyncio import Redis

from engine.backoff import backoff_s
from engine.broker import scripts
from engine.broker.connection import TRANSIENT
from engine.broker.partitions import Keys
from engine.errors import EngineClosed, RequestFailed

log = logging.getLogger("engine.broker")
REPLY, SETTLED = 0, 1
EARLY_MAX = 65536  # settle notices kept for entries whose XADD reply is not processed yet


class Notice(msgspec.Struct, array_like=True, frozen=True):
    kind: int
    correlation_id: int = 0
    ok: bool = True
    value: msgspec.Raw = msgspec.Raw(b"\xc0")
    error: str = ""
    entries: list[tuple[int, bytes]] = []


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Notice).decode


def settled_notice(entries: Iterable[tuple[int, bytes]]) -> bytes:
    return _encode(Notice(SETTLED, entries=list(entries)))


class Replies:
    """This node's channel: request waiters, settle waiters, and the subscriber loop."""

    def __init__(self, client: Redis, keys: Keys, node: str, closed: Callable[[], bool]) -> None:
        self.client = client
        self.keys = keys
        self.channel = keys.replies(node)
        self.closed = closed
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.settle_waiting: dict[tuple[int, bytes], asyncio.Future[None]] = {}
        self.early: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.counts = {"replies_sent": 0, "replies_fenced": 0, "replies_unmatched": 0}

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._listen())
        await self.ready.wait()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for fut in [*self.waiting.values(), *self.settle_waiting.values()]:
            if not fut.done():
                fut.set_exception(EngineClosed("the cluster node stopped before the answer came"))

    # -- waiting (requesting side) ----------------------------------------------------
    def expect_reply(self, cid: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[cid] = fut
        return fut

    def forget_reply(self, cid: int) -> None:
        self.waiting.pop(cid, None)

    async def wait_settled(self, entries: list[tuple[int, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for key in entries:
            if key in self.early:
                del self.early[key]
                continue
            fut = self.settle_waiting.get(key)
            if fut is None:
                fut = self.settle_waiting[key] = loop.create_future()
            futures.append(fut)
        try:
            await asyncio.gather(*futures)
        finally:
            for key in entries:
                fut = self.settle_waiting.get(key)
                if fut is not None and fut.done():
                    del self.settle_waiting[key]

    # -- the subscriber ---------------------------------------------------------------
    async def _listen(self) -> None:
        attempt = 0
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.ready.set()
                attempt = 0
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._on_notice(msg["data"])
            except TRANSIENT as exc:
                if attempt == 0:
                    log.warning("reply channel %s lost, resubscribing: %s", self.channel, exc)
                await asyncio.sleep(backoff_s(attempt, 0.05, 1.0))
                attempt += 1
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_notice(self, data: bytes) -> None:
        try:
            notice = _decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.exception("undecodable notice on %s", self.channel)
            return
        if notice.kind == REPLY:
            fut = self.waiting.pop(notice.correlation_id, None)
            if fut is None or fut.done():
                self.counts["replies_unmatched"] += 1
            elif notice.ok:
                fut.set_result(notice.value)  # raw: request() decodes, the service forwards
            else:
                fut.set_exception(RequestFailed(notice.error))
        elif notice.kind == SETTLED:
            for p, eid in notice.entries:
                key = (p, eid)
                fut = self.settle_waiting.get(key)
                if fut is None:
                    self.early[key] = None
                    if len(self.early) > EARLY_MAX:
                        self.early.popitem(last=False)
                elif not fut.done():
                    fut.set_result(None)

    # -- answering (owning side) --------------------------------------------------------
    async def send_reply(
        self, requester: str, cid: int, outcome: asyncio.Future[Any], lease: Any
    ) -> None:
        """Publish a handler's answer to ``requester``, fenced by the owner's ``lease``."""
        if outcome.cancelled():
            return
        exc = outcome.exception()
        if isinstance(exc, EngineClosed):
            return  # this node stopped: the next owner answers
        if exc is None:
            notice = Notice(REPLY, cid, True, msgspec.Raw(_encode(outcome.result())))
        else:
            notice = Notice(REPLY, cid, False, error=str(exc))
        if not lease.valid():
            self.counts["replies_fenced"] += 1
            return
        p = lease.partition
        keys = [self.keys.leases[p], self.keys.epochs[p]]
        args = [lease.token, lease.epoch, self.keys.replies(requester), _encode(notice)]
        try:
            result = await scripts.reply(self.client, keys, args)
        except TRANSIENT as exc2:
            log.warning("reply to request %d not sent (redis unavailable): %s", cid, exc2)
            return
        if result == -1:
            self.counts["replies_fenced"] += 1
        else:
            self.counts["replies_sent"] += 1
