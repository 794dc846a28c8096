"""A cluster node's HTTP over the DLQ stream: pages by cursor, whatever happens meanwhile.

The cursor holds the stream id of the last letter of its page, so a walk goes
on after it even when that letter was replayed or trimmed (`XDEL` here), and
two letters of one message id (dead-lettered, replayed, dead-lettered again)
are two positions.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from engine.client import Client
from tests.broker.cluster import Cluster
from tests.broker.redis_proc import RedisServer

LETTERS = 12


def get(url: str) -> tuple[dict[str, str], list[Any]]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return dict(resp.headers), json.loads(resp.read())


def walk(base: str, query: str) -> list[int]:
    """Every page of ``query`` by cursor; the message ids in the order seen."""
    ids: list[int] = []
    headers, page = get(f"{base}/v1/dead-letters?{query}")
    while True:
        ids += [dl["id"] for dl in page]
        if "X-Next-Cursor" not in headers:
            return ids
        headers, page = get(f"{base}/v1/dead-letters?{query}&cursor={headers['X-Next-Cursor']}")


def test_the_dlq_stream_is_walked_by_stream_position(
    tmp_path: Path, redis_server: RedisServer, namespace: str
) -> None:
    c = Cluster(tmp_path, redis_server, namespace=namespace)
    try:
        svc = c.start("a", ENGINE_RETRY_MAX_ATTEMPTS="1")
        c.wait_balanced(["a"])
        with Client(svc.url) as client:
            client.submit_many([(f"R{i}", [i, 0, {"f": 1}]) for i in range(LETTERS)])
        with c.client() as r:
            deadline = time.monotonic() + 30
            while r.xlen(c.keys.dlq) < LETTERS:
                assert time.monotonic() < deadline, r.xlen(c.keys.dlq)
                time.sleep(0.05)
            stream = [int(fields[b"id"]) for _, fields in r.xrange(c.keys.dlq)]
            entry_of = {int(fields[b"id"]): eid for eid, fields in r.xrange(c.keys.dlq)}
            base = svc.http_url
            assert walk(base, "limit=5") == stream  # oldest first, in stream order
            assert walk(base, "limit=5&newest_first=1") == stream[::-1]
            # The cursor's own letter leaves the stream between two pages.
            headers, first = get(f"{base}/v1/dead-letters?limit=5")
            assert [dl["id"] for dl in first] == stream[:5]
            r.xdel(c.keys.dlq, entry_of[stream[4]])
            _, second = get(f"{base}/v1/dead-letters?limit=5&cursor={headers['X-Next-Cursor']}")
            assert [dl["id"] for dl in second] == stream[5:10]
            headers, newest = get(f"{base}/v1/dead-letters?limit=3&newest_first=1")
            r.xdel(c.keys.dlq, entry_of[stream[-3]])
            cursor = headers["X-Next-Cursor"]
            _, older = get(f"{base}/v1/dead-letters?limit=3&newest_first=1&cursor={cursor}")
            assert [dl["id"] for dl in newest] == stream[::-1][:3]
            assert [dl["id"] for dl in older] == stream[::-1][3:6]
    finally:
        c.close()
