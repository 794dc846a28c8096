"""The HTTP side of the real service: health, stats, Prometheus metrics, JSON ingress, DLQ.

One service (routing handler, a token, 64 KB frames, small rings with a low fill
warning) serves the module; the ring-fill test runs last and waits for health to
come back, so the other tests always see a healthy service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.service_proc import ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape, wait_for

TOKEN = "http-secret"
MAX_FRAME = 65536
HANDLER = "tests.integration.handlers_service:route"
ROUTES = [
    ("GET", "/stats"),
    ("GET", "/metrics"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/dead-letters"),
    ("POST", "/v1/dead-letters/replay"),
]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    with running_service(
        tmp_path_factory.mktemp("http"),
        ENGINE_HANDLER=HANDLER,
        ENGINE_WORKERS="2",
        ENGINE_AUTH_TOKEN=TOKEN,
        ENGINE_MAX_FRAME_BYTES=str(MAX_FRAME),
        ENGINE_RING_BYTES=str(256 * 1024),
        ENGINE_RING_WARN_RATIO="0.1",
    ) as svc:
        wait_for(svc, lambda s: len(s["workers"]) == 2, token=TOKEN)  # first monitor report
        yield svc
    assert svc.returncode == 0, svc.log_text()


def call(svc: ServiceProc, method: str, path: str, body: Any = None, raw: bytes = b"") -> Any:
    """An authorised request; returns (status, decoded JSON body)."""
    data = raw or (msgspec.json.encode(body) if body is not None else None)
    status, out = http(svc, method, path, data, token=TOKEN)
    return status, msgspec.json.decode(out) if out.startswith((b"{", b"[")) else out


def stats(svc: ServiceProc) -> dict[str, Any]:
    return wait_for(svc, lambda s: True, token=TOKEN)


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz"])
def test_the_probes_are_open_without_a_token_and_say_ok(svc: ServiceProc, path: str) -> None:
    for token in (None, "wrong", TOKEN):
        status, body = http(svc, "GET", path, token=token)
        assert (status, msgspec.json.decode(body)) == (200, {"status": "ok"})


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_other_route_needs_the_bearer_token(svc: ServiceProc, method: str, path: str) -> None:
    before, counted_before = stats(svc), scrape(svc, token=TOKEN)
    body = b'{"recipient": "echo-auth", "payload": 1}' if path == "/v1/messages" else None
    attempts = [
        ({}, "a bearer token is required"),
        ({"Authorization": "Bearer nope"}, "the token is wrong"),
        ({"Authorization": f"Basic {TOKEN}"}, "the token is wrong"),
    ]
    for headers, reason in attempts:
        status, out = http(svc, method, path, body, token=None, headers=headers)
        assert status == 401, out
        assert msgspec.json.decode(out) == {"error": "auth", "reason": reason}
    assert stats(svc)["submitted"] == before["submitted"]  # nothing got in
    name = "engine_http_auth_failures_total"
    counted = metric(scrape(svc, token=TOKEN), name) - metric(counted_before, name)
    assert counted == len(attempts)  # each refusal shows in /metrics
    status, _ = http(svc, method, path, body, token=TOKEN)
    assert status in (200, 202)


def test_stats_json_has_totals_workers_and_service_counters(svc: ServiceProc) -> None:
    s = stats(svc)
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"] + s["in_flight"]
    assert set(s["queue_depth"]) == set(s["ring_fill"]) == {"critical", "high", "normal", "low"}
    assert [w["worker"] for w in s["workers"]] == [0, 1]
    assert all(w["alive"] and w["pid"] > 0 for w in s["workers"])
    assert s["monitor"]["alive"]
    service = s["service"]
    assert service["addresses"]["http"] == svc.start_line["http"]
    assert service["addresses"]["tcp"] == svc.start_line["tcp"]
    for key in ("http_requests_total", "bad_frames_total", "connections_active", "reloads_total"):
        assert isinstance(service[key], int)


def test_metrics_parse_as_prometheus_text_with_engine_names(svc: ServiceProc) -> None:
    status, out = call(svc, "POST", "/v1/messages?settled=1", [
        {"recipient": f"echo-m{i}", "payload": i} for i in range(20)
    ])  # fmt: skip
    assert status == 200 and len(out["ids"]) == 20
    # Wait for the monitor's report to catch up with every delivery (none come after).
    s = wait_for(
        svc,
        lambda s: (
            s["in_flight"] == 0
            and sum(w["delivered"] for w in s["workers"]) == s["delivered"] + s["dead_lettered"]
        ),
        token=TOKEN,
    )
    status, raw = http(svc, "GET", "/metrics", token=TOKEN)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    assert all(name.startswith("engine_") for name in families)
    counters = [f for f in families.values() if f.type == "counter"]
    assert len(counters) >= 15
    for family in counters:
        assert all(sample.name == family.name + "_total" for sample in family.samples), family
    for name in ("messages_submitted", "messages_delivered", "messages_dead_lettered",
                 "bad_frames", "errors", "auth_failures", "http_auth_failures",
                 "http_bad_requests", "connections", "worker_restarts"):  # fmt: skip
        assert families[f"engine_{name}"].type == "counter", name
    histograms = [f for f in families.values() if f.type == "histogram"]
    assert {f.name for f in histograms} == {
        "engine_delivery_start_latency_seconds",
        "engine_delivery_settle_latency_seconds",
    }
    for family in histograms:
        buckets = [x for x in family.samples if x.name.endswith("_bucket")]
        counts = [x.value for x in buckets]
        assert counts == sorted(counts)  # cumulative
        assert buckets[-1].labels["le"] == "+Inf"
        [count] = [x.value for x in family.samples if x.name.endswith("_count")]
        assert counts[-1] == count >= 20
    per_worker = families["engine_worker_up"].samples
    assert sorted(x.labels["worker"] for x in per_worker) == ["0", "1"]
    assert all(x.value == 1.0 for x in per_worker)
    delivered = {x.labels["worker"]: x.value for x in families["engine_worker_delivered"].samples}
    assert sum(delivered.values()) == sum(w["delivered"] for w in s["workers"])
    lanes = {x.labels["lane"] for x in families["engine_queue_depth_messages"].samples}
    assert lanes == {"critical", "high", "normal", "low"}
    assert families["engine_monitor_up"].samples[0].value == 1.0


def test_post_one_message_or_an_array_answers_202_with_ids(svc: ServiceProc) -> None:
    status, one = call(svc, "POST", "/v1/messages", {"recipient": "echo-1", "payload": {"n": 1}})
    assert status == 202 and len(one["ids"]) == 1
    batch = [
        {"recipient": "echo-2", "payload": [1, 2]},
        {"recipient": "echo-2", "payload": None, "priority": "high", "ttl": 30},
        {"recipient": "echo-3", "priority": 0, "tags": ["a"], "metadata": {"k": "v"}},
    ]
    status, many = call(svc, "POST", "/v1/messages", batch)
    assert status == 202 and len(set(many["ids"])) == 3
    assert min(many["ids"]) > one["ids"][0]
    status, none = call(svc, "POST", "/v1/messages", [])
    assert (status, none) == (202, {"ids": []})
    wait_for(svc, lambda s: s["in_flight"] == 0, token=TOKEN)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "JSON is malformed"),
        (b'"just a string"', "Expected `object | array`, got `str`"),
        (b'{"payload": 1}', "missing required field `recipient`"),
        (b'{"recipient": "echo", "colour": "red"}', "unknown field `colour`"),
        (b'{"recipient": "echo", "priority": "urgent"}', "invalid priority 'urgent'"),
        (b'{"recipient": "echo", "priority": 9}', "invalid priority 9"),
        (b'{"recipient": ""}', "recipient must be a non-empty string"),
        (b'{"recipient": 7}', "Expected `str`, got `int`"),
        (b'{"recipient": "echo", "ttl": -1}', "ttl must be"),
        (b'{"recipient": "echo", "metadata": {"k": 1}}', "Expected `str`, got `int`"),
        (b'[{"recipient": "echo"}, 5]', "Expected `object`, got `int`"),
        (b'{"recipient": "\xff\xfe"}', "body is not a message"),  # not UTF-8
        (b'{"recipient": "echo", "payload": ' + b"[" * 5000 + b"]" * 5000 + b"}", "recursion"),
    ],
    ids=lambda v: v.decode("ascii", "replace")[:40] if isinstance(v, bytes) else None,
)
def test_bad_bodies_get_400_with_the_reason(svc: ServiceProc, body: bytes, reason: str) -> None:
    before = stats(svc)
    status, out = call(svc, "POST", "/v1/messages", raw=body)
    assert status == 400, out
    assert out["error"] == "bad_request" and reason in out["reason"], out
    after = stats(svc)
    assert after["submitted"] == before["submitted"]
    bad = after["service"]["http_bad_requests_total"] - before["service"]["http_bad_requests_total"]
    assert bad == 1


def test_a_body_above_the_frame_limit_gets_413(svc: ServiceProc) -> None:
    before = stats(svc)
    body = msgspec.json.encode({"recipient": "echo", "payload": "x" * MAX_FRAME})
    status, out = http(svc, "POST", "/v1/messages", body, token=TOKEN)
    assert status == 413, out
    assert b"65536" in out
    assert stats(svc)["submitted"] == before["submitted"]


def test_dead_letters_are_listed_and_replayed(svc: ServiceProc) -> None:
    before = stats(svc)["dead_lettered"]
    status, out = call(svc, "POST", "/v1/messages", {"recipient": "reject-dl", "payload": {"x": 1}})
    assert status == 202
    [mid] = out["ids"]
    wait_for(svc, lambda s: s["dead_lettered"] == before + 1, token=TOKEN)
    status, letters = call(svc, "GET", "/v1/dead-letters")
    assert status == 200
    [letter] = [dl for dl in letters if dl["id"] == mid]
    assert letter["recipient"] == "reject-dl" and letter["reason"] == "rejected"
    assert letter["payload"] == {"x": 1} and "rejected payload" in letter["error"]
    status, replayed = call(svc, "POST", "/v1/dead-letters/replay")
    assert status == 200 and replayed["replayed"] >= 1
    # The handler rejects it again: a second dead letter, with a new id.
    wait_for(svc, lambda s: s["dead_lettered"] >= before + 2 and s["in_flight"] == 0, token=TOKEN)
    status, letters = call(svc, "GET", "/v1/dead-letters")
    assert [dl["payload"] for dl in letters if dl["recipient"] == "reject-dl"] == [{"x": 1}]


def test_readyz_says_not_ready_while_a_ring_is_filling_and_livez_stays_ok(
    svc: ServiceProc,
) -> None:
    """A slow first message holds its recipient's lane; the messages queued behind it
    keep the ring's committed position back, past ENGINE_RING_WARN_RATIO (10%).
    That is backpressure, not a broken engine: /livez (and /healthz) stay 200."""
    status, _ = call(svc, "POST", "/v1/messages", {
        "recipient": "sleep-fill", "payload": {"s": 3.0}, "priority": "low"
    })  # fmt: skip
    assert status == 202
    filler = [
        {"recipient": "sleep-fill", "payload": {"s": 0, "pad": "x" * 2000}, "priority": "low"}
        for _ in range(20)
    ]
    assert call(svc, "POST", "/v1/messages", filler)[0] == 202
    deadline = time.monotonic() + 30
    while True:
        status, body = http(svc, "GET", "/readyz", token=None)
        if status != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ready = msgspec.json.decode(body)
    alive = [http(svc, "GET", path, token=None) for path in ("/livez", "/healthz")]
    assert status == 503, ready
    assert ready["status"] == "not ready"
    assert any(r.startswith("ring fill of lane low is") for r in ready["reasons"]), ready
    assert "(warning at 10%)" in ready["reasons"][0]
    for status, body in alive:
        assert (status, msgspec.json.decode(body)) == (200, {"status": "ok"})
    wait_for(svc, lambda s: s["in_flight"] == 0, token=TOKEN)
    status, body = http(svc, "GET", "/readyz", token=None)
    assert (status, msgspec.json.decode(body)) == (200, {"status": "ok"})
    samples = scrape(svc, token=TOKEN)
    assert samples[("engine_ring_fill_ratio", (("lane", "low"),))] == 0.0
