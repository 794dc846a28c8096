"""`EngineAPI`: what producer code does with a running engine.

Submit (one, many, with settlement marks), request and reply, register and
broadcast, subscribe and publish, drain, stats and dead letters: every call
goes to the dispatcher.  It is apart from `Engine` (`engine.core.engine`),
which brings the memory and the processes up and down, so the blocking facade
(`engine.core.sync`), which `Engine` returns, can be typed against this API
without an import cycle.  `Engine` is the one class built on it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from engine.core.stats import build_stats
from engine.errors import EngineClosed, EngineError, RequestTimeout
from ipc.codec import Kind
from ipc.records import DeadLetter

if TYPE_CHECKING:
    from engine.core.dispatcher import Dispatcher
    from engine.core.supervisor import MonitorSupervisor

SUBMIT_CHUNK = 4096  # submit_many validates and queues this many at a time


class EngineAPI:
    """The message API of `Engine` (its base class), over the running dispatcher."""

    dispatcher: Dispatcher | None
    supervisor: MonitorSupervisor

    def _dispatcher(self) -> Dispatcher:
        if self.dispatcher is None or self.dispatcher.closed:
            raise EngineClosed("the engine is not running")
        return self.dispatcher

    async def submit(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message; waits while its lane is full.  Returns the message id."""
        d = self._dispatcher()
        out = d.build(recipient, payload, **options)
        await d.enqueue(out)
        return out[0]

    def submit_nowait(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message or raise QueueFull at once (nothing is queued then)."""
        d = self._dispatcher()
        out = d.build(recipient, payload, **options)
        d.enqueue_nowait(out)
        return out[0]

    async def submit_many(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = False,
        raw_checked: bool = False,
        **options: Any,
    ) -> list[int]:
        """Queue many (recipient, payload) pairs with the same options; returns their ids.

        With ``settled=True`` it returns only once every one of them was delivered,
        dead-lettered or expired (the service's ``ack="settled"``).  ``raw_checked``
        is for the ingress: its ``msgspec.Raw`` payloads come out of a msgspec
        decode, which checked their structure; what it does not check (UTF-8 of
        strings inside) fails at ``msg.body()`` for that message alone.
        """
        ids, marks = await self.submit_marked(
            items, settled=settled, raw_checked=raw_checked, **options
        )
        if marks:
            await self._dispatcher().wait_settled(marks)
        return ids

    async def submit_marked(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = True,
        raw_checked: bool = False,
        **options: Any,
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Queue like ``submit_many``; returns the ids and, with ``settled``, the ring marks.

        For callers that must queue in order now and wait for settlement later
        (the ingress's pipelined settled acks): ``await wait_settled(marks)``.
        """
        d = self._dispatcher()
        opts = d.options(**options) if options else d.default_options
        ids: list[int] = []
        marks: list[tuple[int, int, int]] = []
        it = iter(items)
        # Chunks keep the workers busy while later items are still being encoded.
        while chunk := list(itertools.islice(it, SUBMIT_CHUNK)):
            try:
                outs = d.build_many(chunk, opts, raw_checked=raw_checked)
            except (ValueError, EngineError) as exc:
                raise type(exc)(
                    f"{exc} (item {len(ids)} or later; the {len(ids)} items before "
                    f"this chunk of {len(chunk)} were queued, none after)"
                ) from exc
            await d.enqueue_many(outs)
            ids.extend(m[0] for m in outs)
            if settled:
                marks += await d.settle_marks(outs)
        return ids, marks

    async def wait_settled(self, marks: list[tuple[int, int, int]]) -> None:
        """Return once the messages behind ``marks`` (from ``submit_marked``) are settled."""
        await self._dispatcher().wait_settled(marks)

    async def request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        """Deliver a request and return the handler's return value; RequestTimeout on expiry."""
        if not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for name in ("kind", "correlation_id"):
            if name in options:
                raise TypeError(f"request() sets {name} itself; got {name}={options[name]!r}")
        d = self._dispatcher()
        cid = next(d.ids)
        options.setdefault("ttl", timeout)
        out = d.build(recipient, payload, kind=Kind.REQUEST, correlation_id=cid, **options)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        d.futures[cid] = fut

        async def send_and_wait() -> Any:
            await d.enqueue(out)
            return await fut

        try:
            # The timeout covers waiting for ring space too, not only the reply.
            return await asyncio.wait_for(send_and_wait(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {recipient!r} within {timeout}s (message {out[0]})"
            ) from None
        finally:
            d.futures.pop(cid, None)

    def register(self, recipient: str) -> None:
        if not isinstance(recipient, str) or not recipient:
            raise ValueError(f"recipient must be a non-empty string, got {recipient!r}")
        self._dispatcher().recipients[recipient] = None

    def unregister(self, recipient: str) -> None:
        self._dispatcher().recipients.pop(recipient, None)

    async def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        """One message to every registered recipient (kind broadcast)."""
        d = self._dispatcher()
        options.setdefault("kind", Kind.BROADCAST)
        return await self._fan_out(list(d.recipients), payload, options)

    def subscribe(self, topic: str, recipient: str) -> None:
        if not topic or not recipient:
            raise ValueError(f"topic and recipient must be non-empty, got {topic!r}, {recipient!r}")
        self._dispatcher().topics.setdefault(topic, {})[recipient] = None

    def unsubscribe(self, topic: str, recipient: str) -> None:
        self._dispatcher().topics.get(topic, {}).pop(recipient, None)

    async def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        """One message (kind event) to every subscriber of ``topic``."""
        d = self._dispatcher()
        options.setdefault("kind", Kind.EVENT)
        options.setdefault("tags", (topic,))
        return await self._fan_out(list(d.topics.get(topic, {})), payload, options)

    async def _fan_out(
        self, recipients: list[str], payload: Any, options: dict[str, Any]
    ) -> list[int]:
        from ipc.codec import pack_payload

        raw = payload if isinstance(payload, msgspec.Raw) else pack_payload(payload)
        return await self.submit_many(((r, raw) for r in recipients), **options)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted message is settled; False if ``timeout`` passed first."""
        return await self._dispatcher().drain(timeout)

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        if d is None:
            raise EngineClosed("the engine was never started")
        sup = self.supervisor
        stats = build_stats(d, sup.report, sup.proc, sup.restarts)
        stats["monitor"]["error"] = sup.error
        return stats

    def dead_letters(self) -> list[DeadLetter]:
        if self.dispatcher is None:
            raise EngineClosed("the engine was never started")
        return self.dispatcher.dead.items()

    async def replay_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Resubmit the stored dead letters (only those of message ``ids`` when given) as
        fresh messages, attempts reset; returns how many were resubmitted."""
        d = self._dispatcher()
        items = d.dead.take_all() if ids is None else d.dead.take(ids)
        for dl in items:
            m = dl.message
            msg = d.build(
                m.recipient,
                m.payload,
                priority=m.priority,
                kind=m.kind,
                sender=m.sender,
                tags=m.tags,
                metadata=m.metadata,
                dedup_key=m.dedup_key,
                reply_to=m.reply_to,
            )
            await d.enqueue(msg)
        return len(items)
