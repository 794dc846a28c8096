"""The idempotent-submit window (engine.core.dedup): expiry, the bound, per-user keys."""

from __future__ import annotations

import asyncio

import pytest

from engine.core.dedup import DedupWindow


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def accept(w: DedupWindow, user: str, key: str, mid: int) -> None:
    entry = w.reserve(user, key, mid, "r", 2)
    w.settle(user, [key], [entry], True)


def test_a_key_is_remembered_for_the_window_then_forgotten() -> None:
    clock = Clock()
    w = DedupWindow(5.0, 100, clock=clock)
    accept(w, "u", "k", 1)
    clock.now += 4.9
    known = w.get(("u", "k"))
    assert known is not None and known.id == 1
    clock.now += 0.2
    assert w.get(("u", "k")) is None and len(w) == 0


def test_the_oldest_key_goes_first_at_the_bound() -> None:
    w = DedupWindow(60.0, 2, clock=Clock())
    for mid, key in enumerate("abc", 1):
        accept(w, "u", key, mid)
    assert w.get(("u", "a")) is None  # forgotten early: the bound
    assert w.get(("u", "c")) is not None and w.evicted == 1 and len(w) == 2


def test_keys_are_per_user_and_split_finds_repeats_within_one_call() -> None:
    w = DedupWindow(60.0, 100, clock=Clock())
    accept(w, "alice", "k", 7)
    fresh, dups = w.split("bob", ["k", "x", "x", ""])
    assert fresh == [0, 1, 3] and dups == {2: 1}
    fresh, dups = w.split("alice", ["k", "y"])
    assert fresh == [1] and dups[0].id == 7  # type: ignore[union-attr]
    assert w.suppressed == 2


def test_a_failed_first_copy_is_forgotten_and_its_waiters_told() -> None:
    async def go() -> tuple[bool, object]:
        w = DedupWindow(60.0, 100)
        entry = w.reserve("u", "k", 1, "r", 2)
        waiting = asyncio.ensure_future(entry.wait())
        await asyncio.sleep(0)
        w.settle("u", ["k"], [entry], False)
        return await waiting, w.get(("u", "k"))

    assert asyncio.run(go()) == (False, None)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window_s"):
        DedupWindow(0, 10)
