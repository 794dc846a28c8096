"""The ``engine`` command line; every subcommand returns an `ExitCode`.

Config flags are generated from the `Config` fields and handed to `resolve_config` as
strings, so a CLI value is checked by exactly the code that checks ``ENGINE_*`` values.
"""

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from importlib import metadata
from typing import NoReturn

import msgspec

from engine import __version__
from engine.config import ConfigError, FieldDoc, describe_fields, resolve_config
from engine.exitcodes import ExitCode
from ipc.errors import EngineError

_DEST = "cfg__"  # namespace prefix of config flags, so they never clash with a command's own
_MASK = "***"  # shown instead of a secret's value
Command = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that exits with EX_USAGE (64) on a bad command line, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def version() -> str:
    """The installed distribution's version, or the source tree's when not installed."""
    try:
        return metadata.version("ringway")
    except metadata.PackageNotFoundError:
        return __version__


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting(text: str) -> tuple[str, str]:
    """Parse ``--set FIELD=VALUE``; FIELD may be ``ring-bytes``, ``ring_bytes`` or the env name."""
    name, sep, value = text.partition("=")
    name = name.strip().lower().replace("-", "_").removeprefix("engine_")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, value  # an unknown FIELD is reported, with a suggestion, by resolve_config


def _metavar(doc: FieldDoc) -> str:
    if doc.type_name == "choice":
        return "{" + doc.allowed.removeprefix("one of ").replace(", ", ",") + "}"
    if doc.name.endswith("_s"):
        return "SECONDS"
    if doc.name.endswith("_bytes"):
        return "BYTES"
    return {"int": "N", "float": "X"}.get(doc.type_name, "TEXT")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--set FIELD=VALUE`` and one ``--<field>`` flag per Config field to ``parser``."""
    group = parser.add_argument_group("configuration (wins over ENGINE_* variables)")
    group.add_argument(
        "--set",
        dest=_DEST + "set",
        action="append",
        default=[],
        type=_setting,
        metavar="FIELD=VALUE",
        help="set any field, e.g. --set workers=4 (repeatable)",
    )
    for doc in describe_fields():
        default = _MASK if doc.secret and doc.default else json.dumps(doc.default)
        text = f"{doc.description} ({doc.allowed}; default {default}; {doc.env})"
        group.add_argument(
            _flag(doc.name),
            dest=_DEST + doc.name,
            metavar=_metavar(doc),
            help=text.replace("%", "%%"),
        )


def overrides_from_args(ns: argparse.Namespace) -> dict[str, str]:
    """The config values given on the command line, still strings, for `resolve_config`.

    A field given by ``--set`` and by its own flag with different values is an error,
    not a silent pick of one of them.
    """
    overrides: dict[str, str] = dict(getattr(ns, _DEST + "set", None) or [])
    for doc in describe_fields():
        value = getattr(ns, _DEST + doc.name, None)
        if value is None:
            continue
        if overrides.get(doc.name, value) != value:
            raise ConfigError(
                f"{doc.name} given twice: --set {doc.name}={overrides[doc.name]} "
                f"and {_flag(doc.name)} {value}"
            )
        overrides[doc.name] = value
    return overrides


def reference_table() -> str:
    """Every setting as a Markdown table: tuning.md embeds it verbatim (a test checks)."""
    lines = ["| Variable | Default | Allowed | What it sets |", "|---|---|---|---|"]
    for d in describe_fields():
        default = json.dumps(d.default)
        lines.append(f"| `{d.env}` | `{default}` | {d.allowed} | {d.description} |")
    return "\n".join(lines)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_table())
        return ExitCode.OK
    config, sources = resolve_config(overrides=overrides_from_args(args), source_label="cli")
    values = msgspec.structs.asdict(config)
    docs = describe_fields()
    shown = {d.name: _MASK if d.secret and values[d.name] else values[d.name] for d in docs}
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\+?[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_ring_demo

    return int(run_ring_demo(seconds=args.seconds, batch=args.batch))


def build_parser() -> argparse.ArgumentParser:
    """The ``engine`` parser; each subcommand stores its function as ``run``."""
    parser = _Parser(
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
        "--seconds", type=_positive_float, default=3.0, help="how long to run (default 3.0)"
    )
    demo.add_argument(
        "--batch", type=_positive_int, default=256, help="messages per batch (default 256)"
    )
    demo.set_defaults(run=_cmd_demo)

    from engine.cli_service import add_service_commands

    add_service_commands(sub)

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
    from bench.stress.cli import main as stress_main

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
