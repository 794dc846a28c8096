"""Scenario 3: a worker that crashes at boot.

At start the engine must fail with the cause; once running, a shard whose worker
cannot boot again must be retried with backoff (no respawn storm), be reported
unhealthy with the cause, and recover -- losing nothing -- once boots work again.
Two kinds of boot crash (``tests.chaos.handlers_boot``): the handler import raises
(``raise``), or the process dies outright during the import (``exit``, code 13).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from engine import Engine, EngineStartError
from engine.core.sharding import stable_shard
from tests.chaos import checker, recorder
from tests.chaos.handlers_boot import BOOT_ERROR, BOOT_EXIT_CODE
from tests.chaos.harness import (
    Plan,
    alive,
    all_workers_up,
    chaos_config,
    conservation,
    sigkill,
    wait_stats,
    worker_info,
)

BOOT = "tests.chaos.handlers_boot:record"
START_BOUND_S = 60.0
IDLE_WATCH_S = 3.0  # how long the failing shard is watched with nothing pending
MAX_BOOTS_IN_WATCH = 10  # backoff 0.2, 0.4, 0.8, 1.6 s allows ~5; a storm does hundreds
CAUSES = {"raise": re.escape(BOOT_ERROR), "exit": rf"(exit|code)\D{{0,12}}\b{BOOT_EXIT_CODE}\b"}
# At start, a hard crash must at least be named as one (its exit code: see the test below).
START_CAUSES = {"raise": CAUSES["raise"], "exit": r"worker \d exited with code"}


@pytest.fixture
def boot_env(tmp_path: Path, record_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    paths = {"log": tmp_path / "boots.log", "flag": tmp_path / "crash-at-boot"}
    monkeypatch.setenv("CHAOS_BOOT_LOG", str(paths["log"]))
    monkeypatch.setenv("CHAOS_BOOT_FLAG", str(paths["flag"]))
    return paths


def boots(log: Path) -> list[tuple[int, int]]:
    """(pid, t_ns) of every boot attempt so far."""
    if not log.exists():
        return []
    return [(int(p), int(t)) for p, t in (ln.split() for ln in log.read_text().splitlines())]


@pytest.mark.parametrize("mode", ["raise", "exit"])
@pytest.mark.timeout(120)
def test_boot_crash_at_start_fails_start_with_cause(
    mode: str,
    boot_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    report: dict[str, Any],
) -> None:
    monkeypatch.setenv("CHAOS_BOOT_MODE", mode)
    boot_env["flag"].touch()
    cfg = chaos_config(workers=2)
    facts: dict[str, Any] = {}

    async def main() -> None:
        eng = Engine(BOOT, cfg)
        t0 = time.monotonic()
        with pytest.raises(EngineStartError) as info:
            await asyncio.wait_for(eng.start(), START_BOUND_S)
        facts["elapsed_s"] = round(time.monotonic() - t0, 3)
        facts["error"] = str(info.value)

    asyncio.run(main())
    attempts = boots(boot_env["log"])
    report.update(mode=mode, boot_attempts=len(attempts), **facts)
    assert re.search(START_CAUSES[mode], facts["error"]), facts["error"]
    # No retry at start: at most one boot attempt per worker.
    assert 1 <= len(attempts) <= cfg.workers, attempts
    assert all(not alive(pid) for pid, _ in attempts)


@pytest.mark.timeout(120)
def test_boot_crash_at_start_reports_the_exit_code(
    boot_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, report: dict[str, Any]
) -> None:
    """Repeated starts with a hard boot crash: every error must carry the exit code."""
    monkeypatch.setenv("CHAOS_BOOT_MODE", "exit")
    boot_env["flag"].touch()
    errors: list[str] = []

    async def main() -> None:
        for _ in range(12):
            with pytest.raises(EngineStartError) as info:
                await asyncio.wait_for(Engine(BOOT, chaos_config()).start(), START_BOUND_S)
            errors.append(str(info.value))

    asyncio.run(main())
    without = [e for e in errors if not re.search(CAUSES["exit"], e)]
    report.update(starts=len(errors), without_exit_code=len(without), examples=without[:3])
    assert without == [], f"{len(without)} of {len(errors)} start errors lack the exit code"


@pytest.mark.parametrize(
    "mode",
    [
        "raise",
        "exit",
    ],
)
@pytest.mark.timeout(120)
def test_boot_crash_on_respawn_backs_off_reports_cause_and_recovers(
    mode: str,
    boot_env: dict[str, Path],
    record_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    report: dict[str, Any],
) -> None:
    monkeypatch.setenv("CHAOS_BOOT_MODE", mode)
    caplog.set_level(logging.INFO, logger="engine")
    cfg = chaos_config(workers=2)
    victim = 0
    recipients = [
        r for r in (f"r{i}" for i in range(200)) if stable_shard(r, cfg.workers) == victim
    ]
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(BOOT, cfg) as eng:
            s = await all_workers_up(eng)
            first = [plan.make(r) for r in recipients]
            await eng.submit_many(first)
            for item in first:
                plan.accept(item)
            assert await eng.drain(30)
            boot_env["flag"].touch()
            n_before = len(boots(boot_env["log"]))
            sigkill(worker_info(s, victim)["pid"])
            # Phase 1: nothing pending on the shard; count boot attempts.
            await asyncio.sleep(IDLE_WATCH_S)
            facts["boots_in_idle_watch"] = len(boots(boot_env["log"])) - n_before
            s = eng.stats()
            facts["unhealthy"] = not worker_info(s, victim)["alive"]
            facts["stats_during_outage"] = s
            # Phase 2: messages wait for the shard while it cannot boot.
            waiting = [plan.make(r) for r in recipients for _ in range(5)]
            await eng.submit_many(waiting)
            for item in waiting:
                plan.accept(item)
            await asyncio.sleep(1.0)
            facts["delivered_during_outage"] = eng.stats()["delivered"]
            boot_env["flag"].unlink()
            t_fix = time.monotonic()
            await wait_stats(
                eng, lambda s: worker_info(s, victim)["alive"], "the shard back", timeout=30
            )
            facts["recovered_after_fix_s"] = round(time.monotonic() - t_fix, 3)
            assert await eng.drain(30), eng.stats()
            facts["stats"] = eng.stats()

    asyncio.run(main())
    res = checker.check(plan.accepted, recorder.read_all(record_dir))
    logs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    cause_seen = bool(
        re.search(CAUSES[mode], json.dumps(facts["stats_during_outage"]))
        or any(re.search(CAUSES[mode], m) for m in logs)
    )
    s = facts["stats"]
    report.update(
        mode=mode,
        boots_in_idle_watch_s=IDLE_WATCH_S,
        boots_in_idle_watch=facts["boots_in_idle_watch"],
        unhealthy_during_outage=facts["unhealthy"],
        cause_reported=cause_seen,
        warnings=logs[:5],
        recovered_after_fix_s=facts["recovered_after_fix_s"],
        checker=res.to_dict(),
        stats=conservation(s),
    )
    problems = []
    if facts["boots_in_idle_watch"] > MAX_BOOTS_IN_WATCH:
        problems.append(f"respawn storm: {facts['boots_in_idle_watch']} boots in {IDLE_WATCH_S}s")
    if not facts["unhealthy"]:
        problems.append("the shard was not reported unhealthy")
    if not cause_seen:
        problems.append(f"the cause ({CAUSES[mode]}) is in neither stats() nor the log: {logs[:3]}")
    if res.duplicated > s["redelivered"]:
        problems.append(f"{res.duplicated} duplicates, {s['redelivered']} counted as redelivered")
    if res.lost or res.unexpected or res.out_of_order:
        problems.append(f"deliveries wrong: {res.to_dict()}")
    if s["delivered"] != len(plan.accepted) or s["in_flight"]:
        problems.append(f"not all delivered: {conservation(s)}")
    assert problems == []
