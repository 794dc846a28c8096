"""Users from a tokens file (reloaded on SIGHUP) and per-user rate limits, on the real service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import Client
from engine.errors import AuthenticationError, RateLimited
from engine.exitcodes import ExitCode
from tests.integration.service_proc import REPO, ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape

ROUTE = "tests.integration.handlers_batch:route"
ALICE, BOB, CAROL = "tok-alice", "tok-bob", "tok-carol"


def wait_log(svc: ServiceProc, msg: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (found := svc.logs(msg)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {msg!r} line within {timeout}s:\n{svc.log_text()}")
        time.sleep(0.05)
    return found[-1]


def status_of(svc: ServiceProc, token: str) -> int:
    body = msgspec.json.encode({"recipient": "echo", "payload": 1})
    return http(svc, "POST", "/v1/messages", body, token=token)[0]


def test_a_bad_tokens_file_stops_the_start_naming_the_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-a\nbob\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env |= {"ENGINE_AUTH_TOKENS_FILE": str(tokens), "ENGINE_PORT": "0", "ENGINE_HTTP_PORT": "0"}
    env["ENGINE_SINK"] = "null"  # a valid sink: the tokens file is what is wrong
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert f"ENGINE_AUTH_TOKENS_FILE={tokens} line 2: expected 'USER TOKEN'" in proc.stderr


def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# the users\nalice {ALICE}\n")
    with running_service(
        tmp_path, ENGINE_HANDLER=ROUTE, ENGINE_AUTH_TOKENS_FILE=str(tokens)
    ) as svc:
        assert svc.start_line["auth"] is True and svc.start_line["users"] == 1
        with pytest.raises(AuthenticationError, match="the token is wrong"):
            Client(svc.url, token=BOB)
        assert status_of(svc, BOB) == 401
        alice = Client(svc.url, token=ALICE)
        assert alice.request("whoami", None) == "alice"

        tokens.write_text(f"bob {BOB}\ncarol {CAROL}\n")  # alice is gone
        os.kill(svc.pid, signal.SIGHUP)
        assert wait_log(svc, "auth tokens reloaded")["users"] == 2
        assert (status_of(svc, BOB), status_of(svc, ALICE)) == (202, 401)
        with Client(svc.url, token=CAROL) as carol:
            assert carol.request("whoami", None) == "carol"
        with pytest.raises(AuthenticationError, match="the token is wrong"):
            alice.request("whoami", None)  # her open connection ends at its next frame
        alice.close()

        tokens.write_text("broken line here\n")
        os.kill(svc.pid, signal.SIGHUP)
        line = wait_log(svc, "auth tokens not reloaded; the old ones stay")
        assert "line 1: expected 'USER TOKEN' (two fields), got 3 fields" in line["error"]
        assert status_of(svc, BOB) == 202  # the tokens in force stay
    assert svc.returncode == 0, svc.log_text()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    """A service allowing each user 3 messages at once, then one every 5 s."""
    tmp = tmp_path_factory.mktemp("limits")
    tokens = tmp / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\ncarol {CAROL}\n")
    with running_service(
        tmp,
        ENGINE_HANDLER=ROUTE,
        ENGINE_AUTH_TOKENS_FILE=str(tokens),
        ENGINE_RATE_LIMIT="0.2",
        ENGINE_RATE_BURST="3",
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()


def submitted(svc: ServiceProc) -> int:
    status, body = http(svc, "GET", "/stats", token=BOB)  # reading stats is not rate-limited
    assert status == 200
    return int(msgspec.json.decode(body)["submitted"])


def raw_post(svc: ServiceProc, path: str, body: Any, token: str) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(svc.http_url + path, data=msgspec.json.encode(body), method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), msgspec.json.decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), msgspec.json.decode(exc.read())


def test_over_the_limit_http_answers_429_with_retry_after(limited: ServiceProc) -> None:
    svc = limited
    before = submitted(svc)
    msgs = [{"recipient": "echo", "payload": i} for i in range(3)]
    assert raw_post(svc, "/v1/messages", msgs, ALICE)[0] == 202  # the whole burst
    status, headers, body = raw_post(svc, "/v1/messages", msgs[:1], ALICE)
    assert status == 429 and body["error"] == "rate_limited", body
    assert 4.0 < body["retry_after_s"] <= 5.0
    assert headers["Retry-After"] == "5"
    assert "user 'alice' is over ENGINE_RATE_LIMIT=0.2 messages/s" in body["reason"]
    status, _, body = raw_post(svc, "/v1/batch", {"requests": [{"recipient": "echo"}]}, ALICE)
    assert status == 429
    assert raw_post(svc, "/v1/messages", msgs[:1], BOB)[0] == 202  # bob has his own bucket
    assert submitted(svc) == before + 4  # nothing of a refused body was queued


def test_over_the_limit_the_client_raises_rate_limited(limited: ServiceProc) -> None:
    svc = limited
    with Client(svc.url, token=CAROL) as client:
        assert len(client.submit_many([("echo", i) for i in range(3)])) == 3
        before = submitted(svc)
        with pytest.raises(RateLimited) as info:
            client.submit_many([("echo", 9)])
        assert info.value.code == "rate_limited" and 4.0 < info.value.retry_after_s <= 5.0
        with pytest.raises(RateLimited):
            client.request("echo", 1)
        with pytest.raises(RateLimited):
            client.request_many([{"recipient": "echo"}])
        assert submitted(svc) == before
        time.sleep(info.value.retry_after_s)
        assert len(client.submit_many([("echo", 10)])) == 1  # admitted again


def test_metrics_count_messages_and_refusals_per_user(limited: ServiceProc) -> None:
    samples = scrape(limited, token=BOB)
    assert metric(samples, "engine_user_rate_limited_total", user="alice") >= 2
    assert metric(samples, "engine_user_rate_limited_total", user="carol") >= 3
    assert metric(samples, "engine_user_rate_limited_total", user="bob") == 0
    assert metric(samples, "engine_user_messages_total", user="bob") >= 1
