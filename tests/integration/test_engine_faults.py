"""Fault injection against a real engine: killed, stopped and poisoned workers, a killed
monitor, a handler that cannot be imported, an exception inside ``async with``.

Deliveries are observed outside the engine: the handlers in ``handlers_faults`` append
one JSON line per delivery to a file per worker pid, so "nothing lost", duplicates and
per-recipient order are checked against what handlers really saw, and the engine's own
counters (``stats()``) are checked against that.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import psutil
import pytest

from engine import Config, Engine, EngineStartError
from engine.core.monitor import BOOT_TIMEOUT_S
from engine.core.sharding import stable_shard
from ipc.shm import list_segments
from tests.integration.handlers_faults import ENV_DIR

HANDLERS = "tests.integration.handlers_faults"
WORKERS = 2
VICTIM = 0  # the worker index the tests kill or stop
DRAIN_TIMEOUT_S = 60.0
REPORT_TIMEOUT_S = 15.0  # liveness bound for the monitor's report to show a respawn

Record = dict[str, Any]


# -- helpers -----------------------------------------------------------------------
def make_config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "workers": WORKERS,
        "stall_timeout_s": 1.0,
        "heartbeat_interval_s": 0.1,
        "stats_interval_s": 0.1,
    }
    settings.update(overrides)
    return Config.from_env(env={}, **settings)


def own_segments() -> list[str]:
    return list_segments(f"ringway-{os.getpid()}-")


def engine_children(ignore: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """Our live descendants, minus ``ignore`` and Python's per-process resource tracker.

    The "spawn" start method launches ``multiprocess.resource_tracker`` once per
    parent process and keeps it for the parent's lifetime; it is not the engine's.
    """
    out = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in ignore:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if "resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


def wait_children_gone(
    ignore: frozenset[int] = frozenset(), timeout: float = 10.0
) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = engine_children(ignore)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = engine_children(ignore)
    return left


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody can signal usefully)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Recorded:
    """Reads the handlers' JSON-lines files incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[str, int] = {}
        self.lines = 0

    def count(self) -> int:
        """Complete lines written so far (cheap: reads only what is new)."""
        for entry in os.scandir(self.directory):
            off = self.offsets.get(entry.name, 0)
            with open(entry.path, "rb") as f:
                f.seek(off)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.lines += data.count(b"\n", 0, end)
            self.offsets[entry.name] = off + end
        return self.lines

    def records(self) -> list[Record]:
        """Every delivery, ordered by its monotonic time, then by file position.

        A trailing line without a newline (a worker killed inside ``write``) is
        ignored: that delivery never returned, so the engine must deliver it again.
        """
        out: list[tuple[int, int, int, Record]] = []
        for fi, path in enumerate(sorted(self.directory.iterdir())):
            data = path.read_bytes()
            for li, line in enumerate(data.split(b"\n")[:-1]):
                rec = msgspec.json.decode(line)
                out.append((rec["t"], fi, li, rec))
        out.sort(key=lambda x: x[:3])
        return [x[3] for x in out]

    def pids(self) -> set[int]:
        return {int(p.stem) for p in self.directory.iterdir()}


def check_deliveries(
    records: list[Record], expected: dict[str, int]
) -> tuple[list[tuple[str, int]], int, list[str]]:
    """Compare deliveries with ``expected`` (recipient -> count of seqs 0..n-1).

    Returns (lost pairs, duplicate deliveries, order problems).  Order: a recipient's
    sequence with every repeated (already seen) seq removed must be strictly increasing.
    """
    seen: dict[str, set[int]] = defaultdict(set)
    firsts: dict[str, list[int]] = defaultdict(list)
    dups = 0
    for rec in records:
        r, seq = rec["r"], rec["seq"]
        if seq in seen[r]:
            dups += 1
            continue
        seen[r].add(seq)
        firsts[r].append(seq)
    lost = [(r, s) for r, n in expected.items() for s in range(n) if s not in seen[r]]
    order = []
    for r, seqs in firsts.items():
        bad = next((i for i, (a, b) in enumerate(itertools.pairwise(seqs)) if a >= b), None)
        if bad is not None:
            order.append(f"{r}: first deliveries ...{seqs[max(0, bad - 3) : bad + 5]}...")
    extra = sorted(set(seen) - set(expected))
    if extra:
        order.append(f"unexpected recipients delivered: {extra[:10]}")
    return lost, dups, order


async def submit_stream(eng: Engine, recipients: int, per_recipient: int) -> None:
    """Round-robin over recipients, seq 0..per_recipient-1 each, yielding now and then."""
    k = 0
    for seq in range(per_recipient):
        for r in range(recipients):
            await eng.submit(f"Agent-{r}", {"seq": seq})
            k += 1
            if k % 500 == 0:
                await asyncio.sleep(0)  # let the watcher (and return-ring reader) run


async def wait_recorded(rec: Recorded, target: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := rec.count()) < target:
        assert time.monotonic() < deadline, f"only {n} of {target} deliveries recorded"
        await asyncio.sleep(0.002)
    return n


async def wait_stats(
    eng: Engine, ok: Callable[[dict[str, Any]], bool], what: str, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = eng.stats()
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"{what} not seen within {timeout}s; stats: {s}"
        await asyncio.sleep(0.05)


async def first_report(eng: Engine) -> dict[str, Any]:
    """Stats once the monitor has reported every worker (workers can be ready before)."""
    return await wait_stats(
        eng,
        lambda s: len(s["workers"]) == WORKERS and all(w["alive"] for w in s["workers"]),
        "the monitor's first report",
        REPORT_TIMEOUT_S,
    )


def worker(s: dict[str, Any], index: int) -> dict[str, Any]:
    (w,) = [w for w in s["workers"] if w["worker"] == index]
    return w


def summary(facts: dict[str, Any], s: dict[str, Any], dups: int) -> str:
    """One line for the test log (shown on failure or with -s)."""
    keys = ("submitted", "delivered", "dead_lettered", "expired", "in_flight", "redelivered")
    plain = {k: v for k, v in facts.items() if k not in ("stats", "dead")}
    restarts = [(w["worker"], w["restarts"]) for w in s["workers"]]
    return f"{plain} stats={ {k: s[k] for k in keys} } restarts={restarts} duplicates={dups}"


def assert_conserved(s: dict[str, Any], total: int) -> None:
    assert s["in_flight"] == 0, s
    assert s["submitted"] == total, s
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"], s


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# -- fixtures ----------------------------------------------------------------------
@pytest.fixture
def faults_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "deliveries"
    d.mkdir()
    monkeypatch.setenv(ENV_DIR, str(d))  # inherited by the spawned monitor and its workers
    return d


class Before(NamedTuple):
    """What existed before the test (left by an earlier, failed test): not this test's."""

    segments: frozenset[str]
    children: frozenset[int]

    def new_segments(self) -> list[str]:
        return [n for n in own_segments() if n not in self.segments]

    def children_left(self, timeout: float = 10.0) -> list[tuple[int, list[str]]]:
        return [(p.pid, p.cmdline()) for p in wait_children_gone(self.children, timeout)]


@pytest.fixture(autouse=True)
def before() -> Iterator[Before]:
    """Every test must leave no segment of this process and no engine process behind."""
    state = Before(frozenset(own_segments()), frozenset(p.pid for p in engine_children()))
    yield state
    assert state.new_segments() == [], f"segments left in /dev/shm: {state.new_segments()}"
    assert state.children_left() == [], f"child processes left: {state.children_left()}"


# -- 1. SIGKILL of a worker mid-stream ---------------------------------------------------
RECIPIENTS = 1000
PER_RECIPIENT = 200
TOTAL = RECIPIENTS * PER_RECIPIENT  # 200,000


@pytest.mark.timeout(120)
def test_sigkill_worker_mid_stream_loses_nothing(faults_dir: Path) -> None:
    rec = Recorded(faults_dir)
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", make_config()) as eng:
            victim = worker(await first_report(eng), VICTIM)
            old_pid = victim["pid"]
            assert old_pid in [p.pid for p in psutil.Process(eng.monitor.pid).children()]
            producer = asyncio.create_task(submit_stream(eng, RECIPIENTS, PER_RECIPIENT))
            facts["recorded_at_kill"] = await wait_recorded(rec, TOTAL * 3 // 10)
            os.kill(old_pid, signal.SIGKILL)
            facts["in_flight_at_kill"] = eng.stats()["in_flight"]
            await producer
            assert await eng.drain(timeout=DRAIN_TIMEOUT_S), eng.stats()
            s = await wait_stats(
                eng,
                lambda s: worker(s, VICTIM)["restarts"] >= 1 and worker(s, VICTIM)["alive"],
                "the respawned worker",
                REPORT_TIMEOUT_S,
            )
            facts["stats"] = s
            facts["old_pid"] = old_pid

    run(main)
    s = facts["stats"]
    records = rec.records()
    lost, dups, order = check_deliveries(
        records, {f"Agent-{r}": PER_RECIPIENT for r in range(RECIPIENTS)}
    )
    print(summary(facts, s, dups))
    assert facts["recorded_at_kill"] < TOTAL, "the kill came after the stream ended"
    assert facts["in_flight_at_kill"] > 0, facts
    assert lost == [], f"{len(lost)} messages never delivered, e.g. {lost[:10]}"
    assert_conserved(s, TOTAL)
    assert s["delivered"] == TOTAL and s["dead_lettered"] == 0 and s["expired"] == 0, s
    assert worker(s, VICTIM)["restarts"] == 1, s["workers"]
    assert worker(s, VICTIM)["pid"] != facts["old_pid"]
    assert worker(s, 1 - VICTIM)["restarts"] == 0, s["workers"]
    assert gone(facts["old_pid"])
    assert order == [], f"per-recipient order broken: {order[:5]}"
    # Redelivery happens only if the kill lands while the victim holds fetched but
    # unsettled frames; a fast worker is often idle with everything committed, so
    # redelivered may be 0. Every duplicate must be counted, though.
    assert dups <= s["redelivered"], (dups, s["redelivered"])
    # Only the killed worker's shard may repeat anything.
    counts = Counter((r["r"], r["seq"]) for r in records)
    repeated_shards = {stable_shard(r, WORKERS) for (r, _), n in counts.items() if n > 1}
    assert repeated_shards <= {VICTIM}, repeated_shards
    assert len(records) == TOTAL + dups


# -- 2. SIGSTOP of a worker: stall detection -----------------------------------------------
@pytest.mark.timeout(120)
def test_sigstopped_worker_is_replaced_and_old_pid_is_gone(faults_dir: Path) -> None:
    rec = Recorded(faults_dir)
    recipients, per_recipient = 200, 100
    total = recipients * per_recipient
    facts: dict[str, Any] = {}

    async def main() -> None:
        cfg = make_config(stall_timeout_s=1.0)
        async with Engine(f"{HANDLERS}:record_slow", cfg) as eng:
            old_pid = worker(await first_report(eng), VICTIM)["pid"]
            producer = asyncio.create_task(submit_stream(eng, recipients, per_recipient))
            facts["recorded_at_stop"] = await wait_recorded(rec, total // 5)
            os.kill(old_pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            facts["in_flight_at_stop"] = eng.stats()["in_flight"]
            s = await wait_stats(
                eng,
                lambda s: worker(s, VICTIM)["restarts"] >= 1 and worker(s, VICTIM)["alive"],
                "a replacement for the stopped worker",
                REPORT_TIMEOUT_S,
            )
            facts["replaced_after_s"] = time.monotonic() - stopped_at
            assert worker(s, VICTIM)["pid"] != old_pid
            # The stopped process must be dead and reaped: SIGCONT reaches nobody.
            deadline = time.monotonic() + 5
            while psutil.pid_exists(old_pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not psutil.pid_exists(old_pid), psutil.Process(old_pid).status()
            with pytest.raises(ProcessLookupError):
                os.kill(old_pid, signal.SIGCONT)
            old_file = faults_dir / f"{old_pid}.jsonl"
            size_before = old_file.stat().st_size
            await producer
            assert await eng.drain(timeout=DRAIN_TIMEOUT_S), eng.stats()
            assert old_file.stat().st_size == size_before, "the stopped worker delivered again"
            facts["stats"] = await wait_stats(
                eng, lambda s: s["in_flight"] == 0, "settled stats", REPORT_TIMEOUT_S
            )

    run(main)
    s = facts["stats"]
    expected = {f"Agent-{r}": per_recipient for r in range(recipients)}
    lost, dups, order = check_deliveries(rec.records(), expected)
    print(summary(facts, s, dups))
    assert facts["recorded_at_stop"] < total, "the stop came after the stream ended"
    assert facts["in_flight_at_stop"] > 0, facts
    assert lost == [], f"{len(lost)} messages never delivered, e.g. {lost[:10]}"
    assert_conserved(s, total)
    assert s["delivered"] == total, s
    assert worker(s, VICTIM)["restarts"] == 1, s["workers"]
    assert worker(s, 1 - VICTIM)["restarts"] == 0, s["workers"]
    assert order == [], f"per-recipient order broken: {order[:5]}"
    assert dups <= s["redelivered"], (dups, s["redelivered"])


# -- 3. Poison message ---------------------------------------------------------------
@pytest.mark.timeout(120)
def test_poison_message_is_quarantined_after_max_crashes(faults_dir: Path) -> None:
    rec = Recorded(faults_dir)
    # A recipient on the victim shard gets the poison message in the middle of its stream.
    poisoned = next(
        f"Agent-{i}" for i in range(100) if stable_shard(f"Agent-{i}", WORKERS) == VICTIM
    )
    recipients = [poisoned] + [f"Agent-{i}" for i in range(100, 109)]  # 10 recipients
    per_recipient = 100  # 1,000 normal messages
    facts: dict[str, Any] = {}

    async def main() -> None:
        cfg = make_config(poison_max_crashes=3)
        async with Engine(f"{HANDLERS}:poison", cfg) as eng:
            for seq in range(per_recipient):
                for r in recipients:
                    await eng.submit(r, {"seq": seq})
                if seq == per_recipient // 2:
                    facts["poison_id"] = await eng.submit(poisoned, {"poison": True})
            assert await eng.drain(timeout=DRAIN_TIMEOUT_S), eng.stats()
            facts["stats"] = await wait_stats(
                eng,
                lambda s: worker(s, VICTIM)["alive"] and worker(s, VICTIM)["restarts"] >= 3,
                "three restarts of the poisoned worker",
                REPORT_TIMEOUT_S,
            )
            facts["dead"] = eng.dead_letters()

    run(main)
    s, dead = facts["stats"], facts["dead"]
    total = len(recipients) * per_recipient + 1
    lost, dups, order = check_deliveries(rec.records(), dict.fromkeys(recipients, per_recipient))
    print(summary(facts, s, dups), dead)
    assert lost == [], f"{len(lost)} messages never delivered, e.g. {lost[:10]}"
    assert_conserved(s, total)
    assert len(dead) == 1, dead
    (dl,) = dead
    assert dl.reason == "worker_crash", dl
    assert dl.message.id == facts["poison_id"], dl
    assert dl.message.recipient == poisoned
    assert dl.message.body() == {"poison": True}
    assert re.search(r"\b3\b", dl.error), f"the error should give the 3 crashes: {dl.error!r}"
    assert s["dead_lettered"] == 1 and s["delivered"] == total - 1, s
    assert worker(s, VICTIM)["restarts"] == 3, s["workers"]
    assert worker(s, 1 - VICTIM)["restarts"] == 0, s["workers"]
    assert order == [], f"per-recipient order broken: {order[:5]}"
    assert dups <= s["redelivered"], (dups, s["redelivered"])


# -- 4. A handler that cannot be imported ---------------------------------------------------
@pytest.mark.timeout(120)
def test_unimportable_handler_fails_start_cleanly(before: Before) -> None:
    # The failure must travel from the worker to start() at once, not surface when the
    # monitor gives up waiting for ready workers (BOOT_TIMEOUT_S): the bound sits far
    # below that, and the wait_for far above it, so a slow path fails the assertion
    # (a TimeoutError from wait_for would not be the EngineStartError expected either).
    bound = 10.0
    assert bound < BOOT_TIMEOUT_S / 2
    facts: dict[str, Any] = {}

    async def main() -> None:
        eng = Engine("no_such_module_xyz:handle", make_config())
        t0 = time.monotonic()
        with pytest.raises(EngineStartError) as info:
            await asyncio.wait_for(eng.start(), BOOT_TIMEOUT_S + 30)
        facts["elapsed"] = time.monotonic() - t0
        facts["error"] = str(info.value)

    run(main)
    assert facts["elapsed"] < bound, f"the start failed only after {facts['elapsed']:.1f}s"
    assert "no_such_module_xyz" in facts["error"], facts["error"]
    assert "ModuleNotFoundError" in facts["error"], facts["error"]
    assert before.new_segments() == []
    assert before.children_left(timeout=5) == []


# -- 5. The monitor is killed -------------------------------------------------------------
# A dispatcher loop that hangs after the monitor dies can only be broken by
# pytest-timeout's signal, whose exception asyncio then logs and swallows inside the
# callback; short bounds keep such a failure from costing minutes.
@pytest.mark.timeout(60)
def test_killed_monitor_is_restarted_and_nothing_lost(faults_dir: Path) -> None:
    rec = Recorded(faults_dir)
    recipients, per_recipient = 500, 200
    total = recipients * per_recipient
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", make_config()) as eng:
            old_monitor = eng.monitor.pid
            old_workers = [p.pid for p in psutil.Process(old_monitor).children()]
            assert len(old_workers) == WORKERS, old_workers
            producer = asyncio.create_task(submit_stream(eng, recipients, per_recipient))
            facts["recorded_at_kill"] = await wait_recorded(rec, total * 3 // 10)
            os.kill(old_monitor, signal.SIGKILL)
            facts["in_flight_at_kill"] = eng.stats()["in_flight"]
            # Its workers die with it (PR_SET_PDEATHSIG).
            deadline = time.monotonic() + 10
            while not all(gone(p) for p in old_workers) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert all(gone(p) for p in old_workers), [
                (p, psutil.pid_exists(p)) for p in old_workers
            ]
            await producer
            assert await eng.drain(timeout=30), eng.stats()
            s = await wait_stats(
                eng,
                lambda s: (
                    s["monitor"]["restarts"] >= 1
                    and s["monitor"]["alive"]
                    and s["monitor"]["pid"] != old_monitor
                    and len(s["workers"]) == WORKERS
                    and all(w["alive"] and w["pid"] not in old_workers for w in s["workers"])
                ),
                "a new monitor with new workers",
                REPORT_TIMEOUT_S,
            )
            facts["new_workers"] = [p.pid for p in psutil.Process(eng.monitor.pid).children()]
            facts["stats"] = s
            facts["old_workers"] = old_workers

    run(main)
    s = facts["stats"]
    lost, dups, order = check_deliveries(
        rec.records(), {f"Agent-{r}": per_recipient for r in range(recipients)}
    )
    print(summary(facts, s, dups))
    assert facts["recorded_at_kill"] < total, "the kill came after the stream ended"
    assert facts["in_flight_at_kill"] > 0, facts
    assert lost == [], f"{len(lost)} messages never delivered, e.g. {lost[:10]}"
    assert s["monitor"]["restarts"] == 1, s["monitor"]
    assert sorted(facts["new_workers"]) == sorted(w["pid"] for w in s["workers"])
    assert not set(facts["new_workers"]) & set(facts["old_workers"])
    assert_conserved(s, total)
    assert s["delivered"] == total, s
    assert order == [], f"per-recipient order broken: {order[:5]}"
    assert dups <= s["redelivered"], (dups, s["redelivered"])


# -- 6. An exception inside `async with` ----------------------------------------------------
class Boom(Exception):
    """Raised by the test inside the engine's block."""


@pytest.mark.timeout(120)
def test_exception_inside_async_with_cleans_up(faults_dir: Path, before: Before) -> None:
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(f"{HANDLERS}:record", make_config()) as eng:
            facts["segments_inside"] = before.new_segments()
            facts["children_inside"] = [p.pid for p in engine_children(before.children)]
            for i in range(5000):
                await eng.submit(f"Agent-{i % 50}", {"seq": i // 50})
            raise Boom("inside the block")

    with pytest.raises(Boom):
        run(main)
    assert facts["segments_inside"], "the engine made no segments named after this process"
    assert len(facts["children_inside"]) >= 1 + WORKERS, facts["children_inside"]
    assert before.new_segments() == []
    assert before.children_left() == []
    assert not any(psutil.pid_exists(p) and not gone(p) for p in facts["children_inside"])
