"""Issue 11 items 1, 2, 4, 5: return records that cannot crash a worker, corrupt frame
headers skipped, per-letter replay, dead-letter evictions counted and the mirror read back."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from engine import Config, Engine
from engine.core.deadletters import ReplayReport
from ipc.codec import Message
from ipc.records import DeadLetter

H = "tests.integration.handlers_data"


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 1, "stats_interval_s": 0.1, "retry_max_attempts": 1}
    return Config.from_env(env={}, **(base | overrides))


def test_a_10_mb_exception_message_is_a_truncated_dead_letter_not_a_worker_crash() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[list[Any], dict[str, Any], list[int]]:
        async with Engine(f"{H}:oversize", cfg) as eng:
            ids = [await eng.submit("a", {"i": i}) for i in range(5)]
            huge = await eng.submit("a", {"huge": True})
            odd = await eng.submit("a", {"unprintable": True})
            ids += [await eng.submit("a", {"i": i}) for i in range(5, 10)]
            assert await eng.drain(60)
            await asyncio.sleep(0.3)  # a stats interval: the worker's counters arrive
            return eng.dead_letters(), eng.stats(), [huge, odd]

    letters, s, (huge, odd) = asyncio.run(go())
    assert s["delivered"] == 10 and s["dead_lettered"] == 2 and s["in_flight"] == 0
    assert s["workers"][0]["restarts"] == 0
    by_id = {dl.message.id: dl for dl in letters}
    big = by_id[huge]
    assert big.error.startswith("ValueError: xxx")
    assert big.error.endswith("[truncated, 10,485,772 chars]")
    assert len(big.error) <= 4096
    assert big.message.body() == {"huge": True} and not big.payload_dropped
    assert len(big.traceback) <= 8192 and "Traceback (most recent call last)" in big.traceback
    assert by_id[odd].error == "Unprintable: <str() of Unprintable raised RuntimeError>"


def test_replay_is_per_letter_and_keeps_what_cannot_be_replayed_with_the_reason() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[ReplayReport, list[DeadLetter], list[DeadLetter], list[int], int]:
        async with Engine(f"{H}:reject", cfg) as eng:
            good = [await eng.submit("a", {"i": i}) for i in range(3)]
            big = await eng.submit("a", "x" * 40_000)  # too large for the return ring
            assert await eng.drain(60)
            assert eng.dispatcher is not None
            store = eng.dispatcher.dead
            store.add(DeadLetter(Message(id=0, recipient=""), "malformed", 1, "undecodable"))
            bad_raw = Message(id=10**9, recipient="a", payload=msgspec.Raw(b"\xc1"))
            store.add(DeadLetter(bad_raw, "rejected", 1, "no"))
            dropped = [dl.payload_dropped for dl in eng.dead_letters()]
            assert dropped == [False, False, False, True, False, False]
            report = await eng.replay_dead_letters()
            letters = eng.dead_letters()
            assert await eng.drain(60)  # the replayed ones are rejected again, as new messages
            s = eng.stats()
            assert s["submitted"] == 7 and s["dead_lettered"] == 7 and s["in_flight"] == 0
            return report, letters, eng.dead_letters(), good, big

    report, kept, after, good, big = asyncio.run(go())
    assert report == ReplayReport(3, 3, {"payload_dropped": 1, "malformed": 1, "rebuild_failed": 1})
    assert [dl.message.id for dl in kept] == [big, 0, 10**9]
    assert "dropped for size" in kept[0].replay_error
    assert "no recipient" in kept[1].replay_error
    assert kept[2].replay_error.startswith("CodecError: payload given as msgspec.Raw")
    again = [dl for dl in after if dl not in kept]  # the good ones, rejected again
    assert sorted(dl.message.body()["i"] for dl in again) == [0, 1, 2]
    assert not {dl.message.id for dl in again} & set(good)
