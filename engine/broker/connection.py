"""The Redis client of a node: one pool, no hidden retries, and which errors are transient.

redis-py would retry a failed command by itself; for an ``XADD`` that can mean
a second entry, so its retries are off and every loop here retries on its
own terms (with backoff, and where a repeat is harmless or counted).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.backoff import backoff_s
from engine.errors import EngineClosed, EngineError, EngineStartError

T = TypeVar("T")
log = logging.getLogger("engine.broker")
MIN_REDIS = (6, 2)  # XAUTOCLAIM, XTRIM MINID, XPENDING IDLE
TRANSIENT: tuple[type[Exception], ...] = (
    RedisConnectionError,  # refused, reset, closed (a restart)
    RedisTimeoutError,
    BusyLoadingError,  # LOADING: a restarted Redis replays its AOF
    ReadOnlyError,  # a failover demoted the server we talk to
    TryAgainError,
    ConnectionError,
    OSError,
)


class BrokerError(EngineError):
    """Cluster mode cannot go on: a namespace mismatch, an unusable Redis, a lost lease."""


def redacted(url: str) -> str:
    """The broker URL without its password, for logs and stats."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


POOL_WAIT_S = 30.0  # a command waits this long for a free pooled connection


def connect(url: str, max_connections: int) -> Redis:
    """A client whose pool makes callers wait for a free connection (never "too many").

    Blocking XREADGROUPs hold a connection each while they wait, so the node uses
    one client for them (a connection per partition) and one for everything else.
    """
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=0,
        )
    except ValueError as exc:
        raise EngineStartError(f"ENGINE_BROKER={redacted(url)!r} is not usable: {exc}") from exc
    return Redis(connection_pool=pool)


async def check_server(client: Redis, url: str) -> str:
    """The server's version, or a clear start error (unreachable, too old)."""
    try:
        info = await client.info("server")
    except TRANSIENT as exc:
        raise EngineStartError(f"cannot reach Redis at {redacted(url)}: {exc}") from exc
    except ResponseError as exc:
        raise EngineStartError(f"Redis at {redacted(url)} refused INFO: {exc}") from exc
    version = str(info.get("redis_version", "0"))
    numbers = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if numbers < MIN_REDIS:
        need = ".".join(map(str, MIN_REDIS))
        raise EngineStartError(f"cluster mode needs Redis >= {need}; {redacted(url)} is {version}")
    return version


async def retrying(
    op: Callable[[], Awaitable[T]],
    what: str,
    closed: Callable[[], bool],
    on_error: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``op`` until it succeeds, backing off on transient errors; EngineClosed once closed.

    For operations whose repeat is harmless (reads, fenced scripts, idempotent
    writes) or accepted (an XADD whose reply was lost: at least once).
    """
    attempt = 0
    while True:
        if closed():
            raise EngineClosed(f"{what} abandoned: the node is stopping or the lease ended")
        try:
            return await op()
        except TRANSIENT as exc:
            if on_error is not None:
                on_error(exc)
            if attempt == 0 or attempt % 20 == 0:
                log.warning("redis unavailable during %s (retrying): %s", what, exc)
            await asyncio.sleep(backoff_s(attempt, 0.05, 1.0))
            attempt += 1
