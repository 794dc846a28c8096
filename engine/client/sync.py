"""The blocking `Client`: an `AsyncClient` on a private event loop in a daemon thread.

Apart from engine.client.aio so the asyncio client reads on its own; see there for
the protocol, batching and reconnect rules, which are the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures._base import FINISHED, RUNNING
from typing import Any, TypeVar, cast

import msgspec

from engine.batches import BatchRequest, BatchResults
from engine.client.aio import AsyncClient
from engine.client.connection import DEFAULT_URL
from engine.client.options import (
    DEFAULT_SPEC,
    Spec,
    Specs,
    bad_recipient,
    encode_payload,
    partly_sent,
)
from engine.client.pipeline import Waiter
from engine.errors import EngineClosed, ServiceError

__all__ = ["Client", "MessageFuture"]

T = TypeVar("T")
_futures_log = logging.getLogger("concurrent.futures")  # where Future logs a failed callback


class MessageFuture(cf.Future[int]):
    """The id of one `Client.submit` message, once the service acked it.

    A ``concurrent.futures.Future`` built for a hot loop.  A plain Future builds
    a Condition and two lists: eight objects the garbage collector keeps
    walking while 100,000 messages are pending, 5 us per submit, more than
    everything else together.  This one shares its client's Condition, creates
    its lists on first use, carries its message to the loop thread itself (no
    tuple), and starts RUNNING: a queued message cannot be called back, so
    ``cancel()`` returns False.  Waits tolerate wake-ups meant for siblings.
    """

    _result: int | None = None
    _exception: BaseException | None = None
    _w: list[Any] | None = None
    _cb: list[Callable[[cf.Future[int]], object]] | None = None

    def __init__(  # no super().__init__(): see above
        self, condition: threading.Condition, spec: Spec, recipient: str, raw: msgspec.Raw | None
    ) -> None:
        self._condition = condition
        self._state = RUNNING
        self._spec = spec
        self._recipient = recipient
        self._raw = raw

    @property
    def _waiters(self) -> list[Any]:  # concurrent.futures.wait() adds its waiters here
        w = self._w
        if w is None:
            w = self._w = []
        return w

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        self._w = value

    @property
    def _done_callbacks(self) -> list[Callable[[cf.Future[int]], object]]:
        cb = self._cb
        if cb is None:
            cb = self._cb = []
        return cb

    def _wait(self, timeout: float | None) -> None:
        with self._condition:
            if timeout is None:
                while self._state != FINISHED:
                    self._condition.wait()
                return
            deadline = time.monotonic() + timeout
            while self._state != FINISHED:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._condition.wait(left)

    def result(self, timeout: float | None = None) -> int:
        self._wait(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(0)


class _LoopClient(AsyncClient):
    """The AsyncClient behind a `Client`: completes a batch of MessageFutures under one
    lock, as ``Future.set_result`` does for one, and counts them for backpressure."""

    def __init__(
        self, url: str, token: str | None, condition: threading.Condition, **settings: Any
    ) -> None:
        super().__init__(url, token, **settings)
        self.condition = condition
        self.done = 0  # per-message futures resolved; read by the producer thread

    def _set_results(self, futs: list[Waiter], ids: list[int]) -> None:
        with_callbacks = []
        with self.condition:
            for fut, mid in zip(cast("list[MessageFuture]", futs), ids, strict=True):
                if fut._state != RUNNING:
                    continue
                fut._result = mid
                fut._state = FINISHED
                if fut._w:
                    for waiter in fut._w:
                        waiter.add_result(fut)
                if fut._cb:
                    with_callbacks.append(fut)
            self.condition.notify_all()
        for fut in with_callbacks:
            for callback in fut._done_callbacks:
                try:
                    callback(fut)
                except Exception:  # as Future._invoke_callbacks does
                    _futures_log.exception("exception calling callback for %r", fut)

    def _items_done(self, n: int) -> None:
        self.done += n
        with self.condition:
            self.condition.notify_all()


class Client:
    """Blocking client: an `AsyncClient` on a private event loop in a daemon thread.

    ``submit`` does not block: it returns a ``concurrent.futures.Future[int]`` and
    hands messages to the loop thread in chunks (one wake-up per chunk, not per
    message), so a loop of submits is batched like ``submit_many``.  It blocks
    only while ``max_pending`` submitted messages are unanswered (backpressure,
    a few hundred bytes each).  ``submit_many``, ``request``, ``publish``,
    ``broadcast``, ``subscribe``, ``register`` and ``flush`` block.  Any thread
    may call any method, except a done-callback (those run on the client's own
    thread, which a blocking call would deadlock).  ``with Client(url) as c:``
    flushes (raising the first error of a submit) and closes on exit.  Other
    settings are AsyncClient's keywords.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        max_pending: int = 200_000,
        **settings: Any,
    ) -> None:
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self._cond = threading.Condition()  # shared by every MessageFuture and the backpressure
        self._ac = _LoopClient(url, token, self._cond, **settings)
        self._specs = Specs()
        self.url = url
        self.max_pending = max_pending
        self._outbox: deque[MessageFuture] = deque()  # carries its message: see MessageFuture
        self._scheduled = False
        self._submitted = 0
        self._closed = False
        ready: cf.Future[asyncio.AbstractEventLoop] = cf.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="ringway-client", daemon=True
        )
        self._thread.start()
        self._loop = ready.result()
        try:
            self._call(self._ac.connect())
        except BaseException:
            self._closed = True
            try:
                self._call(self._ac.close(0), closing=True)
            finally:
                self._stop_loop()
            raise

    @staticmethod
    def _new_loop() -> asyncio.AbstractEventLoop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()

    def _run(self, ready: cf.Future[asyncio.AbstractEventLoop]) -> None:
        loop = self._new_loop()
        asyncio.set_event_loop(loop)
        ready.set_result(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], *, closing: bool = False) -> T:
        """Run ``coro`` on the loop thread and wait for its result."""
        if self._closed and not closing:
            coro.close()
            raise EngineClosed(f"the client of {self.url} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    # -- non-blocking submit -----------------------------------------------------
    def submit(
        self, recipient: str, payload: Any = None, *, settled: bool = False, **options: Any
    ) -> MessageFuture:
        """Queue one message; the future (a ``concurrent.futures.Future[int]``) gets its id
        once the service acked it."""
        if self._closed:
            raise EngineClosed(f"the client of {self.url} is closed")
        spec = self._specs.get(options, settled) if options or settled else DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise bad_recipient(recipient)
        fut = MessageFuture(self._cond, spec, recipient, encode_payload(payload))
        self._outbox.append(fut)
        self._submitted += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._hand_over)
        if self._submitted - self._ac.done > self.max_pending:
            self._wait_room()
        return fut

    def _hand_over(self) -> None:
        """On the loop thread: move everything the caller queued into the open batches.

        The flag is cleared before draining, so an item appended after the drain
        always schedules a new hand-over (nothing is stranded)."""
        self._scheduled = False
        outbox, add = self._outbox, self._ac._add
        while outbox:
            fut = outbox.popleft()
            add(fut._spec, fut._recipient, fut._raw, fut, True)  # type: ignore[arg-type]
            fut._raw = None  # the batch holds it now; a kept future should not

    def _wait_room(self) -> None:
        """Block the producer until half of ``max_pending`` is answered (hysteresis);
        every resolved batch notifies the shared condition."""
        low = self.max_pending // 2
        with self._cond:
            while self._submitted - self._ac.done > low and self._thread.is_alive():
                self._cond.wait(1.0)  # the timeout only guards against a dead loop thread

    # -- blocking calls ----------------------------------------------------------
    def submit_many(
        self, items: Iterable[tuple[str, Any]], *, settled: bool = False, **options: Any
    ) -> list[int]:
        """Queue (recipient, payload) pairs; encodes here, pipelines frames, returns the ids."""
        if self._closed:
            raise EngineClosed(f"the client of {self.url} is closed")
        ac = self._ac
        spec = self._specs.get(options, settled) if options or settled else DEFAULT_SPEC
        futs: list[asyncio.Future[Any]] = []

        async def enqueue(chunk: list[tuple[str, msgspec.Raw]]) -> asyncio.Future[Any]:
            self._hand_over()
            await ac._wait_room()
            return ac._seal_items(chunk, spec)

        async def collect() -> list[Any]:
            return await asyncio.gather(*futs, return_exceptions=True)

        sent = 0
        try:
            for chunk in ac._chunks(items, spec):
                futs.append(self._call(enqueue(chunk)))
                sent += len(chunk)
        except (ValueError, TypeError, ServiceError) as exc:
            raise partly_sent(exc, sent) from exc
        ids: list[int] = []
        for result in self._call(collect()):
            if isinstance(result, BaseException):
                raise result
            ids.extend(result)
        return ids

    def request(
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        return self._call(self._ac.request(recipient, payload, timeout=timeout, **options))

    def request_many(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        concurrency: int | None = None,
    ) -> BatchResults:
        """Run many requests on the service at once (see `AsyncClient.request_many`)."""
        return self._call(self._ac.request_many(requests, concurrency=concurrency))

    def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        return self._call(self._ac.publish(topic, payload, **options))

    def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        return self._call(self._ac.broadcast(payload, **options))

    def subscribe(self, topic: str, recipient: str) -> None:
        self._call(self._ac.subscribe(topic, recipient))

    def unsubscribe(self, topic: str, recipient: str) -> None:
        self._call(self._ac.unsubscribe(topic, recipient))

    def register(self, recipient: str) -> None:
        self._call(self._ac.register(recipient))

    def unregister(self, recipient: str) -> None:
        self._call(self._ac.unregister(recipient))

    def flush(self) -> None:
        """Block until every submit so far is answered; raise the first error among them."""

        async def go() -> None:
            self._hand_over()
            await self._ac.flush()

        self._call(go())

    def close(self, timeout: float | None = 30.0) -> None:
        """Wait up to ``timeout`` s for answers, disconnect and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def go() -> None:
            self._hand_over()
            await self._ac.close(timeout)

        try:
            self._call(go(), closing=True)
        finally:
            self._stop_loop()
            while self._outbox:  # a submit racing with close() from another thread
                self._outbox.popleft().set_exception(EngineClosed(f"{self.url}: client closed"))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
