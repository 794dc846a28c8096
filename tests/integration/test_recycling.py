"""Workers recycled gracefully (like Celery's max-tasks-per-child and max-memory-per-child).

A worker over ENGINE_MAX_MESSAGES_PER_WORKER (with up to 10% jitter) or
ENGINE_MAX_WORKER_RSS_BYTES is asked to stop fetching, settles what it holds,
exits 0 and is replaced on the same rings: nothing lost, nothing delivered twice,
and the restart is not a crash (no poison suspicion, counted as ``recycled``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from engine import Engine
from tests.integration.handlers_faults import ENV_DIR
from tests.integration.test_engine_faults import (
    DRAIN_TIMEOUT_S,
    Recorded,
    assert_conserved,
    check_deliveries,
    first_report,
    make_config,
    run,
    submit_stream,
    wait_stats,
    worker,
)

RECIPIENTS = 20


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    return Recorded(tmp_path)


def test_message_limit_recycles_workers_without_loss_or_duplicates(recorded: Recorded) -> None:
    per_recipient = 1_000  # 20,000 messages; limit 2,000 per worker process
    limit = 2_000

    async def main() -> None:
        config = make_config(workers=2, max_messages_per_worker=limit, stats_interval_s=0.05)
        async with Engine("tests.integration.handlers_faults:record_slow", config) as eng:
            await first_report(eng)
            await submit_stream(eng, RECIPIENTS, per_recipient)
            assert await eng.drain(DRAIN_TIMEOUT_S)
            s = await wait_stats(
                eng,
                lambda s: sum(w["delivered"] for w in s["workers"]) == s["submitted"],
                "every delivery in the monitor's report",
                15.0,
            )
        total = RECIPIENTS * per_recipient
        assert_conserved(s, total)
        lost, dups, order = check_deliveries(
            recorded.records(),
            dict.fromkeys((f"Agent-{r}" for r in range(RECIPIENTS)), per_recipient),
        )
        assert (lost, dups, order) == ([], 0, [])
        assert s["redelivered"] == 0, s
        recycled = sum(w["recycled"] for w in s["workers"])
        # Each worker delivers ~10,000: at least 2 restarts each at a limit of <= 2,200.
        assert recycled >= 4, s["workers"]
        assert all(w["restarts"] == w["recycled"] for w in s["workers"]), s["workers"]
        # No process went far past its jittered limit: the limit (<= 2,200), plus the
        # window it holds when asked to stop (2,048 + a frame), plus one stats interval.
        per_pid = Counter(r["pid"] for r in recorded.records())
        assert max(per_pid.values()) < 5_000, per_pid

    run(main)


def test_rss_limit_recycles_a_leaking_worker(recorded: Recorded) -> None:
    messages = 200  # 1 MiB leaked each: ~200 MiB without recycling

    async def main() -> None:
        config = make_config(
            workers=1, max_worker_rss_bytes=96 * 2**20, stats_interval_s=0.05, batch_size=8
        )
        async with Engine("tests.integration.handlers_recycle:leak", config) as eng:
            await wait_stats(eng, lambda s: bool(s["workers"]), "the first report", 15.0)
            for seq in range(messages):
                await eng.submit("Agent-0", {"seq": seq})
                if seq % 8 == 7:
                    await asyncio.sleep(0.02)  # give the monitor time to see RSS grow
            assert await eng.drain(DRAIN_TIMEOUT_S)
            s = await wait_stats(
                eng, lambda s: worker(s, 0)["delivered"] == messages, "all delivered", 15.0
            )
        assert_conserved(s, messages)
        lost, dups, order = check_deliveries(recorded.records(), {"Agent-0": messages})
        assert (lost, dups, order) == ([], 0, [])
        w = worker(s, 0)
        assert w["recycled"] >= 1, w
        assert w["restarts"] == w["recycled"], w
        assert w["rss_bytes"] < 200 * 2**20, w

    run(main)
