"""Issue 16 item 1: oversized fields are refused at every edge, and no delivery failure
wedges a lane, whatever the exception looks like.

- Embedded: ``submit``/``submit_many``/``request``/``publish``/``subscribe``/``register``
  refuse a recipient, topic, sender, reply_to, dedup_key, tags or metadata above
  ENGINE_MAX_RECIPIENT_BYTES / ENGINE_MAX_METADATA_BYTES with a `FieldTooLarge` that
  names the field, its size and the knob; nothing of the call is queued.
- A handler raising an exception whose ``str()`` raises, or is 10 MB, an OSError with a
  100,000-character filename, or a Reject with a 10 MB reason: each message is retried
  and dead-lettered, the other messages are delivered, no worker dies.
- The service: 9,000 normal messages and 20 with a 100,000-character recipient (refused
  as ``bad_frame``/400 naming the limit) plus 20 the inbox sink cannot store (a name too
  long for a file: OSError, dead-lettered): every normal message is in the inbox,
  ``in_flight`` returns to 0, /healthz answers 200 and SIGTERM exits 0.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from engine import Config, Engine
from engine.client import Client
from engine.errors import FieldTooLarge, ServiceError
from tests.integration.service_proc import start_service
from tests.integration.test_service_ingress import http

HANDLERS = "tests.integration.handlers_oversized"
BIG = "r" * 100_000


def config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "workers": 2,
        "stats_interval_s": 0.1,
        "heartbeat_interval_s": 0.1,
        "retry_max_attempts": 2,
        "retry_backoff_base_s": 0.01,
        "retry_backoff_max_s": 0.02,
    }
    return Config.from_env(env={}, **(settings | overrides))


async def settled(eng: Engine, timeout: float = 60.0) -> dict[str, Any]:
    """Stats once every submitted message settled (AssertionError with them otherwise)."""
    async with asyncio.timeout(timeout):
        while True:
            s = eng.stats()
            if s["in_flight"] == 0 and s["submitted"] > 0:
                return s
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_every_edge_of_the_engine_refuses_oversized_fields_naming_the_limit() -> None:
    async def main() -> None:
        async with Engine(config=config(workers=1, sink="null")) as eng:
            limit = re.escape("the limit is 1,024 (ENGINE_MAX_RECIPIENT_BYTES)")
            calls: list[tuple[str, Any]] = [
                ("recipient", lambda: eng.submit(BIG, 1)),
                ("recipient", lambda: eng.submit_many([("ok", 1), (BIG, 2)])),
                ("recipient", lambda: eng.request(BIG, 1, timeout=5)),
                ("sender", lambda: eng.submit("ok", 1, sender="s" * 2000)),
                ("reply_to", lambda: eng.submit("ok", 1, reply_to="t" * 2000)),
                ("dedup_key", lambda: eng.submit("ok", 1, dedup_key="k" * 2000)),
                ("dedup_key", lambda: eng.submit_many([("ok", 1)], dedup_keys=["k" * 2000])),
                ("topic", lambda: eng.publish("t" * 2000, 1)),
            ]
            for field, call in calls:
                with pytest.raises(FieldTooLarge, match=f"^{field} .* bytes; {limit}"):
                    await call()
            # UTF-8 bytes, not characters: 513 two-byte characters are 1,026 bytes.
            with pytest.raises(FieldTooLarge, match="1,026 bytes"):
                await eng.submit("é" * 513, 1)
            assert await eng.submit("é" * 512, 1) > 0  # exactly at the limit
            with pytest.raises(FieldTooLarge, match="ENGINE_MAX_METADATA_BYTES"):
                await eng.submit("ok", 1, tags=["t"] * 40_000)
            with pytest.raises(FieldTooLarge, match="ENGINE_MAX_METADATA_BYTES"):
                await eng.submit("ok", 1, metadata={"m": "v" * 70_000})
            for field, sync_call in (
                ("topic", lambda: eng.subscribe("t" * 2000, "ok")),
                ("recipient", lambda: eng.subscribe("t", BIG)),
                ("recipient", lambda: eng.register(BIG)),
            ):
                with pytest.raises(FieldTooLarge, match=f"^{field} .*{limit}"):
                    sync_call()
            s = await settled(eng)
            assert s["submitted"] == 1 and s["delivered"] == 1, s  # nothing else was queued
        lifted = config(workers=1, sink="null", max_recipient_bytes=200_000)
        async with Engine(config=lifted) as eng:  # the knob lifts it
            assert await eng.submit(BIG, 1) > 0
            assert (await settled(eng))["delivered"] == 1

    asyncio.run(main())


@pytest.mark.timeout(180)
def test_any_exception_a_handler_raises_is_dead_lettered_and_the_lanes_move_on() -> None:
    awkward = [f"{p}{i}" for p in ("bad-str", "huge-str", "os-", "reject-") for i in range(5)]
    normal = [f"n{i}" for i in range(16)]
    facts: dict[str, Any] = {}

    async def main() -> None:
        # The smallest return ring: every record the failures produce must still fit.
        async with Engine(f"{HANDLERS}:awkward", config(return_ring_bytes=65536)) as eng:
            for i in range(3000):
                await eng.submit(normal[i % len(normal)], i)
                if i % 150 == 0:
                    await eng.submit(awkward[i // 150], i)
            facts["stats"] = await settled(eng)
            facts["dead"] = eng.dead_letters()

    asyncio.run(main())
    s, dead = facts["stats"], facts["dead"]
    assert s["delivered"] == 3000 and s["dead_lettered"] == len(awkward), s
    assert [w["restarts"] for w in s["workers"]] == [0, 0], s["workers"]
    assert sorted(d.message.recipient for d in dead) == sorted(awkward)
    by_prefix = {d.message.recipient.rstrip("0123456789"): d for d in dead}
    assert "str() of UnprintableError raised RuntimeError" in by_prefix["bad-str"].error
    assert by_prefix["reject-"].reason == "rejected"
    for d in dead:
        assert len(d.error) < 20_000 and len(d.traceback) < 20_000, (d.reason, len(d.error))


@pytest.mark.timeout(300)
def test_service_refuses_oversized_recipients_and_a_failing_sink_wedges_no_lane(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    svc = start_service(
        tmp_path,
        ENGINE_SINK="inbox",
        ENGINE_INBOX_DIR=str(inbox),
        ENGINE_WORKERS="2",
        ENGINE_RETRY_MAX_ATTEMPTS="2",
        ENGINE_RETRY_BACKOFF_BASE_S="0.01",
        ENGINE_STATS_INTERVAL_S="0.1",
    )
    refused: list[str] = []
    try:
        unstorable = [f"{i:02d}" + "u" * 998 for i in range(20)]  # within 1,024; no such file
        with Client(svc.url, max_pending=20_000) as client:
            for i in range(9000):
                client.submit(f"n{i % 16}", [i, i // 16])
                if i % 450 == 0:
                    try:
                        client.submit_many([(BIG, [i, 0])])
                    except ServiceError as exc:
                        refused.append(f"{exc.code}: {exc.reason}")
                    client.submit(unstorable[i // 450], [i, 0])
            client.flush()
        status, body = http(
            svc, "POST", "/v1/messages", json.dumps({"recipient": BIG}).encode(), token=None
        )
        after = svc.wait_stats(lambda s: s["in_flight"] == 0 and s["submitted"] == 9020)
        svc.get_json("/healthz")  # raises HTTPError on a 503
    except urllib.error.HTTPError as exc:  # /healthz said 503
        raise AssertionError(exc.read()) from exc
    finally:
        code = svc.stop()
    lines = sum(len(p.read_bytes().splitlines()) for p in inbox.glob("*.jsonl"))
    assert len(refused) == 20, refused
    assert all(r.startswith("bad_frame: recipient 'rrr") for r in refused), refused[:1]
    named = "100,000 bytes; the limit is 1,024 (ENGINE_MAX_RECIPIENT_BYTES)"
    assert all(named in r for r in refused), refused[:1]
    assert status == 400 and b"ENGINE_MAX_RECIPIENT_BYTES" in body, (status, body[:300])
    assert after["delivered"] == 9000 and after["dead_lettered"] == 20, after
    assert lines == 9000
    assert code == 0, svc.log_text()[-3000:]
