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
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from engine.batches import (
    BatchRequest,
    BatchResults,
    BatchStats,
    check_concurrency,
    check_ttl,
)
from engine.core.batch import BatchRun, Outcome, prepare
from engine.core.builder import check_name
from engine.core.cache import ResponseCache, cache_key, shared
from engine.core.cluster import Cluster
from engine.core.deadletters import REPLAY_ERRORS, ReplayReport, unreplayable
from engine.core.stats import build_stats
from engine.errors import EngineClosed, EngineError, RequestTimeout
from ipc.codec import Kind, pack_payload
from ipc.records import DeadLetter

if TYPE_CHECKING:
    from engine.config import Config
    from engine.core.builder import Options, Outgoing
    from engine.core.dedup import DedupWindow
    from engine.core.dispatcher import Dispatcher
    from engine.core.supervisor import MonitorSupervisor

SUBMIT_CHUNK = 4096  # submit_many validates and queues this many at a time
_FIRST = operator.itemgetter(0)


class EngineAPI:
    """The message API of `Engine` (its base class), over the running dispatcher."""

    dispatcher: Dispatcher | None
    supervisor: MonitorSupervisor
    config: Config
    cache: ResponseCache  # cacheable requests' answers (engine.core.cache)
    dedup: DedupWindow | None  # dedup_keys seen (engine.core.dedup); None when the window is 0
    abandoned: int  # set by Engine.stop
    cluster: Cluster | None  # cluster mode (ENGINE_BROKER): the node; None when embedded

    def _dispatcher(self) -> Dispatcher:
        if self.dispatcher is None or self.dispatcher.closed:
            raise EngineClosed("the engine is not running")
        return self.dispatcher

    async def submit(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message; waits while its lane is full.  Returns the message id.

        A ``dedup_key`` already accepted (for the same ``user``) within
        ENGINE_DEDUP_WINDOW_S returns the first message's id and queues nothing.
        """
        if self.cluster is not None:  # accepted once Redis has it (dedup there, cluster-wide)
            out = self._dispatcher().build(recipient, payload, **options)
            ids, _ = await self.cluster.send([out], options.get("dedup_key", ""), False)
            return ids[0]
        if options.get("dedup_key") and self.dedup is not None:
            return (await self.submit_many([(recipient, payload)], **options))[0]
        d = self._dispatcher()
        out = d.build(recipient, payload, **options)
        await d.enqueue(out)
        return out[0]

    def submit_nowait(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message or raise QueueFull at once (nothing is queued then)."""
        d = self._dispatcher()
        if self.cluster is not None:
            raise EngineError(
                "submit_nowait is not available in cluster mode: a message is accepted only "
                "once Redis has it; use submit"
            )
        key = options.get("dedup_key")
        if key and self.dedup is not None:
            user = options.get("user", "")
            known = self.dedup.get((user, key))
            if known is not None:
                self.dedup.suppressed += 1
                return known.id
            out = d.build(recipient, payload, **options)
            d.enqueue_nowait(out)
            entry = self.dedup.reserve(user, key, out[0], recipient, out[2])
            self.dedup.settle(user, [key], [entry], True)
            return out[0]
        out = d.build(recipient, payload, **options)
        d.enqueue_nowait(out)
        return out[0]

    async def submit_many(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = False,
        raw_checked: bool = False,
        dedup_keys: Sequence[str] | None = None,
        **options: Any,
    ) -> list[int]:
        """Queue many (recipient, payload) pairs with the same options; returns their ids.

        With ``settled=True`` it returns only once every one of them was delivered,
        dead-lettered or expired (the service's ``ack="settled"``).  ``raw_checked``
        is for the ingress: its ``msgspec.Raw`` payloads come out of a msgspec
        decode, which checked their structure; what it does not check (UTF-8 of
        strings inside) fails at ``msg.body()`` for that message alone.
        ``dedup_keys`` gives each item its own key (else ``dedup_key`` is every
        item's): an item whose key was accepted within the window gets the first
        message's id and is not queued again.
        """
        ids, marks = await self.submit_marked(
            items, settled=settled, raw_checked=raw_checked, dedup_keys=dedup_keys, **options
        )
        if marks:
            await self.wait_settled(marks)
        return ids

    async def submit_marked(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = True,
        raw_checked: bool = False,
        dedup_keys: Sequence[str] | None = None,
        **options: Any,
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Queue like ``submit_many``; returns the ids and, with ``settled``, the ring marks.

        For callers that must queue in order now and wait for settlement later
        (the ingress's pipelined settled acks): ``await wait_settled(marks)``.
        """
        d = self._dispatcher()
        opts = d.options(**options) if options else d.default_options
        if self.cluster is not None:
            if dedup_keys is not None:
                raise EngineError(
                    "dedup_keys (one key per item) is not available in cluster mode; "
                    "submit the items one by one with dedup_key"
                )
            return await self.cluster.submit_marked(items, opts, settled, raw_checked)
        return await self._queue(items, opts, settled, raw_checked, dedup_keys, dedup=True)

    async def _queue(
        self,
        items: Iterable[tuple[str, Any]],
        opts: Options,
        settled: bool,
        raw_checked: bool,
        dedup_keys: Sequence[str] | None,
        *,
        dedup: bool,
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        d = self._dispatcher()
        window = self.dedup if dedup else None
        if dedup_keys is not None:  # checked even when the window is off (0)
            if not isinstance(dedup_keys, Sequence) or not all(type(k) is str for k in dedup_keys):
                raise ValueError(f"dedup_keys must be a list of strings, got {dedup_keys!r}")
            for key in dedup_keys:
                check_name("dedup_key", key, self.config.max_recipient_bytes)
            items = list(items)
            if len(dedup_keys) != len(items):
                raise ValueError(
                    f"dedup_keys has {len(dedup_keys)} keys for {len(items)} items: "
                    "give one per item"
                )
        if window is None or not (opts.dedup_key or dedup_keys):
            window = None
        ids: list[int] = []
        marks: list[tuple[int, int, int]] = []
        it = iter(items)
        # Chunks keep the workers busy while later items are still being encoded.
        while chunk := list(itertools.islice(it, SUBMIT_CHUNK)):
            if window is not None:
                keys = (
                    list(dedup_keys[len(ids) : len(ids) + len(chunk)])
                    if dedup_keys
                    else [opts.dedup_key] * len(chunk)
                )
                chunk_ids, chunk_marks = await self._queue_unique(
                    window, chunk, keys, opts, settled, raw_checked, len(ids)
                )
                ids += chunk_ids
                marks += chunk_marks
                continue
            outs = self._build(chunk, opts, raw_checked, len(ids))
            await d.enqueue_many(outs)
            ids += map(_FIRST, outs)  # the ids, without a generator per message
            if settled:
                marks += await d.settle_marks(outs)
        return ids, marks

    def _build(
        self, chunk: list[tuple[str, Any]], opts: Options, raw_checked: bool, done: int
    ) -> list[Outgoing]:
        try:
            return self._dispatcher().build_many(chunk, opts, raw_checked=raw_checked)
        except (ValueError, EngineError) as exc:
            raise type(exc)(
                f"{exc} (item {done} or later; the {done} items before "
                f"this chunk of {len(chunk)} were queued, none after)"
            ) from exc

    async def _queue_unique(
        self,
        window: DedupWindow,
        chunk: list[tuple[str, Any]],
        keys: list[str],
        opts: Options,
        settled: bool,
        raw_checked: bool,
        done: int,
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Queue the items of a chunk whose key is new; the others get the first copy's id."""
        d = self._dispatcher()
        user = opts.user
        fresh, dups = window.split(user, keys)
        outs = self._build([chunk[i] for i in fresh] if dups else chunk, opts, raw_checked, done)
        reserved = [(keys[i], out) for i, out in zip(fresh, outs, strict=True) if keys[i]]
        entries = [window.reserve(user, k, out[0], out[1], out[2]) for k, out in reserved]
        try:
            await d.enqueue_many(outs)
        except BaseException:
            window.settle(user, [k for k, _ in reserved], entries, False)
            raise
        window.settle(user, [k for k, _ in reserved], entries, True)
        ids = [0] * len(chunk)
        for i, out in zip(fresh, outs, strict=True):
            ids[i] = out[0]
        repeated: list[Outgoing] = []  # where the first copies went, for settled marks
        marks: list[tuple[int, int, int]] = []
        for i, first in sorted(dups.items()):
            if isinstance(first, int):
                ids[i] = ids[first]
            elif await first.wait():
                ids[i] = first.id
                repeated.append((first.id, first.recipient, first.lane, b""))
            else:  # queueing the first copy failed: this one is the first now
                window.suppressed -= 1
                more, more_marks = await self._queue_unique(
                    window, [chunk[i]], [keys[i]], opts, settled, raw_checked, done + i
                )
                ids[i] = more[0]
                marks += more_marks
        if settled:
            marks += await d.settle_marks(outs + repeated)
        return ids, marks

    async def wait_settled(self, marks: list[tuple[int, int, int]]) -> None:
        """Return once the messages behind ``marks`` (from ``submit_marked``) are settled."""
        if self.cluster is not None:
            await self.cluster.wait_settled(marks)
            return
        await self._dispatcher().wait_settled(marks)

    async def request(
        self,
        recipient: str,
        payload: Any = None,
        *,
        timeout: float = 30.0,
        cache: bool = False,
        cache_ttl_s: float | None = None,
        **options: Any,
    ) -> Any:
        """Deliver a request and return the handler's return value; RequestTimeout on expiry.

        ``cache=True`` marks a read that may be shared: an identical request (same
        ``user``, recipient and payload bytes) running now is joined instead of
        sent again, and the answer is kept for ``cache_ttl_s`` (ENGINE_CACHE_TTL_S).
        A joined request shares the first one's outcome, its timeout included.
        """
        raw = await self.request_raw(
            recipient, payload, timeout=timeout, cache=cache, cache_ttl_s=cache_ttl_s, **options
        )
        return msgspec.msgpack.decode(raw)

    async def request_raw(
        self,
        recipient: str,
        payload: Any = None,
        *,
        timeout: float = 30.0,
        cache: bool = False,
        cache_ttl_s: float | None = None,
        **options: Any,
    ) -> msgspec.Raw:
        """``request`` with the reply left as raw msgpack (the service sends it on as is)."""
        if type(cache) is not bool:
            raise ValueError(f"cache must be true or false, got {cache!r}")
        ttl = check_ttl(cache_ttl_s)
        _check_request(timeout, options)  # here too: a shared (cached) request runs elsewhere
        if not cache:
            return await self._send_request(recipient, payload, timeout=timeout, **options)
        raw = payload if type(payload) is msgspec.Raw else pack_payload(payload)
        key = cache_key(options.get("user", ""), recipient, raw)
        value, _ = await shared(
            self.cache,
            key,
            ttl,
            lambda: self._send_request(recipient, raw, timeout=timeout, **options),
        )
        return value

    async def _send_request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> msgspec.Raw:
        """One request to the handler, no cache: the raw reply, or RequestTimeout."""
        _check_request(timeout, options)
        d = self._dispatcher()
        cid = next(d.ids)
        options.setdefault("ttl", timeout)
        out = d.build(recipient, payload, kind=Kind.REQUEST, correlation_id=cid, **options)
        if self.cluster is not None:
            raw: msgspec.Raw = await self.cluster.request(out, cid, timeout)
            return raw
        fut: asyncio.Future[msgspec.Raw] = asyncio.get_running_loop().create_future()
        d.futures[cid] = fut

        async def send_and_wait() -> msgspec.Raw:
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

    async def request_many(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        concurrency: int | None = None,
        retries: int | None = None,
        user: str = "",
    ) -> BatchResults:
        """Run many requests at once; one `BatchResult` per request, in order, and ``.stats``.

        Each request is a `BatchRequest` or a mapping of its fields (recipient,
        payload, priority, timeout_s, cache, cache_ttl_s).  Work starts in priority
        order, at most ``concurrency`` (ENGINE_BATCH_CONCURRENCY) at a time; a
        timeout is retried ``retries`` (ENGINE_BATCH_RETRIES) times with backoff.
        One request's failure is its result's ``error`` (code, reason), never an
        exception; a bad batch raises before anything is queued.
        """
        outcomes, stats = await self.run_batch(
            requests, concurrency=concurrency, retries=retries, user=user
        )
        return BatchResults([o.result() for o in outcomes], stats)

    async def run_batch(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        concurrency: int | None = None,
        retries: int | None = None,
        user: str = "",
        raw_checked: bool = False,
    ) -> tuple[list[Outcome], BatchStats]:
        """``request_many`` with the values left raw (the service sends them on as they are)."""
        self._dispatcher()
        cfg = self.config
        items = prepare(requests, cfg.batch_max_requests, raw_checked=raw_checked)
        limit = check_concurrency(concurrency, cfg.batch_concurrency)
        if retries is None:
            retries = cfg.batch_retries
        elif type(retries) is not int or not 0 <= retries <= 100:
            raise ValueError(f"retries must be an integer in [0, 100], got {retries!r}")
        if type(user) is not str:
            raise ValueError(f"user must be a string, got {user!r}")
        run = BatchRun(
            self._send_request,
            self.cache,
            cfg,
            items,
            concurrency=limit,
            retries=retries,
            user=user,
        )
        return await run.run()

    def register(self, recipient: str) -> None:
        if not isinstance(recipient, str) or not recipient:
            raise ValueError(f"recipient must be a non-empty string, got {recipient!r}")
        d = self._dispatcher()
        check_name("recipient", recipient, self.config.max_recipient_bytes)
        d.recipients[recipient] = None

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
        d = self._dispatcher()
        check_name("topic", topic, self.config.max_recipient_bytes)
        check_name("recipient", recipient, self.config.max_recipient_bytes)
        d.topics.setdefault(topic, {})[recipient] = None

    def unsubscribe(self, topic: str, recipient: str) -> None:
        self._dispatcher().topics.get(topic, {}).pop(recipient, None)

    async def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        """One message (kind event) to every subscriber of ``topic``."""
        d = self._dispatcher()
        check_name("topic", topic, self.config.max_recipient_bytes)
        options.setdefault("kind", Kind.EVENT)
        options.setdefault("tags", (topic,))
        return await self._fan_out(list(d.topics.get(topic, {})), payload, options)

    async def _fan_out(
        self, recipients: list[str], payload: Any, options: dict[str, Any]
    ) -> list[int]:
        from ipc.codec import pack_payload

        raw = payload if isinstance(payload, msgspec.Raw) else pack_payload(payload)
        d = self._dispatcher()
        opts = d.options(**options)
        # A fan-out's messages share one dedup_key: it is not an idempotency key here.
        ids, _ = await self._queue(((r, raw) for r in recipients), opts, False, False, None,
                                   dedup=False)  # fmt: skip
        return ids

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted message is settled; False if ``timeout`` passed first.

        In cluster mode: until everything this node accepted is in Redis (delivering it
        is the partition owners' part; ``stop`` settles what this node owns).
        """
        if self.cluster is not None:
            self._dispatcher()
            return await self.cluster.drain(timeout)
        return await self._dispatcher().drain(timeout)

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        if d is None:
            raise EngineClosed("the engine was never started")
        sup = self.supervisor
        stats = build_stats(d, sup.report, sup.proc, sup.restarts, self.abandoned)
        stats["monitor"]["error"] = sup.error
        stats["cache"] = self.cache.stats()
        dedup = self.dedup
        stats["dedup"] = dedup.stats() if dedup else {"keys": 0, "suppressed": 0, "evicted": 0}
        if self.cluster is not None:
            stats["cluster"] = self.cluster.stats()
        return stats

    def dead_letters(self) -> list[DeadLetter]:
        if self.dispatcher is None:
            raise EngineClosed("the engine was never started")
        return self.dispatcher.dead.items()

    def positioned_dead_letters(self) -> list[tuple[tuple[int, int], DeadLetter]]:
        """((run, position), letter), oldest first: positions only grow within a run of
        the engine (page cursors use them; see `DeadLetterStore.positioned`)."""
        if self.dispatcher is None:
            raise EngineClosed("the engine was never started")
        return self.dispatcher.dead.positioned()

    async def replay_dead_letters(self, ids: Iterable[int] | None = None) -> ReplayReport:
        """Resubmit the stored dead letters (only those of message ``ids`` when given) as
        fresh messages, attempts reset, one letter at a time.

        A letter that cannot be replayed (``malformed``: no recipient; its payload was
        dropped for size; or the message cannot be built again) stays in the store with
        the reason in its ``replay_error``; the report counts both kinds.  In cluster
        mode: every letter of the cluster's DLQ stream.
        """
        d = self._dispatcher()
        if self.cluster is not None:
            if ids is not None:
                raise EngineError("replaying chosen dead letters is not available in cluster mode")
            return await self.cluster.replay_dead_letters()
        replayed = 0
        kept: dict[str, int] = {}
        for key, dl in d.dead.entries(ids):
            why = unreplayable(dl)
            error = REPLAY_ERRORS.get(why, "")
            if not why:
                m = dl.message
                try:
                    opts = d.options(
                        priority=m.priority,
                        kind=m.kind,
                        sender=m.sender,
                        tags=m.tags,
                        metadata=m.metadata,
                        dedup_key=m.dedup_key,
                        reply_to=m.reply_to,
                        user=m.user,
                    )
                    # The payload's structure is checked again (a restored letter's
                    # came from a file); one the handler could not decode (bad UTF-8
                    # inside, say) is replayed as it was.
                    (msg,) = d.build_many(((m.recipient, m.payload),), opts)
                except (EngineError, ValueError, TypeError) as exc:
                    why, error = "rebuild_failed", f"{type(exc).__name__}: {exc}"
            if why:
                dl.replay_error = error
                kept[why] = kept.get(why, 0) + 1
                continue
            await d.room(msg)  # cancelled while it waits: nothing queued, the letter stays
            if d.dead.pop(key) is None:
                continue  # a concurrent replay took it meanwhile
            try:
                buf = d.queue(msg)
            except BaseException:
                d.dead.put_back(key, dl)  # not queued (the engine stopped): the letter stays
                raise
            d.dead.replayed(dl)
            replayed += 1
            # Queued: a cancel from here on must not keep the letter too (it would be
            # delivered and stay stored, and a second replay would deliver it again).
            await d.backpressure(buf)
        return ReplayReport(replayed, sum(kept.values()), kept)


def _check_request(timeout: float, options: Mapping[str, Any]) -> None:
    """Refuse a request's bad timeout or options before it may be shared (single-flight):
    an identical request joining it must not inherit the caller's mistake."""
    if not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    for name in ("kind", "correlation_id"):
        if name in options:
            raise TypeError(f"request() sets {name} itself; got {name}={options[name]!r}")
