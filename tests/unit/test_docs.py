"""The docs stay true: tuning.md embeds the current reference table, README the commands."""

from __future__ import annotations

import pathlib
import re

from engine.cli.commands import reference_table
from engine.config import describe_fields

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tuning_md_embeds_the_current_reference_table() -> None:
    text = (ROOT / "tuning.md").read_text()
    m = re.search(r"<!-- reference:start -->\n(.*?)\n<!-- reference:end -->", text, re.S)
    assert m, "tuning.md lost its reference markers"
    assert m.group(1) == reference_table(), "run `engine config --reference` into tuning.md"


def test_every_variable_is_documented() -> None:
    text = (ROOT / "tuning.md").read_text()
    missing = [d.env for d in describe_fields() if f"`{d.env}`" not in text]
    assert missing == []


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"
