"""Bad and large input at the submit edge: clear errors, nothing counted, nothing lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine import Config, Engine
from engine.errors import FrameTooLargeError


def _config(**overrides: Any) -> Config:
    return Config.from_env(env={}, **({"workers": 1, "sink": "null"} | overrides))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"metadata": {"a": 1}}, "metadata"),
        ({"tags": ["ok", 2]}, "tags"),
        ({"sender": 3}, "sender"),
        ({"reply_to": b"x"}, "reply_to"),
        ({"dedup_key": None}, "dedup_key"),
        ({"ttl": "5"}, "ttl"),
        ({"priority": True}, "priority"),
        ({"kind": "telegram"}, "kind"),
    ],
)
def test_bad_optional_fields_are_refused_by_name(options: dict[str, Any], named: str) -> None:
    async def go() -> dict[str, Any]:
        async with Engine(None, _config()) as eng:
            with pytest.raises(ValueError, match=named):
                await eng.submit("Agent-1", {"n": 1}, **options)
            await eng.submit("Agent-1", {"n": 2})  # the engine goes on working
            assert await eng.drain(30)
            return eng.stats()

    s = asyncio.run(go())
    assert (s["submitted"], s["delivered"]) == (1, 1)


def test_message_larger_than_a_ring_is_refused_at_submit() -> None:
    async def go() -> dict[str, Any]:
        async with Engine(None, _config(ring_bytes=65536)) as eng:
            with pytest.raises(FrameTooLargeError, match="ENGINE_RING_BYTES"):
                await eng.submit("Agent-1", b"x" * 70_000)
            assert await eng.drain(30)
            return eng.stats()

    s = asyncio.run(go())
    assert s["submitted"] == 0 and s["in_flight"] == 0


def test_large_messages_are_split_across_frames_and_all_delivered() -> None:
    """40 messages of 20 KB with batch size 256 would make a 800 KB frame; a 64 KB ring
    takes at most ~64 KB per frame, so batches are cut by size too."""

    async def go() -> dict[str, Any]:
        async with Engine(None, _config(ring_bytes=65536)) as eng:
            await eng.submit_many([(f"Agent-{i % 3}", b"y" * 20_000) for i in range(40)])
            assert await eng.drain(60)
            return eng.stats()

    s = asyncio.run(go())
    assert (s["submitted"], s["delivered"], s["in_flight"]) == (40, 40, 0)
    assert s["batches"] >= 40 * 20_000 // 65536


def test_malformed_message_inside_a_frame_is_dead_lettered_not_fatal() -> None:
    """A frame the worker cannot fully decode must not crash it (it would come back after
    every respawn): the bad message is dead-lettered as malformed, its neighbours delivered."""
    from engine.core.builder import array_header
    from ipc.codec import Priority

    async def go() -> tuple[dict[str, Any], list[Any]]:
        async with Engine(None, _config(stats_interval_s=0.1)) as eng:
            d = eng.dispatcher
            assert d is not None
            good = [d.build(f"Agent-{i}", {"i": i})[3] for i in range(2)]
            bad = d.build("Agent-x", {"x": 1})[3][:-1] + b"\x01"  # user (the last) not a str
            frame = array_header(3) + good[0] + bad + good[1]
            d.producers[0][Priority.NORMAL].write([frame])
            d.counts["submitted"] += 3  # written behind the dispatcher's back: account here
            d.lane_submitted[Priority.NORMAL] += 3
            assert await eng.drain(30)
            await asyncio.sleep(0.3)
            return eng.stats(), eng.dead_letters()

    s, dead = asyncio.run(go())
    assert (s["submitted"], s["delivered"], s["dead_lettered"], s["in_flight"]) == (3, 2, 1, 0)
    assert [d.reason for d in dead] == ["malformed"]
    assert "field 'user'" in dead[0].error
    assert s["workers"][0]["restarts"] == 0


def test_submit_many_reports_how_much_was_queued_before_a_bad_item() -> None:
    from engine.core.api import SUBMIT_CHUNK

    async def go() -> dict[str, Any]:
        async with Engine(None, _config()) as eng:
            items: list[tuple[Any, Any]] = [(f"Agent-{i % 7}", i) for i in range(SUBMIT_CHUNK + 10)]
            items[SUBMIT_CHUNK + 3] = ("", "bad")
            with pytest.raises(ValueError, match=f"the {SUBMIT_CHUNK} items before"):
                await eng.submit_many(items)
            assert await eng.drain(30)
            return eng.stats()

    s = asyncio.run(go())
    assert (s["submitted"], s["delivered"]) == (SUBMIT_CHUNK, SUBMIT_CHUNK)
