"""`StressReport`: a stress run's figures and end-of-run checks, as msgspec Structs.

Everything is derived from counters: the generator's per-type and per-agent
counts, the engine's settle counts and merged latency histograms, the dead
letters (which come back whole, so they can be attributed to a type, a sender
and a recipient) and the sampler's gauges.  Delivered per type or agent is
generated minus dead-lettered minus expired; no TTL is set unless
ENGINE_DEFAULT_TTL_S is, and expired messages cannot be attributed (the engine
counts them, it does not return them), so any expiry fails the breakdown check.

``lost`` is not taken from the engine's own counts (which cannot see a message
lost inside it): the mock sink records the id of every delivery where it
happens (ENGINE_MOCK_RECORD_DIR), and `reconcile` matches the ids the engine
handed out for what was generated against those deliveries and the dead letters.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from engine.stress.generator import MessageGenerator
from engine.stress.metrics import MetricsCollector, SeriesPoint
from engine.stress.processes import ROLES


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What was run: the scenario's values after every override."""

    scenario: str
    agents: int
    messages_per_agent: int | None  # None for a timed (--duration) run
    message_types: list[str]
    priorities: dict[str, str]  # priority lane of each type
    workers: int
    success_rate: float
    delay_s: float
    retry_max_attempts: int
    retry_backoff_base_s: float
    retry_backoff_max_s: float
    delivery_concurrency: int
    recipient_concurrency: int
    ttl_s: float  # ENGINE_DEFAULT_TTL_S; 0 = none
    duration_s: float | None
    rate: float | None  # offered generated msgs/s; None = as fast as the engine takes them
    chaos_interval_s: float | None
    seed: int
    payload_bytes: int


class Latency(msgspec.Struct, frozen=True):
    """Percentiles in seconds from the engine's merged histogram (bucket midpoints)."""

    p50_s: float
    p95_s: float
    p99_s: float
    max_s: float
    count: int


class Gauge(msgspec.Struct, frozen=True):
    peak: float
    average: float


class TypeCounts(msgspec.Struct, frozen=True):
    generated: int
    delivered: int
    dead_lettered: int
    expired: int
    success_rate: float


class AgentCounts(msgspec.Struct, frozen=True):
    """One agent: what it sent (fan-out included) and what happened to what it was sent."""

    sent: int
    received: int
    delivered: int
    dead_lettered: int


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"check {self.name}: {'PASS' if self.ok else 'FAIL'}: {self.detail}"


class DeadLetterTally(msgspec.Struct, frozen=True, kw_only=True):
    """The engine's dead letters, counted by type, sender, recipient and reason."""

    records: int
    by_type: dict[str, int]
    by_sender: dict[str, int]
    by_recipient: dict[str, int]
    by_reason: dict[str, int]


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True):
    """The generated message ids against the deliveries seen by the mock sink and the
    dead letters: counted where each happened, not taken from the engine's counters."""

    generated: int  # ids the engine returned for what was generated
    deliveries: int  # deliveries the sink accepted, repeats included
    delivered: int  # generated messages the sink delivered at least once
    repeats: int  # deliveries beyond the first of a message (at least once)
    dead_lettered: int  # generated messages dead-lettered and never delivered
    unaccounted: int  # generated messages neither delivered nor dead-lettered
    unexpected: int  # delivered or dead-lettered ids that were never generated


def read_delivered_ids(directory: Path) -> array[int]:
    """Every id the mock sink recorded in ``directory`` (a torn tail is ignored)."""
    ids: array[int] = array("Q")
    for path in sorted(directory.glob("*.ids")):
        data = path.read_bytes()
        ids.frombytes(data[: len(data) - len(data) % ids.itemsize])
    return ids


def reconcile(
    generated_ids: Iterable[int], delivered_ids: Iterable[int], dead_ids: Iterable[int]
) -> Reconciliation:
    """Mark each id generated, delivered, dead-lettered; count what each mark set holds."""
    generated, delivered, dead = 1, 2, 4
    state = bytearray()

    def mark(ids: Iterable[int], bit: int) -> tuple[int, int]:
        """Set ``bit`` on every id; (how many ids, how many were already set)."""
        n = repeated = 0
        for i in ids:
            if i >= len(state):
                state.extend(bytes(max(i + 1 - len(state), len(state))))
            repeated += (state[i] & bit) != 0
            state[i] |= bit
            n += 1
        return n, repeated

    gen_n, _ = mark(generated_ids, generated)
    deliveries, repeats = mark(delivered_ids, delivered)
    mark(dead_ids, dead)
    seen = (generated | delivered, generated | delivered | dead)
    return Reconciliation(
        generated=gen_n,
        deliveries=deliveries,
        delivered=sum(state.count(v) for v in seen),
        repeats=repeats,
        dead_lettered=state.count(generated | dead),
        unaccounted=state.count(generated),
        unexpected=sum(state.count(v) for v in (delivered, dead, delivered | dead)),
    )


class StressReport(msgspec.Struct, kw_only=True):
    """A stress run: totals, rates, latencies, breakdowns, processes, checks, time series."""

    settings: Settings
    ok: bool  # every check passed
    checks: list[Check]
    generated: int  # broadcast fan-out included
    submitted: int  # as the engine counted them
    delivered: int
    dead_lettered: int
    expired: int
    in_flight: int  # after the drain: 0 unless it timed out
    # Generated, and neither delivered by the sink nor dead-lettered nor expired nor in
    # flight: counted where deliveries happen (see `reconcile`), not by the engine.
    lost: int
    sink: Reconciliation  # the mock sink's deliveries against the generated ids
    drained: bool
    elapsed_s: float  # first submit to every message settled
    submit_s: float  # first submit to the last submit_many returning
    throughput_msgs_per_s: float  # settled messages / elapsed_s
    peak_throughput_msgs_per_s: float  # best sampling interval (>= the average)
    success_rate: float  # delivered / generated: after retries, not the mock core's rate
    failed_attempts: int
    retried: int
    redelivered: int  # delivered again after a worker died (at-least-once)
    chaos_kills: int
    worker_restarts: int
    latency_start_s: Latency  # submit -> handler start
    latency_settle_s: Latency  # submit -> delivered, dead-lettered or expired
    by_type: dict[str, TypeCounts]
    by_agent: dict[str, AgentCounts]
    dead_letter_reasons: dict[str, int]
    cpu_percent: dict[str, Gauge]  # total, dispatcher, monitor, workers; 100 = one core
    rss_bytes: dict[str, Gauge]
    queue_depth: Gauge  # submitted and not yet settled, all lanes
    ring_fill: Gauge  # fullest lane ring, 0..1
    samples: int
    series: list[SeriesPoint]
    too_short: str = ""  # why the rates, peaks and CPU figures mean little; "" when they do

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n"


def _latency(d: dict[str, Any]) -> Latency:
    return Latency(d["p50"], d["p95"], d["p99"], d["max"], d["count"])


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def peak_throughput(series: list[SeriesPoint]) -> float:
    """Highest settled msgs/s between two consecutive points (cumulative counts)."""
    best = 0.0
    for a, b in itertools.pairwise(series):
        dt = b.t_s - a.t_s
        if dt > 0:
            best = max(best, (b.settled - a.settled) / dt)
    return best


MIN_TRUSTED_S = 2.0
"""A run shorter than this (or with fewer samples) is mostly start-up and drain."""
MIN_TRUSTED_SAMPLES = 8


def too_short(elapsed_s: float, samples: int) -> str:
    """Why a run's rates, peaks and CPU figures are not worth much, or ""."""
    if elapsed_s >= MIN_TRUSTED_S and samples >= MIN_TRUSTED_SAMPLES:
        return ""
    return (
        f"a {elapsed_s:.2f}s run with {samples} sample(s) is too short to trust its rates, "
        f"peak and CPU figures (want >= {MIN_TRUSTED_S:g}s and {MIN_TRUSTED_SAMPLES} "
        "samples): use --suite medium, more --messages, or --duration"
    )


def build_report(
    *,
    settings: Settings,
    generator: MessageGenerator,
    stats: dict[str, Any],
    tally: DeadLetterTally,
    metrics: MetricsCollector,
    sink: Reconciliation,
    drained: bool,
    drain_timeout_s: float,
    elapsed_s: float,
    submit_s: float,
) -> StressReport:
    """Combine the run's counters into a report and run the checks on it."""
    gen = generator
    delivered, dead, expired = stats["delivered"], stats["dead_lettered"], stats["expired"]
    in_flight = stats["in_flight"]
    settled = delivered + dead + expired
    # Expired and unsettled messages carry no record (the sink never saw them): they are
    # the only ones among the unaccounted that are not lost.
    lost = sink.unaccounted - expired - in_flight
    by_type = {}
    for kind, n in gen.by_type.items():
        d = tally.by_type.get(kind, 0)
        by_type[kind] = TypeCounts(n, n - d, d, 0, _rate(n - d, n))
    by_agent = {}
    for i, name in enumerate(gen.names):
        d = tally.by_recipient.get(name, 0)
        by_agent[name] = AgentCounts(gen.sent[i], gen.received[i], gen.received[i] - d, d)
    checks = [
        _conservation(gen.generated, stats, sink, lost, drained, drain_timeout_s),
        _breakdown(gen, stats, tally, by_type, by_agent),
    ]

    def gauge(name: str) -> Gauge:
        g = metrics.gauge(name)
        return Gauge(g.peak, g.average)

    return StressReport(
        settings=settings,
        ok=all(c.ok for c in checks),
        checks=checks,
        generated=gen.generated,
        submitted=stats["submitted"],
        delivered=delivered,
        dead_lettered=dead,
        expired=expired,
        in_flight=in_flight,
        lost=lost,
        sink=sink,
        drained=drained,
        elapsed_s=elapsed_s,
        submit_s=submit_s,
        throughput_msgs_per_s=settled / elapsed_s if elapsed_s > 0 else 0.0,
        peak_throughput_msgs_per_s=peak_throughput(metrics.series),
        success_rate=_rate(delivered, gen.generated),
        failed_attempts=stats["failed_attempts"],
        retried=stats["retried"],
        redelivered=stats["redelivered"],
        chaos_kills=metrics.counters["chaos_kills"],
        worker_restarts=sum(w["restarts"] for w in stats["workers"]),
        latency_start_s=_latency(stats["latency_start_s"]),
        latency_settle_s=_latency(stats["latency_settle_s"]),
        by_type=by_type,
        by_agent=by_agent,
        dead_letter_reasons=dict(sorted(tally.by_reason.items())),
        cpu_percent={r: gauge(f"cpu_percent.{r}") for r in ("total", *ROLES)},
        rss_bytes={r: gauge(f"rss_bytes.{r}") for r in ("total", *ROLES)},
        queue_depth=gauge("queue_depth"),
        ring_fill=gauge("ring_fill"),
        samples=metrics.counters["samples"],
        series=list(metrics.series),
        too_short=too_short(elapsed_s, metrics.counters["samples"]),
    )


def _conservation(
    generated: int,
    stats: dict[str, Any],
    sink: Reconciliation,
    lost: int,
    drained: bool,
    drain_timeout_s: float,
) -> Check:
    """Every generated message was delivered (as the sink saw it), dead-lettered or expired;
    none lost or stuck; the engine's counts agree with what happened."""
    delivered, expired, in_flight = stats["delivered"], stats["expired"], stats["in_flight"]
    submitted, redelivered = stats["submitted"], stats["redelivered"]
    detail = (
        f"generated {generated:,} = delivered {sink.delivered:,} (as the sink saw them; the"
        f" engine counted {delivered:,}) + dead-lettered {sink.dead_lettered:,} + expired"
        f" {expired:,} + in flight {in_flight:,} + lost {lost:,}; {sink.repeats:,} repeated"
        f" deliveries"
    )
    problems = []
    if not drained:
        problems.append(f"the drain timed out after {drain_timeout_s:g}s")
    if submitted != generated:
        problems.append(f"the engine counted {submitted:,} submitted")
    if sink.generated != generated:
        problems.append(f"the engine returned {sink.generated:,} ids")
    if sink.delivered < delivered:
        problems.append(f"the engine counted {delivered - sink.delivered:,} deliveries never made")
    if sink.repeats > redelivered:
        problems.append(f"{sink.repeats:,} repeats but {redelivered:,} counted as redelivered")
    if sink.unexpected:
        problems.append(f"{sink.unexpected:,} ids delivered that were never generated")
    ok = not problems and lost == 0 and in_flight == 0
    return Check("conservation", ok, detail + "".join(f"; {p}" for p in problems))


def _breakdown(
    gen: MessageGenerator,
    stats: dict[str, Any],
    tally: DeadLetterTally,
    by_type: dict[str, TypeCounts],
    by_agent: dict[str, AgentCounts],
) -> Check:
    """The per-type and per-agent figures add up to the engine's totals."""
    dead, expired = stats["dead_lettered"], stats["expired"]
    problems = []
    if tally.records != dead:
        problems.append(f"{tally.records:,} dead-letter records for {dead:,} dead-lettered")
    if expired:
        problems.append(f"{expired:,} expired messages cannot be attributed to a type or agent")
    sums = {
        "by type": (
            sum(t.generated for t in by_type.values()),
            sum(t.delivered for t in by_type.values()),
        ),
        "by agent (received)": (
            sum(a.received for a in by_agent.values()),
            sum(a.delivered for a in by_agent.values()),
        ),
        "by agent (sent)": (sum(a.sent for a in by_agent.values()), None),
    }
    for label, (generated, delivered) in sums.items():
        if generated != gen.generated:
            problems.append(f"{label}: generated sums to {generated:,}, not {gen.generated:,}")
        if delivered is not None and delivered != stats["delivered"]:
            problems.append(
                f"{label}: delivered sums to {delivered:,}, the engine says {stats['delivered']:,}"
            )
    detail = (
        f"{len(by_type)} types and {len(by_agent)} agents sum to the totals;"
        f" {tally.records:,} dead-letter records"
    )
    return Check("breakdown", not problems, "; ".join(problems) if problems else detail)
