"""Issue 11 items 1, 2, 4, 5: return records that cannot crash a worker, corrupt frame
headers skipped, per-letter replay, dead-letter evictions counted and the mirror read back."""

from __future__ import annotations

import asyncio
from typing import Any

from engine import Config, Engine

H = "tests.integration.handlers_data"


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 1, "stats_interval_s": 0.1, "retry_max_attempts": 1}
    return Config.from_env(env={}, **(base | overrides))


def test_a_10_mb_exception_message_is_a_truncated_dead_letter_not_a_worker_crash() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[list[Any], dict[str, Any], list[int]]:
        async with Engine(f"{H}:oversize", cfg) as eng:
            ids = [await eng.submit("a", {"i": i}) for i in range(5)]
            huge = await eng.submit("a", {"huge": True})
            odd = await eng.submit("a", {"unprintable": True})
            ids += [await eng.submit("a", {"i": i}) for i in range(5, 10)]
            assert await eng.drain(60)
            await asyncio.sleep(0.3)  # a stats interval: the worker's counters arrive
            return eng.dead_letters(), eng.stats(), [huge, odd]

    letters, s, (huge, odd) = asyncio.run(go())
    assert s["delivered"] == 10 and s["dead_lettered"] == 2 and s["in_flight"] == 0
    assert s["workers"][0]["restarts"] == 0
    by_id = {dl.message.id: dl for dl in letters}
    big = by_id[huge]
    assert big.error.startswith("ValueError: xxx")
    assert big.error.endswith("[truncated, 10,485,772 chars]")
    assert len(big.error) <= 4096
    assert big.message.body() == {"huge": True} and not big.payload_dropped
    assert len(big.traceback) <= 8192 and "Traceback (most recent call last)" in big.traceback
    assert by_id[odd].error == "Unprintable: <str() of Unprintable raised RuntimeError>"
