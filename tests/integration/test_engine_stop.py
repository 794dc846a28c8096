"""What a stop leaves behind is never silent: abandoned messages, dead letters, redeliveries.

``Engine.stop`` counts the messages it abandons (submitted, never settled), logs
them at ERROR, keeps the count in ``stats()["abandoned"]`` and, on leaving
``async with`` / ``with``, raises ``DrainTimeout`` unless ``abandon_ok=True``.
Dead letters held only in memory are announced with their count when they die
with the engine; a respawned worker that delivers messages again says so.
The service's stop line gives every outcome, with the engine's own figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from engine import Config, DrainTimeout, Engine, EngineError
from engine.client import Client
from ipc.shm import list_segments
from tests.integration.service_proc import start_service

MESSAGES = 200
SLOW = {"sink": "mock", "mock_delay_s": 0.2}  # 4 recipients x 5/s: 200 take 10 s


def config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 2, "stats_interval_s": 0.1, "shutdown_timeout_s": 0.3}
    return Config.from_env(env={}, **(base | overrides))


def items(n: int = MESSAGES) -> list[tuple[str, int]]:
    return [(f"slow-{i % 4}", i) for i in range(n)]


def own_segments() -> list[str]:
    return list_segments(f"ringway-{os.getpid()}-")


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


def check_abandoned(eng: Engine, abandoned: int, caplog: pytest.LogCaptureFixture) -> None:
    s = eng.stats()
    assert 0 < abandoned <= MESSAGES and s["abandoned"] == abandoned == s["in_flight"], s
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"] + abandoned, s
    [line] = errors(caplog, "unsettled messages abandoned")
    assert f"stopped with {abandoned} unsettled" in line.getMessage()
    assert "drain timed out after 0.3s" in line.getMessage()
    assert own_segments() == []


def test_async_with_raises_drain_timeout_when_the_stop_abandons_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = Engine(None, config(**SLOW))

    async def main() -> None:
        async with eng:
            await eng.submit_many(items())

    with pytest.raises(DrainTimeout) as info:
        asyncio.run(main())
    assert isinstance(info.value, EngineError)
    assert "abandon_ok=True" in str(info.value) and "ENGINE_SHUTDOWN_TIMEOUT_S" in str(info.value)
    check_abandoned(eng, info.value.abandoned, caplog)


def test_with_raises_drain_timeout_too(caplog: pytest.LogCaptureFixture) -> None:
    eng = Engine(None, config(**SLOW))
    with pytest.raises(DrainTimeout) as info, eng as sync:
        sync.submit_many(items())
    check_abandoned(eng, info.value.abandoned, caplog)


def test_abandon_ok_accepts_the_loss_but_still_counts_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = Engine(None, config(**SLOW), abandon_ok=True)

    async def main() -> None:
        async with eng:
            await eng.submit_many(items())

    asyncio.run(main())
    check_abandoned(eng, eng.stats()["abandoned"], caplog)


def test_an_error_leaving_the_block_is_not_replaced(caplog: pytest.LogCaptureFixture) -> None:
    eng = Engine(None, config(**SLOW))

    async def main() -> None:
        async with eng:
            await eng.submit_many(items())
            raise ValueError("the caller's own error")

    with pytest.raises(ValueError, match="the caller's own error"):
        asyncio.run(main())
    check_abandoned(eng, eng.stats()["abandoned"], caplog)


def test_a_stop_with_a_full_ring_leaves_no_flush_behind(caplog: pytest.LogCaptureFixture) -> None:
    """Messages still buffered for a full ring at stop are abandoned, and nothing keeps
    trying to write them to the unmapped ring afterwards (it used to, in a loop)."""

    async def main() -> dict[str, Any]:
        eng = Engine(None, config(**SLOW, ring_bytes=65536), abandon_ok=True)
        async with eng:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # far more than the ring holds
                    await eng.submit_many([(f"slow-{i % 4}", "x" * 200) for i in range(20000)])
        await asyncio.sleep(0.3)  # the loop runs on after the stop, as an application's does
        return eng.stats()

    s = asyncio.run(main())
    assert s["abandoned"] > 0
    assert errors(caplog, "flushing a lane failed") == []


def test_stop_returns_the_count_and_a_fast_stop_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[int, int]:
        eng = Engine(None, config(**SLOW))
        await eng.start()
        await eng.submit_many(items())
        first = await eng.stop(fast=True)
        again = await eng.stop()  # already stopped: the same figure
        assert eng.stats()["abandoned"] == first
        return first, again

    first, again = asyncio.run(main())
    assert 0 < first == again
    [line] = errors(caplog, "unsettled messages abandoned (fast stop)")
    assert f"stopped with {first} unsettled" in line.getMessage()


def test_a_clean_stop_abandons_nothing_and_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    eng = Engine(None, config(sink="null", shutdown_timeout_s=30.0))

    async def main() -> None:
        async with eng:
            await eng.submit_many(items())

    asyncio.run(main())
    s = eng.stats()
    assert s["abandoned"] == 0 and s["delivered"] == MESSAGES, s
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- dead letters held only in memory ---------------------------------------------------------
FAILING = {"sink": "mock", "mock_success_rate": 0.0, "retry_max_attempts": 1}


def test_dead_letters_held_in_memory_are_announced_when_they_die(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = Engine(None, config(shutdown_timeout_s=30.0, **FAILING))

    async def main() -> None:
        async with eng:
            await eng.submit_many(items(20))
            assert await eng.drain(30)

    asyncio.run(main())
    assert eng.stats()["dead_lettered"] == 20
    [line] = [r for r in caplog.records if "dead letters kept in memory" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "discarding 20 dead letters" in line.getMessage()
    assert "ENGINE_DLQ_PATH" in line.getMessage()


def test_dead_letters_mirrored_to_a_file_are_not_announced(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    dlq = str(tmp_path / "dlq.jsonl")
    eng = Engine(None, config(shutdown_timeout_s=30.0, dlq_path=dlq, **FAILING))

    async def main() -> None:
        async with eng:
            await eng.submit_many(items(20))
            assert await eng.drain(30)

    asyncio.run(main())
    assert len((tmp_path / "dlq.jsonl").read_text().splitlines()) == 20
    assert not [r for r in caplog.records if "dead letters kept in memory" in r.getMessage()]


# -- redelivery -------------------------------------------------------------------------------
def test_a_redelivery_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A worker killed while it holds messages: its successor delivers them again, and
    the log says so (the handler sees those messages twice)."""
    eng = Engine(None, config(sink="mock", mock_delay_s=0.05, shutdown_timeout_s=60.0))

    async def main() -> dict[str, Any]:
        async with eng:
            await eng.submit_many([("one", i) for i in range(40)])
            while len(eng.stats()["workers"]) < 2:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a few delivered, the rest held by the worker
            for w in eng.stats()["workers"]:
                os.kill(w["pid"], signal.SIGKILL)
            assert await eng.drain(60)
            return {"stats": eng.stats()}

    facts = asyncio.run(main())
    s = facts["stats"]
    assert s["redelivered"] > 0 and s["delivered"] == 40, s
    lines = [r for r in caplog.records if "delivers again" in r.getMessage()]
    assert lines and all(r.levelno == logging.WARNING for r in lines), caplog.text
    counts = [getattr(r, "redelivered", 0) for r in lines]  # rate-limited: at most the total
    assert all(n > 0 for n in counts) and sum(counts) <= s["redelivered"], (counts, s)


# -- the service's stop line ------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_service_stop_line_gives_every_outcome_with_the_engines_figures(tmp_path: Path) -> None:
    svc = start_service(
        tmp_path,
        ENGINE_SINK="mock",
        ENGINE_MOCK_DELAY_S="0.2",
        ENGINE_WORKERS="2",
        ENGINE_SHUTDOWN_TIMEOUT_S="0.5",
    )
    try:
        with Client(svc.url) as client:
            client.submit_many(items())
        svc.wait_stats(lambda s: len(s["workers"]) == 2)  # and 10 s of work queued
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(120)
    finally:
        svc.stop()
    assert code == 1, svc.log_text()  # the drain timed out: a failure, not a clean stop
    [line] = svc.logs("stopped with unsettled messages (drain timed out after 0.5s)")
    keys = ("submitted", "delivered", "dead_lettered", "expired", "redelivered", "abandoned")
    assert all(isinstance(line.get(k), int) for k in keys), line
    assert line["submitted"] == MESSAGES and line["abandoned"] > 0, line
    assert line["submitted"] == sum(line[k] for k in keys if k not in ("submitted", "redelivered"))
    [engine_line] = [x for x in svc.lines if "unsettled messages abandoned" in str(x.get("msg"))]
    assert engine_line["abandoned"] == line["abandoned"], (engine_line, line)  # one figure
