"""Scenario 4: SIGKILL of the monitor (its workers go, a new monitor and workers come, nothing
lost) and of the dispatcher (every engine process exits, no orphans, and the next start
removes the dead engine's segments).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine import Engine
from engine.core.sharding import stable_shard
from engine.core.supervisor import MONITOR_RESTART_LIMIT
from engine.worker.state import window_for
from ipc.shm import list_segments
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
    paced_stream,
    sigkill,
    wait_stats,
)

REPO = Path(__file__).resolve().parents[2]
RECIPIENTS = [f"r{i}" for i in range(500)]
BURST_RECIPIENTS = [f"k{i}" for i in range(100)]  # apart from the stream's: own seqs, no race
BURST = 20_000  # submitted just before each monitor kill: work in flight when it lands
EXIT_BOUND_S = 5.0  # "every engine process exits within a few seconds"


@pytest.mark.timeout(180)
def test_sigkill_monitor_repeatedly_loses_nothing(record_dir: Path, report: dict[str, Any]) -> None:
    total = 600_000  # the paced stream; plus a burst before each kill
    monitor_kills = 3
    assert monitor_kills < MONITOR_RESTART_LIMIT
    cfg = chaos_config()
    plan = Plan()
    kills: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            sampler = RssSampler(eng)
            sampler.start()
            producer = asyncio.create_task(paced_stream(eng, plan, RECIPIENTS, total, 90_000))
            for _ in range(monitor_kills):
                await asyncio.sleep(1.5)
                assert not producer.done(), "the stream ended before the monitor was killed"
                old = eng.monitor.pid
                old_workers = [p.pid for p in psutil.Process(old).children()]
                assert len(old_workers) == cfg.workers, old_workers
                # The paced stream alone may be settled as fast as it comes (in flight 0
                # at the kill): a burst makes sure the kill meets fetched, unsettled work.
                kin = BURST_RECIPIENTS
                burst = [plan.make(kin[i % len(kin)]) for i in range(BURST)]
                await eng.submit_many(burst)
                for item in burst:
                    plan.accept(item)
                in_flight = eng.stats()["in_flight"]
                t_kill = sigkill(old)
                t0 = time.monotonic()
                # Its workers die with it (PR_SET_PDEATHSIG).
                while any(alive(p) for p in old_workers):
                    assert time.monotonic() - t0 < EXIT_BOUND_S, "workers outlived their monitor"
                    await asyncio.sleep(0.01)
                workers_gone_s = time.monotonic() - t0
                await wait_stats(
                    eng,
                    lambda s, old=old, ow=old_workers: (
                        s["monitor"]["alive"]
                        and s["monitor"]["pid"] != old
                        and len(s["workers"]) == cfg.workers
                        and all(w["alive"] and w["pid"] not in ow for w in s["workers"])
                    ),
                    "a new monitor with new workers",
                )
                kills.append(
                    {
                        "t_ns": t_kill,
                        "workers_gone_s": round(workers_gone_s, 3),
                        "new_monitor_and_workers_s": round(time.monotonic() - t0, 3),
                        "in_flight_at_kill": in_flight,
                    }
                )
            await producer
            assert await eng.drain(timeout=60), eng.stats()
            facts["stats"] = await wait_stats(eng, lambda s: s["in_flight"] == 0, "settled")
            await sampler.stop()
            facts["rss"] = sampler.report()

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    res = checker.check(plan.accepted, deliveries)
    shard_of = {r: stable_shard(r, cfg.workers) for r in RECIPIENTS + BURST_RECIPIENTS}
    rec = checker.recovery(
        deliveries, [(k["t_ns"], shard) for k in kills for shard in range(cfg.workers)], shard_of
    )
    s = facts["stats"]
    report.update(
        messages=total + monitor_kills * BURST,
        monitor_kills=kills,
        checker=res.to_dict(),
        in_flight_window=window_for(cfg) + cfg.batch_size,
        recovery=checker.summarize_recovery(rec),
        rss=facts["rss"],
        stats=conservation(s),
    )
    assert any(k["in_flight_at_kill"] for k in kills), "no kill landed with work in flight"
    assert res.lost == 0, res.examples.get("lost")
    assert res.unexpected == 0 and res.out_of_order == 0, res.examples
    assert res.same_process_duplicates == 0, res.examples
    assert res.duplicated <= s["redelivered"], (res.duplicated, s["redelivered"])
    assert_conserved(s, total + monitor_kills * BURST)
    assert s["delivered"] == total + monitor_kills * BURST, s
    assert s["monitor"]["restarts"] == monitor_kills, s["monitor"]


@pytest.mark.timeout(120)
def test_sigkill_dispatcher_leaves_no_process_and_next_start_sweeps(
    record_dir: Path, report: dict[str, Any]
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.engine_child"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"the engine child exited early with {child.wait()}"
        info = json.loads(line)
        t0 = time.monotonic()
        while recorder.count_all(record_dir) < 10_000:  # it is really delivering
            assert time.monotonic() - t0 < 60, "the engine child delivers nothing"
            time.sleep(0.05)
        tree = psutil.Process(child.pid).children(recursive=True)
        procs = {p.pid: " ".join(p.cmdline())[:100] for p in tree}
        segments = list_segments(info["prefix"])
        child.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        child.wait(10)
        exit_s: dict[int, float] = {}
        while len(exit_s) < len(procs) and time.monotonic() - t_kill < 30:
            for pid in procs:
                if pid not in exit_s and not alive(pid):
                    exit_s[pid] = round(time.monotonic() - t_kill, 3)
            time.sleep(0.01)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    left = {pid: cmd for pid, cmd in procs.items() if pid not in exit_s}
    segments_after_kill = list_segments(info["prefix"])

    async def restart() -> None:
        async with Engine(f"{HANDLERS}:record", chaos_config(workers=1)) as eng:
            await eng.submit("after", [0, 0])
            assert await eng.drain(30)

    asyncio.run(restart())
    segments_after_restart = list_segments(info["prefix"])
    report.update(
        engine=info,
        processes=procs,
        exit_after_kill_s={str(k): v for k, v in exit_s.items()},
        orphans=left,
        segments_before_kill=len(segments),
        segments_after_kill=len(segments_after_kill),
        segments_after_next_start=len(segments_after_restart),
    )
    assert {info["monitor"], *info["workers"]} <= set(procs), (info, procs)
    for pid in procs:  # kill anything left so a failure does not leak processes
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes outlived the dispatcher: {left}"
    assert max(exit_s.values()) <= EXIT_BOUND_S, exit_s
    assert segments, "the engine child had no segments"
    assert segments_after_kill == segments, "a dead engine's segments went before the next start"
    assert segments_after_restart == [], segments_after_restart
