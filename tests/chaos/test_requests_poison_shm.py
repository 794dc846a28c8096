"""Scenarios 12, 13 and 14a: request/response while workers are killed; poison messages that
kill their worker; rings that do not fit in /dev/shm.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine import Config, Engine, RequestFailed, RequestTimeout
from engine.core.sharding import stable_shard
from engine.errors import ShmSpaceError
from engine.worker.state import window_for
from ipc.shard import shard_bytes
from ipc.shm import shm_free_bytes
from tests.chaos import checker, recorder
from tests.chaos.handlers import POISONED
from tests.chaos.harness import (
    HANDLERS,
    Plan,
    alive,
    all_workers_up,
    assert_conserved,
    chaos_config,
    conservation,
    descendants,
    own_segments,
    sigkill,
    wait_stats,
)


# -- 12. Request/response with workers killed -------------------------------------------------
@pytest.mark.timeout(180)
def test_requests_under_worker_kills_reply_or_timeout_never_misrouted(
    record_dir: Path, report: dict[str, Any]
) -> None:
    callers, rate, timeout_s = 4000, 1000.0, 5.0  # callers start over 4 s
    min_kills = 5
    cfg = chaos_config()
    plan = Plan()
    rng = random.Random(12)
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[Any, Any]] = []
    reply_cids: list[int] = []
    kills: list[int] = []

    async def call(eng: Engine, t0: float, i: int) -> None:
        recipient, body = plan.make(f"r{i % 200}", {"d": 0.02})
        plan.accept((recipient, body))
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        try:
            # The outer bound catches a caller left hanging (a worker crash must never).
            reply = await asyncio.wait_for(
                eng.request(recipient, body, timeout=timeout_s), timeout_s + 10
            )
        except RequestTimeout:
            outcomes["request_timeout"] += 1
            return
        except TimeoutError:
            outcomes["hung"] += 1
            return
        except RequestFailed as exc:
            outcomes[f"request_failed: {str(exc)[:60]}"] += 1
            return
        outcomes["reply"] += 1
        uid, seq, got_recipient, cid = reply
        if [uid, seq, got_recipient] != [body[0], body[1], recipient]:
            wrong.append(((recipient, body[:2]), reply))
        reply_cids.append(cid)

    async def killer(eng: Engine, done: asyncio.Event) -> None:
        killed: set[int] = set()
        while not done.is_set():
            await asyncio.sleep(0.5)
            live = [w for w in eng.stats()["workers"] if w["alive"] and w["pid"] not in killed]
            live = [w for w in live if alive(w["pid"])]
            if live and not done.is_set():
                w = rng.choice(live)
                sigkill(w["pid"])
                killed.add(w["pid"])
                kills.append(w["worker"])

    async def main() -> None:
        async with Engine(f"{HANDLERS}:answer", cfg) as eng:
            await all_workers_up(eng)
            done = asyncio.Event()
            k = asyncio.create_task(killer(eng, done))
            t0 = time.monotonic()
            await asyncio.gather(*(call(eng, t0, i) for i in range(callers)))
            report["callers_s"] = round(time.monotonic() - t0, 2)
            done.set()
            await k
            assert await eng.drain(60), eng.stats()
            report["stats"] = conservation(eng.stats())
            report["replies_unmatched"] = eng.dispatcher.counts["replies_unmatched"]

    asyncio.run(main())
    answered = recorder.read_all(record_dir)
    res = checker.check(plan.accepted, answered)
    report.update(
        callers=callers,
        kills=len(kills),
        outcomes=dict(outcomes),
        misrouted_replies=wrong[:10],
        handler_calls=res.to_dict(),
    )
    assert len(kills) >= min_kills, f"only {len(kills)} kills while the callers waited"
    assert sum(outcomes.values()) == callers, outcomes
    assert set(outcomes) <= {"reply", "request_timeout"}, outcomes
    assert wrong == [], f"{len(wrong)} replies reached the wrong caller: {wrong[:5]}"
    assert len(set(reply_cids)) == len(reply_cids), "one correlation id answered two callers"
    assert outcomes["reply"] > 0
    assert res.unexpected == 0, res.examples


# -- 13. Poison messages ---------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_poison_messages_quarantined_after_three_crashes_rest_delivered(
    record_dir: Path, report: dict[str, Any]
) -> None:
    max_crashes = 3
    cfg = chaos_config(poison_max_crashes=max_crashes)
    recipients = [f"r{i}" for i in range(300)]
    shard_of = {r: stable_shard(r, cfg.workers) for r in recipients}
    # Two poison messages on shard 0 (one after the other is quarantined), one on shard 1.
    targets = [
        next(r for r in recipients if shard_of[r] == 0),
        next(r for r in recipients if shard_of[r] == 1),
        [r for r in recipients if shard_of[r] == 0][1],
    ]
    per_recipient = 200
    plan = Plan()
    poison_uids: dict[int, str] = {}
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            for seq in range(per_recipient):
                items = [plan.make(r) for r in recipients]
                if seq in (40, 100, 160):
                    target = targets[(seq - 40) // 60]
                    poison = plan.make(target, {"p": 1})
                    poison_uids[poison[1][0]] = target
                    items.insert(recipients.index(target) + 1, poison)
                await eng.submit_many(items)
                for item in items:
                    plan.accept(item)
                await asyncio.sleep(0.01)  # a stream, so poison lands mid-flow
            assert await eng.drain(120), eng.stats()
            facts["stats"] = await wait_stats(
                eng,
                lambda s: (
                    all(w["alive"] for w in s["workers"])
                    and sum(w["restarts"] for w in s["workers"]) >= max_crashes * len(poison_uids)
                ),
                "every poison crash respawned",
            )
            facts["dead"] = eng.dead_letters()

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    healthy = {u: v for u, v in plan.accepted.items() if u not in poison_uids}
    res = checker.check(healthy, deliveries)
    crashes = Counter(d.uid for d in deliveries if d.kind == POISONED)
    dead = facts["dead"]
    s = facts["stats"]
    restarts = {w["worker"]: w["restarts"] for w in s["workers"]}
    report.update(
        messages=len(plan.accepted),
        poison={str(u): {"recipient": r, "crashes": crashes[u]} for u, r in poison_uids.items()},
        dead_letters=[
            {"uid": dl.message.body()[0], "reason": dl.reason, "error": dl.error} for dl in dead
        ],
        worker_restarts=restarts,
        checker=res.to_dict(),
        in_flight_window=window_for(cfg) + cfg.batch_size,
        stats=conservation(s),
    )
    assert sorted(dl.message.body()[0] for dl in dead) == sorted(poison_uids), dead
    for dl in dead:
        assert dl.reason == "worker_crash", dl
        assert dl.message.recipient == poison_uids[dl.message.body()[0]]
        assert re.search(rf"\b{max_crashes}\b", dl.error), dl.error
    assert all(crashes[u] == max_crashes for u in poison_uids), crashes
    assert res.lost == 0, res.examples.get("lost")
    assert res.unexpected == 0 and res.out_of_order == 0, res.examples
    assert res.same_process_duplicates == 0, res.examples
    assert res.duplicated <= s["redelivered"], (res.duplicated, s["redelivered"])
    assert_conserved(s, len(plan.accepted))
    assert s["dead_lettered"] == len(poison_uids) and s["delivered"] == len(healthy), s
    per_shard = Counter(shard_of[r] for r in poison_uids.values())
    assert restarts == {i: max_crashes * per_shard[i] for i in range(cfg.workers)}, restarts


# -- 14a. Rings that do not fit in /dev/shm --------------------------------------------------------
@pytest.mark.parametrize("facade", ["async", "sync"])
@pytest.mark.timeout(60)
def test_rings_larger_than_dev_shm_fail_start_clearly(facade: str, report: dict[str, Any]) -> None:
    ring = 1 << 30  # the largest ENGINE_RING_BYTES allows
    per_shard = shard_bytes(ring, ring)
    free = shm_free_bytes()
    workers = free // per_shard + 3  # 10+ GiB over: others' use of /dev/shm cannot close it
    if workers > 256:
        pytest.skip(f"/dev/shm has {free:,} bytes free: more than 256 maximal shards need")
    env = {
        "ENGINE_RING_BYTES": str(ring),
        "ENGINE_RETURN_RING_BYTES": str(ring),
        "ENGINE_WORKERS": str(workers),
    }
    cfg = Config.from_env(env=env)
    segments_before = own_segments()
    t0 = time.monotonic()
    with pytest.raises(ShmSpaceError) as info:
        if facade == "async":
            asyncio.run(Engine(f"{HANDLERS}:record", cfg).start())
        else:
            with Engine(f"{HANDLERS}:record", cfg):
                pass
    elapsed = time.monotonic() - t0
    text = str(info.value)
    report.update(
        env=env,
        free_bytes=free,
        needed_bytes=workers * per_shard,
        error=text,
        elapsed_s=round(elapsed, 3),
        free_after=shm_free_bytes(),
    )
    assert "/dev/shm" in text and "ENGINE_RING_BYTES" in text, text
    assert f"{workers * per_shard:,}" in text, text  # the figures: what it needs
    assert own_segments() == segments_before
    assert descendants() == [] or all(
        "resource_tracker" in " ".join(p.cmdline()) for p in descendants()
    )
