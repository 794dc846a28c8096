"""Batch requests, the response cache and users through the real service: HTTP and binary.

One ``engine serve`` (``tests.integration.handlers_batch:route``, a tokens file
with the users alice and bob, a cache of 3 entries) serves the module.  The
handler appends a line to a file per execution, so a test counts how often a
request really ran.  Every test uses payloads of its own (its tmp_path), so
cache entries of one test never answer another's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import Client
from engine.errors import ServiceError
from tests.integration.service_proc import REPO, ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape

ALICE, BOB = "tok-alice-1", "tok-bob-2"
CACHE_SIZE = 3
ROUTE = "tests.integration.handlers_batch:route"
OK_KEYS = {"ok", "value", "cached", "deduplicated", "duration_s", "attempts"}
ERROR_KEYS = {"ok", "error", "cached", "deduplicated", "duration_s", "attempts"}
STATS_KEYS = {
    "total_duration_s",
    "average_duration_s",
    "cache_hit_rate",
    "deduplication_rate",
    "requests",
    "executed",
}


def write_tokens(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    tmp = tmp_path_factory.mktemp("batch")
    tokens = write_tokens(tmp / "tokens", f"alice {ALICE}\nbob {BOB}\n")
    with running_service(
        tmp,
        ENGINE_HANDLER=ROUTE,
        ENGINE_WORKERS="2",
        ENGINE_AUTH_TOKENS_FILE=str(tokens),
        ENGINE_CACHE_SIZE=str(CACHE_SIZE),
        ENGINE_RETRY_MAX_ATTEMPTS="2",
        ENGINE_RETRY_BACKOFF_BASE_S="0.01",
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()


def post(svc: ServiceProc, path: str, body: Any, token: str | None = ALICE) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    status, out = http(svc, "POST" if path != "/v1/cache" else "DELETE", path, data, token=token)
    return status, msgspec.json.decode(out)


def batch(
    svc: ServiceProc, requests: list[dict[str, Any]], token: str = ALICE, **extra: Any
) -> Any:
    status, out = post(svc, "/v1/batch", {"requests": requests} | extra, token)
    assert status == 200, out
    return out


def stats(svc: ServiceProc) -> dict[str, Any]:
    status, out = http(svc, "GET", "/stats", token=ALICE)
    assert status == 200
    result: dict[str, Any] = msgspec.json.decode(out)
    return result


def runs(path: Path) -> list[str]:
    """The executions the handler recorded in ``path``."""
    return path.read_text().splitlines() if path.exists() else []


def count_req(path: Path, recipient: str = "count", **extra: Any) -> dict[str, Any]:
    payload = {"path": str(path), "v": recipient} | extra.pop("payload", {})
    return {"recipient": recipient, "payload": payload, "cache": True} | extra


def test_http_batch_answers_every_request_in_order_with_its_own_error(svc: ServiceProc) -> None:
    out = batch(
        svc,
        [
            {"recipient": "echo-h", "payload": {"n": 1}, "priority": "high", "timeout_s": 5},
            {"recipient": "reject-h", "payload": 2},
            {"recipient": "whoami-h"},
            {"recipient": "fail-h"},
        ],
        concurrency=2,
    )
    r = out["responses"]
    assert [x["ok"] for x in r] == [True, False, True, False]
    assert set(r[0]) == set(r[2]) == OK_KEYS and set(r[1]) == set(r[3]) == ERROR_KEYS
    assert r[0]["value"] == {"echo": {"n": 1}, "user": "alice"}
    assert r[1]["error"]["code"] == "rejected" and "no thanks: 2" in r[1]["error"]["reason"]
    assert r[2]["value"] == "alice"
    assert r[3]["error"]["code"] == "max_attempts"
    assert set(out["stats"]) == STATS_KEYS
    assert out["stats"]["requests"] == out["stats"]["executed"] == 4


def test_binary_request_many_gives_the_same_answers(svc: ServiceProc, tmp_path: Path) -> None:
    with Client(svc.url, token=BOB) as client:
        results = client.request_many(
            [
                {"recipient": "echo-b", "payload": [1, "two"]},
                {"recipient": "reject-b", "payload": 3},
                {"recipient": "whoami-b"},
                count_req(tmp_path / "c"),
                count_req(tmp_path / "c"),
            ]
        )
    assert [r.ok for r in results] == [True, False, True, True, True]
    assert results[0].value == {"echo": [1, "two"], "user": "bob"}
    assert results[1].error is not None and results[1].error.code == "rejected"
    assert results[2].value == "bob"
    assert results[4].deduplicated and results.stats.deduplication_rate == 0.2
    assert runs(tmp_path / "c") == ["count"]


def test_identical_requests_of_two_concurrent_batches_run_once(
    svc: ServiceProc, tmp_path: Path
) -> None:
    """One batch over HTTP, one over the binary protocol, both alice's, started together."""
    shared = count_req(tmp_path / "c", "count-sf", payload={"s": 1.0})
    barrier = threading.Barrier(2)
    got: dict[str, Any] = {}

    def over_http() -> None:
        barrier.wait()
        got["http"] = batch(svc, [shared, count_req(tmp_path / "h", "count-h")])["responses"]

    def over_binary() -> None:
        with Client(svc.url, token=ALICE) as client:
            barrier.wait()
            got["binary"] = client.request_many([count_req(tmp_path / "b", "count-b"), shared])

    threads = [threading.Thread(target=f) for f in (over_http, over_binary)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got["http"][0]["value"] == got["binary"][1].value == "count-sf"
    assert [got["http"][0]["deduplicated"], got["binary"][1].deduplicated].count(True) == 1
    assert runs(tmp_path / "c") == ["count-sf"]  # the handler ran once for both batches
    assert runs(tmp_path / "h") == ["count-h"] and runs(tmp_path / "b") == ["count-b"]


def test_no_cached_answer_is_ever_served_to_another_user(svc: ServiceProc, tmp_path: Path) -> None:
    req = count_req(tmp_path / "c", "count-u")
    for token in (ALICE, BOB):
        [r] = batch(svc, [req], token)["responses"]
        assert r["ok"] and not r["cached"] and not r["deduplicated"]
    assert runs(tmp_path / "c") == ["count-u", "count-u"]  # once per user
    for token in (ALICE, BOB):
        [r] = batch(svc, [req], token)["responses"]
        assert r["cached"]
    with Client(svc.url, token=BOB) as client:  # the binary path shares bob's entries
        assert client.request("count-u", req["payload"], cache=True) == "count-u"
    assert len(runs(tmp_path / "c")) == 2


def test_a_cached_answer_expires_after_its_ttl(svc: ServiceProc, tmp_path: Path) -> None:
    req = count_req(tmp_path / "c", "count-t", cache_ttl_s=0.5)
    expired = stats(svc)["cache"]["expired"]
    assert not batch(svc, [req])["responses"][0]["cached"]
    assert batch(svc, [req])["responses"][0]["cached"]
    time.sleep(0.8)
    assert stats(svc)["cache"]["expired"] == expired + 1  # cleaned up, not only skipped
    assert not batch(svc, [req])["responses"][0]["cached"]
    assert len(runs(tmp_path / "c")) == 2


def test_the_least_recently_used_answer_goes_at_the_size_bound(
    svc: ServiceProc, tmp_path: Path
) -> None:
    a, b, c, d = (count_req(tmp_path / n, f"count-{n}") for n in "abcd")
    batch(svc, [a, b, c], concurrency=1)  # the cache holds exactly a, b, c now
    evicted = stats(svc)["cache"]["evicted"]
    assert batch(svc, [a])["responses"][0]["cached"]  # a is the most recent
    batch(svc, [d])  # evicts b, the least recently used
    assert stats(svc)["cache"]["evicted"] == evicted + 1
    out = batch(svc, [a, b], concurrency=1)["responses"]
    assert out[0]["cached"] and not out[1]["cached"]  # b ran again (and c went)
    assert [len(runs(tmp_path / n)) for n in "abcd"] == [1, 2, 1, 1]
    assert stats(svc)["cache"]["entries"] == CACHE_SIZE


def test_delete_cache_and_engine_cache_clear_forget_the_callers_entries_only(
    svc: ServiceProc, tmp_path: Path
) -> None:
    req = count_req(tmp_path / "c", "count-x")
    batch(svc, [req], ALICE)
    batch(svc, [req], BOB)
    status, out = post(svc, "/v1/cache", b"", ALICE)
    assert status == 200 and out["user"] == "alice" and out["cleared"] >= 1
    assert not batch(svc, [req], ALICE)["responses"][0]["cached"]
    assert batch(svc, [req], BOB)["responses"][0]["cached"]
    cli = subprocess.run(
        [sys.executable, "-m", "engine", "cache", "clear", "--url", svc.http_url, "--token", BOB],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")},
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == "cleared 1 cached responses of user 'bob'"
    assert not batch(svc, [req], BOB)["responses"][0]["cached"]
    assert len(runs(tmp_path / "c")) == 4


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"requests": [{"recipient": "echo"}], "parallel": 5}, "unknown field `parallel`"),
        ({"requests": [{"recipient": "echo", "ttl": 5}]}, "unknown field `ttl`"),
        ({"requests": [{"recipient": 5}]}, "Expected `str`, got `int`"),
        ({"requests": [{"recipient": "echo", "timeout_s": -1}]}, "request 0 of the batch"),
        ({"requests": [{"recipient": "echo"}], "concurrency": 0}, "concurrency must be"),
        ({"requests": "echo"}, "Expected `array`, got `str`"),
        ({"requests": [{"recipient": "echo"}] * 100_000}, "ENGINE_BATCH_MAX_REQUESTS=10,000"),
        (b"not json", "body is not a batch"),
    ],
)
def test_a_bad_batch_gets_400_with_the_reason_and_nothing_is_queued(
    svc: ServiceProc, body: Any, reason: str
) -> None:
    before = stats(svc)["submitted"]
    status, out = post(svc, "/v1/batch", body)
    assert status == 400 and out["error"] == "bad_request", out
    assert reason in out["reason"]
    assert stats(svc)["submitted"] == before


def test_a_batch_above_the_cap_is_refused_over_the_binary_protocol_too(svc: ServiceProc) -> None:
    before = stats(svc)["submitted"]
    with Client(svc.url, token=ALICE) as client, pytest.raises(ServiceError) as info:
        client.request_many([{"recipient": "echo"}] * 100_000)
    assert info.value.code == "bad_request"
    assert "ENGINE_BATCH_MAX_REQUESTS=10,000 requests, got 100,000" in info.value.reason
    assert stats(svc)["submitted"] == before


def test_the_user_comes_from_the_token_never_from_the_client(svc: ServiceProc) -> None:
    status, out = post(svc, "/v1/messages", {"recipient": "echo", "user": "mallory"})
    assert status == 400 and "unknown field `user`" in out["reason"]
    with Client(svc.url, token=BOB) as client:
        assert client.request("whoami", None) == "bob"
    for path in ("/v1/batch", "/v1/cache"):
        status, out = post(svc, path, {"requests": []}, token="guess")
        assert (status, out["error"]) == (401, "auth")


def test_metrics_count_the_cache_and_each_users_messages(svc: ServiceProc, tmp_path: Path) -> None:
    req = count_req(tmp_path / "c", "count-m")
    batch(svc, [req, req])  # one miss, one joined
    batch(svc, [req])  # one hit
    samples = scrape(svc, token=ALICE)
    for name in (
        "engine_cache_hits_total",
        "engine_cache_misses_total",
        "engine_requests_deduplicated_total",
    ):
        assert metric(samples, name) >= 1
    assert 0 < metric(samples, "engine_cache_entries") <= CACHE_SIZE
    assert metric(samples, "engine_user_messages_total", user="alice") >= 3
    assert metric(samples, "engine_user_rate_limited_total", user="alice") == 0
    body = json.loads(http(svc, "GET", "/stats", token=ALICE)[1])
    assert {"hits", "misses", "deduplicated", "entries"} <= set(body["cache"])
