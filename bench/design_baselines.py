"""Baselines beyond the sequential broker: the original multi-worker design and process pools.

- ``AsyncioDesignBroker``: the original design's multi-worker shape, in one
  process: 5 consumer coroutines share one asyncio.PriorityQueue, each takes a
  batch of up to 20 and delivers it with ``asyncio.gather`` under its own
  semaphore of 10.
- ``measure_mpqueue_workers``: one ``multiprocessing.Queue`` feeding N
  processes, one put per chunk of encoded messages (the ring's framing).
- ``measure_process_pool``: ``concurrent.futures.ProcessPoolExecutor.map`` of
  the handler over chunks.
- ``*_kill`` variants SIGKILL one process mid-run and count what was lost
  (neither pool redelivers; the recovery group compares that with Ringway).

Timed like the engine: from the first submit (messages built and encoded
inside the clock, as the engine's dispatcher does) to the last message handled;
process start-up is outside the clock, as engine start-up is.  The process
baselines use the standard library's ``multiprocessing`` (not ``multiprocess``,
whose pure-Python dill pickler would slow them).  An ``async def`` handler is
awaited one message at a time in each process: parallelism there is the
process count.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import msgspec

from bench.engine_baselines import BaselineRun, Item, PriorityQueueBroker
from engine.stress.ringdemo import fork_safe_context
from ipc.codec import Message, decode_batch, encode_batch

Handler = Callable[[Message], Any]
ASYNCIO_CONSUMERS = 5  # the original design's numbers: 5 workers,
ASYNCIO_BATCH = 20  # batches of up to 20,
ASYNCIO_PARALLELISM = 10  # each delivered with at most 10 in flight
RESULT_TIMEOUT_S = 120.0  # far beyond a healthy run; a process baseline this slow is a hang
# After a SIGKILL, survivors silent this long count as hung (a healthy one acks a chunk in ms).
KILLED_IDLE_S = 1.0
WARM_S = 0.05


class KillRun(msgspec.Struct, frozen=True):
    """A baseline run with one process SIGKILLed mid-run."""

    messages: int
    handled: int  # confirmed handled (acknowledged chunks)
    lost: int  # messages - handled: never confirmed, and nothing redelivers them
    hung: bool  # the survivors never finished (the dead process held a queue lock)
    seconds: float
    msgs_per_s: float  # handled / seconds


class AsyncioDesignBroker(PriorityQueueBroker):
    """The original multi-worker design: 5 consumers, batches of 20, parallelism 10 each."""

    CONSUMERS = ASYNCIO_CONSUMERS

    async def _consume(self) -> None:
        get, get_nowait, done = self.queue.get, self.queue.get_nowait, self.queue.task_done
        handler = self.handler
        limit = asyncio.Semaphore(ASYNCIO_PARALLELISM)
        is_async = inspect.iscoroutinefunction(handler)

        async def deliver(msg: Message) -> None:
            async with limit:
                if is_async:
                    await handler(msg)
                else:
                    handler(msg)

        while True:
            batch = [(await get())[2]]
            with contextlib.suppress(asyncio.QueueEmpty):
                while len(batch) < ASYNCIO_BATCH:
                    batch.append(get_nowait()[2])
            await asyncio.gather(*(deliver(m) for m in batch), return_exceptions=True)
            self.handled += len(batch)
            for _ in batch:
                done()


# -- process baselines --------------------------------------------------------------


def encoded_chunks(items: Sequence[Item], chunk: int) -> Iterator[bytes]:
    """The items as Messages (as the engine builds them), encoded ``chunk`` to a frame."""
    now = time.monotonic_ns
    for first in range(0, len(items), chunk):
        yield encode_batch(
            [
                Message(first + i, recipient, payload=payload, created_ns=now())
                for i, (recipient, payload) in enumerate(items[first : first + chunk])
            ]
        )


async def _await_each(handler: Handler, msgs: list[Message]) -> None:
    for msg in msgs:
        await handler(msg)


def deliver_chunk(handler: Handler, chunk: bytes) -> int:
    """Decode a chunk and call the handler on each message in order; returns the count."""
    msgs = decode_batch(chunk)
    if inspect.iscoroutinefunction(handler):
        asyncio.run(_await_each(handler, msgs))
    else:
        for msg in msgs:
            handler(msg)
    return len(msgs)


def _queue_consumer(handler: Handler, inbox: Any, acks: Any, ack_each: bool) -> None:
    """Take chunks until the None sentinel; report the total (and, if asked, every chunk)."""
    acks.put(("ready", 0))
    total = 0
    while (chunk := inbox.get()) is not None:
        n = deliver_chunk(handler, chunk)
        total += n
        if ack_each:
            acks.put(("chunk", n))
    acks.put(("done", total))


def _start_consumers(
    handler: Handler, processes: int, ack_each: bool
) -> tuple[list[Any], Any, Any]:
    ctx = fork_safe_context(multiprocessing)
    inbox, acks = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_queue_consumer, args=(handler, inbox, acks, ack_each), daemon=True)
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every consumer is up: process start-up stays outside the clock
        acks.get(timeout=RESULT_TIMEOUT_S)
    return procs, inbox, acks


def _stop_consumers(procs: list[Any], inbox: Any, acks: Any) -> None:
    for p in procs:
        p.join(1)
        if p.exitcode is None:
            p.kill()
            p.join(5)
    for q in (inbox, acks):
        q.cancel_join_thread()  # a queue with undelivered data must not block our exit
        q.close()


def _feed(inbox: Any, items: Sequence[Item], chunk: int, consumers: int) -> None:
    """Every chunk, then one stop sentinel per consumer."""
    for frame in encoded_chunks(items, chunk):
        inbox.put(frame)
    for _ in range(consumers):
        inbox.put(None)


def measure_mpqueue_workers(
    handler: Handler, items: Sequence[Item], processes: int, chunk: int = 256
) -> BaselineRun:
    """``processes`` consumers fed by one multiprocessing.Queue, one put per encoded chunk."""
    procs, inbox, acks = _start_consumers(handler, processes, ack_each=False)
    try:
        t0 = time.perf_counter()
        _feed(inbox, items, chunk, len(procs))
        handled = sum(acks.get(timeout=RESULT_TIMEOUT_S)[1] for _ in procs)
        seconds = time.perf_counter() - t0
    finally:
        _stop_consumers(procs, inbox, acks)
    return BaselineRun(len(items), handled, seconds, len(items) / seconds)


def _warm(_: int) -> int:
    time.sleep(WARM_S)  # held long enough that each process takes one
    return os.getpid()


def _pool(processes: int) -> ProcessPoolExecutor:
    """A pool with every process started (start-up outside the clock, as for the engine).

    Submitted together, the warm-up tasks find no idle process, so the pool starts
    all of them, also under "spawn", where it starts processes only on demand.
    """
    pool = ProcessPoolExecutor(processes, mp_context=fork_safe_context(multiprocessing))
    list(pool.map(_warm, range(processes)))
    return pool


def measure_process_pool(
    handler: Handler, items: Sequence[Item], processes: int, chunk: int = 256
) -> BaselineRun:
    """ProcessPoolExecutor.map of the handler over encoded chunks (pickled to the pool)."""
    with _pool(processes) as pool:
        t0 = time.perf_counter()
        frames = encoded_chunks(items, chunk)
        handled = sum(pool.map(deliver_chunk, [handler] * -(-len(items) // chunk), frames))
        seconds = time.perf_counter() - t0
    return BaselineRun(len(items), handled, seconds, len(items) / seconds)


# -- the same, with one process SIGKILLed mid-run -------------------------------------------


def measure_mpqueue_kill(
    handler: Handler, items: Sequence[Item], processes: int, kill_at: float, chunk: int = 256
) -> KillRun:
    """Kill one consumer once ``kill_at`` of the messages are confirmed; count the lost."""
    procs, inbox, acks = _start_consumers(handler, processes, ack_each=True)
    n = len(items)
    handled, finished, killed = 0, 0, False
    try:
        t0 = time.perf_counter()
        _feed(inbox, items, chunk, len(procs))
        while finished < processes - killed:
            try:
                kind, count = acks.get(timeout=KILLED_IDLE_S if killed else RESULT_TIMEOUT_S)
            except queue.Empty:
                break  # the survivors are stuck: the dead consumer held the queue's lock
            if kind == "chunk":
                handled += count
            else:
                finished += 1
            if not killed and handled >= kill_at * n:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed = True
        seconds = time.perf_counter() - t0
    finally:
        _stop_consumers(procs, inbox, acks)
    hung = finished < processes - killed
    return KillRun(n, handled, n - handled, hung, seconds, handled / seconds)


def measure_pool_kill(
    handler: Handler, items: Sequence[Item], processes: int, kill_at: float, chunk: int = 256
) -> KillRun:
    """Kill one pool process once ``kill_at`` of the messages are done: the pool breaks."""
    n = len(items)
    handled, killed = 0, False
    with _pool(processes) as pool:
        # The pool keeps its processes in a private dict; there is no public way to name one.
        victim = next(iter(pool._processes))
        t0 = time.perf_counter()
        pending = {pool.submit(deliver_chunk, handler, f) for f in encoded_chunks(items, chunk)}
        while pending:
            done, pending = wait(pending, RESULT_TIMEOUT_S, return_when=FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                if fut.exception() is None:
                    handled += fut.result()
            if not killed and handled >= kill_at * n:
                os.kill(victim, signal.SIGKILL)
                killed = True
        seconds = time.perf_counter() - t0
    return KillRun(n, handled, n - handled, False, seconds, handled / seconds)
