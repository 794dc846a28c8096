"""The Lua scripts of cluster mode against a real redis-server: leases, fencing, acks, dedup.

Fencing is the point: a holder whose epoch moved on (another node acquired the
lease) cannot ack, dead-letter, trim or reply, whatever it sends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio

from engine.broker import scripts
from engine.broker.consumer import _successor
from engine.broker.partitions import GROUP, Keys, assignment
from tests.broker.redis_proc import RedisServer

TTL_MS = 60_000


def run(r: redis.Redis, script: scripts.Script, keys: list[Any], args: list[Any]) -> Any:
    return r.eval(script.source, len(keys), *keys, *args)


def acquire(r: redis.Redis, k: Keys, p: int, node: str, ttl: int = TTL_MS) -> tuple[int, bytes]:
    epoch, holder = run(r, scripts.acquire, [k.leases[p], k.epochs[p]], [node, ttl])
    return int(epoch), holder


def settle(
    r: redis.Redis,
    k: Keys,
    p: int,
    token: str,
    epoch: int,
    ids: list[bytes],
    minid: bytes = b"",
    letters: list[list[Any]] | None = None,
    notices: list[tuple[str, bytes]] | None = None,
) -> int:
    args: list[Any] = [token, epoch, GROUP, minid, 100, len(ids), *ids, len(letters or [])]
    for fields in letters or []:
        args += [len(fields), *fields]
    args.append(len(notices or []))
    for channel, payload in notices or []:
        args += [channel, payload]
    keys = [k.streams[p], k.leases[p], k.epochs[p], k.dlq]
    return int(run(r, scripts.settle, keys, args))


def stream_with_pending(r: redis.Redis, k: Keys, p: int, n: int) -> list[bytes]:
    """``n`` entries in partition ``p``, all delivered to its consumer (pending)."""
    r.xgroup_create(k.streams[p], GROUP, id="0", mkstream=True)
    ids = [r.xadd(k.streams[p], {"m": b"\x90", "h": b""}) for _ in range(n)]
    r.xreadgroup(GROUP, k.consumers[p], {k.streams[p]: ">"}, count=n)
    return ids


def test_acquire_gives_a_new_epoch_and_refuses_a_held_lease(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 4)
    assert acquire(r, k, 0, "a") == (1, b"")
    epoch, holder = acquire(r, k, 0, "b")
    assert (epoch, holder) == (0, b"a/1")
    assert r.get(k.leases[0]) == b"a/1"
    assert 0 < r.pttl(k.leases[0]) <= TTL_MS


def test_renew_keeps_its_own_lease_and_fails_once_another_holds_it(
    r: redis.Redis, namespace: str
) -> None:
    k = Keys(namespace, 4)
    keys = [k.leases[1], k.epochs[1]]
    acquire(r, k, 1, "a")
    assert run(r, scripts.renew, keys, ["a/1", 1, TTL_MS]) == 1
    # Expired, nobody took it: the epoch is unchanged, so the holder may set it again.
    r.delete(k.leases[1])
    assert run(r, scripts.renew, keys, ["a/1", 1, TTL_MS]) == 2
    assert r.get(k.leases[1]) == b"a/1"
    # Expired and taken by b (epoch 2): a's renewal fails and leaves b's lease alone.
    r.delete(k.leases[1])
    assert acquire(r, k, 1, "b") == (2, b"")
    assert run(r, scripts.renew, keys, ["a/1", 1, TTL_MS]) == 0
    assert r.get(k.leases[1]) == b"b/2"


def test_release_only_by_the_holder(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    acquire(r, k, 0, "a")
    assert run(r, scripts.release, [k.leases[0]], ["b/1"]) == 0
    assert r.get(k.leases[0]) == b"a/1"
    assert run(r, scripts.release, [k.leases[0]], ["a/1"]) == 1
    assert r.get(k.leases[0]) is None


def test_a_stale_epoch_cannot_ack_dead_letter_or_trim(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    ids = stream_with_pending(r, k, 0, 5)
    acquire(r, k, 0, "a", ttl=1)  # a's lease runs out ...
    r.delete(k.leases[0])
    assert acquire(r, k, 0, "b") == (2, b"")  # ... and b takes the partition
    letter = ["id", 7, "reason", "rejected"]
    stale = settle(r, k, 0, "a/1", 1, ids, _successor(ids[-1]), [letter])
    assert stale == -1
    assert r.xpending(k.streams[0], GROUP)["pending"] == 5  # nothing acked
    assert r.xlen(k.dlq) == 0  # no dead letter
    assert r.xlen(k.streams[0]) == 5  # nothing trimmed
    # The same call with b's epoch goes through.
    assert settle(r, k, 0, "b/2", 2, ids, _successor(ids[-1]), [letter]) == 5
    assert r.xpending(k.streams[0], GROUP)["pending"] == 0
    assert r.xrange(k.dlq)[0][1] == {b"id": b"7", b"reason": b"rejected"}


def read(r: redis.Redis, k: Keys, p: int, token: str, epoch: int, cursor: str = ">") -> Any:
    keys = [k.streams[p], k.leases[p], k.epochs[p]]
    return run(r, scripts.read, keys, [token, epoch, GROUP, k.consumers[p], 10, cursor])


def test_a_stale_epoch_cannot_read_the_group(r: redis.Redis, namespace: str) -> None:
    """A read is a write: a paused owner's read must not move entries its successor needs."""
    k = Keys(namespace, 2)
    r.xgroup_create(k.streams[0], GROUP, id="0", mkstream=True)
    acquire(r, k, 0, "a", ttl=1)
    r.delete(k.leases[0])
    assert acquire(r, k, 0, "b") == (2, b"")
    assert read(r, k, 0, "b/2", 2, "0") == [0, b"0-0"]  # b: nothing pending, now live
    new = r.xadd(k.streams[0], {"m": b"\x90", "h": b""})
    assert read(r, k, 0, "a/1", 1) == -1  # a wakes up and reads: fenced
    assert read(r, k, 0, "a/1", 1, "0") == -1
    assert r.xpending(k.streams[0], GROUP)["pending"] == 0  # nothing moved
    assert read(r, k, 0, "b/2", 2) == [1, [[new, [b"m", b"\x90", b"h", b""]]]]
    assert read(r, k, 0, "b/2", 2) == [0, new]  # caught up: the id to wait after


def test_a_read_under_an_expired_untaken_lease_goes_through(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    ids = stream_with_pending(r, k, 1, 2)
    acquire(r, k, 1, "a")
    r.delete(k.leases[1])  # expired, and no other node acquired since: still a's epoch
    got = read(r, k, 1, "a/1", 1, "0")
    assert got[0] == 1 and [e[0] for e in got[1]] == ids


def test_a_read_of_pending_entries_shows_a_deleted_one_and_no_group_is_nogroup(
    r: redis.Redis, namespace: str
) -> None:
    k = Keys(namespace, 2)
    ids = stream_with_pending(r, k, 0, 3)
    acquire(r, k, 0, "a")
    r.xdel(k.streams[0], ids[1])  # trimmed or deleted since it was delivered
    got = read(r, k, 0, "a/1", 1, "0")
    assert got[0] == 1
    assert [(eid, fields is None) for eid, fields in got[1]] == [
        (ids[0], False),
        (ids[1], True),
        (ids[2], False),
    ]
    r.xgroup_destroy(k.streams[0], GROUP)  # Redis lost it (a restart without data)
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        read(r, k, 0, "a/1", 1)


def test_an_expired_untaken_lease_still_acks_with_its_epoch(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    ids = stream_with_pending(r, k, 1, 2)
    acquire(r, k, 1, "a")
    r.delete(k.leases[1])  # expired, and no other node acquired since
    assert settle(r, k, 1, "a/1", 1, ids) == 2


def test_trimming_never_passes_an_unacked_entry(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    r.config_set("stream-node-max-entries", 10)  # so '~' trimming has nodes to drop
    try:
        ids = stream_with_pending(r, k, 0, 300)
        acquire(r, k, 0, "a")
        keep = ids[150]
        acked = [i for i in ids if i != keep]
        # The caller claims everything read is done; the pending entry still bounds the trim.
        assert settle(r, k, 0, "a/1", 1, acked, _successor(ids[-1])) == 299
        first = r.xrange(k.streams[0], count=1)[0][0]
        assert first <= keep
        assert r.xlen(k.streams[0]) <= 300 - 140  # trimmed up to the node holding `keep`
        assert r.xrange(k.streams[0], min=keep, max=keep)  # and `keep` is there
        assert settle(r, k, 0, "a/1", 1, [keep], _successor(ids[-1])) == 1
        assert r.xlen(k.streams[0]) <= 10
    finally:
        r.config_set("stream-node-max-entries", 100)


def test_settle_publishes_notices_only_when_it_acks(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    ids = stream_with_pending(r, k, 0, 1)
    acquire(r, k, 0, "a")
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(k.replies("n1"))
    sub.get_message(timeout=1)
    assert settle(r, k, 0, "a/9", 9, ids, notices=[(k.replies("n1"), b"x")]) == -1
    assert settle(r, k, 0, "a/1", 1, ids, notices=[(k.replies("n1"), b"y")]) == 1
    msg = sub.get_message(timeout=2)
    assert msg is not None and msg["data"] == b"y"
    assert sub.get_message(timeout=0.2) is None
    sub.close()


def test_reply_is_fenced(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 2)
    acquire(r, k, 1, "a")
    keys = [k.leases[1], k.epochs[1]]
    assert run(r, scripts.reply, keys, ["a/1", 1, "chan", b"v"]) == 0  # no subscriber
    assert run(r, scripts.reply, keys, ["a/0", 0, "chan", b"v"]) == -1


def test_produce_deduplicates_per_recipient_and_returns_the_first_id(
    r: redis.Redis, namespace: str
) -> None:
    k = Keys(namespace, 2)
    stream = k.streams[0]

    def produce(items: list[tuple[bytes, int, bytes]]) -> list[Any]:
        keys: list[Any] = [stream] + [key for key, _, _ in items if key]
        args: list[Any] = [60, b"hdr", len(items)]
        for key, mid, data in items:
            args += [1 if key else 0, mid, data]
        out: list[Any] = run(r, scripts.produce, keys, args)
        return out

    a1, b1 = k.dedup(0, "a", "k1"), k.dedup(0, "b", "k1")
    out = produce([(a1, 10, b"\x01"), (b"", 11, b"\x02")])
    assert out[0] and out[1:] == []
    assert r.xrange(stream)[-1][1] == {b"m": b"\x92\x01\x02", b"h": b"hdr"}
    # A re-sent message: dropped, and the first one's id comes back; others still go in.
    out = produce([(a1, 20, b"\x03"), (b1, 21, b"\x04")])
    assert out[1:] == [1, b"10"]
    assert r.xrange(stream)[-1][1][b"m"] == b"\x91\x04"
    # Everything a duplicate: no entry at all.
    assert produce([(a1, 30, b"\x05")]) == [b"", 1, b"10"]
    assert r.xlen(stream) == 2
    assert 0 < r.ttl(a1) <= 60


def test_produce_builds_msgpack_headers_for_any_count(r: redis.Redis, namespace: str) -> None:
    import msgspec

    k = Keys(namespace, 1)
    for n in (1, 15, 16, 300):
        keys: list[Any] = [k.streams[0]]
        args: list[Any] = [60, b"h", n]
        for i in range(n):
            args += [0, i, msgspec.msgpack.encode(i)]
        run(r, scripts.produce, keys, args)
        frame = r.xrange(k.streams[0])[-1][1][b"m"]
        assert msgspec.msgpack.decode(frame) == list(range(n))


def test_heartbeat_lists_live_nodes_and_drops_expired_ones(r: redis.Redis, namespace: str) -> None:
    k = Keys(namespace, 1)
    out = run(r, scripts.heartbeat, [k.nodes, k.node_info("a")], ["a", 60_000, "{}"])
    assert out[1:] == [b"a"]
    run(r, scripts.heartbeat, [k.nodes, k.node_info("b")], ["b", 1, "{}"])
    import time

    time.sleep(0.01)
    out = run(r, scripts.heartbeat, [k.nodes, k.node_info("a")], ["a", 60_000, "{}"])
    assert out[1:] == [b"a"]
    run(r, scripts.leave, [k.nodes, k.node_info("a")], ["a"])
    assert r.zrange(k.nodes, 0, -1) == [] and r.get(k.node_info("a")) is None


def test_scripts_reload_after_a_script_flush(redis_server: RedisServer, namespace: str) -> None:
    """A restarted Redis forgets scripts: EVALSHA's NOSCRIPT loads them again."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        k = Keys(namespace, 1)
        await client.script_flush()
        assert await scripts.acquire(client, [k.leases[0], k.epochs[0]], ["a", 1000]) == [1, b""]
        await client.aclose()

    asyncio.run(main())


def test_assignment_is_fair_stable_and_the_same_everywhere() -> None:
    one = assignment(["a"], 64)
    assert set(one.values()) == {"a"} and len(one) == 64
    two = assignment(["b", "a"], 64)
    assert two == assignment(["a", "b"], 64)
    counts = {n: sum(1 for v in two.values() if v == n) for n in "ab"}
    assert counts == {"a": 32, "b": 32}
    three = assignment(["a", "b", "c"], 64)
    assert sorted(sum(1 for v in three.values() if v == n) for n in "abc") == [21, 21, 22]
    moved = sum(1 for p in range(64) if two[p] != three[p])
    assert moved <= 30  # c takes about its third; few others shift
