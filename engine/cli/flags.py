"""What every ``engine`` subcommand shares: the parser class, config flags, argument types.

Config flags are generated from the `Config` fields and handed to `resolve_config` as
strings, so a CLI value is checked by exactly the code that checks ``ENGINE_*`` values.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import NoReturn

from engine.config import ConfigError, FieldDoc, describe_fields
from engine.exitcodes import ExitCode

DEST = "cfg__"  # namespace prefix of config flags, so they never clash with a command's own
MASK = "***"  # shown instead of a secret's value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that exits with EX_USAGE (64) on a bad command line, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


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
        dest=DEST + "set",
        action="append",
        default=[],
        type=_setting,
        metavar="FIELD=VALUE",
        help="set any field, e.g. --set workers=4 (repeatable)",
    )
    for doc in describe_fields():
        default = MASK if doc.secret and doc.default else json.dumps(doc.default)
        text = f"{doc.description} ({doc.allowed}; default {default}; {doc.env})"
        group.add_argument(
            _flag(doc.name),
            dest=DEST + doc.name,
            metavar=_metavar(doc),
            help=text.replace("%", "%%"),
        )


def overrides_from_args(ns: argparse.Namespace) -> dict[str, str]:
    """The config values given on the command line, still strings, for `resolve_config`.

    A field given by ``--set`` and by its own flag with different values is an error,
    not a silent pick of one of them.
    """
    overrides: dict[str, str] = dict(getattr(ns, DEST + "set", None) or [])
    for doc in describe_fields():
        value = getattr(ns, DEST + doc.name, None)
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\+?[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)
