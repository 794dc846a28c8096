"""`Engine`: the embedded API.  Owns the shared memory, the dispatcher and the monitor.

``async with Engine(handler, config) as eng`` runs the dispatcher on the
caller's event loop; ``with Engine(handler, config) as eng`` runs it on a
private uvloop thread and returns a blocking facade with the same method
names.  The engine's process creates every segment and unlinks them all on
exit, also after an exception or a crash of the monitor or a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import msgspec
import psutil

from engine.backoff import backoff_s
from engine.config import Config
from engine.core.cluster import Cluster
from engine.core.dispatcher import Dispatcher
from engine.core.stats import build_stats
from engine.errors import EngineClosed, EngineError, EngineStartError, RequestTimeout
from engine.procutil import context
from ipc.codec import Kind, Message, Priority
from ipc.control import (
    Command,
    MonitorReport,
    WorkerFailed,
    WorkerReady,
    WorkerRecycled,
    recv_control,
    send_control,
)
from ipc.records import DeadLetter
from ipc.shard import SLOT_PID, EngineWakeups, ShardMemory, shard_bytes
from ipc.shm import check_shm_space, new_engine_prefix, sweep_stale_segments

T = TypeVar("T")
Handler = str | Callable[[Message], Any] | None
MONITOR_RESTART_LIMIT = 5
log = logging.getLogger("engine")
SUBMIT_CHUNK = 4096  # submit_many validates and queues this many at a time


class Engine:
    """A running Ringway engine: dispatcher here, a monitor process, N worker processes."""

    def __init__(self, handler: Handler = None, config: Config | None = None) -> None:
        self.handler = handler
        self.config = config if config is not None else Config.from_env()
        self.shards: list[ShardMemory] = []
        self.wakeups: EngineWakeups | None = None
        self.dispatcher: Dispatcher | None = None
        self.monitor: Any = None
        self.monitor_conn: Any = None
        self.monitor_restarts = 0
        self.report: MonitorReport | None = None
        self.ready_workers: set[int] = set()
        self._boot: asyncio.Future[None] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self.monitor_error = ""
        self.cluster: Cluster | None = None  # cluster mode (ENGINE_BROKER): the node

    # -- start / stop ------------------------------------------------------------
    async def start(self) -> None:
        if self.config.broker and self.cluster is None:
            from engine.core.cluster import load_cluster

            # Before the monitor starts: the node wraps the workers' sink in its lease fence.
            self.cluster = load_cluster(self)
        cfg = self.config
        sweep_stale_segments()
        check_shm_space(cfg.workers * shard_bytes(cfg.ring_bytes, cfg.return_ring_bytes))
        prefix = new_engine_prefix()
        self.wakeups = EngineWakeups.create()
        try:
            for i in range(cfg.workers):
                self.shards.append(
                    ShardMemory.create(
                        prefix, i, self.wakeups, cfg.ring_bytes, cfg.return_ring_bytes
                    )
                )
            self.dispatcher = Dispatcher(cfg, self.shards, self.wakeups)
            await self._start_monitor()
            if self.cluster is not None:
                await self.cluster.start()
        except BaseException:
            if self.cluster is not None:
                await self.cluster.stop(0, fast=True)
            await self._teardown()
            raise

    async def _start_monitor(self) -> None:
        from engine.core.monitor import monitor_main

        loop = asyncio.get_running_loop()
        ctx = context(self.config.start_method)
        here, there = ctx.Pipe(duplex=True)
        self.ready_workers.clear()
        self._boot = loop.create_future()
        proc = ctx.Process(
            target=monitor_main,
            args=([s.spec for s in self.shards], self.config, self.handler, there, os.getpid()),
            name="ringway-monitor",
        )
        proc.start()
        there.close()
        self.monitor, self.monitor_conn = proc, here
        loop.add_reader(here.fileno(), self._on_monitor_message)
        loop.add_reader(proc.sentinel, self._on_monitor_exit)
        await self._boot

    def _on_monitor_message(self) -> bool:
        """Handle one message from the monitor; False once the pipe is closed."""
        try:
            msg = recv_control(self.monitor_conn)
        except (EOFError, OSError):
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(self.monitor_conn.fileno())
            return False
        boot = self._boot
        if isinstance(msg, MonitorReport):
            self.report = msg
        elif isinstance(msg, WorkerReady):
            self.ready_workers.add(msg.worker)
            if boot is not None and not boot.done() and len(self.ready_workers) == len(self.shards):
                boot.set_result(None)
        elif isinstance(msg, WorkerFailed):
            if boot is not None and not boot.done():
                boot.set_exception(
                    EngineStartError(f"worker {msg.worker} failed to start: {msg.error}")
                )
            else:
                log.warning("worker %d (pid %d): %s", msg.worker, msg.pid, msg.error)
        elif isinstance(msg, WorkerRecycled):
            log.info("restarting worker %d (pid %d): %s", msg.worker, msg.pid, msg.reason)
        return True

    def reload(self) -> None:
        """Restart the workers one at a time, gracefully (re-imports a ``module:function`` handler).

        Each worker stops fetching, settles what it holds and exits; its successor
        resumes at the ring's committed position, so nothing is lost or repeated.
        """
        self._dispatcher()
        if self.monitor_conn is None:
            raise EngineClosed("the monitor is not running")
        send_control(self.monitor_conn, Command(op="reload"))

    def _on_monitor_exit(self) -> None:
        loop = asyncio.get_running_loop()
        proc = self.monitor
        loop.remove_reader(proc.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(self.monitor_conn.fileno())
        proc.join(1)  # the sentinel fired: it has exited, reap it
        with contextlib.suppress(OSError, EOFError):
            # A WorkerFailed may still be in the pipe; at EOF poll() stays true, so stop there.
            while self.monitor_conn.poll() and self._on_monitor_message():
                pass
        boot = self._boot
        if boot is not None and not boot.done():
            boot.set_exception(
                EngineStartError(
                    f"the monitor exited with code {proc.exitcode} before the workers were ready"
                )
            )
            return
        if self._stopping:
            return
        self.monitor_restarts += 1
        if self.monitor_restarts > MONITOR_RESTART_LIMIT:
            self.monitor_error = f"monitor died {self.monitor_restarts} times; not restarted"
            log.error("%s", self.monitor_error)
            return  # stats() reports it; the rings keep every message for a restart
        self._restart_task = loop.create_task(self._restart_monitor())

    async def _restart_monitor(self) -> None:
        """Start a new monitor once every worker of the dead one is gone (one consumer per ring)."""
        self.monitor_conn.close()
        pids = [int(s.slot_idx[SLOT_PID]) for s in self.shards]
        deadline = asyncio.get_running_loop().time() + 10
        while any(_running(pid) for pid in pids):
            if asyncio.get_running_loop().time() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.01)
        try:
            await self._start_monitor()
        except Exception as exc:
            # Never silently run without a monitor: record why, and try again later.
            self.monitor_error = f"monitor restart {self.monitor_restarts} failed: {exc}"
            log.exception("%s", self.monitor_error)
            if self._stopping or self.monitor_restarts >= MONITOR_RESTART_LIMIT:
                return
            await asyncio.sleep(backoff_s(self.monitor_restarts, 0.2, 5.0, jitter="none"))
            self.monitor_restarts += 1
            await self._restart_monitor()
        else:
            self.monitor_error = ""

    async def stop(self, timeout: float | None = None, *, fast: bool = False) -> None:
        """Stop accepting, drain within the shutdown timeout, stop processes, unlink memory.

        ``fast`` skips the drain and kills the workers instead of letting them
        settle what they hold (a second Ctrl-C); unsettled messages are then lost.
        """
        if self.dispatcher is None or self._stopping:
            return
        wait = self.config.shutdown_timeout_s if timeout is None else timeout
        try:
            if self.cluster is not None:
                # Settle and ack what the node holds, give its partitions back, leave.
                await self.cluster.stop(wait, fast)
            if not fast and self.monitor is not None and self.monitor.exitcode is None:
                await self.dispatcher.drain(wait)
        finally:
            self.dispatcher.closed = True
            await self._teardown(fast)

    async def _teardown(self, fast: bool = False) -> None:
        """Stop the monitor (and so the workers), then release every segment and fd."""
        self._stopping = True
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        try:
            await self._stop_monitor(fast)
        finally:
            if self.dispatcher is not None:
                self.dispatcher.close()
                # Let cancelled flushes unwind before their rings are unmapped below.
                await asyncio.gather(*self.dispatcher.tasks, return_exceptions=True)
            for shard in self.shards:
                shard.close()
                shard.close_wakeups()
            self.shards.clear()
            if self.wakeups is not None:
                self.wakeups.close()
                self.wakeups = None

    async def _stop_monitor(self, fast: bool = False) -> None:
        proc, conn = self.monitor, self.monitor_conn
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        for fd in (proc.sentinel, conn.fileno()):
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(fd)
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                send_control(conn, Command(op="stop", arg="fast" if fast else ""))
            await loop.run_in_executor(None, proc.join, self.config.shutdown_timeout_s + 10)
            if proc.exitcode is None:
                proc.kill()
                await loop.run_in_executor(None, proc.join, 10)
        with contextlib.suppress(OSError, EOFError):
            while conn.poll():
                msg = recv_control(conn)
                if isinstance(msg, MonitorReport):
                    self.report = msg
        conn.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the API -----------------------------------------------------------------
    def _dispatcher(self) -> Dispatcher:
        if self.dispatcher is None or self.dispatcher.closed:
            raise EngineClosed("the engine is not running")
        return self.dispatcher

    async def submit(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message; waits while its lane is full.  Returns the message id."""
        d = self._dispatcher()
        out = d.build(recipient, payload, **options)
        if self.cluster is not None:
            ids, _ = await self.cluster.send([out], options.get("dedup_key", ""), False)
            return ids[0]
        await d.enqueue(out)
        return out[0]

    def submit_nowait(self, recipient: str, payload: Any = None, **options: Any) -> int:
        """Queue one message or raise QueueFull at once (nothing is queued then)."""
        d = self._dispatcher()
        if self.cluster is not None:
            raise EngineError(
                "submit_nowait is not available in cluster mode: a message is accepted only "
                "once Redis has it; use submit"
            )
        out = d.build(recipient, payload, **options)
        d.enqueue_nowait(out)
        return out[0]

    async def submit_many(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = False,
        raw_checked: bool = False,
        **options: Any,
    ) -> list[int]:
        """Queue many (recipient, payload) pairs with the same options; returns their ids.

        With ``settled=True`` it returns only once every one of them was delivered,
        dead-lettered or expired (the service's ``ack="settled"``).  ``raw_checked``
        is for the ingress: its ``msgspec.Raw`` payloads come out of a msgspec
        decode, which checked their structure; what it does not check (UTF-8 of
        strings inside) fails at ``msg.body()`` for that message alone.
        """
        ids, marks = await self.submit_marked(
            items, settled=settled, raw_checked=raw_checked, **options
        )
        if marks:
            await self.wait_settled(marks)
        return ids

    async def submit_marked(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        settled: bool = True,
        raw_checked: bool = False,
        **options: Any,
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Queue like ``submit_many``; returns the ids and, with ``settled``, the ring marks.

        For callers that must queue in order now and wait for settlement later
        (the ingress's pipelined settled acks): ``await wait_settled(marks)``.
        """
        d = self._dispatcher()
        opts = d.options(**options) if options else d.default_options
        if self.cluster is not None:
            return await self.cluster.submit_marked(items, opts, settled, raw_checked)
        ids: list[int] = []
        marks: list[tuple[int, int, int]] = []
        it = iter(items)
        # Chunks keep the workers busy while later items are still being encoded.
        while chunk := list(itertools.islice(it, SUBMIT_CHUNK)):
            try:
                outs = d.build_many(chunk, opts, raw_checked=raw_checked)
            except (ValueError, EngineError) as exc:
                raise type(exc)(
                    f"{exc} (item {len(ids)} or later; the {len(ids)} items before "
                    f"this chunk of {len(chunk)} were queued, none after)"
                ) from exc
            await d.enqueue_many(outs)
            ids.extend(m[0] for m in outs)
            if settled:
                marks += await d.settle_marks(outs)
        return ids, marks

    async def wait_settled(self, marks: list[tuple[int, int, int]]) -> None:
        """Return once the messages behind ``marks`` (from ``submit_marked``) are settled."""
        if self.cluster is not None:
            await self.cluster.wait_settled(marks)
            return
        await self._dispatcher().wait_settled(marks)

    async def request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        """Deliver a request and return the handler's return value; RequestTimeout on expiry."""
        if not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for name in ("kind", "correlation_id"):
            if name in options:
                raise TypeError(f"request() sets {name} itself; got {name}={options[name]!r}")
        d = self._dispatcher()
        cid = next(d.ids)
        options.setdefault("ttl", timeout)
        out = d.build(recipient, payload, kind=Kind.REQUEST, correlation_id=cid, **options)
        if self.cluster is not None:
            return await self.cluster.request(out, cid, timeout)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        d.futures[cid] = fut

        async def send_and_wait() -> Any:
            await d.enqueue(out)
            return await fut

        try:
            # The timeout covers waiting for ring space too, not only the reply.
            return await asyncio.wait_for(send_and_wait(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {recipient!r} within {timeout}s (message {out[0]})"
            ) from None
        finally:
            d.futures.pop(cid, None)

    def register(self, recipient: str) -> None:
        if not isinstance(recipient, str) or not recipient:
            raise ValueError(f"recipient must be a non-empty string, got {recipient!r}")
        self._dispatcher().recipients[recipient] = None

    def unregister(self, recipient: str) -> None:
        self._dispatcher().recipients.pop(recipient, None)

    async def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        """One message to every registered recipient (kind broadcast)."""
        d = self._dispatcher()
        options.setdefault("kind", Kind.BROADCAST)
        return await self._fan_out(list(d.recipients), payload, options)

    def subscribe(self, topic: str, recipient: str) -> None:
        if not topic or not recipient:
            raise ValueError(f"topic and recipient must be non-empty, got {topic!r}, {recipient!r}")
        self._dispatcher().topics.setdefault(topic, {})[recipient] = None

    def unsubscribe(self, topic: str, recipient: str) -> None:
        self._dispatcher().topics.get(topic, {}).pop(recipient, None)

    async def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        """One message (kind event) to every subscriber of ``topic``."""
        d = self._dispatcher()
        options.setdefault("kind", Kind.EVENT)
        options.setdefault("tags", (topic,))
        return await self._fan_out(list(d.topics.get(topic, {})), payload, options)

    async def _fan_out(
        self, recipients: list[str], payload: Any, options: dict[str, Any]
    ) -> list[int]:
        from ipc.codec import pack_payload

        raw = payload if isinstance(payload, msgspec.Raw) else pack_payload(payload)
        return await self.submit_many(((r, raw) for r in recipients), **options)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted message is settled; False if ``timeout`` passed first.

        In cluster mode: until everything this node accepted is in Redis (delivering it
        is the partition owners' part; ``stop`` settles what this node owns).
        """
        if self.cluster is not None:
            self._dispatcher()
            return await self.cluster.drain(timeout)
        return await self._dispatcher().drain(timeout)

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        if d is None:
            raise EngineClosed("the engine was never started")
        stats = build_stats(d, self.report, self.monitor, self.monitor_restarts)
        stats["monitor"]["error"] = self.monitor_error
        if self.cluster is not None:
            stats["cluster"] = self.cluster.stats()
        return stats

    def dead_letters(self) -> list[DeadLetter]:
        if self.dispatcher is None:
            raise EngineClosed("the engine was never started")
        return self.dispatcher.dead.items()

    async def replay_dead_letters(self) -> int:
        """Resubmit every stored dead letter as a fresh message (attempts reset).

        In cluster mode: every letter of the cluster's DLQ stream.
        """
        d = self._dispatcher()
        if self.cluster is not None:
            return await self.cluster.replay_dead_letters()
        items = d.dead.take_all()
        for dl in items:
            m = dl.message
            msg = d.build(
                m.recipient,
                m.payload,
                priority=m.priority,
                kind=m.kind,
                sender=m.sender,
                tags=m.tags,
                metadata=m.metadata,
                dedup_key=m.dedup_key,
                reply_to=m.reply_to,
            )
            await d.enqueue(msg)
        return len(items)

    # -- sync facade -------------------------------------------------------------
    def __enter__(self) -> SyncEngine:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            import uvloop

            loop = uvloop.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="ringway-dispatcher", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return SyncEngine(self)

    def __exit__(self, *exc: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            self._thread = self._loop = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop thread and wait for it (sync facade)."""
        if self._loop is None:
            coro.close()
            raise EngineClosed("the engine is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class SyncEngine:
    """Blocking twin of Engine's API; every call runs on the engine's loop thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, recipient: str, payload: Any = None, **options: Any) -> int:
        return self.engine.call(self.engine.submit(recipient, payload, **options))

    def submit_nowait(self, recipient: str, payload: Any = None, **options: Any) -> int:
        async def go() -> int:
            return self.engine.submit_nowait(recipient, payload, **options)

        return self.engine.call(go())

    def submit_many(self, items: Iterable[tuple[str, Any]], **options: Any) -> list[int]:
        return self.engine.call(self.engine.submit_many(list(items), **options))

    def request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        return self.engine.call(self.engine.request(recipient, payload, timeout=timeout, **options))

    def register(self, recipient: str) -> None:
        self.engine.call(_later(self.engine.register, recipient))

    def subscribe(self, topic: str, recipient: str) -> None:
        self.engine.call(_later(self.engine.subscribe, topic, recipient))

    def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        return self.engine.call(self.engine.broadcast(payload, **options))

    def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        return self.engine.call(self.engine.publish(topic, payload, **options))

    def drain(self, timeout: float | None = None) -> bool:
        return self.engine.call(self.engine.drain(timeout))

    def stats(self) -> dict[str, Any]:
        return self.engine.call(_later(self.engine.stats))

    def dead_letters(self) -> list[DeadLetter]:
        return self.engine.call(_later(self.engine.dead_letters))

    def replay_dead_letters(self) -> int:
        return self.engine.call(self.engine.replay_dead_letters())


def _running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _later(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


__all__ = ["Engine", "EngineError", "Priority", "SyncEngine"]
