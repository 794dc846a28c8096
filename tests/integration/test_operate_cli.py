"""The CLI as an operator meets it: health, dlq show, a handler from the working directory,
a missing handler, unknown variables, sending to a stopped service."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from tests.integration.service_proc import ServiceProc, free_port, running_service
from tests.integration.test_service_cli import engine

ENGINE_SCRIPT = Path(sys.executable).parent / "engine"  # the installed console script


def test_health_exits_0_when_up_and_1_with_one_line_when_not(tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_SINK="null") as svc:
        ok = engine("health", "--url", svc.http_url)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == f"ok: {svc.http_url}/readyz says ok\n"
        url = svc.http_url
    down = engine("health", "--url", url, "--timeout", "2")
    assert down.returncode == 1
    assert down.stdout.startswith(f"unreachable: cannot reach the service at {url}")
    assert down.stdout.count("\n") == 1


def test_dlq_show_prints_a_letter_with_its_traceback(tmp_path: Path) -> None:
    with running_service(
        tmp_path,
        ENGINE_HANDLER="tests.integration.handlers_operate:always_fail",
        ENGINE_RETRY_MAX_ATTEMPTS="1",
    ) as svc:
        sent = engine("send", "--url", svc.url, "Agent-1", '{"n": 1}')
        assert sent.returncode == 0, sent.stderr
        mid = int(sent.stdout)
        svc.wait_stats(lambda s: s["dead_letters_stored"] == 1)
        shown = engine("dlq", "show", str(mid), "--url", svc.http_url)
        assert shown.returncode == 0, shown.stderr
        assert f"id:        {mid}" in shown.stdout
        assert "reason:    max_attempts" in shown.stdout
        assert "Traceback (most recent call last):" in shown.stdout
        assert f"ValueError: no luck with message {mid}" in shown.stdout
        missing = engine("dlq", "show", "424242", "--url", svc.http_url)
        assert missing.returncode == 1 and "no dead letter of message 424242" in missing.stderr


def test_a_handler_is_imported_from_the_working_directory(tmp_path: Path) -> None:
    """`engine serve --handler app:handle` finds ./app.py, like gunicorn and celery."""
    app = tmp_path / "myapp_here.py"
    app.write_text("def handle(msg):\n    return {'from': 'cwd', 'n': msg.body()['n']}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "PYTHONPATH"))}
    env |= {"ENGINE_LOG_FORMAT": "json", "ENGINE_PORT": "0", "ENGINE_HTTP_PORT": "0"}
    proc = subprocess.Popen(
        [str(ENGINE_SCRIPT), "serve", "--handler", "myapp_here:handle"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    svc = ServiceProc(proc, tmp_path / "serve.log")
    try:
        svc.wait_serving()
        asked = engine("send", "--url", svc.url, "--request", "Agent-1", '{"n": 7}')
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip() == '{"from": "cwd", "n": 7}'
    finally:
        assert svc.stop() == 0, svc.log_text()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "no handler: give one with --handler module:function (ENGINE_HANDLER)"),
        (["--handler", "no_such_module_here:handle"], "cannot import handler module"),
        (["--handler", "tests.integration.handlers_operate:nope"], "has no attribute 'nope'"),
        (["--handler", "just-a-name"], "handler must look like 'module:function'"),
    ],
)
def test_a_missing_or_malformed_handler_exits_78_before_spawning(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    out = engine("serve", *args, ENGINE_PORT="0", ENGINE_HTTP_PORT="0")
    assert out.returncode == 78, out.stderr
    assert out.stderr.startswith("engine: configuration error: ")
    assert expected in out.stderr and "--sink" in out.stderr
    if args:
        assert "--handler / ENGINE_HANDLER" in out.stderr
    assert "Traceback" not in out.stderr and "serving" not in out.stderr
    assert time.monotonic() - started < 30


def test_an_engine_variable_that_is_no_setting_warns_and_a_typo_stops() -> None:
    foreign = engine("config", "--json", ENGINE_ENV="prod")
    assert foreign.returncode == 0, foreign.stderr
    warning = "engine: warning: ENGINE_ENV is not a setting of this engine; ignored\n"
    assert foreign.stderr == warning
    typo = engine("config", ENGINE_WORKRS="3")
    assert typo.returncode == 78
    assert "ENGINE_WORKRS is not a known setting; did you mean ENGINE_WORKERS?" in typo.stderr


def test_send_to_a_stopped_service_fails_within_a_second_naming_the_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = main(["send", "--url", url, "Agent-1", "{}"])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1
    assert took < 1.0, took
    assert url in err and "refused" in err.lower()
