"""The operating side of the HTTP API: degraded health, backlog, dead-letter pages, /v1/live."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.client import Client
from tests.integration.service_proc import ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape

TOKEN = "op/secret+="
FAILING = {
    "ENGINE_HANDLER": "tests.integration.handlers_operate:route",
    "ENGINE_RETRY_MAX_ATTEMPTS": "2",
    "ENGINE_RETRY_BACKOFF_BASE_S": "0.001",
    "ENGINE_RETRY_BACKOFF_MAX_S": "0.002",
    "ENGINE_STATS_INTERVAL_S": "0.2",
}


def get(svc: ServiceProc, path: str, token: str | None = None) -> tuple[int, Any]:
    status, body = http(svc, "GET", path, token=token)
    return status, json.loads(body)


def test_readyz_says_degraded_while_the_handler_fails_and_ok_again_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    with running_service(tmp_path, **FAILING) as svc:
        assert get(svc, "/readyz") == (200, {"status": "ok"})
        deadline = time.monotonic() + 30
        status, body = get(svc, "/readyz")
        with Client(svc.url) as client:
            while body.get("status") != "degraded" and time.monotonic() < deadline:
                client.submit_many([(f"bad-{i}", {"i": i}) for i in range(20)], settled=True)
                status, body = get(svc, "/readyz")
        assert status == 503 and body["status"] == "degraded", body
        # Alive all the while: a liveness probe must not restart a degraded service.
        assert get(svc, "/livez") == (200, {"status": "ok"})
        assert get(svc, "/healthz") == (200, {"status": "ok"})
        [why] = body["reasons"]
        assert why.startswith("handler failing: 100% of") and "ENGINE_DEGRADED_FAILURE_RATIO" in why
        # `engine health` says the same in one line, with exit code 1.
        capsys.readouterr()
        assert main(["health", "--url", svc.http_url]) == 1
        line = capsys.readouterr().out
        assert line.startswith("degraded: handler failing") and line.count("\n") == 1
        # Healthy deliveries for longer than the window: ok again.
        with Client(svc.url) as client:
            deadline = time.monotonic() + 30
            while get(svc, "/readyz")[1]["status"] != "ok" and time.monotonic() < deadline:
                client.submit_many([(f"good-{i}", {"i": i}) for i in range(50)], settled=True)
                time.sleep(0.2)
        assert get(svc, "/readyz") == (200, {"status": "ok"})
        assert main(["health", "--url", svc.http_url]) == 0
        assert capsys.readouterr().out.startswith("ok: ")


def test_the_largest_backlogs_are_in_stats_and_a_bounded_metric(tmp_path: Path) -> None:
    with running_service(
        tmp_path,
        ENGINE_HANDLER="tests.integration.handlers_operate:slow",
        ENGINE_BACKLOG_TOP="2",
        ENGINE_STATS_INTERVAL_S="0.2",
        ENGINE_SHUTDOWN_TIMEOUT_S="1",
    ) as svc:
        with Client(svc.url) as client:
            client.submit_many([("slow-a", {}) for _ in range(60)])
            client.submit_many([("slow-b", {}) for _ in range(30)])
            client.submit_many([("slow-c", {}) for _ in range(5)])
        stats = svc.wait_stats(lambda s: len(s["top_recipients"]) == 2)
        top = stats["top_recipients"]
        assert [t["recipient"] for t in top] == ["slow-a", "slow-b"], top
        assert 50 <= top[0]["held"] <= 60 and 20 <= top[1]["held"] <= 30
        samples = scrape(svc, token=None)
        assert metric(samples, "engine_recipient_backlog_messages", recipient="slow-a") >= 50
        labelled = [k for k in samples if k[0] == "engine_recipient_backlog_messages"]
        assert len(labelled) == 2  # the top N only: no unbounded label set
        svc.stop()  # the drain times out (slow handler): exit 1 is expected here


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_service(
        tmp_path_factory.mktemp("op-http"), ENGINE_AUTH_TOKEN=TOKEN, **FAILING
    ) as svc:
        with Client(svc.url, token=TOKEN) as client:
            client.submit_many([(f"bad-{i % 3}", {"i": i}) for i in range(9)], settled=True)
            client.submit_many([("ok-1", {"i": 1})], settled=True)
        yield svc
    assert svc.returncode == 0, svc.log_text()


def test_dead_letters_filter_page_show_and_replay_one(authed: ServiceProc) -> None:
    svc = authed
    status, body = http(svc, "GET", "/v1/dead-letters", token=TOKEN)
    assert status == 200 and len(json.loads(body)) == 9
    status, body = http(svc, "GET", "/v1/dead-letters?recipient=bad-1&limit=2", token=TOKEN)
    page = json.loads(body)
    assert status == 200 and [d["recipient"] for d in page] == ["bad-1", "bad-1"]
    status, body = http(svc, "GET", "/v1/dead-letters?reason=max_attempts&offset=8", token=TOKEN)
    assert len(json.loads(body)) == 1
    status, body = http(svc, "GET", "/v1/dead-letters?limit=0", token=TOKEN)
    assert status == 400 and b"limit must be an integer" in body
    oldest = json.loads(http(svc, "GET", "/v1/dead-letters", token=TOKEN)[1])
    newest = json.loads(http(svc, "GET", "/v1/dead-letters?newest_first=1", token=TOKEN)[1])
    assert [d["id"] for d in newest] == [d["id"] for d in reversed(oldest)]
    one = newest[0]
    status, body = http(svc, "GET", f"/v1/dead-letters/{one['id']}", token=TOKEN)
    shown = json.loads(body)
    assert status == 200 and shown["id"] == one["id"]
    assert "Traceback (most recent call last)" in shown["traceback"]
    assert http(svc, "GET", "/v1/dead-letters/999999", token=TOKEN)[0] == 404
    assert http(svc, "GET", f"/v1/dead-letters/{one['id']}", token=None)[0] == 401
    status, body = http(svc, "POST", f"/v1/dead-letters/replay?id={one['id']}", token=TOKEN)
    assert status == 200 and json.loads(body) == {"replayed": 1, "kept": 0, "kept_reasons": {}}
    assert http(svc, "GET", f"/v1/dead-letters/{one['id']}", token=TOKEN)[0] == 404


def test_the_page_is_open_its_data_is_not(authed: ServiceProc) -> None:
    status, body = http(authed, "GET", "/", token=None)
    assert status == 200 and b'data-metric="delivered"' in body
    for name in ("app.js", "charts.js", "style.css"):
        assert http(authed, "GET", f"/dashboard/{name}", token=None)[0] == 200
    assert http(authed, "GET", "/dashboard/__init__.py", token=None)[0] == 404
    assert http(authed, "GET", "/stats", token=None)[0] == 401


def test_the_websocket_refuses_without_the_token_and_streams_with_it(authed: ServiceProc) -> None:
    url = authed.http_url + "/v1/live"
    b64 = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")

    async def run() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            for protocols in ((), ("ringway.v1", "bearer.d3Jvbmc")):  # none, "wrong"
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(url, protocols=protocols)
                assert refused.value.status == 401
            got = []
            async with session.ws_connect(url, protocols=("ringway.v1", f"bearer.{b64}")) as ws:
                assert ws.protocol == "ringway.v1"
                got.append(await ws.receive_json(timeout=10))
                got.append(await ws.receive_json(timeout=10))
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.ws_connect(url, headers=headers) as ws:
                got.append(await ws.receive_json(timeout=10))
            return got

    hello, sample, again = asyncio.run(run())
    assert hello["type"] == "hello" and again["type"] == "hello"
    assert hello["stats"]["dead_lettered"] >= 9 and hello["interval_s"] == 0.2
    assert any(e["type"] == "dead_letter" for e in hello["events"])
    assert sample["type"] in ("stats", "event")
