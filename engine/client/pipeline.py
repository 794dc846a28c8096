"""The frames of one client between its callers and the wire, and what answers do to them.

Messages go into an open batch per options (`Spec`); a batch is sealed into a
``Submit`` frame when full, when its bytes reach the service's frame limit, or
before a frame of another call (so call order holds).  Sealed frames wait in a
queue, then in flight until their answer resolves the callers' futures.  The
frames and bytes in flight are bounded.  No I/O here: a `Connection` writes the
queue and feeds the answers back.  `AsyncClient` is a `Pipeline` with the
public API on top; the blocking `Client` overrides how per-message futures are
completed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import msgspec

from engine.client.options import DEFAULT_SPEC, Spec, bad_recipient, encode_payload
from engine.errors import (
    AuthenticationError,
    ConnectionLost,
    EngineClosed,
    EngineError,
    RateLimited,
    RequestFailed,
    RequestTimeout,
    ServiceError,
)
from engine.protocol import (
    ERR_AUTH,
    ERR_CLOSED,
    ERR_HANDLER,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    Ack,
    BatchAnswer,
    ClientFrame,
    Error,
    Response,
    Submit,
    encode_frame,
)

__all__ = [
    "ANSWERED_ONCE",
    "K_BATCH",
    "K_IDS",
    "K_ITEMS",
    "K_NONE",
    "K_REQUEST",
    "Frame",
    "Pipeline",
    "Waiter",
    "error_from_code",
]

DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024  # the service's default, until Welcome says
ITEM_OVERHEAD: Final = 12  # per (recipient, payload) pair: array and str headers (+4 B a char)
MAX_KEPT_ERRORS: Final = 1000  # errors of fire-and-forget frames kept for flush()

# What a frame's answer resolves: per-message futures, one future with all ids,
# one future with None, one future with the Response value, or with the BatchAnswer.
K_ITEMS, K_IDS, K_NONE, K_REQUEST, K_BATCH = 0, 1, 2, 3, 4
# Frames never re-sent after a drop (a request may have been delivered): they fail instead.
ANSWERED_ONCE = frozenset((K_REQUEST, K_BATCH))

_INVALID_STATE = (asyncio.InvalidStateError, cf.InvalidStateError)
Waiter = asyncio.Future[Any] | cf.Future[Any]


def error_from_code(code: str, reason: str, retry_after_s: float = 0.0) -> EngineError:
    """The typed exception for a service ``Error``; the message keeps the service's reason."""
    if code == ERR_RATE_LIMITED:
        return RateLimited(code, reason, retry_after_s)
    if code == ERR_AUTH:
        return AuthenticationError(code, reason)
    if code == ERR_TIMEOUT:
        return RequestTimeout(reason)
    if code == ERR_HANDLER:
        return RequestFailed(reason)
    if code == ERR_CLOSED:
        return EngineClosed(reason)
    return ServiceError(code, reason)


class Frame:
    """A batch being filled (seq 0), then a sealed frame waiting to be written or answered."""

    __slots__ = ("data", "detached", "fut", "futs", "items", "kind", "nbytes", "seq", "spec")

    def __init__(self, kind: int, spec: Spec) -> None:
        self.kind = kind
        self.spec = spec
        self.seq = 0
        self.data = b""
        self.items: list[tuple[str, msgspec.Raw]] = []
        self.futs: list[Waiter] = []
        self.fut: asyncio.Future[Any] | None = None
        self.detached = False  # holds fire-and-forget sends: flush() reports its error
        self.nbytes = spec.size


class Pipeline:
    """Open batches, the queue of sealed frames, the frames in flight, and their futures.

    Seqs ascend in the queue and in flight (re-sent frames go first), so the
    oldest unanswered frame is always at the front: flush() waits for it.
    """

    def __init__(
        self, url: str, batch_size: int, max_inflight_frames: int, max_inflight_bytes: int
    ) -> None:
        self.url = url
        self.batch_size = batch_size
        self.max_inflight_frames = max_inflight_frames
        self.max_inflight_bytes = max_inflight_bytes
        self.max_frame_bytes = DEFAULT_MAX_FRAME
        self._last = 0  # seq of the latest sealed frame
        self._open: dict[Spec, Frame] = {}  # batches being filled, by options
        self._outq: deque[Frame] = deque()  # sealed, not yet written (ascending seq)
        self._inflight: dict[int, Frame] = {}  # written, not yet answered (ascending seq)
        self._pending_bytes = 0  # of sealed frames not yet answered
        self._errors: list[tuple[int, BaseException]] = []
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._room: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: asyncio.Event | None = None  # set when there is something to write
        self._fatal: BaseException | None = None  # the service refused us for good
        self._closing = False
        self._key_prefix = ""  # set: every submitted message gets a dedup_key (idempotent)
        self._key_count = 0

    # -- building frames ---------------------------------------------------------
    def _chunks(
        self, items: Iterable[tuple[str, Any]], spec: Spec
    ) -> Iterator[list[tuple[str, msgspec.Raw]]]:
        """Encode pairs into lists that each fit one Submit frame (items and bytes)."""
        limit = self.max_frame_bytes - spec.size
        size = self.batch_size
        chunk: list[tuple[str, msgspec.Raw]] = []
        nbytes = 0
        for recipient, payload in items:
            if type(recipient) is not str or not recipient:
                raise bad_recipient(recipient)
            raw = encode_payload(payload)
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
        self, spec: Spec, recipient: str, raw: msgspec.Raw, fut: Waiter, detached: bool
    ) -> None:
        """Append one message to the open batch of its options (the hot path)."""
        if self._closing or self._fatal is not None:
            self._refuse(fut, self._fatal or EngineClosed(f"the client of {self.url} is closed"))
            return
        n = len(raw) + 4 * len(recipient) + ITEM_OVERHEAD
        batch = self._open.get(spec)
        if batch is None:
            batch = self._open[spec] = Frame(K_ITEMS, spec)
        elif batch.nbytes + n > self.max_frame_bytes:
            self._seal(self._open.pop(spec))
            batch = self._open[spec] = Frame(K_ITEMS, spec)
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

    def _seal(self, frame: Frame) -> None:
        """Give the frame its seq and bytes and queue it for the writer."""
        self._last = frame.seq = seq = self._last + 1
        keys: list[str] = []
        if self._key_prefix and not frame.spec.options.dedup_key:
            # Made once, here: a re-sent frame carries the same keys, so the service
            # acks what it already queued with the first ids instead of queueing it again.
            first, self._key_count = self._key_count, self._key_count + len(frame.items)
            keys = [f"{self._key_prefix}{n:x}" for n in range(first, self._key_count)]
        options, settled = frame.spec.options, frame.spec.settled
        frame.data = encode_frame(Submit(seq, frame.items, options, settled, keys))
        frame.items = []
        self._queue(frame)

    def _queue(self, frame: Frame) -> None:
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

    def _seal_items(self, items: list[tuple[str, msgspec.Raw]], spec: Spec) -> asyncio.Future[Any]:
        self._seal_open()
        frame = Frame(K_IDS, spec)
        frame.items = items
        frame.fut = fut = self._future()
        self._seal(frame)
        return fut

    def _seal_one(self, kind: int, build: Callable[[int], ClientFrame]) -> asyncio.Future[Any]:
        self._seal_open()
        frame = Frame(kind, DEFAULT_SPEC)
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
    def _resolve(self, frame: Frame, answer: Ack | Response | Error | BatchAnswer) -> None:
        self._pending_bytes -= len(frame.data)
        if type(answer) is Error:
            self._fail(frame, error_from_code(answer.code, answer.reason, answer.retry_after_s))
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
            if kind == K_BATCH and type(answer) is BatchAnswer:
                fut.set_result(answer)
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

    def _fail(self, frame: Frame, exc: BaseException) -> None:
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

    def _requeue(self) -> None:
        """After a drop: requests in flight fail, every other unanswered frame goes first
        in the queue, in seq order, to be re-sent on the next connection."""
        resend: list[Frame] = []
        for frame in self._inflight.values():
            if frame.kind in ANSWERED_ONCE:
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
