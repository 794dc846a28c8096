"""`StressTestRunner`: one stress run against a real engine with the mock sink.

The engine's dispatcher runs on this process's event loop (so its monitor and
workers start with "spawn" and need nothing from here: the ``mock`` sink is
part of the engine).  Agents are registered so a broadcast reaches all of
them; messages stream from the generator in chunks, grouped by (type, sender)
so each group is one ``submit_many``; a background task samples stats and
processes every ``sample_interval_s``; ``--chaos`` adds a task that kills
workers.  Delivered counts per type and per agent come from what was
generated minus the dead letters, which the engine returns whole.  The mock
sink records every delivery it makes in a temporary directory, and the report
reconciles those with the ids of what was generated (``lost``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from engine import Config, Engine
from engine.stress.chaos import chaos_loop
from engine.stress.generator import BROADCAST, MESSAGE_TYPES, GeneratedMessage, MessageGenerator
from engine.stress.metrics import MetricsCollector, SeriesPoint, interval_histogram
from engine.stress.processes import ROLES, ProcessSampler
from engine.stress.report import (
    DeadLetterTally,
    Settings,
    StressReport,
    build_report,
    read_delivered_ids,
    reconcile,
)
from engine.stress.scenarios import DEFAULT_AGENTS, SUITES, Scenario
from ipc.codec import pack_payload
from ipc.control import Histogram
from ipc.records import DeadLetter
from ipc.shard import SLOT_PID

# Onboarding is control traffic: a hard onboard must not wait behind chat, a soft one may.
PRIORITY_OF = {
    "direct": "normal",
    "broadcast": "normal",
    "hard_onboard": "high",
    "soft_onboard": "low",
}
CHUNK = 1024  # messages taken from the generator per round of submit_many calls
RATE_CHUNK_S = 0.01  # with --rate, a chunk holds about this much traffic
REPORT_WAIT_S = 3.0  # after the drain: how long to wait for the monitor's report to catch up
DLQ_CAP = 10**7  # Config.dlq_max's upper bound
ProgressHook = Callable[[int, int], None]  # (generated so far, settled so far)


class StressTestRunner:
    """Drives one engine with ``num_agents`` agents and reports what happened.

    ``messages_per_agent`` messages per sender, or, with ``duration_s``, as many
    as fit in that time (optionally paced at ``rate`` generated msgs/s).
    ``delivery_success_rate`` and ``simulated_delay`` configure the mock core.
    Every other engine knob comes from ``env`` (default: the ``ENGINE_*``
    environment), except the stats interval, which follows the sampling.
    """

    def __init__(
        self,
        num_agents: int = DEFAULT_AGENTS,
        messages_per_agent: int = SUITES["small"],
        message_types: Sequence[str] = MESSAGE_TYPES,
        *,
        delivery_success_rate: float = 1.0,
        simulated_delay: float = 0.0001,
        workers: int | None = None,
        retry_max_attempts: int = 5,
        retry_backoff_base_s: float = 0.01,
        retry_backoff_max_s: float = 1.0,
        duration_s: float | None = None,
        rate: float | None = None,
        chaos_interval_s: float | None = None,
        seed: int = 0,
        payload_bytes: int = 100,
        drain_timeout_s: float = 600.0,
        sample_interval_s: float = 0.25,
        scenario: str = "custom",
        env: Mapping[str, str] | None = None,
        on_progress: ProgressHook | None = None,
    ) -> None:
        for name, value in (
            ("duration_s", duration_s),
            ("rate", rate),
            ("chaos_interval_s", chaos_interval_s),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not drain_timeout_s > 0 or not sample_interval_s > 0:
            raise ValueError("drain_timeout_s and sample_interval_s must be > 0")
        if payload_bytes < 0:
            raise ValueError(f"payload_bytes must be >= 0, got {payload_bytes}")
        # Validates agents, messages and types now, before any process starts.
        self.generator = MessageGenerator(
            num_agents, None if duration_s else messages_per_agent, message_types, seed=seed
        )
        self.num_agents = num_agents
        self.messages_per_agent = messages_per_agent
        self.duration_s = duration_s
        self.rate = rate
        self.chaos_interval_s = chaos_interval_s
        self.seed = seed
        self.payload_bytes = payload_bytes
        self.drain_timeout_s = drain_timeout_s
        self.sample_interval_s = sample_interval_s
        self.scenario = scenario
        self.on_progress = on_progress
        planned = self.generator.planned_total()
        overrides: dict[str, Any] = {
            "sink": "mock",
            "mock_success_rate": delivery_success_rate,
            "mock_delay_s": simulated_delay,
            "retry_max_attempts": retry_max_attempts,
            "retry_backoff_base_s": retry_backoff_base_s,
            "retry_backoff_max_s": retry_backoff_max_s,
            "stats_interval_s": sample_interval_s,
            # Keep every dead letter: the per-type and per-agent figures come from them.
            "dlq_max": DLQ_CAP if planned is None else min(DLQ_CAP, max(planned, 1)),
        }
        if workers is not None:
            overrides["workers"] = workers
        self.config = Config.from_env(env, **overrides)  # ConfigError on a bad value
        self.metrics = MetricsCollector()
        self.ids: array[int] = array("Q")  # every id the engine gave a generated message

    @classmethod
    def from_scenario(cls, scenario: Scenario, **options: Any) -> StressTestRunner:
        """A runner with ``scenario``'s mock core, types and retries; ``options`` win."""
        base: dict[str, Any] = {
            "message_types": scenario.message_types,
            "delivery_success_rate": scenario.success_rate,
            "simulated_delay": scenario.delay_s,
            "retry_max_attempts": scenario.retry_max_attempts,
            "retry_backoff_base_s": scenario.retry_backoff_base_s,
            "retry_backoff_max_s": scenario.retry_backoff_max_s,
            "scenario": scenario.name,
        }
        return cls(**(base | options))

    def planned_total(self) -> int | None:
        """Messages the run generates (fan-out included); None for a timed run."""
        return self.generator.planned_total()

    def settings(self) -> Settings:
        c = self.config
        return Settings(
            scenario=self.scenario,
            agents=self.num_agents,
            messages_per_agent=None if self.duration_s else self.messages_per_agent,
            message_types=list(self.generator.types),
            priorities={t: PRIORITY_OF[t] for t in self.generator.types},
            workers=c.workers,
            success_rate=c.mock_success_rate,
            delay_s=c.mock_delay_s,
            retry_max_attempts=c.retry_max_attempts,
            retry_backoff_base_s=c.retry_backoff_base_s,
            retry_backoff_max_s=c.retry_backoff_max_s,
            delivery_concurrency=c.delivery_concurrency,
            recipient_concurrency=c.recipient_concurrency,
            ttl_s=c.default_ttl_s,
            duration_s=self.duration_s,
            rate=self.rate,
            chaos_interval_s=self.chaos_interval_s,
            seed=self.seed,
            payload_bytes=self.payload_bytes,
        )

    def run_sync(self) -> StressReport:
        """Run on a fresh uvloop event loop (the engine's dispatcher runs on it)."""
        import uvloop

        return uvloop.run(self.run())

    async def run(self) -> StressReport:
        """Start an engine, stream the messages, drain, check, stop; one call per runner."""
        if self.generator.generated:
            raise RuntimeError("a StressTestRunner runs once; make a new one")
        with tempfile.TemporaryDirectory(prefix="ringway-stress-") as records:
            return await self._run(Path(records))

    async def _run(self, records: Path) -> StressReport:
        """The run, with the mock sink recording its deliveries in ``records``."""
        gen, metrics = self.generator, self.metrics
        config = msgspec.structs.replace(self.config, mock_record_dir=str(records))
        eng = Engine(None, config)
        await eng.start()
        drained = False
        tasks: list[asyncio.Task[None]] = []
        chaos: list[asyncio.Task[None]] = []
        try:
            for name in gen.names:
                eng.register(name)
            sampler = Sampler(eng, gen, metrics, self.on_progress)
            t0 = time.monotonic()
            sampler.prime(t0)
            tasks.append(asyncio.create_task(sampler.loop(t0, self.sample_interval_s)))
            if self.chaos_interval_s is not None:
                rng = random.Random(self.seed)
                chaos.append(
                    asyncio.create_task(chaos_loop(eng, self.chaos_interval_s, metrics, rng))
                )
            await self._submit_all(eng, t0, tasks + chaos)
            submit_s = time.monotonic() - t0
            # Chaos ends with the sending: the drain shows the recovery, and cannot be
            # kept from finishing by kills that come faster than workers respawn.
            await _cancel(chaos, reraise=True)
            drained = await eng.drain(self.drain_timeout_s)
            # The last point closes the series at the end of the run: the intervals then
            # cover the run exactly, so the best interval is never below the average.
            elapsed_s = sampler.sample(t0, final=True)
            await _cancel(tasks, reraise=True)
            stats = await _settled_stats(eng, self.sample_interval_s)
            letters = eng.dead_letters()
            tally = tally_dead_letters(letters)
            _keep_histograms(eng, metrics)
        finally:
            await _cancel(chaos + tasks)
            # After a failed drain, waiting again would only repeat the timeout.
            await eng.stop(timeout=None if drained else 0.0)
        # Every worker is gone: the record files are complete.
        dead_ids = (dl.message.id for dl in letters)
        sink = reconcile(self.ids, read_delivered_ids(records), dead_ids)
        return build_report(
            settings=self.settings(),
            generator=gen,
            stats=stats,
            tally=tally,
            sink=sink,
            metrics=metrics,
            drained=drained,
            drain_timeout_s=self.drain_timeout_s,
            elapsed_s=elapsed_s,
            submit_s=submit_s,
        )

    async def _submit_all(self, eng: Engine, t0: float, tasks: list[asyncio.Task[None]]) -> None:
        """Feed the generator to the engine until it ends or the duration is over."""
        gen = self.generator
        body = b"x" * self.payload_bytes
        payloads = {t: pack_payload({"type": t, "body": body}) for t in gen.types}
        deadline = None if self.duration_s is None else t0 + self.duration_s
        chunk_size = CHUNK
        if self.rate is not None:
            chunk_size = max(1, min(CHUNK, round(self.rate * RATE_CHUNK_S)))
        while deadline is None or time.monotonic() < deadline:
            chunk = list(itertools.islice(gen, chunk_size))
            if not chunk:
                break
            self.ids.extend(await _submit_chunk(eng, chunk, payloads))
            for task in tasks:  # a failed sampler or chaos task ends the run, loudly
                if task.done() and not task.cancelled() and task.exception() is not None:
                    task.result()
            pause = 0.0
            if self.rate is not None:
                pause = t0 + gen.generated / self.rate - time.monotonic()
            # Even with room in every ring submit_many need not yield: let the
            # return rings, the sampler and the chaos task run.
            await asyncio.sleep(max(0.0, pause))


async def _submit_chunk(
    eng: Engine, chunk: list[GeneratedMessage], payloads: dict[str, msgspec.Raw]
) -> list[int]:
    """Submit one chunk; the ids the engine gave its messages (broadcast fan-out included)."""
    ids: list[int] = []
    groups: dict[tuple[str, str], list[tuple[str, msgspec.Raw]]] = {}
    for m in chunk:
        if m.kind == BROADCAST:
            continue
        groups.setdefault((m.kind, m.sender), []).append((m.recipient, payloads[m.kind]))
    for (kind, sender), items in groups.items():
        ids += await eng.submit_many(items, kind=kind, sender=sender, priority=PRIORITY_OF[kind])
    for m in chunk:
        if m.kind == BROADCAST:
            ids += await eng.broadcast(
                payloads[m.kind], sender=m.sender, priority=PRIORITY_OF[m.kind]
            )
    return ids


class Sampler:
    """Every interval: engine stats, CPU and RSS of its processes, into the collector."""

    def __init__(
        self,
        eng: Engine,
        gen: MessageGenerator,
        metrics: MetricsCollector,
        on_progress: ProgressHook | None,
    ) -> None:
        self.eng = eng
        self.gen = gen
        self.metrics = metrics
        self.on_progress = on_progress
        self.procs = ProcessSampler()
        self._report_ns = -1
        self._last_settle: Histogram | None = None
        self._cpu: dict[str, float] = {}  # CPU seconds per role at the previous sample
        self._cpu_at = 0.0

    def prime(self, t0: float) -> None:
        """The first point (t=0): the CPU counters' starting values."""
        self.sample(t0, observe=False)

    async def loop(self, t0: float, interval_s: float) -> None:
        next_at = time.monotonic() + interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval_s, time.monotonic())  # no catch-up bursts
            self.sample(t0)

    def sample(self, t0: float, *, final: bool = False, observe: bool = True) -> float:
        """One point of the series, and its time since ``t0``; ``observe``: also feed the
        gauges (not for the priming one)."""
        eng, m = self.eng, self.metrics
        stats = eng.stats()
        settled = stats["delivered"] + stats["dead_lettered"] + stats["expired"]
        depth = sum(stats["queue_depth"].values())
        procs = self.procs.sample(
            getattr(eng.monitor, "pid", None), [int(s.slot_idx[SLOT_PID]) for s in eng.shards]
        )
        now = time.monotonic()
        dt = now - self._cpu_at
        # CPU % of each role over the interval since the previous sample (100 = one core).
        pct = {
            role: (procs[role][0] - self._cpu.get(role, 0.0)) / dt * 100 if dt > 0 else 0.0
            for role in ROLES
        }
        self._cpu = {role: procs[role][0] for role in ROLES}
        self._cpu_at = now
        cpu = sum(pct.values())
        rss = sum(r for _, r in procs.values())
        if observe:
            m.observe("queue_depth", depth)
            m.observe("ring_fill", max(stats["ring_fill"].values(), default=0.0))
            m.observe("cpu_percent.total", cpu, weight=dt)
            m.observe("rss_bytes.total", rss)
            for role in ROLES:
                m.observe(f"cpu_percent.{role}", pct[role], weight=dt)
                m.observe(f"rss_bytes.{role}", procs[role][1])
            m.count("samples")
        p50 = p99 = None
        report = eng.report
        if report is not None and report.sent_ns != self._report_ns:
            self._report_ns = report.sent_ns
            recent = interval_histogram(report.latency_settle, self._last_settle)
            self._last_settle = report.latency_settle
            if recent.count:
                p50, p99 = recent.percentile(50), recent.percentile(99)
        point = SeriesPoint(
            t_s=now - t0,
            generated=self.gen.generated,
            settled=settled,
            queue_depth=depth,
            cpu_percent=cpu,
            rss_bytes=rss,
            kills=m.counters["chaos_kills"],
            p50_s=p50,
            p99_s=p99,
            failed_attempts=stats["failed_attempts"],
            dead_lettered=stats["dead_lettered"],
        )
        m.add_point(point, force=final)
        if self.on_progress is not None:
            self.on_progress(self.gen.generated, settled)
        return point.t_s


def tally_dead_letters(letters: list[DeadLetter]) -> DeadLetterTally:
    """Count the dead letters by type, sender, recipient and reason; keep none of them."""
    by_type: Counter[str] = Counter()
    by_sender: Counter[str] = Counter()
    by_recipient: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for dl in letters:
        msg = dl.message
        by_type[msg.kind.name.lower()] += 1
        by_sender[msg.sender] += 1
        by_recipient[msg.recipient] += 1
        by_reason[dl.reason] += 1
    return DeadLetterTally(
        records=len(letters),
        by_type=dict(by_type),
        by_sender=dict(by_sender),
        by_recipient=dict(by_recipient),
        by_reason=dict(by_reason),
    )


async def _settled_stats(eng: Engine, interval_s: float) -> dict[str, Any]:
    """stats() once the monitor's report covers every settled message, or can no longer.

    A report is at most one stats interval old.  After chaos kills it may never
    cover everything (a killed worker's unreported counts die with it): once a
    report is two intervals younger than the drain, waiting longer changes nothing.
    """
    drained_ns = time.monotonic_ns()
    enough_ns = drained_ns + int(2 * interval_s * 1e9)
    deadline = time.monotonic() + REPORT_WAIT_S
    stats = eng.stats()
    while time.monotonic() < deadline:
        settled = stats["delivered"] + stats["dead_lettered"] + stats["expired"]
        if stats["latency_settle_s"]["count"] >= settled:
            break
        report = eng.report
        if report is not None and report.sent_ns >= enough_ns:
            break
        await asyncio.sleep(0.05)
        stats = eng.stats()
    return stats


def _keep_histograms(eng: Engine, metrics: MetricsCollector) -> None:
    report = eng.report
    if report is not None:
        metrics.set_histogram("latency_start", report.latency_start)
        metrics.set_histogram("latency_settle", report.latency_settle)


async def _cancel(tasks: list[asyncio.Task[None]], *, reraise: bool = False) -> None:
    """Cancel and await ``tasks``; ``reraise``: a task that had failed raises its error."""
    for task in tasks:
        task.cancel()
    pending, tasks[:] = list(tasks), []
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            if reraise:
                raise


__all__ = ["PRIORITY_OF", "Sampler", "StressTestRunner", "tally_dead_letters"]
