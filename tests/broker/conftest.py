"""Fixtures of the cluster-mode tests: a private redis-server, a fresh namespace per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis

from tests.broker.redis_proc import RedisServer, running_redis

_names = itertools.count(1)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server per module for the tests that do not kill it (each has its own namespace).

    Not per session: other suites check that no child process outlives their tests.
    """
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"t{next(_names)}"


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
