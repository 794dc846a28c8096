"""Batch requests (``request_many``): many requests at once, one result each, never one exception.

The whole batch is checked before anything is queued (a bad item, an unknown
field or too many requests refuses it with the item's index).  Then the work
runs in priority order, critical first and in batch order within a priority,
at most ``concurrency`` requests at a time.  Cacheable requests (``cache``)
go through the response cache (`engine.core.cache`): a hit or a join of an
identical running request takes no slot.  A request that timed out is retried
with the engine's backoff (``ENGINE_BATCH_RETRIES``; the handler's own
``Retry`` and exceptions are retried by the worker as for every message);
``Reject``, dead letters and exhausted retries come back as that item's error
with a code.  The per-batch figures are what the design's "Enhanced Batch API"
reported: total and average duration, cache hit and de-duplication rates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from engine.backoff import backoff_s
from engine.batches import (
    BatchRequest,
    BatchResult,
    BatchStats,
    ItemError,
    as_request,
    check_request,
)
from engine.config import Config
from engine.core.cache import CacheKey, ResponseCache, cache_key
from engine.errors import (
    EngineClosed,
    EngineError,
    FrameTooLargeError,
    RequestFailed,
    RequestTimeout,
)
from engine.logs import LogLimiter, suppressed_note
from ipc.codec import Priority, check_raw, pack_payload

log = logging.getLogger("engine.batch")
_quiet = LogLimiter(10.0)  # a bug hit by every item of a large batch logs once per 10 s

# Dead-letter reasons a failed reply starts with ("rejected: why"); they become the error code.
_DEAD_LETTER_CODES = ("rejected", "max_attempts", "worker_crash", "malformed", "expired")


class Prepared(NamedTuple):
    """A checked, encoded request of a batch."""

    recipient: str
    payload: msgspec.Raw
    priority: Priority
    timeout_s: float
    cache: bool
    cache_ttl_s: float | None


class Outcome:
    """One request's result with its value still raw msgpack (the service sends it as is)."""

    __slots__ = (
        "attempts",
        "cached",
        "code",
        "deduplicated",
        "duration_s",
        "ok",
        "reason",
        "value",
    )

    def __init__(self) -> None:
        self.ok = False
        self.value: msgspec.Raw | None = None
        self.code = ""
        self.reason = ""
        self.cached = False
        self.deduplicated = False
        self.duration_s = 0.0
        self.attempts = 0

    def result(self) -> BatchResult:
        """The embedded API's form: the value decoded, for this caller alone."""
        if self.ok:
            value = None if self.value is None else msgspec.msgpack.decode(self.value)
            return BatchResult(
                ok=True,
                value=value,
                cached=self.cached,
                deduplicated=self.deduplicated,
                duration_s=self.duration_s,
                attempts=self.attempts,
            )
        return BatchResult(
            ok=False,
            error=ItemError(self.code, self.reason),
            cached=self.cached,
            deduplicated=self.deduplicated,
            duration_s=self.duration_s,
            attempts=self.attempts,
        )


def prepare(
    requests: Sequence[BatchRequest | Mapping[str, Any]],
    max_requests: int,
    *,
    raw_checked: bool = False,
) -> list[Prepared]:
    """Check and encode every request, or raise naming the first bad one (nothing queued).

    ``raw_checked``: ``msgspec.Raw`` payloads came out of a msgspec decode (the
    ingress's frames), which checked their structure.
    """
    if isinstance(requests, str | bytes | Mapping) or not isinstance(requests, Sequence):
        raise TypeError(f"requests must be a list of requests, got {type(requests).__name__}")
    if len(requests) > max_requests:
        raise ValueError(
            f"a batch holds at most ENGINE_BATCH_MAX_REQUESTS={max_requests:,} requests, "
            f"got {len(requests):,}"
        )
    out: list[Prepared] = []
    for i, req in enumerate(requests):
        try:
            out.append(_prepare_one(req, raw_checked))
        except (ValueError, TypeError, EngineError, msgspec.ValidationError) as exc:
            raise ValueError(f"request {i} of the batch: {exc} (nothing was queued)") from exc
    return out


def _prepare_one(req: BatchRequest | Mapping[str, Any], raw_checked: bool) -> Prepared:
    request = as_request(req)
    priority, timeout, ttl = check_request(request)
    payload = request.payload
    if type(payload) is msgspec.Raw:
        raw = payload if raw_checked else check_raw(payload)
    else:
        raw = pack_payload(payload)
    return Prepared(request.recipient, raw, priority, timeout, request.cache, ttl)


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, reason) of a request that failed; dead-letter reasons become the code."""
    if isinstance(exc, RequestFailed):
        text = str(exc)
        code, sep, rest = text.partition(": ")
        if sep and code in _DEAD_LETTER_CODES:
            return code, rest
        return "handler_error", text
    if isinstance(exc, RequestTimeout):
        return "timeout", str(exc)
    if isinstance(exc, EngineClosed):
        return "closed", str(exc)
    if isinstance(exc, FrameTooLargeError):
        return "too_large", str(exc)
    if isinstance(exc, ValueError | EngineError):
        return "bad_request", str(exc)
    return "internal", f"{type(exc).__name__}: {exc}"


SendRequest = Callable[..., Coroutine[Any, Any, msgspec.Raw]]
"""One uncached request: (recipient, payload, timeout=, priority=, user=) -> the raw reply."""


class BatchRun:
    """One batch on its way: the slots, the tasks it started, the outcomes in request order."""

    def __init__(
        self,
        send: SendRequest,
        cache: ResponseCache,
        config: Config,
        items: list[Prepared],
        *,
        concurrency: int,
        retries: int,
        user: str,
    ) -> None:
        self.send = send
        self.cache = cache
        self.config = config
        self.items = items
        self.retries = retries
        self.user = user
        self.slots = asyncio.Semaphore(concurrency)
        self.outcomes = [Outcome() for _ in items]
        self.waits: list[asyncio.Future[None]] = []
        self.own: list[asyncio.Task[msgspec.Raw]] = []  # uncached requests: ours alone
        self.executed = 0

    async def run(self) -> tuple[list[Outcome], BatchStats]:
        started = time.perf_counter()
        order = sorted(range(len(self.items)), key=lambda i: (self.items[i].priority, i))
        try:
            for i in order:
                item = self.items[i]
                key = cache_key(self.user, item.recipient, item.payload) if item.cache else None
                if key is not None and self._shared(i, key):
                    continue
                await self.slots.acquire()
                if key is not None and self._shared(i, key):  # it may have landed meanwhile
                    self.slots.release()
                    continue
                self._start(i, item, key)
            await asyncio.gather(*self.waits)
        finally:
            for task in self.own:
                task.cancel()  # only left running when the batch itself was cancelled
        return self.outcomes, self._stats(time.perf_counter() - started)

    def _shared(self, i: int, key: CacheKey) -> bool:
        """Serve item ``i`` from the cache or an identical running request; False if neither."""
        value = self.cache.cached(key)
        if value is not None:
            out = self.outcomes[i]
            out.ok, out.value, out.cached = True, value, True
            return True
        flight = self.cache.flight(key)
        if flight is None:
            return False
        self.outcomes[i].deduplicated = True
        self.waits.append(asyncio.ensure_future(self._collect(i, flight, time.perf_counter())))
        return True

    def _start(self, i: int, item: Prepared, key: CacheKey | None) -> None:
        self.executed += 1
        coro = self._attempts(i, item)
        if key is not None:
            task = self.cache.lead(key, item.cache_ttl_s, coro)
        else:
            task = asyncio.ensure_future(coro)
            self.own.append(task)
        task.add_done_callback(self._landed)
        self.waits.append(asyncio.ensure_future(self._collect(i, task, time.perf_counter())))

    def _landed(self, task: asyncio.Future[msgspec.Raw]) -> None:
        """A request's slot is free again.  Its error is marked retrieved here: `_collect`
        reports it, unless the batch was cancelled before `_collect` ever ran (its client
        hung up) and nobody will; an unretrieved error would be logged as a crash."""
        self.slots.release()
        if not task.cancelled():
            task.exception()

    async def _attempts(self, i: int, item: Prepared) -> msgspec.Raw:
        """Send the request; a timeout is retried with the engine's backoff."""
        cfg = self.config
        out = self.outcomes[i]
        for attempt in range(self.retries + 1):
            out.attempts += 1
            try:
                return await self.send(
                    item.recipient,
                    item.payload,
                    timeout=item.timeout_s,
                    priority=item.priority,
                    user=self.user,
                )
            except RequestTimeout:
                if attempt == self.retries:
                    raise
            await asyncio.sleep(
                backoff_s(attempt, cfg.retry_backoff_base_s, cfg.retry_backoff_max_s)
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _collect(self, i: int, task: asyncio.Future[msgspec.Raw], started: float) -> None:
        out = self.outcomes[i]
        try:
            out.value = await asyncio.shield(task)
            out.ok = True
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the batch itself was cancelled
            out.code, out.reason = "cancelled", "the request was cancelled"
        except Exception as exc:
            out.code, out.reason = error_of(exc)
            if out.code == "internal" and (held := _quiet.allow("internal")) is not None:
                note = suppressed_note(held)
                log.exception("request %d of a batch failed unexpectedly%s", i, note)
        out.duration_s = time.perf_counter() - started

    def _stats(self, total_s: float) -> BatchStats:
        outs = self.outcomes
        n = len(outs)
        return BatchStats(
            total_duration_s=total_s,
            average_duration_s=sum(o.duration_s for o in outs) / n if n else 0.0,
            cache_hit_rate=sum(o.cached for o in outs) / n if n else 0.0,
            deduplication_rate=sum(o.deduplicated for o in outs) / n if n else 0.0,
            requests=n,
            executed=self.executed,
        )
