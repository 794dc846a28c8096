"""The types of batch requests (``request_many``), shared by the engine, the service and the client.

`BatchRequest` is one request; `BatchResults` the answer, one `BatchResult`
per request in order, with the batch's `BatchStats`.  The checks here run
where a batch is made (the client, before sending) and where it is run (the
engine, before queueing anything), so both refuse the same things with the
same words.  The engine's side of batches is `engine.core.batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ipc.codec import Priority, parse_priority

MAX_TIMEOUT_S = 86_400.0
MAX_CONCURRENCY = 10_000  # as ENGINE_BATCH_CONCURRENCY allows
MAX_CACHE_TTL_S = 86_400.0


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One request of a batch: what ``request`` takes, plus whether its answer may be shared."""

    recipient: str
    payload: Any = None
    priority: str | int = "normal"
    timeout_s: float = 30.0
    cache: bool = False
    """A read that may be shared: identical ones run once, the answer is cached."""
    cache_ttl_s: float | None = None
    """How long the answer is kept; None = ENGINE_CACHE_TTL_S."""


class ItemError(msgspec.Struct, frozen=True):
    """Why one request of a batch failed: ``code`` for programs, ``reason`` for people."""

    code: str
    reason: str


class BatchResult(msgspec.Struct, kw_only=True):
    """The answer to one request of a batch: a value (``ok``) or an error."""

    ok: bool
    value: Any = None
    error: ItemError | None = None
    cached: bool = False
    """Served from the response cache."""
    deduplicated: bool = False
    """Joined an identical request that was running (single-flight)."""
    duration_s: float = 0.0
    attempts: int = 0
    """Times this request was sent (0 when it was served from the cache or joined another)."""


class BatchStats(msgspec.Struct, kw_only=True):
    """The figures of one batch."""

    total_duration_s: float
    average_duration_s: float
    cache_hit_rate: float
    deduplication_rate: float
    requests: int
    executed: int
    """Requests this batch sent to a handler (each once, however often retried)."""


class BatchResults(list[BatchResult]):
    """One `BatchResult` per request, in request order, and the batch's ``stats``."""

    def __init__(self, results: list[BatchResult], stats: BatchStats) -> None:
        super().__init__(results)
        self.stats = stats


def check_concurrency(value: object, default: int) -> int:
    """A batch's ``concurrency``: None (the default) or an integer in [1, 10000]."""
    if value is None:
        return default
    if type(value) is not int or not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be an integer in [1, {MAX_CONCURRENCY}], got {value!r}")
    return value


def check_ttl(ttl_s: object) -> float | None:
    """A request's ``cache_ttl_s``: None (the default) or seconds in (0, 86400]."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
        raise TypeError(f"cache_ttl_s must be a number of seconds, got {ttl_s!r}")
    if not 0 < ttl_s <= MAX_CACHE_TTL_S:
        raise ValueError(
            f"cache_ttl_s must be seconds in (0, {MAX_CACHE_TTL_S:.0f}], got {ttl_s!r}"
        )
    return float(ttl_s)


def as_request(req: object) -> BatchRequest:
    """A `BatchRequest`, or a mapping of its fields made into one (unknown fields refused)."""
    if isinstance(req, BatchRequest):
        return req
    if isinstance(req, Mapping):
        try:
            return msgspec.convert(dict(req), BatchRequest)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
    raise TypeError(f"expected a BatchRequest or a mapping, got {type(req).__name__}")


def check_request(req: BatchRequest) -> tuple[Priority, float, float | None]:
    """Check one request's fields; returns its priority, timeout and cache TTL."""
    if type(req.recipient) is not str or not req.recipient:
        raise ValueError(f"recipient must be a non-empty string, got {req.recipient!r}")
    if type(req.priority) is bool:
        raise ValueError(f"invalid priority {req.priority!r}")
    priority = parse_priority(req.priority)
    timeout = req.timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout_s must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be seconds in (0, {MAX_TIMEOUT_S:.0f}], got {timeout!r}")
    if type(req.cache) is not bool:
        raise TypeError(f"cache must be true or false, got {req.cache!r}")
    return priority, float(timeout), check_ttl(req.cache_ttl_s)
