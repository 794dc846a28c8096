"""Cluster mode in one process: ``Engine(handler, Config(broker=...))`` is a node.

Against a private redis-server; each test has its own namespace.  The fault
scenarios with several node processes are in test_cluster_faults.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from engine import Config, ConfigError, Engine, RequestTimeout
from engine.broker import scripts
from engine.broker.partitions import GROUP, Keys
from engine.core.sharding import stable_shard
from ipc.codec import Message, encode_batch
from ipc.shm import list_segments
from tests.broker.handlers import OUT_ENV, read
from tests.broker.redis_proc import RedisServer

HANDLER = "tests.broker.handlers:record"


def node_config(url: str, namespace: str, **extra: Any) -> Config:
    base: dict[str, Any] = {
        "broker": url,
        "namespace": namespace,
        "partitions": 8,
        "workers": 2,
        "lease_ttl_s": 1.0,
        "shutdown_timeout_s": 10.0,
    }
    return Config.from_env({}, **(base | extra))


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    monkeypatch.setenv(OUT_ENV, str(d))
    return d


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_partitions_are_fixed_for_a_namespace(redis_server: RedisServer, namespace: str) -> None:
    async def main() -> None:
        async with Engine(None, node_config(redis_server.url, namespace, sink="null")):
            pass
        eng = Engine(None, node_config(redis_server.url, namespace, sink="null", partitions=4))
        with pytest.raises(ConfigError, match="ENGINE_PARTITIONS=4 but namespace"):
            await eng.start()

    asyncio.run(main())
    mine = f"ringway-{os.getpid()}-"  # other processes on this machine have their own
    assert list_segments(mine) == []  # the failed start left nothing in /dev/shm


def test_messages_delivered_in_order_with_cluster_ids_and_stats(
    redis_server: RedisServer, namespace: str, out: Path
) -> None:
    n = 3000
    recipients = [f"R{i}" for i in range(20)]

    async def main() -> dict[str, Any]:
        async with Engine(HANDLER, node_config(redis_server.url, namespace)) as eng:
            items = [(recipients[i % 20], {"i": i}) for i in range(n)]
            ids = await eng.submit_many(items[: n // 2])
            ids += [await eng.submit(r, p) for r, p in items[n // 2 : n // 2 + 10]]
            ids += await eng.submit_many(items[n // 2 + 10 :])
            await until(lambda: len(read(out)) >= n)
            assert len(set(ids)) == n and min(ids) >= 1 << 40  # node number in the high bits
            stats = eng.stats()
            return {"ids": ids, "stats": stats}

    got = asyncio.run(main())
    seen = read(out)
    assert sorted(body["i"] for _, body, _ in seen) == list(range(n))
    assert sorted(mid for _, _, mid in seen) == sorted(got["ids"])  # the ids submit returned
    for r in recipients:
        mine = [body["i"] for rec, body, _ in seen if rec == r]
        assert mine == sorted(mine)
    cluster = got["stats"]["cluster"]
    assert cluster["partitions"] == 8 and sorted(cluster["leases"]["owned"]) == list(range(8))
    assert cluster["producer"]["accepted"] == n


def test_request_settled_submit_and_dedup(
    redis_server: RedisServer, namespace: str, out: Path
) -> None:
    async def main() -> None:
        async with Engine(HANDLER, node_config(redis_server.url, namespace)) as eng:
            assert await eng.request("Q1", {"q": 1}, timeout=10) == {"q": 1}
            ids = await eng.submit_many([("S1", {"s": 1}), ("S2", {"s": 2})], settled=True)
            assert {(r, b["s"]) for r, b, _ in read(out) if "s" in b} == {("S1", 1), ("S2", 2)}
            assert len(ids) == 2
            first = await eng.submit("D1", {"d": 1}, dedup_key="order-7")
            again = await eng.submit("D1", {"d": 1}, dedup_key="order-7")
            other = await eng.submit("D2", {"d": 2}, dedup_key="order-7")  # another recipient
            assert again == first and other != first
            await until(lambda: sum(1 for _, b, _ in read(out) if "d" in b) >= 2)
            await asyncio.sleep(0.3)
            assert sorted(b["d"] for _, b, _ in read(out) if "d" in b) == [1, 2]
            with pytest.raises(RequestTimeout):
                await _timeout_request(eng)

    asyncio.run(main())


def test_a_long_retry_stays_in_the_ring_in_cluster_mode(
    redis_server: RedisServer, namespace: str, out: Path
) -> None:
    """ENGINE_MAX_RETRY_HOLD_S is ignored in cluster mode: an entry is acked once its
    messages settle, so a waiting message must not leave the node's ring (README)."""

    async def main() -> dict[str, Any]:
        cfg = node_config(redis_server.url, namespace, max_retry_hold_s=0.1)
        async with Engine(HANDLER, cfg) as eng:
            await eng.submit_many([("W", {"retry": 0.5, "n": 0}), ("W", {"n": 1})])
            await until(lambda: len(read(out)) >= 2)
            return eng.stats()

    stats = asyncio.run(main())
    assert [b["n"] for _, b, _ in read(out)] == [0, 1]
    assert stats["deferrals"] == 0


async def _timeout_request(eng: Engine) -> Any:
    """A request whose partition nobody owns (fence closed by hand) times out cleanly."""
    assert eng.cluster is not None
    node: Any = eng.cluster
    p = stable_shard("Q3", 8)
    node.balancer.acquiring = False
    node.balancer.lose(node.balancer.leases[p], "test: partition taken away")
    try:
        return await eng.request("Q3", {"q": 3}, timeout=0.5)
    finally:
        node.balancer.acquiring = True


def test_dead_letters_go_to_the_dlq_stream_and_replay(
    redis_server: RedisServer, namespace: str, out: Path, r: redis.Redis
) -> None:
    (out / "reject_on").touch()
    k = Keys(namespace, 8)

    async def main() -> None:
        async with Engine(HANDLER, node_config(redis_server.url, namespace)) as eng:
            assert eng.cluster is not None
            await eng.submit("X", {"reject": 1})
            await eng.submit("Y", {"ok": 1})
            await until(lambda: r.xlen(k.dlq) == 1)
            [(position, letter)] = await eng.cluster.dead_letters()
            eid = r.xrange(k.dlq)[0][0]
            assert position == tuple(map(int, eid.split(b"-")))  # the stream id, for cursors
            assert (letter.recipient, letter.reason, letter.payload) == (
                "X",
                "rejected",
                {"reject": 1},
            )
            (out / "reject_on").unlink()
            assert (await eng.replay_dead_letters()).replayed == 1
            await until(lambda: any(rec == "X" for rec, _, _ in read(out)))
            assert r.xlen(k.dlq) == 0

    asyncio.run(main())


def test_an_entry_delivered_too_often_goes_to_the_dlq(
    redis_server: RedisServer, namespace: str, out: Path, r: redis.Redis
) -> None:
    """Owners that died holding an entry: Redis's delivery count caps it (worker_crash)."""
    k = Keys(namespace, 8)
    p = stable_shard("P", 8)
    r.hset(k.meta, "partitions", 8)
    r.xgroup_create(k.streams[p], GROUP, id="0", mkstream=True)
    poison = Message(id=77, recipient="P", payload=msgspec.Raw(msgspec.msgpack.encode({"x": 1})))
    head = msgspec.msgpack.encode(["dead-node", time.time_ns(), time.monotonic_ns(), False])
    r.xadd(k.streams[p], {"m": encode_batch([poison]), "h": head})
    r.xreadgroup(GROUP, k.consumers[p], {k.streams[p]: ">"})
    for _ in range(2):  # two more owners read it as pending and died
        r.xreadgroup(GROUP, k.consumers[p], {k.streams[p]: "0"})

    async def main() -> None:
        async with Engine(HANDLER, node_config(redis_server.url, namespace)) as eng:
            await until(lambda: r.xlen(k.dlq) == 1)
            await eng.submit("P", {"after": 1})
            await until(lambda: any(b == {"after": 1} for _, b, _ in read(out)))

    asyncio.run(main())
    fields = r.xrange(k.dlq)[0][1]
    assert fields[b"reason"] == b"worker_crash" and fields[b"id"] == b"77"
    assert b"delivered 3 times" in fields[b"error"]
    assert all(b != {"x": 1} for _, b, _ in read(out))
    assert r.xpending(k.streams[p], GROUP)["pending"] == 0


def test_a_read_sent_before_the_lease_passed_on_takes_nothing_from_the_successor(
    redis_server: RedisServer, namespace: str, out: Path, r: redis.Redis
) -> None:
    """A node's read in flight when another node takes its partition must not take new entries.

    Another owner ("other", played by the test) takes the lease the way a node
    does once this node's lease has run out, reads what is pending, and goes
    live.  An entry added then must reach the successor's live read: a group read
    of the old owner that was already waiting in Redis (a blocking XREADGROUP,
    as a paused node leaves behind) would move it into the pending list, where
    the successor never looks again, and deliver it beside the new owner.
    """
    k = Keys(namespace, 8)
    p = stable_shard("P", 8)

    async def main() -> None:
        async with Engine(HANDLER, node_config(redis_server.url, namespace)) as eng:
            await eng.submit("P", {"n": 0})
            await until(lambda: any(b == {"n": 0} for _, b, _ in read(out)))
            await asyncio.sleep(0.3)  # the node's consumer of p is live (waiting for entries)
            take = r.pipeline(transaction=True)
            take.delete(k.leases[p])
            take.eval(scripts.ACQUIRE, 2, k.leases[p], k.epochs[p], "other", 60_000)
            epoch = int(take.execute()[1][0])
            assert epoch > 1
            r.xreadgroup(GROUP, k.consumers[p], {k.streams[p]: "0"})  # the successor's pending read
            body = msgspec.Raw(msgspec.msgpack.encode({"n": 1}))
            msg = Message(id=78, recipient="P", payload=body)
            head = msgspec.msgpack.encode(["other", time.time_ns(), time.monotonic_ns(), False])
            eid = r.xadd(k.streams[p], {"m": encode_batch([msg]), "h": head})
            await asyncio.sleep(0.5)  # what the node does with it, it has done by now
            live = r.xreadgroup(GROUP, k.consumers[p], {k.streams[p]: ">"})
            assert [e[0] for _, entries in live for e in entries] == [eid], live

    asyncio.run(main())
    assert all(b != {"n": 1} for _, b, _ in read(out))  # the old owner never delivered it
