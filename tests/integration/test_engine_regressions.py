"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine import Config, Engine, QueueFull, RequestFailed

H = "tests.integration.handlers_review"


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 1, "stats_interval_s": 0.1, "retry_backoff_base_s": 0.01}
    return Config.from_env(env={}, **(base | overrides))


def test_cancelled_submit_on_a_full_ring_loses_nothing() -> None:
    """A submit whose flush took already-acknowledged messages is cancelled while the
    ring is full: those messages must stay queued (they used to vanish)."""
    cfg = _config(ring_bytes=65536, batch_size=4, batch_linger_s=2.0, delivery_concurrency=1)

    async def go() -> tuple[int, dict[str, Any]]:
        async with Engine(f"{H}:slow", cfg) as eng:
            acked = 0
            while True:
                try:
                    eng.submit_nowait("a", b"x" * 2000)
                    acked += 1
                except QueueFull:
                    break
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(eng.submit("a", b"late"), 0.2)
            assert await eng.drain(60)
            return acked, eng.stats()

    acked, s = asyncio.run(go())
    assert s["in_flight"] == 0
    assert s["delivered"] == s["submitted"] == acked + 1


def test_a_replay_cancelled_while_its_write_waits_keeps_no_letter_it_queued() -> None:
    """A replay is cancelled while a full ring holds up the write of a letter it queued:
    that message is delivered, so its letter must not stay stored as well (it used to be
    put back, and a second replay delivered it twice)."""
    cfg = _config(ring_bytes=65536, batch_size=4, batch_linger_s=2.0, delivery_concurrency=1)
    dead = [f"dead-{i}" for i in range(8)]

    async def go() -> tuple[list[str], dict[str, Any]]:
        async with Engine(f"{H}:slow_or_reject", cfg) as eng:
            for r in dead:
                await eng.submit(r, b"x")
            assert await eng.drain(60)
            assert sorted(dl.message.recipient for dl in eng.dead_letters()) == dead
            while True:
                try:
                    eng.submit_nowait("a", b"x" * 16_000)
                except QueueFull:
                    break
            with pytest.raises(TimeoutError):  # the write of a replayed letter's batch waits
                await asyncio.wait_for(eng.replay_dead_letters(), 0.2)
            assert await eng.drain(60)
            return [dl.message.recipient for dl in eng.dead_letters()], eng.stats()

    letters, s = asyncio.run(go())
    assert sorted(letters) == dead  # each once: replayed and rejected again, or never replayed
    assert s["in_flight"] == 0
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"]


def test_replies_larger_than_the_return_ring_fail_cleanly_and_the_shard_lives() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[list[Any], Any, dict[str, Any]]:
        async with Engine(f"{H}:echo", cfg) as eng:
            mid = [eng.request("A", "m" * 10_000, timeout=30) for _ in range(40)]
            medium = await asyncio.gather(*mid)  # many 10 KB replies: split by bytes
            with pytest.raises(RequestFailed, match="reply too large"):
                await eng.request("A", "x" * 100_000, timeout=30)
            after = await eng.request("A", "still alive", timeout=30)
            await asyncio.sleep(0.3)
            return medium, after, eng.stats()

    medium, after, s = asyncio.run(go())
    assert medium == ["m" * 10_000] * 40
    assert after == "still alive"
    assert s["workers"][0]["restarts"] == 0


def test_sync_handler_returning_an_awaitable_is_awaited_in_order() -> None:
    async def go() -> list[Any]:
        async with Engine(f"{H}:sync_returning_coroutine", _config()) as eng:
            return list(await asyncio.gather(*(eng.request("A", i, timeout=30) for i in range(20))))

    assert asyncio.run(go()) == [{"n": i} for i in range(20)]


def test_a_request_whose_ttl_ends_before_delivery_fails_at_once_as_expired() -> None:
    """Its recipient is busy past the request's TTL: the caller hears "expired" as soon
    as the worker settles it (RequestFailed), not RequestTimeout at its own timeout."""

    async def go() -> tuple[str, dict[str, Any]]:
        async with Engine(f"{H}:slow_or_echo", _config()) as eng:
            for _ in range(10):
                await eng.submit("A", "slow")  # 0.5 s of work ahead of the request
            with pytest.raises(RequestFailed) as info:
                await eng.request("A", "late", timeout=30, ttl=0.1)
            assert await eng.drain(30)
            return str(info.value), eng.stats()

    error, s = asyncio.run(go())
    assert error.startswith("expired: "), error
    assert s["expired"] == 1 and s["delivered"] == 10


def test_handler_raising_cancelled_error_is_retried_not_a_stop() -> None:
    async def go() -> tuple[Any, dict[str, Any]]:
        async with Engine(f"{H}:cancelled_once", _config()) as eng:
            reply = await eng.request("A", None, timeout=30)
            await asyncio.sleep(0.3)
            return reply, eng.stats()

    reply, s = asyncio.run(go())
    assert reply == 1  # delivered on the second attempt
    assert s["workers"][0]["restarts"] == 0
    assert s["retried"] == 1


@pytest.mark.parametrize("ttl", [float("inf"), 1e12, -1.0, float("nan")])
def test_ttl_out_of_range_names_ttl(ttl: float) -> None:
    async def go() -> None:
        async with Engine(None, _config(sink="null")) as eng:
            with pytest.raises(ValueError, match="ttl"):
                await eng.submit("A", 1, ttl=ttl)

    asyncio.run(go())


def test_invalid_raw_payload_is_refused_at_submit() -> None:
    import msgspec

    from engine.errors import CodecError

    async def go() -> dict[str, Any]:
        async with Engine(None, _config(sink="null")) as eng:
            with pytest.raises(CodecError, match="not valid msgpack"):
                await eng.submit("A", msgspec.Raw(b"\xc1"))
            await eng.submit("A", msgspec.Raw(b"\x01"))
            assert await eng.drain(30)
            return eng.stats()

    s = asyncio.run(go())
    assert (s["submitted"], s["delivered"]) == (1, 1)


def test_a_full_lane_of_one_worker_does_not_hold_up_another_worker() -> None:
    from engine.core.sharding import stable_shard

    busy = next(f"busy-{i}" for i in range(100) if stable_shard(f"busy-{i}", 2) == 0)
    idle = next(f"idle-{i}" for i in range(100) if stable_shard(f"idle-{i}", 2) == 1)
    cfg = _config(workers=2, ring_bytes=65536, batch_size=4)

    async def go() -> Any:
        async with Engine(f"{H}:slow_or_echo", cfg) as eng:

            async def flood() -> None:
                for _ in range(200):  # far more than worker 0's ring holds
                    await eng.submit(busy, "slow", metadata={"pad": "p" * 2000})

            flooding = asyncio.ensure_future(flood())
            await asyncio.sleep(0.3)  # worker 0's ring is full now; flood() waits for space
            assert not flooding.done()
            reply = await eng.request(idle, "hello", timeout=5)
            flooding.cancel()
            return reply

    assert asyncio.run(go()) == "hello"


def test_a_flood_in_a_high_lane_cannot_keep_a_low_lane_out_of_the_window(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_file = tmp_path / "order"
    monkeypatch.setenv("RINGWAY_ORDER_FILE", str(order_file))
    # Window = max(4 x 1, 2 x 4) = 8 messages: the critical flood alone could fill it.
    cfg = _config(delivery_concurrency=1, batch_size=4, starvation_limit=4)

    async def go() -> None:
        async with Engine(f"{H}:record_order", cfg) as eng:
            await eng.submit_many([(f"low-{i}", i) for i in range(5)], priority="low")
            await eng.submit_many([(f"crit-{i}", i) for i in range(400)], priority="critical")
            assert await eng.drain(60)

    asyncio.run(go())
    order = order_file.read_text().split()
    assert len(order) == 405
    lows = [i for i, r in enumerate(order) if r.startswith("low")]
    # With the guard every low message is through within a few dozen deliveries
    # (measured: by position ~26); without it the last one waits for the flood (~402).
    assert max(lows) < 200, f"the low lane waited for the critical flood: {lows}"


def test_dead_letters_of_a_killed_worker_are_void_when_the_redelivery_succeeds() -> None:
    """A worker dead-letters a message and dies before reporting its frame; the frame is
    delivered again and the message may succeed. The store used to keep the first letter,
    so ``dead_letters()`` disagreed with ``stats()["dead_lettered"]`` (and a replay would
    resend delivered messages)."""
    import os
    import signal

    cfg = _config(sink="mock", mock_delay_s=0.005, mock_success_rate=0.5, retry_max_attempts=1)

    async def go() -> tuple[dict[str, Any], list[Any]]:
        async with Engine(None, cfg) as eng:
            await eng.submit_many([(f"Agent-{i % 4}", None) for i in range(1500)])
            for _ in range(3):
                await asyncio.sleep(0.4)
                pids = [w["pid"] for w in eng.stats()["workers"] if w["alive"]]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
            assert await eng.drain(120)
            return eng.stats(), eng.dead_letters()

    s, letters = asyncio.run(go())
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] == 1500, s
    assert s["redelivered"] > 0, "no kill landed mid-window: the test proved nothing"
    assert len(letters) == s["dead_lettered"], (len(letters), s)
    assert len({dl.message.id for dl in letters}) == len(letters)


def test_submit_nowait_fills_a_batch_larger_than_the_ring_without_queue_full() -> None:
    """A full batch bigger than the whole ring used to be written all-or-nothing, so the
    message completing it raised QueueFull on an empty ring."""
    cfg = _config(sink="null", ring_bytes=65536, batch_size=16)

    async def go() -> dict[str, Any]:
        async with Engine(None, cfg) as eng:
            for _ in range(16):
                eng.submit_nowait("a", b"x" * 4096)  # 16 x 4 KiB: more than the 64 KiB ring
            assert await eng.drain(30)
            return eng.stats()

    s = asyncio.run(go())
    assert s["submitted"] == s["delivered"] == 16, s


def test_a_frame_too_deep_to_split_is_dead_lettered_message_by_message() -> None:
    """A batch the worker cannot even split into messages (nesting past every limit) used
    to kill the worker, which met it again after each respawn: now each of its messages
    (counted from the array header) is dead-lettered as malformed."""
    from engine.worker.fetch import _salvage

    frame = b"\x93" + b"\x91" * 100_000 + b"\xc0" + b"\xc0" + b"\xc0"
    good, bad = _salvage(frame)
    assert good == []
    assert [i for i, _ in bad] == [0, 1, 2]
    assert all("undecodable frame" in error for _, error in bad)


def test_a_message_waiting_for_its_retry_does_not_stall_the_other_lanes(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetching was once gated on fetched-but-uncommitted messages: frames settled behind
    a retrying message cannot commit, so after one window the worker stopped fetching
    every lane until the retry came (a critical message waited the whole backoff)."""
    order = tmp_path / "order.txt"
    monkeypatch.setenv("RINGWAY_ORDER_FILE", str(order))
    cfg = _config(batch_size=64, delivery_concurrency=16)

    async def go() -> None:
        async with Engine(f"{H}:retry_bad_once", cfg) as eng:
            await eng.submit("bad", 1)
            await asyncio.sleep(0.3)  # its first attempt failed; the retry is 3 s away
            await eng.submit_many([(f"r{i % 50}", i) for i in range(5_000)])
            await eng.submit("last", 0, priority="critical")
            assert await eng.drain(60)

    asyncio.run(go())
    seen = order.read_text().split()
    assert len(seen) == 5_002
    assert seen.index("last") < seen.index("bad"), "the critical message waited for the retry"


def test_a_cancelled_submit_many_leaves_the_counts_conserved() -> None:
    """``submit_many`` counted all its messages as submitted up front; cancelled while a
    flush waited for ring space (the ingress does that at shutdown), the rest were never
    queued, in_flight stayed above zero for ever and every drain timed out."""
    cfg = _config(batch_size=16, ring_bytes=65536, delivery_concurrency=4)

    async def go() -> dict[str, Any]:
        async with Engine(f"{H}:slow", cfg) as eng:
            # 2 KB each: the ring holds ~30 of them, 50 ms each to deliver.
            task = asyncio.ensure_future(
                eng.submit_many([(f"r{i % 50}", b"x" * 2000) for i in range(20_000)])
            )
            await asyncio.sleep(0.3)
            assert not task.done(), "the ring never filled: the test proved nothing"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await eng.drain(120)
            return eng.stats()

    s = asyncio.run(go())
    assert s["in_flight"] == 0, s
    assert 0 < s["submitted"] < 20_000, s
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"], s


def test_one_slow_delivery_does_not_stall_other_recipients_behind_the_commit_window(
    tmp_path: Any,
) -> None:
    """A frame held by one slow delivery keeps its lane's commits back; fetching is
    bounded by uncommitted messages only while that hold is young, so the others go on
    (with a strict bound they stopped at the window until the slow one finished)."""
    marker = tmp_path / "release"
    cfg = _config(batch_size=8, delivery_concurrency=4, handler_timeout_s=120.0)
    n = 4000  # 125 windows of 32 behind the held frame

    async def go() -> tuple[int, dict[str, Any]]:
        async with Engine(f"{H}:held_until_marker", cfg) as eng:
            await eng.submit("held", str(marker))
            await eng.submit_many([(f"r{i % 50}", None) for i in range(n)])
            for _ in range(6000):  # up to 60 s: the slow one is still held meanwhile
                # The workers' own count: the engine's waits for the held frame's commit.
                delivered = sum(w["delivered"] for w in eng.stats()["workers"])
                if delivered >= n:
                    break
                await asyncio.sleep(0.01)
            marker.touch()
            assert await eng.drain(60)
            return delivered, eng.stats()

    delivered, s = asyncio.run(go())
    assert delivered == n, f"only {delivered} of {n} delivered while one delivery was held"
    assert s["delivered"] == n + 1 and s["in_flight"] == 0
