"""Cluster mode under faults: real node processes, a private redis-server each, a checker.

Each test starts its own ``redis-server`` (AOF on) on a free port and real
``engine serve --broker`` nodes in their own process groups, sends a paced
load through one node, injects the fault, and checks what the handlers saw
against what was acknowledged: lost, duplicated, out of order per recipient,
unexpected.  16 partitions, lease TTL 1 s, small loads: each test takes
seconds on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.broker.partitions import GROUP
from engine.client import Client
from engine.errors import RequestTimeout
from tests.broker.cluster import (
    PARTITIONS,
    TTL_S,
    Cluster,
    Load,
    owner_runs,
    partition_of,
    verdict,
    with_signal,
)
from tests.broker.redis_proc import RedisServer, running_redis
from tests.chaos.recorder import ANSWERED, DELIVERED
from tests.integration.service_proc import REPO


def cli(*args: str) -> str:
    """Run ``python -m engine ...`` and return its stdout (it must exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=REPO, env=env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_clean(res: Any) -> None:
    assert (res.lost, res.out_of_order, res.unexpected) == (0, 0, 0), res.to_dict()


def losses(svc: Any) -> list[str]:
    """The node's "lost partition ..." log lines: each is an epoch it gave up."""
    return [m for line in svc.logs() if (m := line.get("msg", "")).startswith("lost partition")]


def lease_losses(c: Cluster) -> int:
    return sum(len(losses(svc)) for svc in c.nodes.values())


def first_delivery_by(got: list[tuple[str, Any]]) -> dict[int, str]:
    first: dict[int, str] = {}
    for node, d in got:
        if d.kind in (DELIVERED, ANSWERED):
            first.setdefault(d.uid, node)
    return first


@pytest.fixture
def redis_always(tmp_path: Path) -> Any:
    with running_redis(tmp_path / "redis", appendfsync="always") as server:
        yield server


@pytest.fixture
def cluster(tmp_path: Path, redis_always: RedisServer) -> Any:
    c = Cluster(tmp_path, redis_always)
    try:
        yield c
    finally:
        c.close()


def test_1_sigkill_a_node(cluster: Cluster) -> None:
    c = cluster
    a, b = c.start("a"), c.start("b")
    c.wait_balanced(["a", "b"])
    load = Load(a.url, 12_000, rate=4000).start()
    time.sleep(1.2)
    b_parts = {p for p, o in c.owners().items() if o == "b"}
    t_kill = time.monotonic_ns()
    with_signal(b, signal.SIGKILL)
    b.proc.wait()
    while not all(c.owners().get(p) == "a" for p in b_parts):
        assert time.monotonic_ns() - t_kill < 10e9, c.owners()
        time.sleep(0.02)
    takeover_s = (time.monotonic_ns() - t_kill) / 1e9
    load.join()
    assert load.errors == []
    c.wait_delivered(load.accepted)
    got = c.deliveries()
    res = verdict(load.accepted, got)
    assert_clean(res)
    # The other node holds the dead node's partitions within the lease TTL + 1 s ...
    assert takeover_s <= TTL_S + 1.0, takeover_s
    # ... and delivers on each of them within that time too.
    first_after = {}
    for node, d in got:
        p = partition_of(d.recipient)
        if node == "a" and p in b_parts and d.t_ns > t_kill:
            first_after.setdefault(p, (d.t_ns - t_kill) / 1e9)
    assert first_after and max(first_after.values()) <= TTL_S + 1.0, first_after
    # Duplicates only from the dead node's unacknowledged window: first delivered by b.
    first = first_delivery_by(got)
    seen: set[int] = set()
    repeats = []
    for node, d in got:
        if d.uid in seen:
            repeats.append((node, d.uid))
        seen.add(d.uid)
    assert all(first[uid] == "b" and node == "a" for node, uid in repeats), repeats[:10]
    assert res.duplicated == len(repeats)
    print(f"sigkill: takeover {takeover_s:.2f}s, duplicates {res.duplicated} (all b's unacked)")


def test_2_sigstop_past_the_lease_is_fenced(cluster: Cluster) -> None:
    c = cluster
    a, b = c.start("a"), c.start("b")
    c.wait_balanced(["a", "b"])
    load = Load(a.url, 12_000, rate=4000).start()
    time.sleep(1.0)
    b_parts = {p for p, o in c.owners().items() if o == "b"}
    with_signal(b, signal.SIGSTOP)
    t_stop = time.monotonic_ns()
    while not all(c.owners().get(p) == "a" for p in b_parts):
        assert time.monotonic_ns() - t_stop < 10e9
        time.sleep(0.02)
    time.sleep(0.5)  # a delivers b's partitions for a while: b's rings still hold them
    with_signal(b, signal.SIGCONT)
    load.join()
    assert load.errors == []
    c.wait_delivered(load.accepted)
    c.wait_balanced(["a", "b"])  # b is back and got its share again
    got = c.deliveries()
    assert_clean(verdict(load.accepted, got))
    runs, epochs = owner_runs(got), c.epochs()
    assert all(runs[p] <= epochs[p] for p in runs), (runs, epochs)  # one owner at a time
    assert losses(b), "b never noticed it was fenced"


def test_3_redis_killed_and_restarted_loses_nothing_acked(
    cluster: Cluster, redis_always: RedisServer
) -> None:
    c = cluster
    a, _ = c.start("a"), c.start("b")
    c.wait_balanced(["a", "b"])
    load = Load(a.url, 10_000, rate=4000).start()
    time.sleep(1.0)
    redis_always.kill(signal.SIGKILL)
    time.sleep(0.3)
    redis_always.start()  # same port and directory: the AOF comes back
    load.join()
    assert load.errors == []
    c.wait_delivered(load.accepted)
    res = verdict(load.accepted, c.deliveries())
    assert_clean(res)
    c.wait_balanced(["a", "b"])  # both reconnected and hold their shares
    print(f"redis restart: {res.duplicated} duplicates, {lease_losses(c)} leases lost")


def test_4_node_join_and_leave_under_load(cluster: Cluster) -> None:
    c = cluster
    a = c.start("a")
    c.wait_balanced(["a"])
    load = Load(a.url, 16_000, rate=4000).start()
    time.sleep(0.5)
    b = c.start("b")
    c.wait_balanced(["a", "b"])
    time.sleep(0.5)
    assert b.stop() == 0  # SIGTERM: b settles, acks and gives its partitions back
    assert not [x for x in b.logs() if x.get("msg", "").startswith("partitions not settled")]
    c.wait_balanced(["a"])
    load.join()
    assert load.errors == []
    c.wait_delivered(load.accepted)
    got = c.deliveries()
    res = verdict(load.accepted, got)
    assert_clean(res)
    assert any(node == "b" for node, _ in got), "b never delivered anything"
    runs, epochs = owner_runs(got), c.epochs()
    assert all(runs[p] <= epochs[p] for p in runs), (runs, epochs)
    if lease_losses(c) == 0:  # graceful handovers repeat nothing
        assert res.duplicated == 0, res.to_dict()


def test_5_poison_message_reaches_the_dlq_stream(cluster: Cluster) -> None:
    c = cluster
    a = c.start("a", ENGINE_POISON_MAX_CRASHES="2")
    c.wait_balanced(["a"])
    with Client(a.url) as client:
        ids = client.submit_many([(f"R{i % 10}", [i, i // 10]) for i in range(500)])
        [poison_id] = client.submit_many([("Poison", [10_000, 0, {"p": 1}])])
        client.submit_many([(f"R{i % 10}", [i, i // 10]) for i in range(500, 1000)])
    r = c.client()
    deadline = time.monotonic() + 60
    while r.xlen(c.keys.dlq) < 1:
        assert time.monotonic() < deadline, "no dead letter"
        time.sleep(0.1)
    [(_, fields)] = r.xrange(c.keys.dlq)
    assert fields[b"reason"] == b"worker_crash" and int(fields[b"id"]) == poison_id
    assert fields[b"recipient"] == b"Poison"
    expected = {i: (f"R{i % 10}", i // 10) for i in range(1000)}
    c.wait_delivered(expected)
    assert_clean(verdict(expected, c.deliveries()))
    letters = json.loads(cli("dlq", "list", "--json", "--url", a.http_url))  # from the stream
    assert [(x["id"], x["reason"]) for x in letters] == [(poison_id, "worker_crash")]
    table = cli("stats", "--url", a.http_url)
    assert "cluster rw on redis://" in table and "partitions" in table
    stats = json.loads(cli("stats", "--json", "--url", a.http_url))["cluster"]
    assert stats["dlq_length"] == 1 and len(stats["partition_table"]) == PARTITIONS
    assert [n["node"] for n in stats["nodes"]] == ["a"]
    assert len(ids) == 500
    assert r.xpending(c.keys.streams[partition_of("Poison")], GROUP)["pending"] == 0


def test_6_trimming_never_removes_an_unacked_entry(cluster: Cluster) -> None:
    c = cluster
    r = c.client()
    r.config_set("stream-node-max-entries", 16)  # '~' trims whole nodes: make them small
    a = c.start("a")
    c.wait_balanced(["a"])
    samples: list[tuple[int, int]] = []  # (max stream length, violations) per sample
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pipe = r.pipeline(transaction=False)
            for p in range(PARTITIONS):
                pipe.xpending(c.keys.streams[p], GROUP)
                pipe.xrange(c.keys.streams[p], count=1)
                pipe.xlen(c.keys.streams[p])
            out = pipe.execute()
            longest, bad = 0, 0
            for p in range(PARTITIONS):
                pending, first, length = out[3 * p : 3 * p + 3]
                longest = max(longest, length)
                if pending["pending"] and (not first or first[0][0] > pending["min"]):
                    bad += 1  # the oldest pending entry is gone from the stream
            samples.append((longest, bad))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = Load(a.url, 6_000, rate=4000, frame=8).start()  # small frames: many entries
    load.join()
    c.wait_delivered(load.accepted)
    stop.set()
    sampler.join(10)
    assert_clean(verdict(load.accepted, c.deliveries()))
    added = sum(int(r.xinfo_stream(k)["entries-added"]) for k in c.keys.streams)
    assert added > 100 * PARTITIONS  # enough entries for the bound below to mean something
    assert sum(bad for _, bad in samples) == 0
    longest = max(length for length, _ in samples)
    assert longest <= 120, longest  # window (32 entries) + unacked + '~' slack of small nodes
    assert max(r.xlen(k) for k in c.keys.streams) <= 40
    print(f"trimming: {added} entries added, longest stream {longest} entries")


def test_7_cross_node_request_and_dedup(tmp_path: Path, redis_always: RedisServer) -> None:
    c = Cluster(tmp_path, redis_always, handler="tests.chaos.handlers:answer")
    try:
        a, b = c.start("a"), c.start("b")
        owners = c.wait_balanced(["a", "b"])
        on_b = next(f"Q{i}" for i in range(1000) if owners[partition_of(f"Q{i}")] == "b")
        with Client(a.url) as client:
            reply = client.request(on_b, [1, 0], timeout=10)
            assert reply[:3] == [1, 0, on_b]
            answered = [n for n, d in c.deliveries() if d.uid == 1]
            assert answered == ["b"]  # b owns it, a asked, the answer came back to a
            first = client.submit_many([("D", [2, 0])], dedup_key="order-1")
            again = client.submit_many([("D", [2, 0])], dedup_key="order-1")  # a lost ack
            assert again == first
        with Client(b.url) as client_b:
            assert client_b.submit_many([("D", [2, 0])], dedup_key="order-1") == first
        time.sleep(0.5)
        assert [d.uid for _, d in c.deliveries()].count(2) == 1
        # A request to a recipient whose owner dies times out cleanly ...
        with_signal(b, signal.SIGKILL)
        b.proc.wait()
        with Client(a.url) as client:
            started = time.monotonic()
            with pytest.raises(RequestTimeout):
                client.request(on_b, [3, 0], timeout=0.3)
            assert time.monotonic() - started < 3
            # ... and works again once the survivor holds the partition.
            while c.owners().get(partition_of(on_b)) != "a":
                time.sleep(0.05)
            assert client.request(on_b, [4, 0], timeout=10)[:2] == [4, 0]
    finally:
        c.close()
