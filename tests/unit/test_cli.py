"""The ``engine`` command run as a real subprocess, as a user or supervisor would."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engine import __version__
from engine.cli import main
from engine.exitcodes import ExitCode

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m engine`` with a clean ENGINE_* environment plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_json_reports_values_and_sources() -> None:
    proc = run("config", "--json", ENGINE_WORKERS="4", ENGINE_SINK="mock", ENGINE_AUTH_TOKEN="s3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["workers"] == {"value": 4, "source": "env", "env": "ENGINE_WORKERS"}
    assert out["sink"] == {"value": "mock", "source": "env", "env": "ENGINE_SINK"}
    assert out["batch_size"] == {"value": 256, "source": "default", "env": "ENGINE_BATCH_SIZE"}
    assert out["batch_linger_s"]["value"] == 0.0
    assert out["auth_token"]["value"] == "***"  # a secret is never printed
    assert "s3" not in proc.stdout


def test_bad_env_exits_78_with_the_message_on_stderr() -> None:
    proc = run("config", ENGINE_WORKERS="abc")
    assert proc.returncode == int(ExitCode.CONFIG) == 78
    assert proc.stdout == ""
    assert proc.stderr == (
        "engine: configuration error: "
        "ENGINE_WORKERS must be an integer >= 1 and <= 256, got 'abc'\n"
    )


def test_several_problems_one_per_line() -> None:
    proc = run("config", ENGINE_WORKERS="0", ENGINE_WORKRS="1")
    assert proc.returncode == 78
    lines = proc.stderr.splitlines()
    assert lines[0] == "engine: configuration error:"
    assert "  ENGINE_WORKERS must be an integer >= 1 and <= 256, got '0'" in lines
    assert "  ENGINE_WORKRS is not a known setting; did you mean ENGINE_WORKERS?" in lines


def test_cli_flag_beats_env() -> None:
    proc = run("config", "--json", "--workers", "3", "--set", "batch-size=64", ENGINE_WORKERS="5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["workers"]["value"] == 3
    assert out["workers"]["source"] == "cli"
    assert (out["batch_size"]["value"], out["batch_size"]["source"]) == (64, "cli")


def test_cli_values_are_checked_like_env_values() -> None:
    proc = run("config", "--ring-bytes", "1000")
    assert proc.returncode == 78
    assert "ring_bytes (cli) must be a power of two >= 65536 and <= 1073741824, got '1000'" in (
        proc.stderr
    )


def test_config_table_shows_name_env_value_source() -> None:
    proc = run("config", ENGINE_STARVATION_LIMIT="9")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0] == ["NAME", "ENV", "VALUE", "SOURCE"]
    assert ["starvation_limit", "ENGINE_STARVATION_LIMIT", "9", "env"] in rows
    assert ["host", "ENGINE_HOST", '"127.0.0.1"', "default"] in rows


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"engine {__version__}"


def test_help_lists_every_subcommand() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("config", "demo"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [command])
        assert len(line.split()) > 2, line  # the command and a one-line description


def test_no_subcommand_prints_help_and_exits_64() -> None:
    proc = run()
    assert proc.returncode == int(ExitCode.USAGE) == 64
    assert "config" in proc.stderr
    assert "demo" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seconds", "0"], "argument --seconds: must be a number > 0, got '0'"),
        (["demo", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
        (["config", "--set", "workers"], "expected FIELD=VALUE, got 'workers'"),
        (["bogus"], "invalid choice"),
    ],
)
def test_usage_errors_exit_64(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_conflicting_set_and_flag_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "workers=4", "--workers", "3"]) == ExitCode.CONFIG
    assert "workers given twice" in capsys.readouterr().err


def test_demo_runs_the_ring_demo_and_returns_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, int]] = []

    def run_ring_demo(*, seconds: float, batch: int) -> int:
        calls.append((seconds, batch))
        return 7

    fake = types.ModuleType("engine.stress.ringdemo")
    fake.run_ring_demo = run_ring_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.stress.ringdemo", fake)
    assert main(["demo", "--seconds", "0.5", "--batch", "8"]) == 7
    assert main(["demo"]) == 7
    assert calls == [(0.5, 8), (3.0, 256)]
