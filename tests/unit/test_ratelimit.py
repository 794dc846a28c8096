"""Per-user token buckets (engine.service.ratelimit)."""

from __future__ import annotations

import pytest

from engine.service.ratelimit import UserLimits, limited_reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_user_gets_the_burst_then_the_rate() -> None:
    clock = Clock()
    lim = UserLimits(10.0, 5, clock=clock)
    assert [lim.admit("alice") for _ in range(5)] == [0.0] * 5
    wait = lim.admit("alice")
    assert wait == pytest.approx(0.1)
    clock.now += 0.1
    assert lim.admit("alice") == 0.0
    assert lim.admit("bob") == 0.0  # another user's bucket is full
    assert lim.counts() == {
        "alice": {"messages": 6, "rate_limited": 1},
        "bob": {"messages": 1, "rate_limited": 0},
    }


def test_a_frame_larger_than_the_burst_is_admitted_on_a_full_bucket_and_repaid() -> None:
    clock = Clock()
    lim = UserLimits(100.0, 10, clock=clock)
    assert lim.admit("u", 50) == 0.0  # debt of 40 tokens
    assert lim.admit("u", 1) == pytest.approx(0.41)  # 41 tokens to refill first
    clock.now += 0.5
    assert lim.admit("u", 1) == 0.0


def test_no_limit_still_counts_per_user_and_burst_defaults_to_one_second() -> None:
    lim = UserLimits(0.0)
    assert all(lim.admit("u", 1000) == 0.0 for _ in range(10))
    assert lim.counts()["u"]["messages"] == 10_000
    assert UserLimits(2.5).burst == 3.0
    assert "user 'alice' is over ENGINE_RATE_LIMIT=5" in limited_reason("alice", 0.2, 5.0)
