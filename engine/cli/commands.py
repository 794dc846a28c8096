"""The ``engine`` command line; every subcommand returns an `ExitCode`.

Config flags are generated from the `Config` fields and handed to `resolve_config` as
strings, so a CLI value is checked by exactly the code that checks ``ENGINE_*`` values.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib import metadata

import msgspec

from engine import __version__
from engine.cli.flags import (
    MASK,
    Parser,
    add_config_flags,
    overrides_from_args,
    positive_float,
    positive_int,
    reference_table,
)
from engine.config import ConfigError, describe_fields, foreign_env, resolve_config
from engine.exitcodes import ExitCode
from ipc.errors import EngineError

Command = Callable[[argparse.Namespace], int]


def version() -> str:
    """The installed distribution's version, or the source tree's when not installed."""
    try:
        return metadata.version("ringway")
    except metadata.PackageNotFoundError:
        return __version__


def _cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_table())
        return ExitCode.OK
    config, sources = resolve_config(overrides=overrides_from_args(args), source_label="cli")
    for name in foreign_env():
        print(f"engine: warning: {name} is not a setting of this engine; ignored", file=sys.stderr)
    values = msgspec.structs.asdict(config)
    docs = describe_fields()
    shown = {d.name: MASK if d.secret and values[d.name] else values[d.name] for d in docs}
    if args.json:
        out = {
            d.name: {"value": shown[d.name], "source": sources[d.name], "env": d.env} for d in docs
        }
        print(json.dumps(out, indent=2))
        return ExitCode.OK
    rows = [("NAME", "ENV", "VALUE", "SOURCE")]
    rows += [(d.name, d.env, json.dumps(shown[d.name]), sources[d.name]) for d in docs]
    w_name, w_env, w_value = (max(len(row[i]) for row in rows) for i in range(3))
    for name, env, value, source in rows:
        print(f"{name:<{w_name}}  {env:<{w_env}}  {value:<{w_value}}  {source}")
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.stress.ringdemo import run_ring_demo

    return int(run_ring_demo(seconds=args.seconds, batch=args.batch))


def build_parser() -> argparse.ArgumentParser:
    """The ``engine`` parser; each subcommand stores its function as ``run``."""
    parser = Parser(
        prog="engine",
        description="Ringway: multiprocess message delivery over shared-memory rings.",
    )
    parser.add_argument("--version", action="version", version=f"engine {version()}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    config = sub.add_parser(
        "config",
        help="print the effective configuration and where each value came from",
        description="Print each setting, its ENGINE_* variable, value and source "
        "(default, env or cli). Flags win over the environment, which wins over defaults.",
    )
    config.add_argument(
        "--json", action="store_true", help='print {"field": {"value", "source", "env"}}'
    )
    config.add_argument(
        "--reference",
        action="store_true",
        help="print every ENGINE_* variable as a Markdown table (the one in tuning.md)",
    )
    add_config_flags(config)
    config.set_defaults(run=_cmd_config)

    demo = sub.add_parser(
        "demo",
        help="push messages through a shared-memory ring and report throughput",
        description="Run the shared-memory ring demo for a while and report its throughput.",
    )
    demo.add_argument(
        "--seconds", type=positive_float, default=3.0, help="how long to run (default 3.0)"
    )
    demo.add_argument(
        "--batch", type=positive_int, default=256, help="messages per batch (default 256)"
    )
    demo.set_defaults(run=_cmd_demo)

    from engine.cli.service import add_service_commands

    add_service_commands(sub)

    from engine.cli.batch import add_batch_commands

    add_batch_commands(sub)

    stress = sub.add_parser(
        "stress",
        add_help=False,
        help="run the stress harness (agents, message types, mock core); --help for options",
        description="Run the stress harness; see `engine stress --help`.",
    )
    stress.add_argument("argv", nargs=argparse.REMAINDER)
    stress.set_defaults(run=_cmd_stress)
    return parser


def _cmd_stress(args: argparse.Namespace) -> int:
    """Hand the rest of the command line to the harness (it lives in bench/, loaded lazily)."""
    from engine.cli.stress import main as stress_main

    argv = list(args.argv)
    return int(stress_main(argv[1:] if argv[:1] == ["--"] else argv))


def main(argv: list[str] | None = None) -> int:
    """Run the ``engine`` command and return its exit code (see `ExitCode`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stress"]:
        # argparse's REMAINDER cannot start with an option (`engine stress --help`).
        argv = ["stress", "--", *argv[1:]]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors end here
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    run: Command | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        return int(run(args))
    except ConfigError as exc:
        sep = " " if len(exc.problems) == 1 else "\n  "
        print(f"engine: configuration error:{sep}{sep.join(exc.problems)}", file=sys.stderr)
        return ExitCode.CONFIG
    except EngineError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `engine config | head`: the reader left, which is not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return ExitCode.FAILURE
