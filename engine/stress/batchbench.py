"""``engine bench-batch``: the design's batch table, sequential requests against ``request_many``.

The original design's "Enhanced Batch API" reported, for 20 requests with 30%
duplicates against a handler taking 150 ms, 3.0 s one after another and 0.7 s
as a batch.  This runs the same workload on an embedded engine: ``n``
requests, ``duplicates`` of them repeating an earlier one (same recipient and
payload, shuffled in), each answered by `slow_echo` after ``handler_ms``.

- ``sequential``: ``await request(...)`` one at a time (no cache): n handler calls.
- ``batch``: one ``request_many`` with every request cacheable, ``concurrency`` at
  a time; duplicates join the running original (single-flight), so only the
  distinct requests reach the handler.
- ``batch, warm cache``: the same batch again, answered from the response cache.

Sequential runs take n x the handler time (25 minutes for 10,000 at 150 ms), so
beyond ``sequential_max`` requests the sequential row is measured on the first
``sequential_max`` and scaled up, and says so.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from engine.batches import BatchRequest
from engine.config import Config
from engine.core.engine import Engine
from ipc.codec import Message

HANDLER = "engine.stress.batchbench:slow_echo"


async def slow_echo(msg: Message) -> Any:
    """Wait ``payload["ms"]`` milliseconds (an I/O-bound handler), then answer ``payload["k"]``."""
    body = msg.body()
    await asyncio.sleep(body["ms"] / 1000)
    return body["k"]


@dataclass
class Row:
    """One line of the table."""

    mode: str
    requests: int
    total_s: float
    average_s: float
    per_s: float
    cache_hit_rate: float
    deduplication_rate: float
    executed: int
    estimated: bool = False  # the total is scaled up from a sample (see the module docstring)


def workload(n: int, duplicates: float, handler_ms: float, seed: int = 13) -> list[BatchRequest]:
    """``n`` cacheable requests, ``round(n * duplicates)`` of them repeats of earlier ones."""
    if n < 1 or not 0 <= duplicates < 1:
        raise ValueError(f"need n >= 1 and 0 <= duplicates < 1, got {n}, {duplicates}")
    rng = random.Random(seed)
    distinct = max(1, n - round(n * duplicates))
    keys = list(range(distinct)) + [rng.randrange(distinct) for _ in range(n - distinct)]
    rng.shuffle(keys)
    return [
        BatchRequest(
            recipient=f"agent-{k}",  # one recipient each: in-order delivery serialises nothing
            payload={"k": k, "ms": handler_ms},
            timeout_s=max(30.0, 10 * handler_ms / 1000),
            cache=True,
        )
        for k in keys
    ]


async def run_bench(
    n: int,
    duplicates: float,
    handler_ms: float,
    concurrency: int,
    *,
    workers: int = 2,
    sequential_max: int = 200,
    cache_size: int | None = None,
    seed: int = 13,
) -> list[Row]:
    """Measure the three rows (see the module docstring) on a fresh embedded engine.

    ``cache_size`` None keeps ENGINE_CACHE_SIZE (2,000 by default: fewer distinct
    requests than that are all kept; more are evicted, least recently used first).
    """
    requests = workload(n, duplicates, handler_ms, seed)
    overrides: dict[str, object] = {"workers": workers, "log_level": "WARNING"}
    if cache_size is not None:
        overrides["cache_size"] = cache_size
    config = Config.from_env(None, **overrides)
    rows: list[Row] = []
    async with Engine(HANDLER, config) as eng:
        await eng.request("agent-warmup", {"k": -1, "ms": 0}, timeout=30)  # workers are up
        sample = requests[: min(n, sequential_max)]
        started = time.perf_counter()
        for r in sample:
            await eng.request(r.recipient, r.payload, timeout=r.timeout_s)
        took = time.perf_counter() - started
        scale = n / len(sample)
        total = took * scale
        rows.append(Row("sequential", n, total, total / n, n / total, 0.0, 0.0, n, len(sample) < n))
        eng.cache.clear()
        for mode in ("batch", "batch, warm cache"):
            results = await eng.request_many(requests, concurrency=concurrency)
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} requests of the batch failed: {failed[0]}")
            s = results.stats
            rows.append(
                Row(
                    mode,
                    n,
                    s.total_duration_s,
                    s.average_duration_s,
                    n / s.total_duration_s,
                    s.cache_hit_rate,
                    s.deduplication_rate,
                    s.executed,
                )
            )
    return rows


def render(rows: list[Row], handler_ms: float, concurrency: int, cache_size: int) -> str:
    """The rows as the Markdown table tuning.md and the README show."""
    lines = [
        f"| mode (handler {handler_ms:g} ms, concurrency {concurrency}, cache {cache_size:,}) "
        "| requests | total s "
        "| average request s | requests/s | cache hit rate | de-duplication rate "
        "| handler calls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        est = " (est.)" if r.estimated else ""
        lines.append(
            f"| {r.mode} | {r.requests:,} | {r.total_s:,.3f}{est} | {r.average_s:.3f} "
            f"| {r.per_s:,.1f} | {r.cache_hit_rate:.0%} | {r.deduplication_rate:.0%} "
            f"| {r.executed:,} |"
        )
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
