"""What a person sees: a rich progress bar during the run, tables and check lines after it."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from engine.stress.report import Gauge, Latency, StressReport

AGENT_ROWS = 12  # agents listed in the table; the JSON report has all of them


class RunProgress:
    """Two bars, generated and settled; a timed run's bars have no total and pulse."""

    def __init__(self, console: Console, total: int | None, *, enabled: bool) -> None:
        self.total = total
        self.progress = Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=4,  # the dispatcher runs in this process: keep it light
            disable=not enabled,
        )
        self.generated = self.progress.add_task("generated", total=total, rate="")
        self.settled = self.progress.add_task("settled", total=total, rate="")
        self._last: tuple[float, int] | None = None

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def update(self, generated: int, settled: int) -> None:
        """The runner's progress hook: called on every sample (about 4 times a second)."""
        now = self.progress.get_time()
        rate = ""
        if self._last is not None and now > self._last[0]:
            rate = f"{(settled - self._last[1]) / (now - self._last[0]):>9,.0f} msg/s"
        self._last = (now, settled)
        self._set(self.generated, generated, "")
        self._set(self.settled, settled, rate)

    def _set(self, task: TaskID, completed: int, rate: str) -> None:
        if self.total is None:
            self.progress.update(task, completed=completed, total=None, rate=rate)
        else:
            self.progress.update(task, completed=completed, rate=rate)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _lat(lat: Latency) -> str:
    return (
        f"p50 {_ms(lat.p50_s)}  p95 {_ms(lat.p95_s)}  p99 {_ms(lat.p99_s)}"
        f"  max {_ms(lat.max_s)}  (n={lat.count:,})"
    )


def _gauge(g: Gauge, fmt: str) -> str:
    if fmt == "cpu":
        return f"peak {g.peak:,.0f}%  avg {g.average:,.0f}%"
    return f"peak {_mib(g.peak)}  avg {_mib(g.average)}"


def summary_table(r: StressReport) -> Table:
    s = r.settings
    size = (
        f"{s.agents} agents x {s.messages_per_agent:,} messages"
        if s.messages_per_agent is not None
        else f"{s.agents} agents for {s.duration_s:g}s"
    )
    if s.rate is not None:
        size += f" at {s.rate:,.0f} msg/s"
    t = Table(title=f"engine stress: {s.scenario}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("run", f"{size}; types {', '.join(s.message_types)}; {s.workers} workers"),
        (
            "mock core",
            f"each attempt succeeds with p={s.success_rate:g} (ENGINE_MOCK_SUCCESS_RATE),"
            f" delay {_ms(s.delay_s)}",
        ),
        (
            "engine",
            f"retries {s.retry_max_attempts} attempts, backoff {s.retry_backoff_base_s:g}s"
            f" doubling to {s.retry_backoff_max_s:g}s; delivery concurrency"
            f" {s.delivery_concurrency}, per recipient {s.recipient_concurrency}",
        ),
        (
            "messages",
            f"{r.generated:,} generated, {r.delivered:,} delivered, {r.dead_lettered:,}"
            f" dead-lettered, {r.expired:,} expired, {r.in_flight:,} in flight, {r.lost:,} lost",
        ),
        (
            "at the sink",
            f"{r.sink.delivered:,} messages delivered in {r.sink.deliveries:,} deliveries"
            f" ({r.sink.repeats:,} repeats, {r.redelivered:,} redelivered)",
        ),
        (
            "throughput",
            f"{r.throughput_msgs_per_s:,.0f} msg/s over {r.elapsed_s:.2f}s"
            f" (peak {r.peak_throughput_msgs_per_s:,.0f} msg/s; submitting took {r.submit_s:.2f}s)",
        ),
        (
            "delivered",
            f"{_pct(r.success_rate)} of messages, after retries (the mock core's"
            f" {s.success_rate:g} is per attempt)",
        ),
        ("latency settle", _lat(r.latency_settle_s)),
        ("latency start", _lat(r.latency_start_s)),
        (
            "retries",
            f"{r.failed_attempts:,} failed attempts, {r.retried:,} retried;"
            f" dead letters {r.dead_letter_reasons or 'none'}",
        ),
        (
            "queue depth",
            f"peak {r.queue_depth.peak:,.0f}  avg {r.queue_depth.average:,.0f}"
            f"  (fullest ring peak {_pct(r.ring_fill.peak)})",
        ),
    ]
    for role in ("total", "dispatcher", "monitor", "workers"):
        rows.append(
            (
                f"cpu/rss {role}",
                f"{_gauge(r.cpu_percent[role], 'cpu')};  {_gauge(r.rss_bytes[role], 'rss')}",
            )
        )
    if s.chaos_interval_s is not None:
        rows.append(
            (
                "chaos",
                f"{r.chaos_kills} workers killed (every {s.chaos_interval_s:g}s),"
                f" {r.worker_restarts} restarts, {r.redelivered:,} redelivered",
            )
        )
    elif r.redelivered or r.worker_restarts:
        rows.append(("restarts", f"{r.worker_restarts} restarts, {r.redelivered:,} redelivered"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def type_table(r: StressReport) -> Table:
    t = Table(title="by type", title_justify="left")
    for col in ("type", "generated", "delivered", "dead-lettered", "expired", "success"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for kind, c in r.by_type.items():
        t.add_row(
            kind,
            f"{c.generated:,}",
            f"{c.delivered:,}",
            f"{c.dead_lettered:,}",
            f"{c.expired:,}",
            _pct(c.success_rate),
        )
    return t


def agent_table(r: StressReport) -> Table:
    shown = list(r.by_agent.items())[:AGENT_ROWS]
    more = len(r.by_agent) - len(shown)
    caption = f"{more} more agents in the --json report" if more > 0 else None
    t = Table(
        title="by agent (as recipient; sent includes broadcast fan-out)",
        title_justify="left",
        caption=caption,
    )
    for col in ("agent", "sent", "received", "delivered", "dead-lettered"):
        t.add_column(col, justify="left" if col == "agent" else "right")
    for name, a in shown:
        t.add_row(
            name, f"{a.sent:,}", f"{a.received:,}", f"{a.delivered:,}", f"{a.dead_lettered:,}"
        )
    return t


def print_report(console: Console, r: StressReport) -> None:
    """The tables, then one line per check (what scripts and people grep for)."""
    console.print(summary_table(r))
    if r.too_short:
        console.print(f"note: {r.too_short}", style="yellow", highlight=False, soft_wrap=True)
    console.print(type_table(r))
    console.print(agent_table(r))
    for check in r.checks:
        style = "green" if check.ok else "bold red"
        console.print(check.line(), style=style, highlight=False, soft_wrap=True)
