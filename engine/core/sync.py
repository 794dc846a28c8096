"""The blocking facade: ``with Engine(...) as eng`` hosts the engine on its own uvloop thread.

Apart from the async API because it is another way to host the same engine,
for code without an event loop: `LoopThread` owns the thread and its loop
(start, call, stop); `SyncEngine` has the API's method names, and each call is
a round trip to that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import EngineClosed

if TYPE_CHECKING:
    from engine.batches import BatchRequest, BatchResults
    from engine.core.api import EngineAPI
    from engine.core.deadletters import ReplayReport
    from ipc.records import DeadLetter

T = TypeVar("T")


class LoopThread:
    """A uvloop event loop on a daemon thread that runs one engine from start to stop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``start()`` on a new loop thread, which then runs on; raise here what it raised."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            import uvloop

            loop = uvloop.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self.thread = threading.Thread(target=run, name="ringway-dispatcher", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            self.thread.join()
            raise failure[0]

    def stop(self, stop: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run ``stop()`` on the loop, then end the loop and its thread."""
        loop, thread = self.loop, self.thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            self.thread = self.loop = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result."""
        if self.loop is None:
            coro.close()
            raise EngineClosed("the engine is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class SyncEngine:
    """Blocking twin of Engine's API; every call runs on the engine's loop thread."""

    def __init__(self, engine: EngineAPI, host: LoopThread) -> None:
        self.engine = engine
        self.host = host

    def submit(self, recipient: str, payload: Any = None, **options: Any) -> int:
        return self.host.call(self.engine.submit(recipient, payload, **options))

    def submit_nowait(self, recipient: str, payload: Any = None, **options: Any) -> int:
        async def go() -> int:
            return self.engine.submit_nowait(recipient, payload, **options)

        return self.host.call(go())

    def submit_many(self, items: Iterable[tuple[str, Any]], **options: Any) -> list[int]:
        return self.host.call(self.engine.submit_many(list(items), **options))

    def request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        return self.host.call(self.engine.request(recipient, payload, timeout=timeout, **options))

    def request_many(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        concurrency: int | None = None,
        retries: int | None = None,
        user: str = "",
    ) -> BatchResults:
        return self.host.call(
            self.engine.request_many(requests, concurrency=concurrency, retries=retries, user=user)
        )

    def register(self, recipient: str) -> None:
        self.host.call(_later(self.engine.register, recipient))

    def subscribe(self, topic: str, recipient: str) -> None:
        self.host.call(_later(self.engine.subscribe, topic, recipient))

    def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        return self.host.call(self.engine.broadcast(payload, **options))

    def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        return self.host.call(self.engine.publish(topic, payload, **options))

    def drain(self, timeout: float | None = None) -> bool:
        return self.host.call(self.engine.drain(timeout))

    def stats(self) -> dict[str, Any]:
        return self.host.call(_later(self.engine.stats))

    def dead_letters(self) -> list[DeadLetter]:
        return self.host.call(_later(self.engine.dead_letters))

    def replay_dead_letters(self, ids: Iterable[int] | None = None) -> ReplayReport:
        return self.host.call(self.engine.replay_dead_letters(ids))


async def _later(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the loop thread: the dispatcher's state is the loop's alone."""
    return fn(*args)
