"""The service subcommands as a user runs them: ``engine stats|send|dlq`` against a
running service, and ``engine serve --demo``; every command is a real subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.service_proc import REPO, ServiceProc, running_service
from tests.integration.test_service_ingress import wait_for

TOKEN = "cli-secret"
HANDLER = "tests.integration.handlers_service:route"


def cli_env(**extra: str) -> dict[str, str]:
    """Our environment without ENGINE_*, wide enough that tables are not cut."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    return env | {"COLUMNS": "200", "PYTHONPATH": str(REPO)} | extra


def engine(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    with running_service(
        tmp_path_factory.mktemp("cli"),
        ENGINE_HANDLER=HANDLER,
        ENGINE_WORKERS="2",
        ENGINE_AUTH_TOKEN=TOKEN,
    ) as svc:
        wait_for(svc, lambda s: len(s["workers"]) == 2, token=TOKEN)
        yield svc
    assert svc.returncode == 0, svc.log_text()


def target(svc: ServiceProc, http_side: bool = True) -> list[str]:
    return ["--url", svc.http_url if http_side else svc.url, "--token", TOKEN]


def test_stats_json_and_table(svc: ServiceProc) -> None:
    out = engine("stats", "--json", *target(svc))
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert [w["worker"] for w in stats["workers"]] == [0, 1]
    assert stats["service"]["addresses"]["tcp"] == svc.start_line["tcp"]
    table = engine("stats", *target(svc))
    assert table.returncode == 0, table.stderr
    for word in ("submitted", "in_flight", "latency (ms)", "workers", "rss MiB", "service:"):
        assert word in table.stdout
    held = next(line for line in table.stdout.splitlines() if "deferred" in line)
    want = ["deferred", f"{stats['deferred']:,}", "deferrals", f"{stats['deferrals']:,}"]
    assert held.split()[:4] == want, held  # nothing was deferred meanwhile in this module


def test_stats_token_comes_from_the_environment_too(svc: ServiceProc) -> None:
    out = engine("stats", "--json", "--url", svc.http_url, ENGINE_AUTH_TOKEN=TOKEN)
    assert out.returncode == 0, out.stderr
    refused = engine("stats", "--url", svc.http_url)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "a bearer token is required" in refused.stderr


def test_stats_of_a_service_that_is_not_there_fails_clearly() -> None:
    out = engine("stats", "--url", "http://127.0.0.1:9")
    assert out.returncode == 1
    assert "cannot reach the service at http://127.0.0.1:9" in out.stderr


def test_send_prints_the_id_and_request_prints_the_reply(svc: ServiceProc) -> None:
    before = wait_for(svc, lambda s: True, token=TOKEN)["submitted"]
    sent = engine("send", "echo-cli", '{"n": 1}', *target(svc, http_side=False))
    assert sent.returncode == 0, sent.stderr
    assert re.fullmatch(r"\d+\n", sent.stdout)
    reply = engine(
        "send", "echo-cli", '{"q": [1, "two"]}', "--request", "--priority", "high",
        *target(svc, http_side=False),
    )  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    assert json.loads(reply.stdout) == {"q": [1, "two"]}
    after = wait_for(svc, lambda s: s["in_flight"] == 0, token=TOKEN)
    assert after["submitted"] == before + 2


def test_send_reports_bad_input_and_handler_errors(svc: ServiceProc) -> None:
    bad = engine("send", "echo-cli", "{not json", *target(svc, http_side=False))
    assert bad.returncode == 65
    assert "the payload is not JSON" in bad.stderr
    failed = engine("send", "reject-cli", "3", "--request", *target(svc, http_side=False))
    assert failed.returncode == 1
    assert "rejected payload 3" in failed.stderr


def test_dlq_list_and_replay(svc: ServiceProc) -> None:
    before = wait_for(svc, lambda s: True, token=TOKEN)["dead_lettered"]
    sent = engine("send", "reject-dlq", '{"k": "v"}', *target(svc, http_side=False))
    assert sent.returncode == 0, sent.stderr
    mid = int(sent.stdout)
    wait_for(svc, lambda s: s["dead_lettered"] > before, token=TOKEN)
    listed = engine("dlq", "list", "--json", *target(svc))
    assert listed.returncode == 0, listed.stderr
    [letter] = [dl for dl in json.loads(listed.stdout) if dl["id"] == mid]
    assert letter["recipient"] == "reject-dlq" and letter["reason"] == "rejected"
    assert letter["payload"] == {"k": "v"}
    table = engine("dlq", "list", *target(svc))
    assert table.returncode == 0 and "reject-dlq" in table.stdout
    stored = len(json.loads(listed.stdout))
    replayed = engine("dlq", "replay", *target(svc))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed {stored:,} dead letters"
    # The handler rejects them again: they come back as new dead letters.
    wait_for(svc, lambda s: s["dead_letters_stored"] == stored and s["in_flight"] == 0, token=TOKEN)


def test_serve_demo_prints_the_stats_and_keeps_serving_until_sigterm(tmp_path: Path) -> None:
    with (tmp_path / "demo.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--demo", "20000"],
            cwd=REPO,
            env=cli_env(ENGINE_PORT="0", ENGINE_HTTP_PORT="0", ENGINE_WORKERS="2"),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("curl -s -X POST" in line for line in out):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(out) + (tmp_path / "demo.log").read_text()
            out.append(line)
        text = "".join(out)
        assert "demo: 20,000 messages in" in text
        assert re.search(r"submitted\s+20,000\s+failed_attempts\s+0", text), text
        assert re.search(r"delivered\s+20,000\s+retried\s+0", text), text
        assert re.search(r"dead_lettered\s+0\s+redelivered\s+0", text), text
        assert "latency (ms)" in text and "workers" in text
        assert "The service keeps running" in text
        url = re.search(r"curl -s -X POST (http://[\d.:]+)/v1/messages", text)
        assert url is not None, text
        time.sleep(0.5)
        assert proc.poll() is None  # still serving after the demo
        with urllib.request.urlopen(url.group(1) + "/healthz", timeout=30) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "demo.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
