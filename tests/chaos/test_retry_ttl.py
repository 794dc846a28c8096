"""Scenarios 7 and 8: a handler that always fails (exact attempt count, dead letter with reason,
backoff inside the full-jitter bounds) and TTL (an expired message is never delivered, also
mid-retry, and is counted).  The small-scale versions are in test_engine_delivery.py.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from engine import Config, Engine
from tests.chaos import checker, recorder
from tests.chaos.harness import (
    HANDLERS,
    Plan,
    all_workers_up,
    assert_conserved,
    conservation,
    wait_stats,
)

SCHED_SLACK_S = 0.5  # timers and process hops on 2 shared cores, on top of a backoff ceiling
LATE_TOLERANCE_MS = 2.0  # engine checks expiry, then calls: the handler's clock reads a bit later


def env_config(**env: str) -> Config:
    """A Config from ENGINE_* variables, as a deployment would set them."""
    base = {
        "ENGINE_WORKERS": "2",
        "ENGINE_STATS_INTERVAL_S": "0.1",
        "ENGINE_HEARTBEAT_INTERVAL_S": "0.1",
    }
    return Config.from_env(env=base | env)


# -- 7. A handler that always fails --------------------------------------------------------------
@pytest.mark.timeout(120)
def test_always_failing_handler_exact_attempts_dead_letter_and_jitter(
    record_dir: Path, report: dict[str, Any]
) -> None:
    max_attempts, base, cap = 4, 0.05, 0.15
    cfg = env_config(
        ENGINE_RETRY_MAX_ATTEMPTS=str(max_attempts),
        ENGINE_RETRY_BACKOFF_BASE_S=str(base),
        ENGINE_RETRY_BACKOFF_MAX_S=str(cap),
    )
    plan = Plan()
    failing = [plan.make(f"bad{i % 600}", {"f": 1}) for i in range(3000)]
    healthy = [plan.make(f"ok{i % 200}") for i in range(2000)]
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            interleaved = [x for pair in zip(failing, healthy, strict=False) for x in pair]
            mixed = interleaved + failing[len(healthy) :]
            await eng.submit_many(mixed)
            for item in mixed:
                plan.accept(item)
            assert await eng.drain(90), eng.stats()
            # Attempt counters come with the monitor's next report (conservation counts
            # are exact at once); wait for it, then the equality below must hold.
            want = max_attempts * len(failing)
            facts["stats"] = await wait_stats(
                eng, lambda s: s["failed_attempts"] >= want, "the final attempt counters"
            )
            facts["dead"] = eng.dead_letters()

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    bad_uids = {body[0] for _, body in failing}
    ok_expected = {uid: v for uid, v in plan.accepted.items() if uid not in bad_uids}
    res = checker.check(ok_expected, [d for d in deliveries if d.uid not in bad_uids])
    attempts: dict[int, list[recorder.Delivery]] = defaultdict(list)
    for d in deliveries:
        if d.uid in bad_uids:
            attempts[d.uid].append(d)
    want_seq = [(recorder.FAILED, k) for k in range(max_attempts)]
    seen = {uid: [(a.kind, a.attempt) for a in tries] for uid, tries in attempts.items()}
    wrong_attempts = {uid: got for uid, got in seen.items() if got != want_seq}
    missing = bad_uids - set(attempts)
    ratios: dict[int, list[float]] = defaultdict(list)
    over: list[tuple[int, int, float]] = []
    for uid, tries in attempts.items():
        for n, gap in enumerate(checker.pairwise_gaps_s(tries)):
            ceiling = min(cap, base * 2**n)
            ratios[n].append(gap / ceiling)
            if not 0 <= gap <= ceiling + SCHED_SLACK_S:
                over.append((uid, n, round(gap, 4)))
    every = [r for rs in ratios.values() for r in rs]
    dead = facts["dead"]
    dead_by_uid = {dl.message.body()[0]: dl for dl in dead}
    bad_dead = [
        (uid, dl.reason, dl.attempts, dl.error[:60])
        for uid, dl in dead_by_uid.items()
        if (dl.reason, dl.attempts) != ("max_attempts", max_attempts)
        or "ChaosFailure" not in dl.error
    ]
    s = facts["stats"]
    jitter = {
        f"retry_{n}": {
            "ceiling_s": min(cap, base * 2**n),
            "mean_ratio": round(statistics.fmean(rs), 3),
            "share_below_quarter": round(sum(r < 0.25 for r in rs) / len(rs), 3),
            "share_above_three_quarters": round(sum(r > 0.75 for r in rs) / len(rs), 3),
            "share_beyond_ceiling": round(sum(r > 1 for r in rs) / len(rs), 4),
            "max_ratio": round(max(rs), 3),
        }
        for n, rs in sorted(ratios.items())
    }
    report.update(
        config={"ENGINE_RETRY_MAX_ATTEMPTS": max_attempts, "base_s": base, "max_s": cap},
        failing_messages=len(failing),
        healthy_messages=len(healthy),
        wrong_attempt_sequences=len(wrong_attempts),
        dead_letters=len(dead),
        dead_letters_wrong=bad_dead[:5],
        backoff_outside_bounds=over[:10],
        jitter=jitter,
        checker_healthy=res.to_dict(),
        stats=conservation(s),
    )
    assert missing == set(), f"{len(missing)} failing messages never attempted"
    assert wrong_attempts == {}, list(wrong_attempts.items())[:5]
    assert set(dead_by_uid) == bad_uids and len(dead) == len(bad_uids), len(dead)
    assert bad_dead == [], bad_dead[:5]
    assert over == [], over[:10]
    # Full jitter: uniform on [0, ceiling], so about a quarter below 1/4 and above 3/4.
    assert 0.35 <= statistics.fmean(every) <= 0.7, jitter
    assert 0.1 <= sum(r < 0.25 for r in every) / len(every) <= 0.4, jitter
    assert 0.1 <= sum(r > 0.75 for r in every) / len(every) <= 0.4, jitter
    assert res.lost == 0 and res.unexpected == 0 and res.out_of_order == 0, res.examples
    assert_conserved(s, len(plan.accepted))
    assert s["dead_lettered"] == len(failing) and s["delivered"] == len(healthy), s
    assert s["failed_attempts"] == max_attempts * len(failing), s
    assert s["retried"] == (max_attempts - 1) * len(failing), s


# -- 8. TTL ----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_expired_messages_never_delivered_also_mid_retry_and_counted(
    record_dir: Path, report: dict[str, Any]
) -> None:
    cfg = env_config(
        ENGINE_RETRY_MAX_ATTEMPTS="1000",
        ENGINE_RETRY_BACKOFF_BASE_S="0.05",
        ENGINE_RETRY_BACKOFF_MAX_S="0.2",
    )
    rng = random.Random(8)
    plan = Plan()
    ttl_of: dict[int, float] = {}
    groups: dict[str, list[tuple[str, list[Any], float]]] = defaultdict(list)

    def add(group: str, recipient: str, ttl: float, opts: dict[str, Any] | None = None) -> None:
        item = plan.make(recipient, opts)
        groups[group].append((*item, ttl))

    for k in range(100):  # behind a 0.3 s delivery: 0.1 s TTLs expire, 30 s ones do not
        add("blocker", f"q{k}", 30.0, {"d": 0.3})
        for _ in range(20):
            add("queued_short", f"q{k}", 0.1)
        for _ in range(5):
            add("queued_long", f"q{k}", 30.0)
    for k in range(1000):  # fails every attempt, backoff U(0, 0.05 * 2**n): expires mid-retry
        add("mid_retry", f"m{k}", 0.25, {"f": 1})
    for k in range(6000):  # 2 ms each, 150 per recipient, TTLs of 1-500 ms: expiries all
        # around the times deliveries start
        add("boundary", f"b{k % 40}", rng.uniform(0.001, 0.5), {"d": 0.002})
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record_async", cfg) as eng:
            await all_workers_up(eng)
            order = [x for g in ("blocker", "queued_short", "queued_long") for x in groups[g]]
            order.sort(key=lambda x: x[1][0])  # submission order = uid order
            for recipient, body, ttl in order + groups["mid_retry"] + groups["boundary"]:
                await eng.submit(recipient, body, ttl=ttl)
                plan.accept((recipient, body))
                ttl_of[body[0]] = ttl
            assert await eng.drain(90), eng.stats()
            facts["stats"] = eng.stats()
            facts["dead"] = eng.dead_letters()

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    late = []
    max_late_ms = -1e9
    for d in deliveries:  # every handler call: deliveries and failed attempts alike
        expires = d.created_ns + int(ttl_of[d.uid] * 1e9)
        late_ms = (d.t_ns - expires) / 1e6
        max_late_ms = max(max_late_ms, late_ms)
        if late_ms > LATE_TOLERANCE_MS:
            late.append((d.uid, d.recipient, d.attempt, round(late_ms, 3)))
    delivered = {d.uid for d in deliveries if d.kind == recorder.DELIVERED}
    attempted = {d.uid for d in deliveries}
    per_group = {
        g: {
            "messages": len(items),
            "delivered": sum(body[0] in delivered for _, body, _ in items),
            "attempted": sum(body[0] in attempted for _, body, _ in items),
        }
        for g, items in groups.items()
    }
    res = checker.check({u: plan.accepted[u] for u in delivered}, deliveries)
    s = facts["stats"]
    never_delivered = len(plan.accepted) - len(delivered)
    report.update(
        groups=per_group,
        delivered_after_expiry=len(late),
        delivered_after_expiry_examples=late[:10],
        max_start_after_expiry_ms=round(max_late_ms, 3),
        tolerance_ms=LATE_TOLERANCE_MS,
        never_delivered=never_delivered,
        checker=res.to_dict(),
        stats=conservation(s),
    )
    assert late == [], f"{len(late)} handler calls after expiry, e.g. {late[:5]}"
    assert per_group["queued_short"]["delivered"] == 0, per_group
    assert per_group["queued_long"]["delivered"] == per_group["queued_long"]["messages"]
    assert per_group["blocker"]["delivered"] == per_group["blocker"]["messages"]
    assert per_group["mid_retry"]["delivered"] == 0, per_group
    assert per_group["mid_retry"]["attempted"] == per_group["mid_retry"]["messages"]
    b = per_group["boundary"]
    assert 0 < b["delivered"] < b["messages"], f"the boundary group did not straddle expiry: {b}"
    assert res.unexpected == 0 and res.out_of_order == 0 and res.duplicated == 0, res.examples
    assert facts["dead"] == [] and s["dead_lettered"] == 0, facts["dead"][:3]
    assert_conserved(s, len(plan.accepted))
    assert s["expired"] == never_delivered, (s["expired"], never_delivered)
    assert s["delivered"] == len(delivered), (s["delivered"], len(delivered))
