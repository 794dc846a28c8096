"""Scenarios 1 and 2: workers SIGKILLed every second under a million messages; a SIGSTOPped
worker detected by heartbeat age, replaced, and harmless when continued.

The small-scale versions are in tests/integration/test_engine_faults.py; these run at
scale and judge by what the handlers recorded (``tests.chaos.checker``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from engine import Engine
from engine.core.sharding import stable_shard
from engine.procutil import WORKER_STOP
from engine.worker.state import window_for
from tests.chaos import checker, recorder
from tests.chaos.harness import (
    HANDLERS,
    Plan,
    RssSampler,
    alive,
    all_workers_up,
    assert_conserved,
    chaos_config,
    conservation,
    leftovers,
    paced_stream,
    pending_signals,
    sigkill,
    size,
    wait_stats,
    worker_info,
)

RECIPIENTS = [f"r{i}" for i in range(1000)]
MIN_KILLS = 10
KILL_EVERY_S = 1.0
STREAM_S = 12.0  # the stream is paced to last at least this long: >= MIN_KILLS kills


# -- 1. SIGKILL a random worker every second ----------------------------------------------
@pytest.fixture(scope="module")
def kill_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the scenario, judged by the two tests below (so a known engine bug in
    one criterion cannot mask a failure of the others)."""
    record_dir = tmp_path_factory.mktemp("kill-records")
    saved = os.environ.get(recorder.ENV_DIR)
    os.environ[recorder.ENV_DIR] = str(record_dir)
    try:
        return _kill_run(record_dir)
    finally:
        if saved is None:
            os.environ.pop(recorder.ENV_DIR, None)
        else:
            os.environ[recorder.ENV_DIR] = saved


def _kill_run(record_dir: Path) -> dict[str, Any]:
    t_run = time.monotonic()
    total = size("kill_messages")
    cfg = chaos_config()
    plan = Plan()
    kills: list[tuple[int, int, int]] = []  # (t_ns, shard, pid)
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "1")))
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            sampler = RssSampler(eng)
            sampler.start()
            t0 = time.monotonic()
            producer = asyncio.create_task(
                paced_stream(eng, plan, RECIPIENTS, total, rate=total / STREAM_S)
            )
            killed: set[int] = set()
            in_flight_at_kill = []
            while True:
                done, _ = await asyncio.wait({producer}, timeout=KILL_EVERY_S)
                if done:
                    break
                s = eng.stats()
                live = [
                    w
                    for w in s["workers"]
                    if w["alive"] and w["pid"] not in killed and alive(w["pid"])
                ]
                if not live:
                    continue  # both still respawning: skip this second
                w = rng.choice(live)
                kills.append((sigkill(w["pid"]), w["worker"], w["pid"]))
                killed.add(w["pid"])
                in_flight_at_kill.append(s["in_flight"])
            await producer
            facts["stream_s"] = round(time.monotonic() - t0, 2)
            t1 = time.monotonic()
            assert await eng.drain(timeout=120), eng.stats()
            facts["drain_s"] = round(time.monotonic() - t1, 2)
            facts["stats"] = await wait_stats(
                eng,
                lambda s: (
                    sum(w["restarts"] for w in s["workers"]) >= len(kills)
                    and all(w["alive"] for w in s["workers"])
                ),
                "every killed worker replaced",
            )
            await sampler.stop()
            facts["rss"] = sampler.report()
            facts["in_flight_at_kill"] = in_flight_at_kill

    asyncio.run(main())
    segments_left, procs_left = leftovers()
    assert (segments_left, procs_left) == ([], []), "the engine left segments or processes"
    t_check = time.monotonic()
    deliveries = recorder.read_all(record_dir)
    res = checker.check(plan.accepted, deliveries)
    shard_of = {r: stable_shard(r, cfg.workers) for r in RECIPIENTS}
    rec = checker.recovery(deliveries, [(t, shard) for t, shard, _ in kills], shard_of)
    per_kill = checker.redelivery_per_kill(deliveries, kills, shard_of)
    window = window_for(cfg) + cfg.batch_size  # a worker fetches whole frames up to its window
    report = {
        "run_s": round(time.monotonic() - t_run, 2),
        "messages": total,
        "kills": len(kills),
        "stream_s": facts["stream_s"],
        "drain_s": facts["drain_s"],
        "check_s": round(time.monotonic() - t_check, 2),
        "checker": res.to_dict(),
        "in_flight_window": window,
        "max_duplicates_per_kill": max((k["successor_duplicates"] for k in per_kill), default=0),
        "in_flight_at_kill": facts["in_flight_at_kill"],
        "recovery": checker.summarize_recovery(rec),
        "recovery_per_kill": rec,
        "redelivery_per_kill": per_kill,
        "rss": facts["rss"],
        "stats": conservation(facts["stats"]),
    }
    return {
        "res": res,
        "stats": facts["stats"],
        "kills": kills,
        "per_kill": per_kill,
        "window": window,
        "total": total,
        "report": report,
    }


@pytest.mark.timeout(300)
def test_sigkill_random_worker_every_second(
    kill_run: dict[str, Any], report: dict[str, Any]
) -> None:
    """Nothing lost, every duplicate counted as redelivered, per-recipient order kept."""
    report.update(kill_run["report"])
    res, s, kills, total = kill_run["res"], kill_run["stats"], kill_run["kills"], kill_run["total"]
    assert len(kills) >= MIN_KILLS, f"only {len(kills)} kills during the stream"
    assert res.lost == 0, res.examples.get("lost")
    assert res.unexpected == 0, res.examples.get("unexpected")
    assert res.out_of_order == 0, res.examples.get("out_of_order")
    assert res.same_process_duplicates == 0, res.examples.get("same_process_duplicates")
    assert res.duplicated <= s["redelivered"], (res.duplicated, s["redelivered"])
    assert_conserved(s, total)
    assert s["delivered"] == total and s["dead_lettered"] == 0 and s["expired"] == 0, s
    assert sum(w["restarts"] for w in s["workers"]) == len(kills), s["workers"]
    assert all(not alive(pid) for _, _, pid in kills)


@pytest.mark.timeout(300)
def test_sigkill_duplicates_per_kill_within_in_flight_window(
    kill_run: dict[str, Any], report: dict[str, Any]
) -> None:
    """Each kill's redelivered duplicates stay within the killed worker's in-flight window."""
    per_kill, window = kill_run["per_kill"], kill_run["window"]
    over = [k for k in per_kill if k["successor_duplicates"] > window]
    report.update(
        in_flight_window=window,
        kills=len(per_kill),
        kills_over_window=len(over),
        duplicates_per_kill=[k["successor_duplicates"] for k in per_kill],
        over_window_examples=over[:5],
    )
    assert per_kill, "no kills"
    # Every duplicate a successor delivered was its killed predecessor's (no chain).
    assert all(k["of_them_last_by_victim"] == k["successor_duplicates"] for k in per_kill)
    assert over == [], f"{len(over)} of {len(per_kill)} kills redelivered more than {window}"


# -- 2. SIGSTOP: stall detection -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sigstopped_worker_detected_replaced_and_harmless_after_sigcont(
    record_dir: Path, report: dict[str, Any]
) -> None:
    stall_s = 1.0
    cfg = chaos_config(stall_timeout_s=stall_s)
    plan = Plan()
    total = 200_000
    victim = 0
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            old_pid = worker_info(await all_workers_up(eng), victim)["pid"]
            producer = asyncio.create_task(paced_stream(eng, plan, RECIPIENTS, total, total / 6))
            await asyncio.sleep(1.5)
            assert not producer.done(), "the stream ended before the stop"
            os.kill(old_pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            facts["t_stop_ns"] = time.monotonic_ns()
            # Detection: the monitor signals the stopped process (its WORKER_STOP stays
            # pending while it is stopped) or it is already gone.
            while alive(old_pid) and not pending_signals(old_pid) & (1 << (WORKER_STOP - 1)):
                assert time.monotonic() - t_stop < 30, "the stopped worker was never detected"
                await asyncio.sleep(0.01)
            facts["detected_s"] = round(time.monotonic() - t_stop, 3)
            s = await wait_stats(
                eng,
                lambda s: (
                    worker_info(s, victim)["alive"] and worker_info(s, victim)["pid"] != old_pid
                ),
                "a replacement for the stopped worker",
            )
            facts["replaced_s"] = round(time.monotonic() - t_stop, 3)
            facts["new_pid"] = worker_info(s, victim)["pid"]
            while alive(old_pid):
                assert time.monotonic() - t_stop < 30, "the stopped worker was never killed"
                await asyncio.sleep(0.01)
            # SIGCONT of the old process: it must be dead, so the signal reaches nobody.
            try:
                os.kill(old_pid, signal.SIGCONT)
                facts["sigcont"] = "delivered to a (zombie or recycled) pid"
            except ProcessLookupError:
                facts["sigcont"] = "no such process"
            old_file = record_dir / f"{old_pid}.rec"
            facts["old_records_at_cont"] = old_file.stat().st_size if old_file.exists() else 0
            await producer
            assert await eng.drain(timeout=60), eng.stats()
            facts["old_records_end"] = old_file.stat().st_size if old_file.exists() else 0
            facts["stats"] = await wait_stats(eng, lambda s: s["in_flight"] == 0, "settled")
            facts["old_pid"] = old_pid

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    res = checker.check(plan.accepted, deliveries)
    shard_of = {r: stable_shard(r, cfg.workers) for r in RECIPIENTS}
    rec = checker.recovery(deliveries, [(facts["t_stop_ns"], victim)], shard_of)
    s = facts["stats"]
    report.update(
        messages=total,
        stall_timeout_s=stall_s,
        detected_after_s=facts["detected_s"],
        replaced_after_s=facts["replaced_s"],
        sigcont=facts["sigcont"],
        checker=res.to_dict(),
        in_flight_window=window_for(cfg) + cfg.batch_size,
        recovery_after_stop=rec,
        stats=conservation(s),
    )
    assert facts["detected_s"] <= stall_s + 1.0, facts
    assert facts["sigcont"] == "no such process", facts
    assert facts["old_records_end"] == facts["old_records_at_cont"], "the old worker delivered"
    assert res.lost == 0, res.examples.get("lost")
    assert res.unexpected == 0 and res.out_of_order == 0, res.examples
    assert res.same_process_duplicates == 0, res.examples
    assert res.duplicated <= s["redelivered"], (res.duplicated, s["redelivered"])
    assert_conserved(s, total)
    assert worker_info(s, victim)["restarts"] == 1 and worker_info(s, 1 - victim)["restarts"] == 0
