"""The stress harness (`engine stress`, bench/stress) with real engines at small sizes.

Every run here is a real engine (dispatcher in the test's or the CLI's
process, monitor and workers as processes) with the mock sink.  Sizes are a
few hundred to a few thousand messages so each run takes seconds on a loaded
2-core machine; nothing asserts speed.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cli.stress import main
from engine.exitcodes import ExitCode
from engine.stress import (
    MESSAGE_TYPES,
    SCENARIOS,
    MessageGenerator,
    MetricsCollector,
    StressReport,
    StressTestRunner,
)
from engine.stress.metrics import SeriesPoint

CLI_TIMEOUT_S = 120  # generous: the machine is shared; a hang fails rather than blocks
# Subprocesses run from the checkout, so `bench` imports even where the installed
# package predates it (an editable install maps only the packages it was built with).
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "stress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def failing_run() -> StressReport:
    """4 agents x 100 messages, all four types, 60% success, 2 attempts: many dead letters."""
    runner = StressTestRunner.from_scenario(
        SCENARIOS["failure"],
        num_agents=4,
        messages_per_agent=100,
        workers=1,
        simulated_delay=0.001,
        delivery_success_rate=0.6,
        retry_max_attempts=2,
        drain_timeout_s=60,
        env={},
    )
    return runner.run_sync()


# -- counts ----------------------------------------------------------------------------


def test_counts_reconcile_in_total_by_type_and_by_agent(failing_run: StressReport) -> None:
    r = failing_run
    # 400 sends; a quarter are broadcasts to 4 agents: 300 + 100 * 4.
    assert r.generated == r.submitted == 700
    assert r.generated == r.delivered + r.dead_lettered + r.expired
    assert r.lost == 0 and r.in_flight == 0 and r.drained
    assert r.dead_lettered > 0, "the breakdown of dead letters is what this run is for"
    # Counted where they happened: each delivery once at the mock sink, no crash, no repeat.
    assert (r.sink.generated, r.sink.unaccounted, r.sink.unexpected) == (r.generated, 0, 0)
    assert r.sink.delivered == r.sink.deliveries == r.delivered and r.sink.repeats == 0
    assert r.sink.dead_lettered == r.dead_lettered
    assert r.dead_letter_reasons == {"max_attempts": r.dead_lettered}

    assert set(r.by_type) == set(MESSAGE_TYPES)
    assert sum(t.generated for t in r.by_type.values()) == r.generated
    assert sum(t.delivered for t in r.by_type.values()) == r.delivered
    assert sum(t.dead_lettered for t in r.by_type.values()) == r.dead_lettered
    for t in r.by_type.values():
        assert t.generated == t.delivered + t.dead_lettered + t.expired
    assert r.by_type["broadcast"].generated == 400

    assert list(r.by_agent) == ["Agent-1", "Agent-2", "Agent-3", "Agent-4"]
    assert sum(a.sent for a in r.by_agent.values()) == r.generated
    assert sum(a.received for a in r.by_agent.values()) == r.generated
    assert sum(a.delivered for a in r.by_agent.values()) == r.delivered
    assert sum(a.dead_lettered for a in r.by_agent.values()) == r.dead_lettered
    assert all(a.sent == 175 for a in r.by_agent.values())  # 75 single + 25 broadcasts x 4

    assert r.ok
    assert [(c.name, c.ok) for c in r.checks] == [("conservation", True), ("breakdown", True)]


def test_report_fields_are_present_and_consistent(failing_run: StressReport) -> None:
    r = failing_run
    s = r.settings
    assert (s.scenario, s.agents, s.messages_per_agent, s.workers) == ("failure", 4, 100, 1)
    assert (s.success_rate, s.delay_s, s.retry_max_attempts) == (0.6, 0.001, 2)
    assert s.priorities["hard_onboard"] == "high" and s.priorities["soft_onboard"] == "low"

    assert r.success_rate == pytest.approx(r.delivered / r.generated)
    assert r.elapsed_s > 0 and r.submit_s <= r.elapsed_s
    settled = r.delivered + r.dead_lettered + r.expired
    assert r.throughput_msgs_per_s == pytest.approx(settled / r.elapsed_s)
    assert r.peak_throughput_msgs_per_s > 0
    # Each dead letter failed both its attempts; every failure but the last was retried.
    assert r.failed_attempts >= 2 * r.dead_lettered
    assert r.retried == r.failed_attempts - r.dead_lettered

    for lat in (r.latency_start_s, r.latency_settle_s):
        assert 0 < lat.p50_s <= lat.p95_s <= lat.p99_s <= lat.max_s
    assert r.latency_settle_s.count == settled  # no chaos: the report covers every message
    assert r.latency_start_s.count == settled + r.retried  # one start per attempt

    assert set(r.cpu_percent) == set(r.rss_bytes) == {"total", "dispatcher", "monitor", "workers"}
    for g in (*r.cpu_percent.values(), *r.rss_bytes.values(), r.queue_depth, r.ring_fill):
        assert g.peak >= g.average >= 0
    assert r.rss_bytes["workers"].average > 0 and r.rss_bytes["monitor"].average > 0
    assert r.rss_bytes["total"].peak >= r.rss_bytes["dispatcher"].peak
    assert r.queue_depth.peak > 0 and r.samples > 0

    series = r.series
    assert series[0].t_s < 1.0 and series[0].generated == 0  # the point taken at start
    assert series[-1].settled == settled and series[-1].generated == r.generated
    for a, b in itertools.pairwise(series):
        assert a.t_s <= b.t_s and a.settled <= b.settled and a.generated <= b.generated
    assert r.chaos_kills == 0


def test_json_report_parses(failing_run: StressReport) -> None:
    data = json.loads(failing_run.to_json())
    assert data["generated"] == failing_run.generated
    assert data["by_type"]["broadcast"]["generated"] == 400
    assert data["latency_settle_s"]["p99_s"] > 0
    assert {c["name"] for c in data["checks"]} == {"conservation", "breakdown"}
    assert data["settings"]["messages_per_agent"] == 100


# -- the command -----------------------------------------------------------------------


def test_cli_runs_end_to_end_with_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["max", "--agents", "3", "--messages", "300", "--workers", "1"]
    proc = _cli(*args, "--json", str(out), "--plot", str(png), "--no-progress")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "check conservation: PASS" in proc.stdout
    assert "check breakdown: PASS" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["generated"] == data["delivered"] == 900
    assert data["settings"]["message_types"] == ["direct"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_to_stdout_keeps_tables_on_stderr() -> None:
    proc = _cli("max", "--agents", "2", "--messages", "100", "--workers", "1", "--json", "-")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert json.loads(proc.stdout)["generated"] == 200
    assert "check conservation: PASS" in proc.stderr


def test_chaos_kills_workers_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    args = "max --agents 6 --duration 2 --rate 1000 --workers 2 --chaos --chaos-interval 0.4"
    proc = _cli(*args.split(), "--json", str(out), "--no-progress")
    data = json.loads(out.read_text())
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    assert data["chaos_kills"] >= 1
    assert data["worker_restarts"] >= 1
    assert data["lost"] == 0 and data["in_flight"] == 0
    assert data["generated"] == data["delivered"] + data["dead_lettered"] + data["expired"]
    sink = data["sink"]  # every generated message reached the sink; kills repeat some
    assert sink["generated"] == data["generated"] and sink["unaccounted"] == 0
    assert sink["delivered"] == data["delivered"] and sink["unexpected"] == 0
    assert sink["deliveries"] == sink["delivered"] + sink["repeats"]
    assert sink["repeats"] <= data["redelivered"]
    assert "chaos" in proc.stdout and "check conservation: PASS" in proc.stdout


def test_failed_check_exits_nonzero() -> None:
    """A drain that cannot finish in time leaves messages in flight: conservation fails."""
    args = "failure --agents 2 --messages 50 --workers 1 --delay 0.05 --drain-timeout 0.2"
    proc = _cli(*args.split(), "--no-progress")
    assert proc.returncode == ExitCode.FAILURE, proc.stdout + proc.stderr
    assert "check conservation: FAIL" in proc.stdout
    assert "drain timed out" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agents", "0"], "--agents: must be > 0"),
        (["--messages", "x"], "--messages: expected an integer"),
        (["--types", "direct,chat"], "unknown message type 'chat'"),
        (["--success-rate", "1.5"], "--success-rate: must be between 0 and 1"),
        (["--messages", "10", "--duration", "5"], "not allowed with argument"),
        (["--chaos-interval", "1"], "--chaos-interval needs --chaos"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["--json", "/no/such/dir/r.json"], "--json: directory '/no/such/dir' does not exist"),
    ],
)
def test_bad_arguments_give_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert message in err and "usage: engine stress" in err


def test_bad_argument_through_the_engine_command() -> None:
    proc = _cli("realistic", "--workers", "0")
    assert proc.returncode == ExitCode.USAGE
    assert "--workers: must be > 0, got 0" in proc.stderr


def test_bad_engine_variable_gives_a_configuration_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "stress", "max", "--no-progress"],
        cwd=REPO,
        env=os.environ | {"ENGINE_RING_BYTES": "abc"},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG
    assert "ENGINE_RING_BYTES must be a power of two" in proc.stderr


def test_help_lists_scenarios_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == ExitCode.OK
    out = capsys.readouterr().out
    for text in ("usage: engine stress", "realistic", "--chaos-interval", "--plot", "small"):
        assert text in out


def test_engine_stress_help_through_the_engine_command() -> None:
    proc = _cli("--help")
    assert proc.returncode == ExitCode.OK and "usage: engine stress" in proc.stdout


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
        "from engine.cli.stress import main\n"
        f"sys.exit(main(['max', '--plot', {str(tmp_path / 'out.png')!r}, '--no-progress']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == ExitCode.UNAVAILABLE, proc.stderr
    assert "pip install 'ringway[plot]'" in proc.stderr
    assert not (tmp_path / "out.png").exists()


# -- the generator and the collector -----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    agents=st.integers(1, 12),
    messages=st.integers(0, 40),
    types=st.lists(st.sampled_from(MESSAGE_TYPES), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**32),
)
def test_generator_streams_and_counts_what_it_yields(
    agents: int, messages: int, types: list[str], seed: int
) -> None:
    gen = MessageGenerator(agents, messages, types, seed=seed)
    assert iter(gen) is gen  # an iterator, not a list
    planned_by_type, planned = gen.planned_by_type(), gen.planned_total()
    assert gen.generated == 0  # nothing made ahead of time
    names = {f"Agent-{i}" for i in range(1, agents + 1)}
    by_type: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    sends = 0
    for msg in gen:
        sends += 1
        assert msg.kind in types and msg.sender in names
        if msg.kind == "broadcast":
            assert msg.recipient == "" and msg.fan_out == agents
            received.update(names)
        else:
            assert msg.recipient in names and msg.fan_out == 1
            assert agents == 1 or msg.recipient != msg.sender
            received[msg.recipient] += 1
        by_type[msg.kind] += msg.fan_out
        sent[msg.sender] += msg.fan_out
        assert gen.generated == sum(by_type.values())  # counted as yielded, not before
    assert sends == agents * messages
    assert gen.by_type == {t: by_type[t] for t in types} == planned_by_type
    assert gen.generated == planned == sum(gen.sent) == sum(gen.received)
    assert {f"Agent-{i + 1}": n for i, n in enumerate(gen.sent) if n} == dict(sent)
    assert {f"Agent-{i + 1}": n for i, n in enumerate(gen.received) if n} == dict(received)


def test_endless_generator_for_timed_runs() -> None:
    gen = MessageGenerator(3, None, ["direct", "broadcast"])
    assert gen.planned_total() is None
    taken = list(itertools.islice(gen, 10_000))
    assert len(taken) == 10_000 and gen.generated == sum(m.fan_out for m in taken)


def test_generator_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="agents must be >= 1"):
        MessageGenerator(0, 10)
    with pytest.raises(ValueError, match="unknown message type 'chat'"):
        MessageGenerator(3, 10, ["chat"])


def test_collector_series_stays_bounded_and_ordered() -> None:
    m = MetricsCollector(max_points=16)
    for i in range(10_000):
        m.add_point(SeriesPoint(float(i), i, i, 0, 0.0, 0, 0, None, None), force=i == 9_999)
    times = [p.t_s for p in m.series]
    assert len(times) < 16 and times[0] == 0 and times[-1] == 9_999
    assert times == sorted(times)
    for v in (3.0, 1.0, 2.0):
        m.observe("g", v)
    assert (m.gauge("g").peak, m.gauge("g").average) == (3.0, 2.0)
