"""The response cache (engine.core.cache): LRU order, TTL expiry, per-user keys, single-flight."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from engine.core.cache import ResponseCache, cache_key, shared


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def raw(value: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


def key(user: str, n: int) -> tuple[str, str, bytes]:
    return cache_key(user, "r", raw(n))


def test_the_least_recently_used_entry_goes_first_at_the_size_bound() -> None:
    c = ResponseCache(3, 60, clock=Clock())
    for n in (1, 2, 3):
        c.put(key("u", n), raw(n))
    assert c.cached(key("u", 1)) is not None  # 1 is now the most recent
    c.put(key("u", 4), raw(4))
    assert c.cached(key("u", 2)) is None  # the least recently used went
    assert all(c.cached(key("u", n)) is not None for n in (1, 3, 4))
    assert (len(c), c.evicted) == (3, 1)


def test_entries_expire_after_their_ttl_and_are_cleaned_up() -> None:
    clock = Clock()
    c = ResponseCache(10, 5.0, clock=clock)
    c.put(key("u", 1), raw(1))
    c.put(key("u", 2), raw(2), ttl_s=1.0)
    clock.now += 1.0
    assert c.cached(key("u", 2)) is None and c.cached(key("u", 1)) is not None
    clock.now += 4.0
    assert len(c) == 0 and c.expired == 2


def test_the_user_is_part_of_every_key() -> None:
    c = ResponseCache(10, 60, clock=Clock())
    c.put(key("alice", 1), raw("alice's"))
    assert c.cached(key("bob", 1)) is None
    assert key("alice", 1) != key("bob", 1)
    assert cache_key("u", "r", raw(1)) != cache_key("u", "r2", raw(1))


def test_clear_forgets_one_users_entries_only() -> None:
    c = ResponseCache(10, 60, clock=Clock())
    for user in ("alice", "bob"):
        for n in (1, 2):
            c.put(key(user, n), raw(n))
    assert c.clear("alice") == 2
    assert c.cached(key("alice", 1)) is None and c.cached(key("bob", 1)) is not None
    assert c.clear() == 2 and len(c) == 0


def test_size_zero_keeps_nothing_but_still_shares_running_requests() -> None:
    async def go() -> tuple[list[tuple[object, str]], int]:
        c = ResponseCache(0, 60)
        calls = 0

        async def run() -> msgspec.Raw:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return raw("v")

        k = key("u", 1)
        got = await asyncio.gather(*(shared(c, k, None, run) for _ in range(3)))
        again = await shared(c, k, None, run)
        return [(msgspec.msgpack.decode(v), how) for v, how in [*got, again]], calls

    got, calls = asyncio.run(go())
    assert [how for _, how in got] == ["executed", "deduplicated", "deduplicated", "executed"]
    assert calls == 2


def test_errors_are_shared_by_the_running_request_but_never_cached() -> None:
    async def go() -> tuple[list[BaseException | tuple[msgspec.Raw, str]], int]:
        c = ResponseCache(10, 60)
        calls = 0

        async def run() -> msgspec.Raw:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            raise ValueError("boom")

        k = key("u", 1)
        got = await asyncio.gather(
            *(shared(c, k, None, run) for _ in range(2)), return_exceptions=True
        )
        with pytest.raises(ValueError, match="boom"):
            await shared(c, k, None, run)
        return list(got), calls

    got, calls = asyncio.run(go())
    assert all(isinstance(g, ValueError) for g in got)
    assert calls == 2  # the failure was not cached: the third call ran again


def test_a_cancelled_waiter_leaves_the_request_running_for_the_others() -> None:
    async def go() -> tuple[object, int]:
        c = ResponseCache(10, 60)

        async def run() -> msgspec.Raw:
            await asyncio.sleep(0.1)
            return raw("done")

        k = key("u", 1)
        first = asyncio.ensure_future(shared(c, k, None, run))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(shared(c, k, None, run))
        await asyncio.sleep(0.01)
        first.cancel()
        value, how = await second
        assert how == "deduplicated"
        return msgspec.msgpack.decode(value), c.hits + c.misses

    assert asyncio.run(go()) == ("done", 1)
