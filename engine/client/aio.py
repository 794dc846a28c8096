"""Python client of the Ringway service: `AsyncClient` here, `Client` (blocking) in client_sync.

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
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec

from engine.backoff import backoff_s
from engine.errors import (
    AuthenticationError,
    ConnectionLost,
    EngineClosed,
    EngineError,
    RequestFailed,
    RequestTimeout,
    ServiceError,
)
from engine.protocol import (
    ERR_AUTH,
    ERR_BUSY,
    ERR_CLOSED,
    ERR_HANDLER,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Broadcast,
    ClientFrame,
    Error,
    Hello,
    Publish,
    Register,
    Request,
    Response,
    SendOptions,
    Submit,
    Subscribe,
    Welcome,
    encode_frame,
    frame_length,
    server_decoder,
)
from ipc.codec import check_raw, pack_payload

__all__ = ["DEFAULT_URL", "AsyncClient", "Client", "MessageFuture", "error_from_code", "parse_url"]

T = TypeVar("T")
DEFAULT_URL: Final = "tcp://127.0.0.1:7878"
DEFAULT_PORT: Final = 7878
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024  # the service's default, until Welcome says
FRAME_OVERHEAD: Final = 256  # Submit header, seq, settled flag: generous
ITEM_OVERHEAD: Final = 12  # per (recipient, payload) pair: array and str headers (+4 B a char)
MAX_ANSWER_BYTES: Final = 1 << 30  # a larger announced answer means a broken stream
REQUEST_GRACE_S: Final = 5.0  # wait this long past a request's timeout for the service's answer
WRITE_CHUNK: Final = 1 << 20  # bytes of frames handed to the transport per write
MAX_KEPT_ERRORS: Final = 1000  # errors of fire-and-forget frames kept for flush()
CLIENT_NAME: Final = "ringway-python/1"

# What a frame's answer resolves: per-message futures, one future with all ids,
# one future with None, or one future with the Response value.
K_ITEMS, K_IDS, K_NONE, K_REQUEST = 0, 1, 2, 3

_encode = msgspec.msgpack.Encoder().encode
_futures_log = logging.getLogger("concurrent.futures")
_Raw = msgspec.Raw
_NIL: Final = msgspec.Raw(_encode(None))
_INVALID_STATE = (asyncio.InvalidStateError, cf.InvalidStateError)
_RETRIABLE_CODES = frozenset((ERR_BUSY, ERR_CLOSED))
_OPTION_NAMES = frozenset(
    ("priority", "ttl", "kind", "sender", "reply_to", "tags", "metadata", "dedup_key")
)
Waiter = asyncio.Future[Any] | cf.Future[Any]


def parse_url(url: str) -> tuple[str, str, int]:
    """``tcp://host:port`` -> ("tcp", host, port); ``unix:///path`` -> ("unix", path, 0)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"bad service URL {url!r}: {exc}") from None
    if parts.scheme == "tcp" and parts.hostname and not parts.path.strip("/"):
        return "tcp", parts.hostname, DEFAULT_PORT if port is None else port
    if parts.scheme == "unix" and parts.path and not parts.netloc:
        return "unix", parts.path, 0
    raise ValueError(f"bad service URL {url!r}: expected tcp://host:port or unix:///path/to.sock")


def error_from_code(code: str, reason: str) -> EngineError:
    """The typed exception for a service ``Error``; the message keeps the service's reason."""
    if code == ERR_AUTH:
        return AuthenticationError(code, reason)
    if code == ERR_TIMEOUT:
        return RequestTimeout(reason)
    if code == ERR_HANDLER:
        return RequestFailed(reason)
    if code == ERR_CLOSED:
        return EngineClosed(reason)
    return ServiceError(code, reason)


def _payload(payload: Any) -> msgspec.Raw:
    """Encode once at the edge; a Raw passes as is but must be one whole msgpack value,
    since a broken one would corrupt the frame that carries other callers' messages."""
    if type(payload) is _Raw:
        return check_raw(payload)
    if payload is None:
        return _NIL
    return pack_payload(payload)


def _partly_sent(exc: Exception, sent: int) -> Exception:
    """The same error, saying how much of a submit_many went out before it."""
    note = f" (item {sent} or later; the {sent} items before were sent, none after)"
    if isinstance(exc, ServiceError):
        return type(exc)(exc.code, exc.reason + note)
    return type(exc)(f"{exc}{note}")


def _bad_recipient(recipient: object) -> ValueError:
    return ValueError(f"recipient must be a non-empty string, got {recipient!r}")


class _Spec:
    """Validated options of a submit call; equal options share one instance (a batch key)."""

    __slots__ = ("options", "settled", "size")

    def __init__(self, options: SendOptions, settled: bool) -> None:
        self.options = options
        self.settled = settled
        self.size = len(_encode(options)) + FRAME_OVERHEAD


_DEFAULT_SPEC: Final = _Spec(SendOptions(), False)


def _build_options(options: dict[str, Any]) -> SendOptions:
    """Check option names and types here, so a bad one fails before anything is sent
    (value ranges, e.g. an unknown priority name, are the service's to judge)."""
    for name in options:
        if name not in _OPTION_NAMES:
            raise TypeError(
                f"unknown option {name!r}; expected one of {', '.join(sorted(_OPTION_NAMES))}"
            )
    kw: dict[str, Any] = {}
    for name, value in options.items():
        if name in ("priority", "kind"):
            if type(value) is bool or not isinstance(value, str | int):
                raise TypeError(f"option {name} must be a name or an integer, got {value!r}")
            kw[name] = value  # an IntEnum (Priority, Kind) travels as its number
        elif name == "ttl":
            if value is not None and (type(value) is bool or not isinstance(value, int | float)):
                raise TypeError(f"option ttl must be seconds (a number) or None, got {value!r}")
            kw["ttl_s"] = None if value is None else float(value)
        elif name in ("sender", "reply_to", "dedup_key"):
            if not isinstance(value, str):
                raise TypeError(f"option {name} must be a string, got {value!r}")
            kw[name] = str(value)
        elif name == "tags":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise TypeError(f"option tags must be an iterable of strings, got {value!r}")
            tags = tuple(value)
            if not all(isinstance(t, str) for t in tags):
                raise TypeError(f"option tags must be strings, got {tags!r}")
            kw["tags"] = tags
        else:  # metadata
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TypeError(f"option metadata must map strings to strings, got {value!r}")
            kw["metadata"] = dict(value)
    return SendOptions(**kw)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("\0dict", tuple(sorted(value.items())))
    if isinstance(value, list | set | frozenset):
        return ("\0seq", tuple(value))
    return (type(value), value)  # "1" and 1 (and 1.0 and True) stay apart


class _Frame:
    """A batch being filled (seq 0), then a sealed frame waiting to be written or answered."""

    __slots__ = ("data", "detached", "fut", "futs", "items", "kind", "nbytes", "seq", "spec")

    def __init__(self, kind: int, spec: _Spec) -> None:
        self.kind = kind
        self.spec = spec
        self.seq = 0
        self.data = b""
        self.items: list[tuple[str, msgspec.Raw]] = []
        self.futs: list[Waiter] = []
        self.fut: asyncio.Future[Any] | None = None
        self.detached = False  # holds fire-and-forget sends: flush() reports its error
        self.nbytes = spec.size


class _Drop(Exception):
    """Ends a connection; ``error`` says why (fatal when it is not retriable)."""

    def __init__(self, error: BaseException, *, fatal: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.fatal = fatal


def _welcome(answer: Welcome | Ack | Response | Error) -> Welcome:
    """The handshake's answer, or _Drop: fatal unless the service is busy or restarting."""
    if type(answer) is Error:
        exc = error_from_code(answer.code, answer.reason)
        raise _Drop(exc, fatal=answer.code not in _RETRIABLE_CODES)
    if type(answer) is not Welcome:
        raise _Drop(ServiceError("bad_frame", f"expected Welcome, got {answer!r}"))
    if answer.version != PROTOCOL_VERSION:
        reason = f"the service speaks protocol {answer.version}, this client {PROTOCOL_VERSION}"
        raise _Drop(ServiceError("version", reason), fatal=True)
    return answer


class AsyncClient:
    """asyncio client of the Ringway service; use ``async with AsyncClient(url) as c``.

    Methods mirror `Engine`: ``submit`` (batched, awaits the ack), ``send``
    (fire-and-forget, returns a future), ``submit_many`` (pipelined, bounded),
    ``request``, ``publish``, ``broadcast``, ``subscribe``, ``register``,
    ``flush`` and ``close``.  Options are the Engine's: priority, ttl (seconds),
    kind, sender, reply_to, tags, metadata, dedup_key, and ``settled=True`` on
    submits to be answered only once the messages were delivered (or
    dead-lettered or expired).  See the module docstring for the delivery
    guarantee (at least once: a re-sent message may be delivered twice).
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
    ) -> None:
        self.url = url
        self._address = parse_url(url)
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
        self._token = token or ""
        self.batch_size = batch_size
        self.max_inflight_frames = max_inflight_frames
        self.max_inflight_bytes = max_inflight_bytes
        self.reconnect_backoff_s = reconnect_backoff_s
        self.reconnect_max_s = reconnect_max_s
        self.reconnect_attempts = reconnect_attempts
        self.connect_timeout_s = connect_timeout_s
        self.max_frame_bytes = DEFAULT_MAX_FRAME
        self.server = ""
        self._last = 0  # seq of the latest sealed frame
        self._specs: dict[Any, _Spec] = {}
        self._open: dict[_Spec, _Frame] = {}  # batches being filled, by options
        self._outq: deque[_Frame] = deque()  # sealed, not yet written (ascending seq)
        self._inflight: dict[int, _Frame] = {}  # written, not yet answered (ascending seq)
        self._pending_bytes = 0  # of sealed frames not yet answered
        self._errors: list[tuple[int, BaseException]] = []
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._room: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] | None = None
        self._fatal: BaseException | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------
    async def connect(self) -> AsyncClient:
        """Connect and say Hello; raises AuthenticationError, or ConnectionLost when every
        attempt failed (calling it again starts new attempts).  Other methods connect on
        first use too."""
        self._start()
        connected = self._connected
        assert connected is not None and self._work is not None
        if connected.done() and connected.exception() is not None:
            connected = self._connected = self._future()
            self._work.set()  # wakes a supervisor that gave up
        await asyncio.shield(connected)
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
            self._connected = loop.create_future()
            self._task = loop.create_task(self._supervise(), name="ringway-client")
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
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        spec = self._spec(options, settled) if options or settled else _DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise _bad_recipient(recipient)
        fut: asyncio.Future[int] = loop.create_future()
        self._add(spec, recipient, _payload(payload), fut, True)
        return fut

    async def submit(
        self, recipient: str, payload: Any = None, *, settled: bool = False, **options: Any
    ) -> int:
        """Queue one message (batched with concurrent submits); returns its id once acked."""
        loop = self._start()
        spec = self._spec(options, settled) if options or settled else _DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise _bad_recipient(recipient)
        fut: asyncio.Future[int] = loop.create_future()
        self._add(spec, recipient, _payload(payload), fut, False)
        return await fut

    async def submit_many(
        self, items: Iterable[tuple[str, Any]], *, settled: bool = False, **options: Any
    ) -> list[int]:
        """Queue (recipient, payload) pairs with the same options; returns their ids.

        Frames are pipelined (no wait for one ack before the next frame) but the
        in-flight frames and bytes are bounded, so any number of items fits in memory.
        """
        self._start()
        spec = self._spec(options, settled) if options or settled else _DEFAULT_SPEC
        futs: list[asyncio.Future[Any]] = []
        sent = 0
        try:
            for chunk in self._chunks(items, spec):
                await self._wait_room()
                futs.append(self._seal_items(chunk, spec))
                sent += len(chunk)
        except (ValueError, TypeError, ServiceError) as exc:
            raise _partly_sent(exc, sent) from exc
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
        self, recipient: str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> Any:
        """Deliver one message and return the handler's return value, decoded.

        RequestTimeout when no reply came within ``timeout``; RequestFailed when the
        handler rejected it; ConnectionLost when the connection dropped meanwhile.
        """
        self._start()
        if type(timeout) not in (int, float) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        spec = self._spec(options, False) if options else _DEFAULT_SPEC
        if type(recipient) is not str or not recipient:
            raise _bad_recipient(recipient)
        raw = _payload(payload)
        fut = self._seal_one(
            K_REQUEST, lambda seq: Request(seq, recipient, raw, float(timeout), spec.options)
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

    async def publish(self, topic: str, payload: Any = None, **options: Any) -> list[int]:
        """One message to every subscriber of ``topic``; returns the ids queued."""
        self._start()
        spec = self._spec(options, False) if options else _DEFAULT_SPEC
        raw = _payload(payload)
        ids: list[int] = await self._seal_one(
            K_IDS, lambda seq: Publish(seq, topic, raw, spec.options)
        )
        return ids

    async def broadcast(self, payload: Any = None, **options: Any) -> list[int]:
        """One message to every registered recipient; returns the ids queued."""
        self._start()
        spec = self._spec(options, False) if options else _DEFAULT_SPEC
        raw = _payload(payload)
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

    # -- building frames ---------------------------------------------------------
    def _spec(self, options: dict[str, Any], settled: bool) -> _Spec:
        """The validated, shared _Spec of these options (cached: a hot loop pays a lookup)."""
        try:
            key: Any = (bool(settled), *sorted((k, _freeze(v)) for k, v in options.items()))
            spec = self._specs.get(key)
        except TypeError:  # unhashable option value: validate without caching
            key, spec = None, None
        if spec is None:
            spec = _Spec(_build_options(options), bool(settled))
            if key is not None:
                if len(self._specs) >= 1024:
                    self._specs.clear()
                self._specs[key] = spec
        return spec

    def _chunks(
        self, items: Iterable[tuple[str, Any]], spec: _Spec
    ) -> Iterator[list[tuple[str, msgspec.Raw]]]:
        """Encode pairs into lists that each fit one Submit frame (items and bytes)."""
        limit = self.max_frame_bytes - spec.size
        size = self.batch_size
        chunk: list[tuple[str, msgspec.Raw]] = []
        nbytes = 0
        for recipient, payload in items:
            if type(recipient) is not str or not recipient:
                raise _bad_recipient(recipient)
            raw = _payload(payload)
            n = len(raw) + 4 * len(recipient) + ITEM_OVERHEAD
            if chunk and (len(chunk) >= size or nbytes + n > limit):
                yield chunk
                chunk, nbytes = [], 0
            if n > limit:
                raise self._too_large(n)
            chunk.append((recipient, raw))
            nbytes += n
        if chunk:
            yield chunk

    def _too_large(self, n: int) -> ServiceError:
        return ServiceError(
            ERR_TOO_LARGE,
            f"a message of about {n} bytes cannot fit the service's {self.max_frame_bytes}-byte "
            "frames",
        )

    def _add(
        self, spec: _Spec, recipient: str, raw: msgspec.Raw, fut: Waiter, detached: bool
    ) -> None:
        """Append one message to the open batch of its options (the hot path)."""
        if self._closing or self._fatal is not None:
            self._refuse(fut, self._fatal or EngineClosed(f"the client of {self.url} is closed"))
            return
        n = len(raw) + 4 * len(recipient) + ITEM_OVERHEAD
        batch = self._open.get(spec)
        if batch is None:
            batch = self._open[spec] = _Frame(K_ITEMS, spec)
        elif batch.nbytes + n > self.max_frame_bytes:
            self._seal(self._open.pop(spec))
            batch = self._open[spec] = _Frame(K_ITEMS, spec)
        if batch.nbytes + n > self.max_frame_bytes:
            del self._open[spec]
            self._refuse(fut, self._too_large(n))
            return
        batch.items.append((recipient, raw))
        batch.futs.append(fut)
        batch.nbytes += n
        if detached:
            batch.detached = True
        if len(batch.items) >= self.batch_size:
            self._seal(self._open.pop(spec))
        work = self._work
        if work is not None:
            work.set()

    def _refuse(self, fut: Waiter, exc: BaseException) -> None:
        """Fail one message that never made it into a batch."""
        fut.set_exception(exc)
        if isinstance(fut, asyncio.Future):
            fut.exception()
        self._items_done(1)

    def _seal(self, frame: _Frame) -> None:
        """Give the frame its seq and bytes and queue it for the writer."""
        self._last = frame.seq = seq = self._last + 1
        frame.data = encode_frame(Submit(seq, frame.items, frame.spec.options, frame.spec.settled))
        frame.items = []
        self._queue(frame)

    def _queue(self, frame: _Frame) -> None:
        self._pending_bytes += len(frame.data)
        self._outq.append(frame)
        if self._work is not None:
            self._work.set()

    def _seal_open(self) -> None:
        """Seal every open batch (before a frame of another call, so call order holds)."""
        if self._open:
            batches = list(self._open.values())
            self._open.clear()
            for batch in batches:
                self._seal(batch)

    def _seal_items(self, items: list[tuple[str, msgspec.Raw]], spec: _Spec) -> asyncio.Future[Any]:
        self._seal_open()
        frame = _Frame(K_IDS, spec)
        frame.items = items
        frame.fut = fut = self._future()
        self._seal(frame)
        return fut

    def _seal_one(self, kind: int, build: Callable[[int], ClientFrame]) -> asyncio.Future[Any]:
        self._seal_open()
        frame = _Frame(kind, _DEFAULT_SPEC)
        self._last = frame.seq = seq = self._last + 1
        frame.data = encode_frame(build(seq))
        frame.fut = fut = self._future()
        self._queue(frame)
        return fut

    # -- waiting -----------------------------------------------------------------
    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def _pending_frames(self) -> int:
        return len(self._outq) + len(self._inflight)

    def _lowest_pending(self) -> int:
        """Seq of the oldest unanswered frame (outq and inflight ascend; resends come first)."""
        if self._inflight:
            return next(iter(self._inflight))
        return self._outq[0].seq if self._outq else 1 << 62

    async def _wait_answered(self, target: int) -> None:
        if self._lowest_pending() <= target:
            fut = self._future()
            self._flushers.append((target, fut))
            await fut

    async def _wait_room(self) -> None:
        while (
            self._pending_frames() >= self.max_inflight_frames
            or self._pending_bytes >= self.max_inflight_bytes
        ):
            fut = self._future()
            self._room.append(fut)
            await fut

    def _answered(self) -> None:
        """Wake flushes and bounded producers after frames were answered or failed."""
        if self._flushers:
            low = self._lowest_pending()
            still = []
            for target, fut in self._flushers:
                if target < low:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((target, fut))
            self._flushers = still
        if self._room and (
            self._pending_frames() < self.max_inflight_frames
            and self._pending_bytes < self.max_inflight_bytes
        ):
            room, self._room = self._room, []
            for fut in room:
                if not fut.done():
                    fut.set_result(None)

    # -- answers -----------------------------------------------------------------
    def _resolve(self, frame: _Frame, answer: Ack | Response | Error) -> None:
        self._pending_bytes -= len(frame.data)
        if type(answer) is Error:
            self._fail(frame, error_from_code(answer.code, answer.reason))
            return
        kind = frame.kind
        if kind == K_ITEMS and type(answer) is Ack and len(answer.ids) == len(frame.futs):
            self._set_results(frame.futs, answer.ids)
            self._items_done(len(frame.futs))
            return
        fut = frame.fut
        if fut is not None and not fut.done():
            if kind == K_IDS and type(answer) is Ack:
                fut.set_result(answer.ids)
                return
            if kind == K_NONE and type(answer) is Ack:
                fut.set_result(None)
                return
            if kind == K_REQUEST and type(answer) is Response:
                fut.set_result(answer.value)
                return
        elif fut is not None:
            return  # the caller stopped waiting (cancelled or timed out)
        self._fail(
            frame,
            ServiceError("bad_frame", f"unexpected answer {answer!r} to frame {frame.seq}"),
        )

    def _set_results(self, futs: list[Waiter], ids: list[int]) -> None:
        """Give each message's future its id (the per-message part of an ack)."""
        for waiter, mid in zip(futs, ids, strict=True):
            try:  # noqa: SIM105 - per message: cheaper than contextlib.suppress
                waiter.set_result(mid)
            except _INVALID_STATE:
                pass

    def _items_done(self, n: int) -> None:
        """``n`` per-message futures were resolved (`Client` counts them for backpressure)."""

    def _fail(self, frame: _Frame, exc: BaseException) -> None:
        """Fail a frame's futures; mark them retrieved (callers or flush() report errors)."""
        futs: list[Waiter] = list(frame.futs)
        if frame.fut is not None:
            futs.append(frame.fut)
        for fut in futs:
            try:
                fut.set_exception(exc)
            except _INVALID_STATE:
                continue
            if isinstance(fut, asyncio.Future):
                fut.exception()
        if frame.kind == K_ITEMS:
            self._items_done(len(frame.futs))
        if frame.detached and len(self._errors) < MAX_KEPT_ERRORS:
            self._errors.append((frame.seq, exc))

    def _fail_all(self, exc: BaseException) -> None:
        """Fail everything pending (open batches too): the client gave up or closed."""
        frames = [*self._inflight.values(), *self._outq]
        self._inflight.clear()
        self._outq.clear()
        opened = list(self._open.values())
        self._open.clear()
        for frame in opened:
            self._last = frame.seq = self._last + 1
            frames.append(frame)
        for frame in frames:
            self._pending_bytes -= len(frame.data)
            self._fail(frame, exc)
        self._pending_bytes = 0
        self._answered()

    # -- the connection ----------------------------------------------------------
    def _backoff(self, failures: int) -> float:
        return backoff_s(
            failures - 1, self.reconnect_backoff_s, self.reconnect_max_s, jitter="equal"
        )

    async def _supervise(self) -> None:
        """Run the connection; a bug in here fails every call instead of hanging it."""
        try:
            await self._connection_loop()
        except Exception as exc:
            logging.getLogger("engine.client").exception("the client's connection task failed")
            self._give_up(ServiceError("internal", f"client bug: {exc!r}"), fatal=True)

    async def _connection_loop(self) -> None:
        """Connect, serve the connection until it drops, reconnect with backoff; forever."""
        assert self._work is not None
        failures = 0
        while True:
            try:
                reader, writer = await asyncio.wait_for(self._open_stream(), self.connect_timeout_s)
            except _Drop as drop:
                if drop.fatal:
                    self._give_up(drop.error, fatal=True)
                    return
                error: BaseException = drop.error
            except (OSError, EOFError, TimeoutError) as exc:
                error = exc
            else:
                connected = self._connected
                if connected is not None and not connected.done():
                    connected.set_result(None)
                progress = await self._serve(reader, writer)
                if isinstance(progress, BaseException):
                    self._give_up(progress, fatal=True)
                    return
                failures = 0 if progress else failures
                error = ConnectionLost(f"the connection to {self.url} dropped")
            failures += 1
            if failures >= self.reconnect_attempts:
                self._give_up(
                    ConnectionLost(
                        f"cannot reach the service at {self.url} after {failures} attempts: {error}"
                    )
                )
                failures = 0
                # Try again when there is something to send, or connect() is called.
                while not (self._open or self._outq) and self._connected_done():
                    self._work.clear()
                    await self._work.wait()
                continue
            await asyncio.sleep(self._backoff(failures))

    def _connected_done(self) -> bool:
        """False while a connect() waits for a connection."""
        return self._connected is None or self._connected.done()

    def _give_up(self, exc: BaseException, *, fatal: bool = False) -> None:
        """Fail every pending call; connect() now raises ``exc`` until it is called again."""
        if fatal:
            self._fatal = exc
        connected = self._connected
        if connected is None or connected.done():
            connected = self._connected = self._future()
        connected.set_exception(exc)
        connected.exception()
        self._fail_all(exc)

    async def _open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        scheme, host, port = self._address
        if scheme == "unix":
            reader, writer = await asyncio.open_unix_connection(host)
        else:
            reader, writer = await asyncio.open_connection(host, port)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            writer.write(encode_frame(Hello(PROTOCOL_VERSION, self._token, CLIENT_NAME)))
            welcome = _welcome(await self._read_answer(reader))
        except BaseException:
            writer.close()
            raise
        self.max_frame_bytes = welcome.max_frame_bytes
        self.server = welcome.server
        return reader, writer

    @staticmethod
    async def _read_answer(reader: asyncio.StreamReader) -> Welcome | Ack | Response | Error:
        try:
            n = frame_length(await reader.readexactly(HEADER_BYTES))
            if n > MAX_ANSWER_BYTES:
                raise _Drop(ServiceError("bad_frame", f"answer of {n} bytes announced"))
            body = await reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise EOFError("the service closed the connection") from exc
        try:
            answer: Welcome | Ack | Response | Error = server_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _Drop(ServiceError("bad_frame", f"undecodable answer: {exc}")) from exc
        return answer

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool | BaseException:
        """Run one connection until it drops; True if any frame was answered on it,
        an exception if the service refused us for good."""
        state = {"progress": False}
        read = asyncio.ensure_future(self._read_loop(reader, state))
        write = asyncio.ensure_future(self._write_loop(writer))
        try:
            await asyncio.wait((read, write), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, write):
                task.cancel()
            for task in (read, write):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            writer.close()
            self._requeue()
        for task in (read, write):
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, _Drop) and exc.fatal:
                return exc.error
        return state["progress"]

    def _requeue(self) -> None:
        """After a drop: requests in flight fail, every other unanswered frame goes first
        in the queue, in seq order, to be re-sent on the next connection."""
        resend: list[_Frame] = []
        for frame in self._inflight.values():
            if frame.kind == K_REQUEST:
                self._pending_bytes -= len(frame.data)
                self._fail(
                    frame,
                    ConnectionLost(
                        f"the connection to {self.url} dropped before the request's answer; "
                        "it may have been delivered"
                    ),
                )
            else:
                resend.append(frame)
        self._inflight.clear()
        self._outq.extendleft(reversed(resend))
        self._answered()

    async def _read_loop(self, reader: asyncio.StreamReader, state: dict[str, bool]) -> None:
        inflight = self._inflight
        while True:
            answer = await self._read_answer(reader)
            if isinstance(answer, Welcome):
                raise _Drop(ServiceError("bad_frame", "a second Welcome"))
            seq = answer.seq
            frame = inflight.get(seq)
            if frame is None:
                if type(answer) is Error:  # seq 0: the connection as a whole
                    exc = error_from_code(answer.code, answer.reason)
                    raise _Drop(exc, fatal=answer.code == ERR_AUTH)
                raise _Drop(ServiceError("bad_frame", f"answer for unknown frame: {answer!r}"))
            if (
                type(answer) is Error
                and answer.code in _RETRIABLE_CODES
                and frame.kind != K_REQUEST
            ):
                # The service is going away and did not take this frame: re-send it
                # (and everything after it) on the next connection.
                raise _Drop(error_from_code(answer.code, answer.reason))
            del inflight[seq]
            state["progress"] = True
            self._resolve(frame, answer)
            self._answered()
            if self._work is not None:
                self._work.set()

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        """Write queued frames; when nothing is queued, seal the open batches (what
        accumulated while the previous write drained is the next natural batch)."""
        work = self._work
        assert work is not None
        outq, inflight = self._outq, self._inflight
        while True:
            work.clear()
            if not outq and self._open and len(inflight) < self.max_inflight_frames:
                self._seal_open()
            if outq and len(inflight) < self.max_inflight_frames:
                chunks: list[bytes] = []
                size = 0
                while outq and size < WRITE_CHUNK and len(inflight) < self.max_inflight_frames:
                    frame = outq.popleft()
                    inflight[frame.seq] = frame
                    chunks.append(frame.data)
                    size += len(frame.data)
                writer.writelines(chunks)
                await writer.drain()
                continue
            await work.wait()


# The blocking client lives in its own module; importing it last avoids the cycle.
from engine.client.sync import Client, MessageFuture  # noqa: E402
