"""Dramatiq actors for the cluster benchmark's baseline: Dramatiq on the same Redis.

Imported by the benchmark (to send) and by ``python -m dramatiq bench.dramatiq_actors``
(the workers).  The broker URL comes from ``$RINGWAY_BENCH_DRAMATIQ_URL``.  Each
call writes its submit -> start latency (wall clock: Dramatiq messages carry no
monotonic stamp) as one line to ``$RINGWAY_BENCH_DRAMATIQ_OUT/<pid>.lat``, one
``os.write`` each, so a killed worker loses nothing it recorded.
"""

from __future__ import annotations

import asyncio
import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO

URL_ENV = "RINGWAY_BENCH_DRAMATIQ_URL"
OUT_ENV = "RINGWAY_BENCH_DRAMATIQ_OUT"
QUEUE = "default"
IO_DELAY_S = 0.001

broker = RedisBroker(url=os.environ.get(URL_ENV, "redis://127.0.0.1:6379/15"))
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)
_fds: dict[int, int] = {}


def _record(sent_wall: float) -> None:
    now = time.time()
    pid = os.getpid()
    fd = _fds.get(pid)
    if fd is None:
        path = os.path.join(os.environ[OUT_ENV], f"{pid}.lat")
        fd = _fds[pid] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"{now - sent_wall:.6f}\n".encode())


@dramatiq.actor(max_retries=0, queue_name=QUEUE)
def noop(sent_wall: float) -> None:
    _record(sent_wall)


@dramatiq.actor(max_retries=0, queue_name=QUEUE)
async def io_1ms(sent_wall: float) -> None:
    _record(sent_wall)
    await asyncio.sleep(IO_DELAY_S)
