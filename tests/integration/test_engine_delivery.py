"""Delivery semantics of the running engine, end to end through real worker processes.

Covers the delivery rules (README "Using the engine", ARCHITECTURE.md): per-recipient
order, conservation, priorities and the starvation guard, retries with
full-jitter backoff, Retry/Reject, TTL (also mid-retry), request/response,
broadcast and pub/sub, the sync facade with backpressure, bad input, and that
every test leaves no shared memory and no child process behind.

Handlers live in ``tests.integration.handlers_delivery`` and write what they
see to JSON-lines files (one per worker pid) in a per-test directory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine import (
    Config,
    Engine,
    EngineClosed,
    EngineStartError,
    Kind,
    QueueFull,
    RequestFailed,
    RequestTimeout,
)
from engine.errors import CodecError
from ipc.codec import Priority
from ipc.shm import list_segments
from tests.integration.handlers_delivery import OUT_ENV, read_records

H = "tests.integration.handlers_delivery"
RECORD = f"{H}:record"
RECORD_ASYNC = f"{H}:record_async"
ANSWER = f"{H}:answer"
ALWAYS_FAIL = f"{H}:always_fail"
WHICH_PATH = f"{H}:which_path"
GC_SETTINGS = f"{H}:gc_settings"
DRAIN_S = 120.0
# Scheduling slack on top of a backoff ceiling: 2 shared cores, timers, process hops.
SCHED_MARGIN_S = 0.5


# -- fixtures and helpers ----------------------------------------------------------
def _our_children() -> list[str]:
    """Live descendants of this test process, except multiprocess's resource tracker.

    The spawn start method launches one resource-tracker process per parent, and
    it lives as long as the parent by design; it is not the engine's process.
    """
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in p.cmdline()):
                out.append(f"{p.pid} {p.name()} ({p.status()})")
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """After every test: no segment of ours in /dev/shm and no child process left."""
    yield
    prefix = f"ringway-{os.getpid()}-"
    deadline = time.monotonic() + 10
    while (_our_children() or list_segments(prefix)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _our_children()
    assert left == [], f"child processes left after the engine exited: {left}"
    assert list_segments(prefix) == [], f"segments left in /dev/shm: {list_segments(prefix)}"


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory the handlers write to (inherited by the monitor and workers)."""
    d = tmp_path / "out"
    d.mkdir()
    monkeypatch.setenv(OUT_ENV, str(d))
    return d


def config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "workers": 2,
        "retry_backoff_base_s": 0.01,
        "stats_interval_s": 0.1,
        "heartbeat_interval_s": 0.1,
        "shutdown_timeout_s": 20.0,
    }
    base.update(overrides)
    return Config.from_env(env={}, **base)


def assert_conserved(s: dict[str, Any]) -> None:
    settled = s["delivered"] + s["dead_lettered"] + s["expired"]
    assert s["submitted"] == settled + s["in_flight"], s
    assert s["in_flight"] >= 0, s


def assert_all_settled(
    s: dict[str, Any], *, submitted: int, delivered: int, dead_lettered: int = 0, expired: int = 0
) -> None:
    got = {k: s[k] for k in ("submitted", "delivered", "dead_lettered", "expired", "in_flight")}
    want = {
        "submitted": submitted,
        "delivered": delivered,
        "dead_lettered": dead_lettered,
        "expired": expired,
        "in_flight": 0,
    }
    assert got == want


def wait_for_records(out: Path, event: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Block until the handlers wrote at least ``n`` records of ``event``."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_records(out, event)
        if len(recs) >= n:
            return recs
        assert time.monotonic() < deadline, f"only {len(recs)} of {n} {event!r} records"
        time.sleep(0.01)


async def await_records(out: Path, event: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(read_records(out, event)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} {event!r} records"
        await asyncio.sleep(0.01)


def open_gate(out: Path) -> None:
    (out / "gate").touch()


def calls(out: Path) -> list[dict[str, Any]]:
    return read_records(out, "call")


# -- 1. order and exactly-once --------------------------------------------------------
@pytest.mark.parametrize("handler", [RECORD, RECORD_ASYNC], ids=["sync", "async"])
def test_per_recipient_order_and_exactly_once(out: Path, handler: str) -> None:
    recipients = [f"agent-{i}" for i in range(1000)]
    rounds = 20

    async def main() -> Engine:
        async with Engine(handler, config()) as eng:
            for seq in range(rounds):
                await eng.submit_many((r, {"seq": seq}) for r in recipients)
            assert await eng.drain(timeout=DRAIN_S)
            assert_all_settled(eng.stats(), submitted=20_000, delivered=20_000)
        return eng

    eng = asyncio.run(main())
    assert_all_settled(eng.stats(), submitted=20_000, delivered=20_000)

    recs = calls(out)
    assert len(recs) == 20_000
    assert len({(r["recipient"], r["body"]["seq"]) for r in recs}) == 20_000
    seqs: dict[str, list[int]] = defaultdict(list)
    pids: dict[str, set[int]] = defaultdict(set)
    for r in recs:  # each file in its own (delivery) order
        seqs[r["recipient"]].append(r["body"]["seq"])
        pids[r["recipient"]].add(r["pid"])
    assert sorted(seqs) == sorted(recipients)
    assert {r: p for r, p in pids.items() if len(p) != 1} == {}, "a recipient on two workers"
    assert len({r["pid"] for r in recs}) == 2, "both workers should get recipients"
    disorder = {r: s for r, s in seqs.items() if s != list(range(rounds))}
    example = next(iter(disorder.items()), None)
    assert disorder == {}, f"{len(disorder)} recipients out of order, e.g. {example}"
    assert all(r["attempt"] == 0 for r in recs)


def test_sync_fast_path_resumes_after_a_slow_frame(out: Path) -> None:
    """A frame whose handler calls outlast the fast path's time slice leaves a backlog
    for the inline runner; the frames after it go through the fast path again.

    Fetching them while the backlog waited used to queue them behind it, and the
    worker stayed on the (slower) queued path for as long as frames kept coming.
    """
    batch, frames = 64, 20
    slow = [(f"slow-{i}", {"sleep": 0.006}) for i in range(4)]  # each > YIELD_AFTER_NS
    rest = [(f"r-{i % 300}", {}) for i in range(batch * frames - len(slow))]

    async def main() -> dict[str, int]:
        async with Engine(WHICH_PATH, config(workers=1, batch_size=batch)) as eng:
            await eng.submit_many(slow + rest)  # all frames are in the ring during the slow ones
            assert await eng.drain(timeout=DRAIN_S)
            assert_all_settled(eng.stats(), submitted=batch * frames, delivered=batch * frames)
            paths: dict[str, int] = await eng.request("probe", {"paths": True}, timeout=30)
            return paths

    paths = asyncio.run(main())
    assert sum(paths.values()) == batch * frames, paths
    # Only the slow frame's own remainder may go through the inline runner.
    assert paths.get("inline_runner", 0) <= batch - 1, paths
    assert paths["_deliver_now"] >= batch * (frames - 1) + 1, paths


def test_workers_keep_startup_objects_out_of_the_cyclic_gc(out: Path) -> None:
    """Each worker freezes what it holds at startup and collects its young generation
    rarely (it allocates a few objects per message, nearly none in cycles)."""
    from engine.worker.main import WORKER_GC_THRESHOLD

    async def main() -> list[int]:
        async with Engine(GC_SETTINGS, config(workers=1)) as eng:
            got: list[int] = await eng.request("probe", None, timeout=30)
            return got

    threshold, frozen = asyncio.run(main())
    assert threshold == WORKER_GC_THRESHOLD > 700  # CPython's default is 700
    assert frozen > 1000  # the modules, the handler, the worker's state


# -- 2. conservation in every snapshot ------------------------------------------------------
def test_conservation_holds_in_every_snapshot(out: Path) -> None:
    (out / "reject_on").touch()
    sampled: list[dict[str, Any]] = []  # by the sampler thread, in order
    between: list[dict[str, Any]] = []  # by the submitting thread, between batches
    stop = threading.Event()
    n_ok, n_reject, n_fail, n_expire = 2000, 100, 100, 50

    with Engine(RECORD, config()) as eng:

        def sampler() -> None:
            while not stop.is_set():
                sampled.append(eng.stats())

        t = threading.Thread(target=sampler)
        t.start()
        try:
            eng.submit("blocker", {"gate": str(out / "gate")})
            wait_for_records(out, "started", 1)
            # Behind the blocked worker's recipient: these expire before the gate opens.
            eng.submit_many((("blocker", {"i": i}) for i in range(n_expire)), ttl=0.05)
            items: list[tuple[str, Any]] = [(f"r{i % 200}", {"i": i}) for i in range(n_ok)]
            items += [(f"x{i}", {"reject": True}) for i in range(n_reject)]
            items += [(f"f{i}", {"fail": 1}) for i in range(n_fail)]
            for k in range(0, len(items), 100):
                eng.submit_many(items[k : k + 100])
                between.append(eng.stats())
            blocked = eng.stats()
            assert blocked["in_flight"] >= n_expire + 1  # the blocker and what waits behind it
            time.sleep(0.1)  # past the 0.05 s TTL
            open_gate(out)
            assert eng.drain(timeout=DRAIN_S)
        finally:
            stop.set()
            t.join()
        final = eng.stats()

    snapshots = sampled + between
    assert len(sampled) > 20
    for s in snapshots:
        assert_conserved(s)
    assert any(s["in_flight"] > 0 for s in snapshots)
    total = 1 + n_expire + n_ok + n_reject + n_fail
    assert_all_settled(
        final,
        submitted=total,
        delivered=1 + n_ok + n_fail,
        dead_lettered=n_reject,
        expired=n_expire,
    )
    # Counts never go backwards between successive snapshots of one thread.
    for a, b in itertools.pairwise(sampled):
        for k in ("submitted", "delivered", "dead_lettered", "expired"):
            assert b[k] >= a[k], (k, a, b)


# -- 3. priorities and the starvation guard -------------------------------------------------
def _queue_behind_gate(out: Path, cfg: Config, batches: list[tuple[str, str, int]]) -> list[str]:
    """On one worker, block on a gate, queue ``batches`` (lane, prefix, n), then release.

    Returns the recipients in delivery order (the blocker excluded).
    """

    async def main() -> None:
        async with Engine(RECORD, cfg) as eng:
            await eng.submit("blocker", {"gate": str(out / "gate")})
            await await_records(out, "started", 1)
            for lane, prefix, n in batches:
                for i in range(n):
                    await eng.submit(f"{prefix}-{i}", {"i": i}, priority=lane)
            await asyncio.sleep(0.2)  # let the dispatcher flush every lane into its ring
            open_gate(out)
            assert await eng.drain(timeout=DRAIN_S)
            total = 1 + sum(n for _, _, n in batches)
            assert_all_settled(eng.stats(), submitted=total, delivered=total)

    asyncio.run(main())
    order = [r["recipient"] for r in calls(out)]
    assert order[0] == "blocker"
    return order[1:]


def test_critical_overtakes_earlier_low(out: Path) -> None:
    order = _queue_behind_gate(
        out,
        config(workers=1),
        [("low", "low", 30), ("normal", "norm", 10), ("critical", "crit", 30)],
    )
    want = [f"crit-{i}" for i in range(30)] + [f"norm-{i}" for i in range(10)]
    want += [f"low-{i}" for i in range(30)]
    assert order == want


def test_starvation_guard_lets_low_through(out: Path) -> None:
    limit = 4
    order = _queue_behind_gate(
        out,
        config(workers=1, starvation_limit=limit),
        [("low", "low", 10), ("critical", "crit", 20)],
    )
    assert sorted(order) == sorted(
        [f"low-{i}" for i in range(10)] + [f"crit-{i}" for i in range(20)]
    )
    lanes = ["C" if r.startswith("crit") else "L" for r in order]
    last_crit = max(i for i, x in enumerate(lanes) if x == "C")
    while_waiting = "".join(lanes[: last_crit + 1])
    assert "L" in while_waiting, f"no low message got through while critical ones waited: {lanes}"
    assert "C" * (limit + 1) not in while_waiting, f"more than {limit} critical in a row: {lanes}"
    assert "LL" not in while_waiting, f"low messages ran ahead of waiting critical ones: {lanes}"
    # FIFO within each lane.
    assert [r for r in order if r.startswith("crit")] == [f"crit-{i}" for i in range(20)]
    assert [r for r in order if r.startswith("low")] == [f"low-{i}" for i in range(10)]


# -- 4. retries with full-jitter backoff ----------------------------------------------------
def test_retries_backoff_and_max_attempts(out: Path) -> None:
    base, max_attempts, n_dead = 0.05, 5, 20
    cfg = config(retry_backoff_base_s=base, retry_max_attempts=max_attempts)

    async def main() -> Engine:
        async with Engine(RECORD, cfg) as eng:
            for k in range(max_attempts):  # fails k times, then succeeds (k=4: on the last try)
                await eng.submit(f"k{k}", {"fail": k, "seq": 0})
                await eng.submit(f"k{k}", {"seq": 1})  # waits behind the retrying message
            for i in range(n_dead):
                await eng.submit(f"dead{i}", {"fail": 1000})
            assert await eng.drain(timeout=DRAIN_S)
        return eng

    eng = asyncio.run(main())
    total = 2 * max_attempts + n_dead
    final = eng.stats()
    assert_all_settled(final, submitted=total, delivered=2 * max_attempts, dead_lettered=n_dead)
    k_sum = sum(range(max_attempts))
    assert final["failed_attempts"] == k_sum + n_dead * max_attempts
    assert final["retried"] == k_sum + n_dead * (max_attempts - 1)

    recs = read_records(out, None)
    by_recipient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by_recipient[r["recipient"]].append(r)
    for k in range(max_attempts):
        seen = [(r["event"], r["attempt"], r["body"]["seq"]) for r in by_recipient[f"k{k}"]]
        want = [("failed", a, 0) for a in range(k)] + [("call", k, 0), ("call", 0, 1)]
        assert seen == want, f"recipient k{k}"

    dls = {dl.message.recipient: dl for dl in eng.dead_letters()}
    assert sorted(dls) == sorted(f"dead{i}" for i in range(n_dead))
    for dl in dls.values():
        assert dl.reason == "max_attempts"
        assert dl.attempts == max_attempts
        assert "HandlerError" in dl.error

    ceilings_hit: dict[int, float] = defaultdict(float)
    for i in range(n_dead):
        tries = by_recipient[f"dead{i}"]
        assert [(r["event"], r["attempt"]) for r in tries] == [
            ("failed", a) for a in range(max_attempts)
        ]
        for n, (a, b) in enumerate(itertools.pairwise(tries)):
            gap = (b["t_ns"] - a["t_ns"]) / 1e9
            ceiling = min(cfg.retry_backoff_max_s, base * 2**n)
            assert 0 <= gap <= ceiling + SCHED_MARGIN_S, f"dead{i} retry {n}: {gap:.3f}s"
            ceilings_hit[n] = max(ceilings_hit[n], gap / ceiling)
    # Backoff is really applied: over 20 messages some wait beyond a quarter of the ceiling
    # (all 20 below it by chance: 0.25**20).
    assert all(ratio >= 0.25 for ratio in ceilings_hit.values()), ceilings_hit


# -- 5. Retry(after), Reject, replay --------------------------------------------------------------
def test_retry_after_delays_next_attempt(out: Path) -> None:
    n = 20

    async def main() -> Engine:
        async with Engine(RECORD, config()) as eng:
            for i in range(n):  # staggered, so the retries fall at varied timer phases
                await eng.submit(f"a{i}", {"retry_after": 0.3})
                await asyncio.sleep(0.007)
            assert await eng.drain(timeout=DRAIN_S)
        return eng

    eng = asyncio.run(main())
    s = eng.stats()
    assert_all_settled(s, submitted=n, delivered=n)
    assert s["retried"] == n
    by_recipient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in read_records(out, None):
        by_recipient[r["recipient"]].append(r)
    gaps = {}
    for recipient, recs in by_recipient.items():
        assert [(r["event"], r["attempt"]) for r in recs] == [("retry", 0), ("call", 1)]
        gaps[recipient] = (recs[1]["t_ns"] - recs[0]["t_ns"]) / 1e9
    assert len(gaps) == n
    early = {r: round(g, 6) for r, g in gaps.items() if g < 0.3}
    assert early == {}, "next attempt came sooner than Retry(after=0.3) asked"


def test_reject_dead_letters_at_once_and_replay(out: Path) -> None:
    flag = out / "reject_on"
    flag.touch()
    n = 5

    async def main() -> Engine:
        async with Engine(RECORD, config()) as eng:
            first = await eng.submit_many((f"r{i}", {"reject": True, "i": i}) for i in range(n))
            assert await eng.drain(timeout=DRAIN_S)
            dls = eng.dead_letters()
            assert sorted(dl.message.id for dl in dls) == sorted(first)
            for dl in dls:
                assert (dl.reason, dl.attempts, dl.error) == ("rejected", 1, "bad")
            assert_all_settled(eng.stats(), submitted=n, delivered=0, dead_lettered=n)

            # Replay while the handler still rejects: dead-lettered again, as new messages.
            assert (await eng.replay_dead_letters()).replayed == n
            assert await eng.drain(timeout=DRAIN_S)
            again = eng.dead_letters()
            assert len(again) == n
            assert not {dl.message.id for dl in again} & set(first)
            assert sorted(dl.message.body()["i"] for dl in again) == list(range(n))
            assert_all_settled(eng.stats(), submitted=2 * n, delivered=0, dead_lettered=2 * n)

            # Replay once the handler accepts: delivered.
            flag.unlink()
            assert (await eng.replay_dead_letters()).replayed == n
            assert eng.dead_letters() == []
            assert await eng.drain(timeout=DRAIN_S)
            assert (await eng.replay_dead_letters()).replayed == 0
            assert_all_settled(eng.stats(), submitted=3 * n, delivered=n, dead_lettered=2 * n)
        return eng

    eng = asyncio.run(main())
    assert eng.stats()["retried"] == 0
    rejected = read_records(out, "rejected")
    assert len(rejected) == 2 * n and all(r["attempt"] == 0 for r in rejected)
    delivered = calls(out)
    assert sorted((r["recipient"], r["body"]["i"]) for r in delivered) == [
        (f"r{i}", i) for i in range(n)
    ]


# -- 6. TTL ----------------------------------------------------------------------------------------
def test_ttl_expires_behind_a_slow_message(out: Path) -> None:
    async def main() -> Engine:
        async with Engine(RECORD, config(workers=1)) as eng:
            await eng.submit("A", {"gate": str(out / "gate")})
            await await_records(out, "started", 1)
            await eng.submit("A", {"short": 1}, ttl=0.2)
            await eng.submit("B", {"short": 2}, ttl=0.2)
            await eng.submit("A", {"long": 1}, ttl=60)
            await eng.submit("A", {"none": 1})
            await asyncio.sleep(0.4)  # past the short TTLs; the worker is still blocked
            open_gate(out)
            assert await eng.drain(timeout=DRAIN_S)
        return eng

    eng = asyncio.run(main())
    assert_all_settled(eng.stats(), submitted=5, delivered=3, expired=2)
    assert eng.dead_letters() == []
    bodies = [r["body"] for r in calls(out)]
    assert bodies == [{"gate": str(out / "gate")}, {"long": 1}, {"none": 1}]


def test_ttl_expires_while_waiting_for_retry(out: Path) -> None:
    """A message that keeps failing expires during a backoff; no attempt runs after expiry."""
    cfg = config(retry_backoff_base_s=0.5, retry_max_attempts=1000)
    n = 20

    async def main() -> Engine:
        async with Engine(ALWAYS_FAIL, cfg) as eng:
            for i in range(n):  # staggered, so the expiries fall at varied timer phases
                await eng.submit(f"r{i}", {"i": i}, ttl=0.3)
                await asyncio.sleep(0.005)
            assert await eng.drain(timeout=DRAIN_S)
        return eng

    eng = asyncio.run(main())
    assert_all_settled(eng.stats(), submitted=n, delivered=0, expired=n)
    assert eng.dead_letters() == []
    tries = read_records(out, "failed")
    assert sorted({r["recipient"] for r in tries if r["attempt"] == 0}) == sorted(
        f"r{i}" for i in range(n)
    )
    late = [
        (r["recipient"], r["attempt"], f"{(r['t_ns'] - r['expires_ns']) / 1e3:.1f} us after expiry")
        for r in tries
        if r["late"]
    ]
    assert late == [], "the handler was called after the message expired"
    # Attempt n waits U(0, 0.5 * 2**n) s: seven attempts inside 0.3 s need six waits
    # each below 0.3 s, probability < 0.6 * 0.3 * 0.15 * 0.075 * 0.0375 * 0.019 = 1.4e-6.
    per_message: dict[str, int] = defaultdict(int)
    for r in tries:
        per_message[r["recipient"]] += 1
    storms = {k: v for k, v in per_message.items() if v > 6}
    assert storms == {}, "attempts without backoff as the TTL ran out (attempts per message)"


def test_retry_after_longer_than_ttl_expires_without_second_call(out: Path) -> None:
    """Retry(after=30) with 0.3 s left to live: the message expires, it is never retried."""
    n = 40

    async def main() -> Engine:
        async with Engine(RECORD, config()) as eng:
            for i in range(n):  # staggered, so the expiries fall at varied timer phases
                await eng.submit(f"a{i}", {"retry_after": 30}, ttl=0.3)
                await asyncio.sleep(0.005)
            assert await eng.drain(timeout=DRAIN_S)
        return eng

    eng = asyncio.run(main())
    second = [
        (
            r["recipient"],
            r["attempt"],
            f"{(r['expires_ns'] - r['t_ns']) / 1e6:.3f} ms before expiry",
        )
        for r in calls(out)
    ]
    assert second == [], "retried before Retry(after=30) was due (just before expiry)"
    assert_all_settled(eng.stats(), submitted=n, delivered=0, expired=n)
    assert sorted(r["attempt"] for r in read_records(out, "retry")) == [0] * n


# -- 7. request / response -------------------------------------------------------------------------
def test_request_response(out: Path) -> None:
    async def main() -> Engine:
        async with Engine(ANSWER, config()) as eng:
            got = await eng.request("Agent-2", {"q": 1}, timeout=5)
            assert got == {"echo": {"q": 1}, "recipient": "Agent-2", "attempt": 0}

            many = await asyncio.gather(
                *(eng.request(f"Agent-{i}", {"q": i}, timeout=30) for i in range(50))
            )
            assert [m["echo"]["q"] for m in many] == list(range(50))
            assert [m["recipient"] for m in many] == [f"Agent-{i}" for i in range(50)]

            with pytest.raises(RequestTimeout):
                await eng.request("Agent-slow", {"sleep": 1.5}, timeout=0.3)
            # A rejection is reported at once, long before this timeout.
            with pytest.raises(RequestFailed, match="rejected"):
                await eng.request("Agent-3", {"reject": True}, timeout=60)
            with pytest.raises(RequestFailed, match="not encodable"):
                await eng.request("Agent-4", {"unencodable": True}, timeout=60)
            assert await eng.drain(timeout=DRAIN_S)
            s = eng.stats()
            # 1 + 50 + slow (delivered after its caller gave up) + unencodable; 1 rejected
            assert_all_settled(s, submitted=54, delivered=53, dead_lettered=1)
            (dl,) = eng.dead_letters()
            assert (dl.message.recipient, dl.reason, dl.message.kind) == (
                "Agent-3",
                "rejected",
                Kind.REQUEST,
            )
        return eng

    asyncio.run(main())
    kinds = {r["kind"] for r in read_records(out, "started")}
    assert kinds == {int(Kind.REQUEST)}


# -- 8. broadcast and pub/sub ----------------------------------------------------------------------
def test_broadcast_and_publish(out: Path) -> None:
    members = [f"member-{i}" for i in range(50)]

    async def main() -> None:
        async with Engine(RECORD, config()) as eng:
            for m in members:
                eng.register(m)
            ids = await eng.broadcast({"hello": 1})
            assert len(ids) == 50
            assert await eng.drain(timeout=DRAIN_S)
            recs = calls(out)
            assert sorted(r["recipient"] for r in recs) == sorted(members)
            assert {r["kind"] for r in recs} == {int(Kind.BROADCAST)}
            assert {r["id"] for r in recs} == set(ids)

            for m in members[:3]:
                eng.subscribe("alerts", m)
            eng.subscribe("other", members[3])
            ids = await eng.publish("alerts", {"level": "red"})
            assert len(ids) == 3
            eng.unsubscribe("alerts", members[0])
            ids2 = await eng.publish("alerts", {"level": "amber"})
            assert len(ids2) == 2
            assert await eng.publish("nobody-listens", {"x": 1}) == []
            assert await eng.drain(timeout=DRAIN_S)
            assert_all_settled(eng.stats(), submitted=55, delivered=55)

    asyncio.run(main())
    events = [r for r in calls(out) if r["kind"] == int(Kind.EVENT)]
    got = sorted((r["recipient"], r["body"]["level"]) for r in events)
    want = sorted([(m, "red") for m in members[:3]] + [(m, "amber") for m in members[1:3]])
    assert got == want
    assert all(r["tags"] == ["alerts"] for r in events)


# -- 9. sync facade and backpressure ---------------------------------------------------------------
def test_sync_facade_and_queue_full(out: Path) -> None:
    cfg = config(workers=1, ring_bytes=65536)
    accepted: list[int] = []
    with Engine(RECORD, cfg) as eng:
        first = eng.submit("warmup", {"i": -1}, priority="high")
        assert eng.request("warmup", {"i": -2}, timeout=30) is None  # record returns None
        assert eng.drain(timeout=DRAIN_S)
        assert eng.stats()["delivered"] == 2

        blocker = eng.submit("blocker", {"gate": str(out / "gate")})
        wait_for_records(out, "started", 1)
        pad = "x" * 200
        with pytest.raises(QueueFull):
            for i in range(100_000):
                accepted.append(eng.submit_nowait(f"r{i % 10}", {"i": i, "pad": pad}))
        assert 0 < len(accepted) < 100_000
        s = eng.stats()
        assert_conserved(s)
        assert s["submitted"] == 3 + len(accepted)
        open_gate(out)
        assert eng.drain(timeout=DRAIN_S)
        assert_all_settled(eng.stats(), submitted=3 + len(accepted), delivered=3 + len(accepted))
    with pytest.raises(EngineClosed):
        eng.submit("late", {})
    ids = [r["id"] for r in calls(out)]
    assert len(ids) == len(set(ids))
    direct = {r["id"] for r in calls(out) if r["kind"] != int(Kind.REQUEST)}
    assert direct == {first, blocker, *accepted}
    assert len(ids) == len(accepted) + 3
    # Per-recipient order of the accepted messages is kept through the backpressure.
    per: dict[str, list[int]] = defaultdict(list)
    for r in calls(out):
        if r["recipient"].startswith("r"):
            per[r["recipient"]].append(r["body"]["i"])
    assert all(v == sorted(v) for v in per.values())
    assert sum(len(v) for v in per.values()) == len(accepted)


# -- 10. bad input ---------------------------------------------------------------------------------
def test_bad_input_is_refused_and_counts_nothing(out: Path) -> None:
    async def main() -> Engine:
        async with Engine(RECORD, config(workers=1)) as eng:
            with pytest.raises(ValueError, match="recipient"):
                await eng.submit("", {"x": 1})
            with pytest.raises(ValueError, match="recipient"):
                eng.submit_nowait("", {"x": 1})
            with pytest.raises(ValueError, match="priority"):
                await eng.submit("a", {"x": 1}, priority="urgent")
            with pytest.raises(ValueError, match="ttl"):
                await eng.submit("a", {"x": 1}, ttl=-1)
            with pytest.raises(ValueError, match="timeout"):
                await eng.request("a", {"x": 1}, timeout=0)
            with pytest.raises(ValueError, match="recipient"):
                eng.register("")
            with pytest.raises(CodecError):
                await eng.submit("a", object())
            s = eng.stats()
            assert_all_settled(s, submitted=0, delivered=0)
            await eng.submit("a", {"ok": True})
            assert await eng.drain(timeout=DRAIN_S)
            assert_all_settled(eng.stats(), submitted=1, delivered=1)
        return eng

    eng = asyncio.run(main())
    assert [r["body"] for r in calls(out)] == [{"ok": True}]

    async def after_exit() -> None:
        with pytest.raises(EngineClosed):
            await eng.submit("a", {"x": 1})
        with pytest.raises(EngineClosed):
            eng.submit_nowait("a", {"x": 1})
        with pytest.raises(EngineClosed):
            await eng.request("a", {"x": 1}, timeout=1)
        with pytest.raises(EngineClosed):
            await eng.broadcast({"x": 1})
        with pytest.raises(EngineClosed):
            await eng.drain(timeout=1)
        with pytest.raises(EngineClosed):
            await eng.replay_dead_letters()

    asyncio.run(after_exit())
    assert eng.stats()["submitted"] == 1  # still readable after stop


def test_unknown_handler_fails_start_and_cleans_up(out: Path) -> None:
    async def main() -> None:
        async with Engine(f"{H}:no_such_handler", config()):
            pass

    with pytest.raises(EngineStartError, match="no_such_handler"):
        asyncio.run(main())


def test_priority_names_and_numbers_reach_the_handler(out: Path) -> None:
    async def main() -> None:
        async with Engine(RECORD, config(workers=1)) as eng:
            await eng.submit("a", {"i": 0}, priority="critical")
            await eng.submit("a", {"i": 1}, priority=Priority.HIGH)
            await eng.submit("a", {"i": 2}, priority=3)
            await eng.submit("a", {"i": 3})
            assert await eng.drain(timeout=DRAIN_S)

    asyncio.run(main())
    got = sorted((r["body"]["i"], r["priority"]) for r in calls(out))
    assert got == [(0, 0), (1, 1), (2, 3), (3, 2)]
