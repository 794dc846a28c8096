"""Batch requests, the response cache and idempotent submits of the embedded engine.

One engine (real worker processes, ``tests.integration.handlers_batch:route``)
serves the module; its dedup window is short and small so the window and its
bound can be watched.  The service's side (HTTP, binary, users, limits) is in
``test_batch_service.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import BatchRequest, Config, Engine, Priority
from engine.core.sync import SyncEngine

ROUTE = "tests.integration.handlers_batch:route"
DEDUP_WINDOW_S = 1.0
DEDUP_MAX = 4


@pytest.fixture(scope="module")
def eng() -> Iterator[SyncEngine]:
    config = Config.from_env(
        workers=2,
        retry_max_attempts=2,
        retry_backoff_base_s=0.01,
        dedup_window_s=DEDUP_WINDOW_S,
        dedup_max=DEDUP_MAX,
        stats_interval_s=0.2,
    )
    with Engine(ROUTE, config) as e:
        yield e


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_each_request_gets_its_own_result_and_one_failure_never_fails_the_batch(
    eng: SyncEngine,
) -> None:
    results = eng.request_many(
        [
            {"recipient": "echo-1", "payload": {"a": 1}},
            {"recipient": "reject-1", "payload": 2},
            {"recipient": "fail-1", "payload": 3},
            BatchRequest(recipient="retry-1", payload=4),
            {"recipient": "whoami-1"},
        ],
        user="carol",
    )
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert results[0].value == {"echo": {"a": 1}, "user": "carol"}
    assert results[1].error is not None and results[1].error.code == "rejected"
    assert "no thanks: 2" in results[1].error.reason
    assert results[2].error is not None and results[2].error.code == "max_attempts"
    assert "RuntimeError: always fails" in results[2].error.reason
    assert results[3].value == "retried"  # the handler's Retry: retried by the worker
    assert results[4].value == "carol"  # the handler sees who sent it
    assert all(r.attempts == 1 and not r.cached and r.duration_s > 0 for r in results)
    s = results.stats
    assert (s.requests, s.executed, s.cache_hit_rate, s.deduplication_rate) == (5, 5, 0.0, 0.0)
    assert s.total_duration_s >= max(r.duration_s for r in results)
    assert s.average_duration_s == pytest.approx(sum(r.duration_s for r in results) / 5)


def test_priorities_order_the_work_critical_first(eng: SyncEngine, tmp_path: Path) -> None:
    path = tmp_path / "order"
    prios = ["low", "normal", "critical", "high", Priority.LOW, "critical", 1, "normal"]
    requests = [
        {"recipient": f"order-{i}", "payload": {"path": str(path)}, "priority": p}
        for i, p in enumerate(prios)
    ]
    results = eng.request_many(requests, concurrency=1)
    assert all(r.ok for r in results)
    # critical (2, 5), high (3, 6), normal (1, 7), low (0, 4); batch order within each
    assert lines(path) == [f"order-{i}" for i in (2, 5, 3, 6, 1, 7, 0, 4)]


def test_concurrency_bounds_how_many_run_at_once(eng: SyncEngine, tmp_path: Path) -> None:
    path = tmp_path / "spans"
    requests = [
        {"recipient": f"span-{i}", "payload": {"path": str(path), "s": 0.2}} for i in range(9)
    ]
    assert all(r.ok for r in eng.request_many(requests, concurrency=3))
    spans = [tuple(map(float, line.split())) for line in lines(path)]
    assert len(spans) == 9
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 3  # never more than 3, and the pool was used


def test_identical_cacheable_requests_run_once_and_later_ones_hit_the_cache(
    eng: SyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "count"
    same = {"recipient": "count-a", "payload": {"path": str(path), "v": 7, "s": 0.3}}
    other = {"recipient": "count-b", "payload": {"path": str(path), "v": 8}}
    batch = [same | {"cache": True}, other | {"cache": True}, same | {"cache": True}, same]
    results = eng.request_many(batch)
    assert [r.value for r in results] == [7, 8, 7, 7]
    assert [r.deduplicated for r in results] == [False, False, True, False]
    assert results.stats.deduplication_rate == 0.25 and results.stats.executed == 3
    assert sorted(lines(path)) == ["count-a", "count-a", "count-b"]  # the uncached one ran
    again = eng.request_many(batch[:3])
    assert [r.cached for r in again] == [True, True, True]
    assert again.stats.cache_hit_rate == 1.0 and again.stats.executed == 0
    assert len(lines(path)) == 3
    # A plain request shares the same cache (and the user is part of the key).
    assert eng.request("count-a", same["payload"], cache=True) == 7
    assert eng.request("count-a", same["payload"], cache=True, user="dave") == 7
    assert len(lines(path)) == 4


def test_a_plain_request_and_a_batch_share_one_execution(eng: SyncEngine, tmp_path: Path) -> None:
    path = tmp_path / "count"
    payload = {"path": str(path), "v": "shared", "s": 0.5}

    async def both() -> tuple[Any, Any]:
        engine = eng.engine
        return await asyncio.gather(
            engine.request("count-s", payload, cache=True),
            engine.request_many([{"recipient": "count-s", "payload": payload, "cache": True}]),
        )

    value, batch = eng.host.call(both())
    assert value == "shared" and batch[0].value == "shared" and batch[0].deduplicated
    assert lines(path) == ["count-s"]


def test_a_timeout_is_retried_with_backoff(eng: SyncEngine, tmp_path: Path) -> None:
    payload = {"path": str(tmp_path / "first"), "s": 1.5}
    [result] = eng.request_many([{"recipient": "slowfirst", "payload": payload, "timeout_s": 1.0}])
    assert (result.ok, result.value, result.attempts) == (True, "second try", 2)
    [result] = eng.request_many(
        [{"recipient": "slowfirst-2", "payload": payload | {"path": str(tmp_path / "b")},
          "timeout_s": 0.3}],
        retries=0,
    )  # fmt: skip
    assert result.error is not None and (result.error.code, result.attempts) == ("timeout", 1)


BAD_BATCHES = [
    ([{"recipient": "echo", "colour": "red"}], "request 0 of the batch: Object contains unknown"),
    ([{"recipient": "echo"}, {"recipient": ""}], "request 1 of the batch: recipient must be"),
    ([{"recipient": "echo", "timeout_s": "soon"}], "request 0 of the batch: Expected `float`"),
    ([{"recipient": "echo", "priority": "urgent"}], "invalid priority 'urgent'"),
    ([{"recipient": "echo", "cache_ttl_s": 0}], "cache_ttl_s must be seconds in (0, 86400]"),
    ([{"recipient": "echo", "payload": object()}], "cannot encode payload of type object"),
    ([{"recipient": "echo"}] * 100_000, "at most ENGINE_BATCH_MAX_REQUESTS=10,000 requests"),
    ({"recipient": "echo"}, "requests must be a list of requests, got dict"),
    (["echo"], "expected a BatchRequest or a mapping, got str"),
]


@pytest.mark.parametrize(("requests", "message"), BAD_BATCHES)
def test_a_bad_batch_is_refused_whole_and_nothing_is_queued(
    eng: SyncEngine, requests: Any, message: str
) -> None:
    before = eng.stats()["submitted"]
    with pytest.raises((ValueError, TypeError)) as info:
        eng.request_many(requests)
    assert message in str(info.value)
    assert eng.stats()["submitted"] == before
    with pytest.raises(ValueError, match="concurrency must be an integer in"):
        eng.request_many([{"recipient": "echo"}], concurrency=0)


def test_a_dedup_key_is_honoured_within_the_window(eng: SyncEngine) -> None:
    before = eng.stats()
    first = eng.submit("echo-d", 1, dedup_key="order-1")
    assert eng.submit("echo-d", 1, dedup_key="order-1") == first
    assert eng.submit("echo-d", 1, dedup_key="order-1", user="erin") != first  # per user
    ids = eng.submit_many([("echo-d", 2), ("echo-d", 3)], dedup_key="order-2", settled=True)
    assert ids[0] == ids[1]  # one key for both: one message
    assert eng.stats()["submitted"] - before["submitted"] == 3
    time.sleep(DEDUP_WINDOW_S + 0.1)
    assert eng.submit("echo-d", 1, dedup_key="order-1") != first  # the window passed
    s = eng.stats()["dedup"]
    assert s["suppressed"] - before["dedup"]["suppressed"] == 2


def test_the_dedup_window_is_bounded(eng: SyncEngine) -> None:
    time.sleep(DEDUP_WINDOW_S + 0.1)  # an empty window
    before = eng.stats()["dedup"]["evicted"]
    ids = eng.submit_many(
        [("echo-b", i) for i in range(DEDUP_MAX + 1)],
        dedup_keys=[f"bound-{i}" for i in range(DEDUP_MAX + 1)],
    )
    assert eng.stats()["dedup"]["evicted"] - before == 1
    # The oldest key was forgotten early (the bound): its repeat is queued again.
    assert eng.submit("echo-b", 0, dedup_key="bound-0") != ids[0]
    assert eng.submit("echo-b", 9, dedup_key=f"bound-{DEDUP_MAX}") == ids[-1]


def test_dedup_keys_must_match_the_items(eng: SyncEngine) -> None:
    with pytest.raises(ValueError, match="dedup_keys has 1 keys for 2 items"):
        eng.submit_many([("echo", 1), ("echo", 2)], dedup_keys=["a"])


def test_a_fan_out_is_not_deduplicated_by_its_shared_key(eng: SyncEngine) -> None:
    for r in ("echo-f1", "echo-f2", "echo-f3"):
        eng.subscribe("news", r)
    ids = eng.publish("news", {"n": 1}, dedup_key="same")
    assert len(set(ids)) == 3


def test_the_embedded_user_is_empty_unless_passed(eng: SyncEngine) -> None:
    assert eng.request("whoami", None) == ""
    assert eng.request("whoami", None, user="frank") == "frank"
