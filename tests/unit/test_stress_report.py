"""The stress report's ``lost`` comes from what happened at the sink, not from the engine.

The engine's own counts cannot show a message lost inside it: ``generated -
settled - in_flight`` with ``in_flight = submitted - settled`` is zero whenever
the engine counted every submit.  These tests hand `build_report` engine
figures that claim every message settled and sink records that miss some.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

from engine.stress import MessageGenerator, MetricsCollector
from engine.stress.report import (
    DeadLetterTally,
    Settings,
    build_report,
    read_delivered_ids,
    reconcile,
)


def run_figures(delivered_ids: list[int], dead_ids: list[int]) -> Any:
    gen = MessageGenerator(2, 50, ("direct",))
    generated = [i + 1 for i, _ in enumerate(gen)]  # ids 1..100, as the engine gives them
    n = len(generated)
    stats = {  # what the engine says: everything settled
        "submitted": n, "delivered": n - len(dead_ids), "dead_lettered": len(dead_ids),
        "expired": 0, "in_flight": 0, "redelivered": 0, "failed_attempts": 0, "retried": 0,
        "workers": [],
        "latency_start_s": {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "count": 0},
        "latency_settle_s": {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "count": 0},
    }  # fmt: skip
    tally = DeadLetterTally(
        records=len(dead_ids),
        by_type={"direct": len(dead_ids)} if dead_ids else {},
        by_sender={},
        by_recipient={},
        by_reason={"max_attempts": len(dead_ids)} if dead_ids else {},
    )
    settings = Settings(
        scenario="test", agents=2, messages_per_agent=50, message_types=["direct"],
        priorities={"direct": "normal"}, workers=1, success_rate=1.0, delay_s=0.0,
        retry_max_attempts=1, retry_backoff_base_s=0.1, retry_backoff_max_s=1.0,
        delivery_concurrency=1, recipient_concurrency=1, ttl_s=0.0, duration_s=None,
        rate=None, chaos_interval_s=None, seed=0, payload_bytes=0,
    )  # fmt: skip
    return build_report(
        settings=settings,
        generator=gen,
        stats=stats,
        tally=tally,
        sink=reconcile(generated, delivered_ids, dead_ids),
        metrics=MetricsCollector(),
        drained=True,
        drain_timeout_s=1.0,
        elapsed_s=1.0,
        submit_s=0.5,
    )


def test_every_message_seen_at_the_sink_is_not_lost() -> None:
    r = run_figures([*range(1, 99), 1, 2], [99, 100])  # two delivered twice
    assert r.lost == 0 and r.sink.delivered == 98 and r.sink.dead_lettered == 2
    assert r.sink.repeats == 2 and r.sink.deliveries == 100
    [conservation] = [c for c in r.checks if c.name == "conservation"]
    assert not conservation.ok and "2 repeats but 0 counted as redelivered" in conservation.detail


def test_messages_the_sink_never_saw_are_lost_whatever_the_engine_counted() -> None:
    r = run_figures(list(range(1, 96)), [99, 100])  # 96..98 never reached the sink
    assert r.delivered == 98 and r.in_flight == 0  # the engine thinks all is well
    assert r.lost == 3
    [conservation] = [c for c in r.checks if c.name == "conservation"]
    assert not conservation.ok and not r.ok
    assert "lost 3" in conservation.detail
    assert "the engine counted 3 deliveries never made" in conservation.detail


def test_ids_never_generated_are_flagged() -> None:
    r = run_figures([*range(1, 99), 4242], [99, 100])
    assert r.lost == 0 and r.sink.unexpected == 1
    [conservation] = [c for c in r.checks if c.name == "conservation"]
    assert "1 ids delivered that were never generated" in conservation.detail


def test_record_files_are_read_whole_and_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "1.ids").write_bytes(array("Q", [1, 2, 3]).tobytes())
    (tmp_path / "2.ids").write_bytes(array("Q", [4]).tobytes() + b"\x05\x00\x00")
    assert list(read_delivered_ids(tmp_path)) == [1, 2, 3, 4]
