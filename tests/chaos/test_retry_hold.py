"""Issue 11 item 7: a message waiting for a long retry must not pin its lane's ring.

A retry longer than ``ENGINE_MAX_RETRY_HOLD_S`` is handed back to the dispatcher,
which holds it (and every later message of its recipient and lane) out of the ring
and writes it back when it is due, still in order for the recipient.  Judged by
what the handlers recorded (``tests.chaos.checker``), with a small ring.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine
from engine.core.sharding import stable_shard
from engine.errors import FrameTooLargeError, QueueFull
from tests.chaos import checker, recorder
from tests.chaos.harness import (
    HANDLERS,
    Plan,
    all_workers_up,
    assert_conserved,
    chaos_config,
    conservation,
    sigkill,
    wait_stats,
    worker_info,
)

SMALL_RING = 65536  # the smallest ENGINE_RING_BYTES: a few hundred messages
# Messages to others while one waits; the 1,000,000 with RETRY_HOLD_MESSAGES=1000000.
FLOW = int(os.environ.get("RETRY_HOLD_MESSAGES", "300000"))
RETRY_S = 60 if FLOW <= 300_000 else 600  # the wait: longer than the flow takes
LIVENESS_S = RETRY_S - 10.0  # a pinned ring could only move on after the retry
OTHERS = [f"o{i}" for i in range(200)]


def _delivered_uids(record_dir: Path) -> set[int]:
    return {d.uid for d in recorder.read_all(record_dir) if d.kind == recorder.DELIVERED}


# -- (a) the ring flows while one recipient waits 60 s for its retry ------------------------
@pytest.mark.timeout(RETRY_S + 60)
def test_long_retry_does_not_pin_the_ring(
    record_dir: Path, report: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=1.0, shutdown_timeout_s=1.0)
    plan = Plan()
    slow = plan.make("waits", {"r": RETRY_S})
    flow = [plan.make(OTHERS[i % len(OTHERS)]) for i in range(FLOW)]
    facts: dict[str, Any] = {}

    async def main() -> None:
        eng = Engine(f"{HANDLERS}:record", cfg, abandon_ok=True)
        async with eng:
            await all_workers_up(eng)
            await eng.submit_many([slow])
            plan.accept(slow)
            await wait_stats(eng, lambda s: s["deferred"] == 1, "the retry handed back")
            # Many times what the ring holds, behind the waiting message in its lane.
            async with asyncio.timeout(LIVENESS_S):
                for i in range(0, FLOW, 2000):
                    chunk = flow[i : i + 2000]
                    await eng.submit_many(chunk)
                    for item in chunk:
                        plan.accept(item)
                s = await wait_stats(
                    eng,
                    lambda s: s["delivered"] == FLOW,
                    "every other message delivered",
                    timeout=LIVENESS_S,
                )
            facts["while_waiting"] = conservation(s) | {"deferred": s["deferred"]}
        facts["abandoned"] = eng.abandoned
        facts["final"] = eng.stats()

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    expected = {uid: v for uid, v in plan.accepted.items() if uid != slow[1][0]}
    chk = checker.check(expected, deliveries)
    report.update(facts, checker=chk.to_dict(), ring_bytes=SMALL_RING, messages=FLOW)
    assert chk.lost == 0 and chk.duplicated == 0 and chk.out_of_order == 0, chk
    assert facts["while_waiting"]["deferred"] == 1
    assert slow[1][0] not in _delivered_uids(record_dir)  # still waiting for its retry
    # Stopped before it was due: reported, never silently dropped.
    assert facts["abandoned"] == 1
    assert facts["final"]["abandoned"] == 1 and facts["final"]["deferred"] == 1
    [line] = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert "stopped with 1 unsettled messages abandoned" in line
    assert "1 of them held for a retry" in line


# -- (b) order for the waiting recipient ----------------------------------------------------
def _run_schedule(
    record_dir: Path,
    before: int,
    during: int,
    after: int,
    retry_s: float,
    handler: str = "record",
    retries: int = 1,
) -> tuple[checker.DeliveryCheck, dict[str, Any]]:
    """One recipient: ``before`` messages, one that retries, ``during`` while it is held,
    then ``after`` once it was delivered; others flow alongside.  Returns the verdict."""
    config = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def send(items: list[tuple[str, list[Any]]]) -> None:
        await eng_box[0].submit_many(items)
        for item in items:
            plan.accept(item)

    eng_box: list[Engine] = []

    async def main() -> None:
        async with Engine(f"{HANDLERS}:{handler}", config) as eng:
            eng_box.append(eng)
            await all_workers_up(eng)
            await send([plan.make("R") for _ in range(before)])
            await send([plan.make("R", {"r": retry_s, "rn": retries})])
            await wait_stats(eng, lambda s: s["deferrals"] >= 1, "the retry handed back")
            for i in range(during):
                await send([plan.make("R"), plan.make(OTHERS[i % 7])])
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "the held messages delivered")
            await send([plan.make("R") for _ in range(after)])
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything delivered")
            facts["stats"] = conservation(s) | {"deferrals": s["deferrals"]}
            assert_conserved(s, len(plan.accepted))

    asyncio.run(main())
    chk = checker.check(plan.accepted, recorder.read_all(record_dir))
    return chk, facts


@pytest.mark.timeout(120)
def test_waiting_recipient_keeps_submission_order(record_dir: Path, report: dict[str, Any]) -> None:
    # Two long retries in a row: written back, handed back again, written back again.
    chk, facts = _run_schedule(record_dir, before=50, during=300, after=50, retry_s=0.6, retries=2)
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.duplicated, chk.out_of_order, chk.unexpected) == (0, 0, 0, 0), chk
    assert facts["stats"]["deferrals"] >= 2


@pytest.mark.timeout(300)
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.integers(0, 20),
    during=st.integers(0, 60),
    after=st.integers(0, 20),
    retry_s=st.sampled_from([0.3, 0.6]),
    retries=st.integers(1, 2),
    async_pool=st.booleans(),
)
def test_order_holds_for_any_schedule(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    before: int,
    during: int,
    after: int,
    retry_s: float,
    retries: int,
    async_pool: bool,
) -> None:
    d = tmp_path_factory.mktemp("schedule")
    monkeypatch.setenv(recorder.ENV_DIR, str(d))
    handler = "record_async" if async_pool else "record"
    chk, _ = _run_schedule(d, before, during, after, retry_s, handler, retries)
    assert (chk.lost, chk.duplicated, chk.out_of_order, chk.unexpected) == (0, 0, 0, 0), chk


# -- (c) the parked recipient's worker is SIGKILLed ------------------------------------------
@pytest.mark.timeout(120)
def test_worker_killed_while_recipient_parked(record_dir: Path, report: dict[str, Any]) -> None:
    """The worker parked R and committed that, then met more of R's messages in its ring
    (written before the dispatcher parked R) and was killed while a slow message of the
    same lane held their frames uncommitted: its successor must hand them back too."""
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2, batch_size=1)
    shard = stable_shard("R", cfg.workers)
    slow_one = next(f"x{i}" for i in range(100) if stable_shard(f"x{i}", cfg.workers) == shard)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        # Async: the blocker holds its frame (and so every later frame of the lane) open
        # while the loop runs on, reporting the retry's frame and meeting R's later ones.
        async with Engine(f"{HANDLERS}:record_async", cfg) as eng:
            s = await all_workers_up(eng)
            victim = worker_info(s, shard)["pid"]

            async def send(items: list[tuple[str, list[Any]]]) -> None:
                await eng.submit_many(items)
                for item in items:
                    plan.accept(item)

            await send([plan.make("R") for _ in range(5)])
            # One frame each (batch_size 1): R's retry, a 2 s delivery, then more of R.
            blocker = plan.make(slow_one, {"d": 2.0})
            await send([plan.make("R", {"r": 2.0}), blocker, *(plan.make("R") for _ in range(30))])
            while blocker[1][0] not in _delivered_uids(record_dir):
                await asyncio.sleep(0.01)
            s = await wait_stats(eng, lambda s: s["deferrals"] >= 1, "R parked", timeout=1.5)
            facts["deferrals_at_kill"] = s["deferrals"]
            sigkill(victim)
            await send([x for i in range(100) for x in (plan.make("R"), plan.make(f"o{i}"))])
            await wait_stats(
                eng,
                lambda s: worker_info(s, shard)["alive"] and worker_info(s, shard)["pid"] != victim,
                "the worker replaced",
            )
            await send([plan.make("R") for _ in range(20)])
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything delivered")
            facts["stats"] = conservation(s) | {"deferrals": s["deferrals"]}
            assert_conserved(s, len(plan.accepted))

    asyncio.run(main())
    chk = checker.check(plan.accepted, recorder.read_all(record_dir))
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.out_of_order, chk.unexpected) == (0, 0, 0), chk
    assert facts["stats"]["worker_restarts"] >= 1
    assert facts["deferrals_at_kill"] >= 1  # R was parked when the worker died


# -- TTL while held -------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_held_message_expires_in_the_dispatcher(record_dir: Path, report: dict[str, Any]) -> None:
    """A held message whose TTL ends is settled as expired, never delivered; the
    recipient's later messages then go on, in order."""
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            doomed = plan.make("R", {"r": 30})
            await eng.submit_many([doomed], ttl=1.0)
            plan.accept(doomed)
            await wait_stats(eng, lambda s: s["deferred"] == 1, "the retry handed back")
            later = [plan.make("R") for _ in range(10)]
            await eng.submit_many(later)
            for item in later:
                plan.accept(item)
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything settled")
            facts["stats"] = conservation(s) | {"deferred": s["deferred"]}
            facts["doomed"] = doomed[1][0]

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    expected = {uid: v for uid, v in plan.accepted.items() if uid != facts["doomed"]}
    chk = checker.check(expected, deliveries)
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.duplicated, chk.out_of_order, chk.unexpected) == (0, 0, 0, 0), chk
    assert facts["doomed"] not in _delivered_uids(record_dir)
    assert facts["stats"]["expired"] == 1 and facts["stats"]["delivered"] == 10
    assert facts["stats"]["deferred"] == 0


@pytest.mark.timeout(60)
def test_a_recipient_whose_only_held_message_expired_is_unparked(
    record_dir: Path, report: dict[str, Any]
) -> None:
    """The held message expires with nothing behind it: its worker must unpark the
    recipient too (the expired message goes back flagged released and the worker
    settles it), or the next message would make a round trip through the dispatcher
    (it used to, and the worker kept the parked entry until then)."""
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            doomed = plan.make("R", {"r": 30})
            await eng.submit_many([doomed], ttl=0.5)
            plan.accept(doomed)
            await wait_stats(eng, lambda s: s["deferrals"] == 1, "the retry handed back")
            await wait_stats(eng, lambda s: s["expired"] == 1, "the held message expired")
            later = plan.make("R")
            await eng.submit_many([later])
            plan.accept(later)
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything settled")
            facts["stats"] = conservation(s) | {"deferrals": s["deferrals"]}
            facts["doomed"] = doomed[1][0]

    asyncio.run(main())
    deliveries = recorder.read_all(record_dir)
    expected = {uid: v for uid, v in plan.accepted.items() if uid != facts["doomed"]}
    chk = checker.check(expected, deliveries)
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.duplicated, chk.out_of_order, chk.unexpected) == (0, 0, 0, 0), chk
    assert facts["doomed"] not in _delivered_uids(record_dir)
    assert facts["stats"]["expired"] == 1 and facts["stats"]["delivered"] == 1
    assert facts["stats"]["deferrals"] == 1  # the later message went straight through


@pytest.mark.timeout(60)
def test_settled_submit_waits_for_the_held_retry(record_dir: Path, report: dict[str, Any]) -> None:
    """``submit(settled=True)`` (the service's settled ack) returns once the message is
    delivered, not when its worker handed it back."""
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            item = plan.make("R", {"r": 1.0})
            await eng.submit_many([item], settled=True)
            facts["delivered_at_return"] = item[1][0] in _delivered_uids(record_dir)
            facts["stats"] = conservation(eng.stats()) | {"deferrals": eng.stats()["deferrals"]}

    asyncio.run(main())
    report.update(facts)
    assert facts["stats"]["deferrals"] == 1
    assert facts["delivered_at_return"], facts


# -- the largest messages ---------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("lane_ring", "return_ring"),
    [(SMALL_RING, SMALL_RING), (2 * SMALL_RING, SMALL_RING)],
    ids=["equal", "smaller"],
)
def test_largest_message_of_a_parked_recipient(
    record_dir: Path, report: dict[str, Any], lane_ring: int, return_ring: int
) -> None:
    """A message of the largest size a lane takes can be handed back when the return ring is
    as large as a lane ring; with a smaller one it is delivered in place (documented), and
    neither case crashes a worker or loses a message."""
    cfg = chaos_config(ring_bytes=lane_ring, return_ring_bytes=return_ring, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            assert eng.dispatcher is not None
            build = eng.dispatcher.build
            retry = plan.make("R", {"r": 1.0})
            lo, hi = 0, lane_ring  # the longest padding of the next message that still builds
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                try:
                    build("R", [plan.next_uid, 1, {"pad": "x" * mid}])
                    lo = mid
                except FrameTooLargeError:
                    hi = mid
            # Both in the ring before the dispatcher hears of the retry: the worker parks R
            # and meets the big one behind it.
            items = [retry, plan.make("R", {"pad": "x" * lo})]
            await eng.submit_many(items)
            for item in items:
                plan.accept(item)
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything delivered")
            facts["stats"] = conservation(s) | {"deferrals": s["deferrals"]}
            facts["pad"] = lo

    asyncio.run(main())
    chk = checker.check(plan.accepted, recorder.read_all(record_dir))
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.duplicated, chk.unexpected) == (0, 0, 0), chk
    assert facts["stats"]["worker_restarts"] == 0
    if lane_ring == return_ring:
        assert chk.out_of_order == 0, chk
        assert facts["stats"]["deferrals"] == 2  # the retry and the big one behind it
    else:
        assert facts["stats"]["deferrals"] == 1  # the big one could not go back


# -- backpressure for a parked recipient -------------------------------------------------------
@pytest.mark.timeout(60)
def test_submits_to_a_parked_recipient_get_backpressure(
    record_dir: Path, report: dict[str, Any]
) -> None:
    """The dispatcher holds at most a ring's worth of a parked recipient's submits: then
    ``submit_nowait`` raises QueueFull saying why and ``submit`` waits until they go out;
    everything is delivered, in order, once the retry is due."""
    cfg = chaos_config(ring_bytes=SMALL_RING, max_retry_hold_s=0.2)
    plan = Plan()
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", cfg) as eng:
            await all_workers_up(eng)
            first = plan.make("R", {"r": 1.0})
            await eng.submit_many([first])
            plan.accept(first)
            await wait_stats(eng, lambda s: s["deferred"] == 1, "the retry handed back")
            refused: QueueFull | None = None
            while refused is None:
                item = plan.make("R", {"pad": "x" * 500})
                try:
                    eng.submit_nowait(*item)
                except QueueFull as exc:
                    refused = exc
                else:
                    plan.accept(item)
            facts["held_at_refusal"] = eng.stats()["deferred"]
            facts["refusal"] = str(refused)
            late = plan.make("R")
            await eng.submit_many([late])  # waits for room, then goes behind the others
            plan.accept(late)
            s = await wait_stats(eng, lambda s: s["in_flight"] == 0, "everything delivered")
            facts["stats"] = conservation(s)

    asyncio.run(main())
    chk = checker.check(plan.accepted, recorder.read_all(record_dir))
    report.update(facts, checker=chk.to_dict())
    assert (chk.lost, chk.duplicated, chk.out_of_order, chk.unexpected) == (0, 0, 0, 0), chk
    assert "waits for a retry" in facts["refusal"]
    # About a ring's worth of ~530-byte messages, never unbounded.
    assert 1 < facts["held_at_refusal"] <= SMALL_RING // 500 + 1
