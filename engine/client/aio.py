"""The asyncio client of the Ringway service, `AsyncClient` (the blocking `Client`: see sync).

One connection, pipelined: every request frame gets exactly one answer with its
``seq``, and many frames are in flight at once (bounded by frames and bytes).
Submits are batched naturally: concurrent submits with equal options made while
the connection is busy are coalesced into one ``Submit`` frame, so the per-message
cost is one payload encode and one tuple.

Delivery is at least once.  When the connection drops, the client reconnects
with exponential backoff and jitter and re-sends every unanswered Submit,
Publish, Broadcast, Subscribe and Register frame, in order; the service may have
queued such a frame before the drop, so its messages may then be delivered
twice.  A Request in flight fails with `ConnectionLost` instead (it may have
been delivered; the caller decides whether to repeat it).  After
``reconnect_attempts`` consecutive failures without progress every pending call
fails with `ConnectionLost`; the next call starts a new round of attempts.

Order: messages with equal options keep their submission order (the engine
keeps it per recipient and priority lane); frames of different calls go out in
call order, but open batches of different options may overtake each other.

The parts: `options` checks a call's arguments, `pipeline` holds the frames
(`AsyncClient` is a `Pipeline` with the public API on top), `connection` moves
them over the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from engine.batches import (
    BatchRequest,
    BatchResult,
    BatchResults,
    BatchStats,
    ItemError,
    as_request,
    check_concurrency,
    check_request,
    check_ttl,
)
from engine.client.connection import DEFAULT_URL, Connection, parse_url
from engine.client.options import (
    DEFAULT_SPEC,
    Specs,
    bad_recipient,
    encode_payload,
    partly_sent,
)
from engine.client.pipeline import K_BATCH, K_IDS, K_NONE, K_REQUEST, Pipeline
from engine.errors import EngineClosed, EngineError, RequestTimeout, ServiceError
from engine.protocol import (
    ERR_TOO_LARGE,
    Batch,
    BatchAnswer,
    BatchItem,
    Broadcast,
    Publish,
    Register,
    Request,
    Subscribe,
)

__all__ = ["AsyncClient"]

REQUEST_GRACE_S: Final = 5.0  # wait this long past a request's timeout for the service's answer


class AsyncClient(Pipeline):
    """asyncio client of the Ringway service; use ``async with AsyncClient(url) as c``.

    Methods mirror `Engine`: ``submit`` (batched, awaits the ack), ``send``
    (fire-and-forget, returns a future), ``submit_many`` (pipelined, bounded),
    ``request``, ``publish``, ``broadcast``, ``subscribe``, ``register``,
    ``flush`` and ``close``.  Options are the Engine's: priority, ttl (seconds),
    kind, sender, reply_to, tags, metadata, dedup_key, and ``settled=True`` on
    submits to be answered only once the messages were delivered (or
    dead-lettered or expired).  See the module docstring for the delivery
    guarantee (at least once: a re-sent message may be delivered twice).
    ``idempotent=True`` gives every submitted message a ``dedup_key`` of its own,
    so a frame re-sent after a reconnect is acked with the first ids and not
    queued twice (within the service's ENGINE_DEDUP_WINDOW_S).  ``request_many``
    runs a batch of requests on the service (one frame, one answer).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        batch_size: int = 1000,
        max_inflight_frames: int = 32,
        max_inflight_bytes: int = 64 * 1024 * 1024,
        reconnect_backoff_s: float = 0.05,
        reconnect_max_s: float = 2.0,
        reconnect_attempts: int = 10,
        connect_timeout_s: float = 10.0,
        idempotent: bool = False,
    ) -> None:
        address = parse_url(url)
        if type(idempotent) is not bool:
            raise TypeError(f"idempotent must be True or False, got {idempotent!r}")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a string, got {type(token).__name__}")
        for name, value in (
            ("batch_size", batch_size),
            ("max_inflight_frames", max_inflight_frames),
            ("max_inflight_bytes", max_inflight_bytes),
            ("reconnect_attempts", reconnect_attempts),
        ):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < reconnect_backoff_s <= reconnect_max_s:
            raise ValueError(
                "need 0 < reconnect_backoff_s <= reconnect_max_s, got "
                f"{reconnect_backoff_s!r} and {reconnect_max_s!r}"
            )
        super().__init__(url, batch_size, max_inflight_frames, max_inflight_bytes)
        if idempotent:  # unique per client: keys of two clients never meet
            self._key_prefix = secrets.token_hex(8) + ":"
        self._specs = Specs()
        self._connection = Connection(
            self,
            address,
            token or "",
            reconnect_backoff_s=reconnect_backoff_s,
            reconnect_max_s=reconnect_max_s,
            reconnect_attempts=reconnect_attempts,
            connect_timeout_s=connect_timeout_s,
        )

    # -- the connection's settings and what the service said (read-only) ---------
    @property
    def server(self) -> str:
        """The service's name from its Welcome ("" before the first connection)."""
        return self._connection.server

    @property
    def reconnect_backoff_s(self) -> float:
        return self._connection.reconnect_backoff_s

    @property
    def reconnect_max_s(self) -> float:
        return self._connection.reconnect_max_s

    @property
    def reconnect_attempts(self) -> int:
        return self._connection.reconnect_attempts

    @property
    def connect_timeout_s(self) -> float:
        return self._connection.connect_timeout_s

    # -- lifecycle ---------------------------------------------------------------
    async def connect(self) -> AsyncClient:
        """Connect and say Hello; raises AuthenticationError, or ConnectionLost when every
        attempt failed (calling it again starts new attempts).  Other methods connect on
        first use too."""
        self._start()
        await self._connection.wait_connected()
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            await self.close()
            return
        try:
            await self.flush()
        finally:
            await self.close()

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._work = asyncio.Event()
            self._connection.start(loop)
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise EngineClosed(f"the client of {self.url} is closed")
        return loop

    async def close(self, timeout: float | None = 30.0) -> None:
        """Wait up to ``timeout`` s for pending frames to be answered, then disconnect; calls
        still pending then fail with EngineClosed.  Errors are left to their futures."""
        if self._closing:
            return
        self._closing = True
        if self._loop is None:
            return
        self._seal_open()
        if self._pending_frames() and self._fatal is None:
            with contextlib.suppress(TimeoutError, EngineError):
                await asyncio.wait_for(self._wait_answered(self._last), timeout)
        await self._connection.stop()
        self._fail_all(EngineClosed(f"the client of {self.url} was closed before an answer"))

    # -- the API -----------------------------------------------------------------
    def send(
        self, recipient: str, payload: Any = None, *, settled: bool = False, **options: Any
    ) -> asyncio.Future[int]:
        """Queue one message without waiting; the future gets its id once the service acked.

        Not bounded: a producer that never awaits should use ``submit_many`` or await
        ``flush()`` now and then.  Errors also surface in the next ``flush()``.
        """
        loop = self._start()
        spec = self._specs.get(options, settled) if options or settled else DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise bad_recipient(recipient)
        fut: asyncio.Future[int] = loop.create_future()
        self._add(spec, recipient, encode_payload(payload), fut, True)
        return fut

    async def submit(
        self, recipient: str, payload: Any = None, *, settled: bool = False, **options: Any
    ) -> int:
        """Queue one message (batched with concurrent submits); returns its id once acked."""
        loop = self._start()
        spec = self._specs.get(options, settled) if options or settled else DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise bad_recipient(recipient)
        fut: asyncio.Future[int] = loop.create_future()
        self._add(spec, recipient, encode_payload(payload), fut, False)
        return await fut

    async def submit_many(
        self, items: Iterable[tuple[str, Any]], *, settled: bool = False, **options: Any
    ) -> list[int]:
        """Queue (recipient, payload) pairs with the same options; returns their ids.

        Frames are pipelined (no wait for one ack before the next frame) but the
        in-flight frames and bytes are bounded, so any number of items fits in memory.
        """
        self._start()
        spec = self._specs.get(options, settled) if options or settled else DEFAULT_SPEC
        futs: list[asyncio.Future[Any]] = []
        sent = 0
        try:
            for chunk in self._chunks(items, spec):
                await self._wait_room()
                futs.append(self._seal_items(chunk, spec))
                sent += len(chunk)
        except (ValueError, TypeError, ServiceError) as exc:
            raise partly_sent(exc, sent) from exc
        ids: list[int] = []
        first: BaseException | None = None
        for result in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(result, BaseException):
                first = first or result
            else:
                ids.extend(result)
        if first is not None:
            raise first
        return ids

    async def request(
        self,
        recipient: str,
        payload: Any = None,
        *,
        timeout: float = 30.0,
        cache: bool = False,
        cache_ttl_s: float | None = None,
        **options: Any,
    ) -> Any:
        """Deliver one message and return the handler's return value, decoded.

        RequestTimeout when no reply came within ``timeout``; RequestFailed when the
        handler rejected it; ConnectionLost when the connection dropped meanwhile.
        ``cache=True``: a read the service may share between identical requests of
        this user and answer from its cache (``cache_ttl_s``, ENGINE_CACHE_TTL_S).
        """
        self._start()
        if type(timeout) not in (int, float) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if type(cache) is not bool:
            raise TypeError(f"cache must be True or False, got {cache!r}")
        ttl = check_ttl(cache_ttl_s)
        spec = self._specs.get(options, False) if options else DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise bad_recipient(recipient)
        raw = encode_payload(payload)
        fut = self._seal_one(
            K_REQUEST,
            lambda seq: Request(seq, recipient, raw, float(timeout), spec.options, cache, ttl),
        )
        try:
            value = await asyncio.wait_for(fut, timeout + REQUEST_GRACE_S)
        except RequestTimeout:
            raise  # the service's answer (RequestTimeout is a TimeoutError too)
        except TimeoutError:
            raise RequestTimeout(
                f"no answer from the service for the request to {recipient!r} "
                f"within {timeout}s (+{REQUEST_GRACE_S}s grace)"
            ) from None
        return msgspec.msgpack.decode(value)

    async def request_many(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        concurrency: int | None = None,
    ) -> BatchResults:
        """Run many requests on the service at once; one `BatchResult` each, in order.

        Each request is a `BatchRequest` or a mapping of its fields (recipient,
        payload, priority, timeout_s, cache, cache_ttl_s).  One request's failure
        is its result's ``error``, never an exception; a bad batch raises here or
        comes back as ServiceError ``bad_request`` with nothing queued.  The
        service runs at most ``concurrency`` (ENGINE_BATCH_CONCURRENCY) at a time.
        ConnectionLost if the connection dropped before the answer (not re-sent).
        """
        self._start()
        if isinstance(requests, str | bytes | Mapping) or not isinstance(requests, Sequence):
            raise TypeError(f"requests must be a list of requests, got {type(requests).__name__}")
        limit = 0 if concurrency is None else check_concurrency(concurrency, 0)
        items: list[BatchItem] = []
        for i, req in enumerate(requests):
            try:
                r = as_request(req)
                priority, timeout, ttl = check_request(r)
                raw = encode_payload(r.payload)
            except (ValueError, TypeError, EngineError) as exc:
                raise type(exc)(f"request {i} of the batch: {exc} (nothing was sent)") from exc
            items.append(BatchItem(r.recipient, raw, int(priority), timeout, r.cache, ttl))
        frame = Batch(0, items, limit)
        size = sum(len(it.payload) + 4 * len(it.recipient) + 32 for it in items)
        if size > self.max_frame_bytes:
            raise ServiceError(
                ERR_TOO_LARGE,
                f"a batch of about {size:,} bytes cannot fit the service's "
                f"{self.max_frame_bytes:,}-byte frames: send fewer requests at a time",
            )

        def build(seq: int) -> Batch:
            frame.seq = seq
            return frame

        answer: BatchAnswer = await self._seal_one(K_BATCH, build)
        return batch_results(answer)

    async def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        """One message to every subscriber of ``topic``; returns the ids queued."""
        self._start()
        spec = self._specs.get(options, False) if options else DEFAULT_SPEC
        raw = encode_payload(payload)
        ids: list[int] = await self._seal_one(
            K_IDS, lambda seq: Publish(seq, topic, raw, spec.options)
        )
        return ids

    async def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        """One message to every registered recipient; returns the ids queued."""
        self._start()
        spec = self._specs.get(options, False) if options else DEFAULT_SPEC
        raw = encode_payload(payload)
        ids: list[int] = await self._seal_one(K_IDS, lambda seq: Broadcast(seq, raw, spec.options))
        return ids

    async def subscribe(self, topic: str, recipient: str) -> None:
        """Add ``recipient`` to ``topic``'s subscribers."""
        self._start()
        await self._seal_one(K_NONE, lambda seq: Subscribe(seq, topic, recipient))

    async def unsubscribe(self, topic: str, recipient: str) -> None:
        self._start()
        await self._seal_one(K_NONE, lambda seq: Subscribe(seq, topic, recipient, True))

    async def register(self, recipient: str) -> None:
        """Add ``recipient`` to the broadcast set."""
        self._start()
        await self._seal_one(K_NONE, lambda seq: Register(seq, recipient))

    async def unregister(self, recipient: str) -> None:
        self._start()
        await self._seal_one(K_NONE, lambda seq: Register(seq, recipient, True))

    async def flush(self) -> None:
        """Wait until everything sent so far is answered; raise the first error of a
        fire-and-forget send (``send``, ``Client.submit``) since the last flush.

        Awaited calls raise their own errors to their caller, not here.
        """
        self._start()
        self._seal_open()
        target = self._last
        await self._wait_answered(target)
        failed = [exc for seq, exc in self._errors if seq <= target]
        if failed:
            self._errors = [(s, e) for s, e in self._errors if s > target]
            raise failed[0]


def batch_results(answer: BatchAnswer) -> BatchResults:
    """A BatchAnswer frame as the API's `BatchResults` (values decoded)."""
    results = [
        BatchResult(
            ok=a.ok,
            value=msgspec.msgpack.decode(a.value) if a.ok else None,
            error=None if a.ok else ItemError(a.code, a.reason),
            cached=a.cached,
            deduplicated=a.deduplicated,
            duration_s=a.duration_s,
            attempts=a.attempts,
        )
        for a in answer.responses
    ]
    f = answer.stats
    stats = BatchStats(
        total_duration_s=f.total_duration_s,
        average_duration_s=f.average_duration_s,
        cache_hit_rate=f.cache_hit_rate,
        deduplication_rate=f.deduplication_rate,
        requests=f.requests,
        executed=f.executed,
    )
    return BatchResults(results, stats)
