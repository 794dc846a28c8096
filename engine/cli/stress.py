"""``engine stress``: run a stress scenario, show progress, print tables and checks.

``engine stress ARGS`` (engine/cli.py) calls `main` with ARGS.  Exit codes are
`engine.exitcodes.ExitCode`: OK when every check passed, FAILURE when one
failed or the engine failed, USAGE for a bad command line, CONFIG for a bad
``ENGINE_*`` value, UNAVAILABLE when ``--plot`` lacks matplotlib.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from engine.cli.flags import Parser
from engine.exitcodes import ExitCode
from engine.stress.generator import MESSAGE_TYPES, parse_types
from engine.stress.scenarios import DEFAULT_AGENTS, SCENARIOS, SUITES

TABLE_WIDTH = 120  # when stdout is not a terminal; rich would otherwise wrap at 80

EPILOG = """\
scenarios:
  max        success 1.0, delay 0.1 ms, direct messages only
  realistic  success 0.95, delay 1 ms, all four types, 5 attempts (backoff 10 ms doubling to 1 s)
  failure    success 0.80, delay 5 ms, all four types, 3 attempts (backoff 5 ms doubling to 50 ms)
suites (messages per agent): small 1,000, medium 10,000, large 100,000

Other engine knobs come from ENGINE_* variables (e.g. ENGINE_DELIVERY_CONCURRENCY);
the scenario's mock, retry and dead-letter settings win over them.

exit status: 0 all checks passed, 1 a check or the engine failed, 64 bad arguments,
69 --plot without matplotlib, 78 bad ENGINE_* configuration, 130 interrupted

examples:
  engine stress max --suite small
  engine stress realistic --suite medium --json out.json --plot out.png
  engine stress failure --agents 20 --messages 500 --workers 2
  engine stress realistic --duration 600 --rate 2000 --chaos --chaos-interval 5
"""


def _number(kind: type[int] | type[float], low: float, *, strict: bool) -> Any:
    """An argparse type: a number > low (strict) or >= low, with a clear message."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if math.isnan(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text}"
            )
        return value

    return parse


def _rate(text: str) -> float:
    value = _number(float, 0, strict=False)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return float(value)


def _types(text: str) -> tuple[str, ...]:
    try:
        return parse_types(text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="engine stress",
        description="Stress the engine with agents sending direct, broadcast and onboarding\n"
        "messages through the mock messaging core; report throughput, latency and\n"
        "resources, and check that no message was lost.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    positive = _number(int, 0, strict=True)
    seconds = _number(float, 0, strict=True)
    p.add_argument(
        "scenario",
        nargs="?",
        choices=list(SCENARIOS),
        default="max",
        help="workload shape (default: max)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--suite", choices=list(SUITES), help="size preset (default: small)")
    size.add_argument(
        "--messages",
        type=positive,
        metavar="N",
        help="messages each agent sends (a broadcast counts once)",
    )
    size.add_argument(
        "--duration",
        type=seconds,
        metavar="SECONDS",
        help="soak: keep sending for this long instead of a fixed count",
    )
    p.add_argument(
        "--agents",
        type=positive,
        default=DEFAULT_AGENTS,
        metavar="N",
        help=f"agents, each a sender and a recipient (default: {DEFAULT_AGENTS})",
    )
    p.add_argument(
        "--types",
        type=_types,
        metavar="T[,T...]",
        help=f"message types to send, from {','.join(MESSAGE_TYPES)} (default: the scenario's)",
    )
    p.add_argument(
        "--workers",
        type=positive,
        metavar="N",
        help="worker processes (default: ENGINE_WORKERS or 2)",
    )
    p.add_argument(
        "--rate",
        type=seconds,
        metavar="MSG_PER_S",
        help="pace generation at this many msg/s (default: as fast as accepted)",
    )
    core = p.add_argument_group("mock core and retries (override the scenario)")
    core.add_argument(
        "--success-rate",
        type=_rate,
        metavar="X",
        help="share of delivery attempts that succeed, 0..1",
    )
    core.add_argument(
        "--delay",
        type=_number(float, 0, strict=False),
        metavar="SECONDS",
        help="simulated delivery time",
    )
    core.add_argument(
        "--retry-attempts",
        type=positive,
        metavar="N",
        help="attempts before the dead-letter queue, the first included",
    )
    core.add_argument(
        "--retry-backoff",
        type=seconds,
        metavar="SECONDS",
        help="first retry backoff (full jitter, doubling per attempt)",
    )
    chaos = p.add_argument_group("fault injection")
    chaos.add_argument(
        "--chaos",
        action="store_true",
        help="SIGKILL a random worker every --chaos-interval seconds",
    )
    chaos.add_argument(
        "--chaos-interval",
        type=seconds,
        metavar="SECONDS",
        help="seconds between kills (default: 1.0; needs --chaos)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' = stdout)")
    out.add_argument(
        "--plot",
        metavar="PATH.png",
        help="plot throughput, latency and queue depth over time"
        " (needs matplotlib: pip install 'ringway[plot]')",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    misc = p.add_argument_group("run control")
    misc.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of recipients and chaos victims"
    )
    misc.add_argument(
        "--payload-bytes",
        type=_number(int, 0, strict=False),
        default=100,
        metavar="N",
        help="payload body size (default: 100)",
    )
    misc.add_argument(
        "--drain-timeout",
        type=seconds,
        default=600.0,
        metavar="SECONDS",
        help="longest wait for every message to settle (default: 600)",
    )
    return p


def _check_output_path(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    if path is None or path == "-":
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        parser.error(f"{flag}: directory {str(parent)!r} does not exist")


def main(argv: list[str]) -> int:
    """Run ``engine stress`` with ``argv`` (the arguments after ``stress``); the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.chaos_interval is not None and not args.chaos:
            parser.error("--chaos-interval needs --chaos")
        if args.plot == "-":
            parser.error("--plot needs a file path")
        _check_output_path(parser, "--json", args.json)
        _check_output_path(parser, "--plot", args.plot)
    except SystemExit as exc:  # --help and usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("engine stress: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


def _quiet_expected_failures() -> None:
    """The mock core fails on purpose: its failed attempts and dead letters are counted in
    the report, not logged one by one (worker deaths and other events still are)."""
    import logging

    logging.getLogger("engine.delivery").setLevel(logging.CRITICAL)
    logging.getLogger("engine.events").addFilter(
        lambda record: getattr(record, "event", "") != "dead_letter"
    )


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine.config import ConfigError
    from engine.stress.plot import PlotUnavailable, require_matplotlib, write_plot
    from engine.stress.render import RunProgress, print_report
    from engine.stress.runner import StressTestRunner
    from ipc.errors import EngineError

    _quiet_expected_failures()
    if args.plot:
        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            print(f"engine stress: {exc}", file=sys.stderr)
            return ExitCode.UNAVAILABLE
    scenario = SCENARIOS[args.scenario]
    options: dict[str, Any] = {
        "num_agents": args.agents,
        "messages_per_agent": args.messages or SUITES[args.suite or "small"],
        "duration_s": args.duration,
        "workers": args.workers,
        "rate": args.rate,
        "chaos_interval_s": (args.chaos_interval or 1.0) if args.chaos else None,
        "seed": args.seed,
        "payload_bytes": args.payload_bytes,
        "drain_timeout_s": args.drain_timeout,
    }
    overrides = {
        "message_types": args.types,
        "delivery_success_rate": args.success_rate,
        "simulated_delay": args.delay,
        "retry_max_attempts": args.retry_attempts,
        "retry_backoff_base_s": args.retry_backoff,
    }
    options |= {k: v for k, v in overrides.items() if v is not None}
    if args.retry_backoff is not None:
        options["retry_backoff_max_s"] = max(args.retry_backoff, scenario.retry_backoff_max_s)
    try:
        runner = StressTestRunner.from_scenario(scenario, **options)
    except ConfigError as exc:
        sep = " " if len(exc.problems) == 1 else "\n  "
        print(f"engine stress: configuration error:{sep}{sep.join(exc.problems)}", file=sys.stderr)
        return ExitCode.CONFIG
    except ValueError as exc:
        print(f"engine stress: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    json_to_stdout = args.json == "-"
    out = sys.stderr if json_to_stdout else sys.stdout
    console = Console(file=out, width=None if out.isatty() else TABLE_WIDTH)
    err = Console(stderr=True)
    show = not args.no_progress and sys.stderr.isatty()
    try:
        with RunProgress(err, runner.planned_total(), enabled=show) as progress:
            runner.on_progress = progress.update
            report = runner.run_sync()
    except EngineError as exc:
        print(f"engine stress: engine error: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    print_report(console, report)
    try:
        if args.json:
            if json_to_stdout:
                sys.stdout.buffer.write(report.to_json())
                sys.stdout.flush()
            else:
                Path(args.json).write_bytes(report.to_json())
        if args.plot:
            write_plot(report, args.plot)
    except OSError as exc:
        print(f"engine stress: cannot write output: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK if report.ok else ExitCode.FAILURE
