"""One client connection of the binary ingress: a frame reader and an in-order answer writer.

The reader queues each frame's messages in the engine (waiting there while a ring
is full, which is how TCP backpressure reaches the client); requests and settled
acks run as tasks, and the writer sends every answer in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec

from engine.batches import BatchRequest
from engine.errors import (
    EngineClosed,
    EngineError,
    FieldTooLarge,
    RequestFailed,
    RequestTimeout,
)
from engine.protocol import (
    ERR_AUTH,
    ERR_BAD_FRAME,
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_HANDLER,
    ERR_INTERNAL,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    HEADER_BYTES,
    NIL,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    BatchAnswer,
    BatchFigures,
    Broadcast,
    ClientFrame,
    Error,
    Hello,
    ItemAnswer,
    Publish,
    Register,
    Request,
    Response,
    SendOptions,
    ServerFrame,
    Submit,
    Subscribe,
    Welcome,
    client_decoder,
    encode_frames_into,
    frame_length,
)
from engine.service.ratelimit import limited_reason
from ipc.codec import DECODE_ERRORS

if TYPE_CHECKING:
    from engine.batches import BatchStats
    from engine.core.batch import Outcome
    from engine.core.engine import Engine
    from engine.service.ratelimit import UserLimits
    from engine.service.users import Users

log = logging.getLogger("engine.ingress")

PENDING_ANSWERS = 256  # answers queued per connection before its reader pauses
PRE_AUTH_OVERHEAD = 4096  # bytes a Hello may hold besides its token (version, client name)
WRITE_BATCH = 64  # answers coalesced into one socket write at most

Answer = ServerFrame | asyncio.Task[ServerFrame]
# What decoding untrusted bytes may raise (ValidationError is a DecodeError).
_UNDECODABLE = DECODE_ERRORS


class ProtocolViolation(EngineError):
    """Raised inside a connection when the peer broke the framing; the connection closes."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        super().__init__(reason)


def send_options(opts: SendOptions) -> dict[str, Any]:
    """The Engine keywords a frame's SendOptions stand for (only the non-default ones)."""
    out: dict[str, Any] = {}
    if opts.priority != "normal":
        out["priority"] = opts.priority
    if opts.ttl_s is not None:
        out["ttl"] = opts.ttl_s
    if opts.kind != "direct":
        out["kind"] = opts.kind
    if opts.sender:
        out["sender"] = opts.sender
    if opts.reply_to:
        out["reply_to"] = opts.reply_to
    if opts.tags:
        out["tags"] = opts.tags
    if opts.metadata:
        out["metadata"] = opts.metadata
    if opts.dedup_key:
        out["dedup_key"] = opts.dedup_key
    return out


class Host(Protocol):
    """What a connection needs of the ingress that accepted it (`engine.service.ingress`)."""

    engine: Engine
    users: Users
    limits: UserLimits
    max_frame_bytes: int
    hello_timeout_s: float
    answer_linger_s: float
    counts: dict[str, int]
    accepting: bool

    def warn(self, host: str, reason: str, msg: str, *args: object) -> None: ...


class Connection:
    """One client: a reader loop and an in-order writer of answers."""

    def __init__(
        self,
        ingress: Host,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.ingress = ingress
        self.engine = ingress.engine
        self.counts = ingress.counts
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.peer_host = peer  # the rate limit's key for warnings (the ingress sets the host)
        self.hung_up = False  # the client went away: answers still owed are dropped, counted
        self.answers: asyncio.Queue[Answer | None] = asyncio.Queue(PENDING_ANSWERS)
        self.slow: set[asyncio.Task[ServerFrame]] = set()  # requests and settled acks
        self.idle = False
        self.user = ""  # who the Hello's token says this client is
        self._token = ""
        self._generation = ingress.users.generation

    async def run(self) -> None:
        sender = asyncio.ensure_future(self._send_answers())
        try:
            await self._handshake()
            while self.ingress.accepting:
                frame = await self._read_frame()
                if frame is None:
                    break
                await self.answers.put(await self._handle(frame))
        except ProtocolViolation as exc:
            self._count_error(exc.code)
            self.ingress.warn(
                self.peer_host, exc.code, "closing connection from %s: %s", self.peer, exc
            )
            # Never wait here: a peer that stopped reading has filled the queue, and
            # the linger in _finish bounds what it is still owed.
            with contextlib.suppress(asyncio.QueueFull):
                self.answers.put_nowait(Error(0, exc.code, str(exc)))
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up = True  # the client went away; what it had in flight is its to retry
            sender.cancel()
        except Exception as exc:  # a bug of ours: tell the client, keep serving the others
            log.exception("connection from %s failed", self.peer)
            self._count_error(ERR_INTERNAL)
            with contextlib.suppress(asyncio.QueueFull):
                self.answers.put_nowait(Error(0, ERR_INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            self.idle = False
            await self._finish(sender)

    async def _finish(self, sender: asyncio.Future[None]) -> None:
        """Let the writer send the answers still owed (bounded), then close."""
        if not sender.done():
            with contextlib.suppress(TimeoutError, ConnectionError, asyncio.CancelledError):
                # Bounded as a whole: a client that stopped reading fills the queue too.
                async with asyncio.timeout(self.ingress.answer_linger_s):
                    await self.answers.put(None)
                    await asyncio.shield(sender)
        sender.cancel()
        for task in self.slow:
            task.cancel()
        # What the client never got (it hung up, or stopped reading past the linger).
        self._dropped(sum(1 for a in _queued(self.answers) if a is not None))
        await close_writer(self.writer)

    def stop_reading(self) -> None:
        """End the read loop if it is waiting for a frame (never inside one)."""
        if self.idle:
            # Paused first: data arriving after feed_eof would trip the reader's assert.
            # (uvloop's transports are not asyncio.ReadTransport subclasses: no isinstance)
            cast(asyncio.Transport, self.writer.transport).pause_reading()
            self.reader.feed_eof()

    def pre_auth_limit(self) -> int:
        """The largest frame read before the Hello: the longest token plus the overhead.

        An unauthenticated peer can make the service hold no more than this (and
        only for ENGINE_HELLO_TIMEOUT_S), not ENGINE_MAX_FRAME_BYTES.
        """
        limit = self.ingress.users.max_token_bytes + PRE_AUTH_OVERHEAD
        return min(limit, self.ingress.max_frame_bytes)

    async def _handshake(self) -> None:
        timeout = self.ingress.hello_timeout_s
        try:
            # The whole frame, header and body, within the timeout: a peer dribbling a
            # partial Hello is cut off too.
            frame = await asyncio.wait_for(self._read_frame(self.pre_auth_limit()), timeout)
        except TimeoutError:
            raise ProtocolViolation(
                ERR_BAD_FRAME, f"no Hello within {timeout:g}s (ENGINE_HELLO_TIMEOUT_S)"
            ) from None
        if frame is None:
            raise ConnectionResetError
        if not isinstance(frame, Hello):
            raise ProtocolViolation(ERR_BAD_FRAME, "the first frame must be Hello")
        if frame.version != PROTOCOL_VERSION:
            raise ProtocolViolation(
                ERR_BAD_FRAME,
                f"protocol version {frame.version} is not supported (server speaks "
                f"{PROTOCOL_VERSION})",
            )
        self._authenticate(frame.token)
        await self.answers.put(Welcome(PROTOCOL_VERSION, "ringway", self.ingress.max_frame_bytes))

    def _authenticate(self, token: str) -> None:
        """Set the connection's user from ``token`` (engine.service.users); refuse a bad one."""
        users = self.ingress.users
        user = users.authenticate(token)
        if user is None:
            self.counts["auth_failures_total"] += 1
            reason = "a token is required" if not token else "the token is wrong"
            raise ProtocolViolation(ERR_AUTH, reason)
        self.user, self._token, self._generation = user, token, users.generation

    def _admit(self, frame: ClientFrame) -> Error | None:
        """The rate limit's refusal of ``frame``, if over it (nothing of it is queued then)."""
        if isinstance(frame, Submit | Batch):
            n = len(frame.items)
        elif isinstance(frame, Request | Publish | Broadcast):
            n = 1
        else:
            return None
        limits = self.ingress.limits
        wait = limits.admit(self.user, n)
        if not wait:
            return None
        self._count_error(ERR_RATE_LIMITED)
        return Error(
            frame.seq, ERR_RATE_LIMITED, limited_reason(self.user, wait, limits.rate), wait
        )

    async def _read_frame(self, pre_auth: int = 0) -> ClientFrame | None:
        """The next decodable frame; None at a clean end of stream.

        ``pre_auth`` > 0: no Hello yet, frames above that many bytes are refused
        before their body is read.
        """
        while True:
            try:
                self.idle = True  # between frames: stop_reading may end the stream here
                header = await self.reader.readexactly(HEADER_BYTES)
                self.idle = False
            except asyncio.IncompleteReadError as exc:
                self.idle = False
                if exc.partial:
                    raise ProtocolViolation(ERR_BAD_FRAME, "truncated frame header") from None
                return None
            n = frame_length(header)
            if pre_auth and n > pre_auth:
                raise ProtocolViolation(
                    ERR_BAD_FRAME,
                    f"frame of {n:,} bytes before Hello exceeds the pre-auth limit of "
                    f"{pre_auth:,} bytes (the longest token plus {PRE_AUTH_OVERHEAD:,})",
                )
            if n > self.ingress.max_frame_bytes:
                raise ProtocolViolation(
                    ERR_TOO_LARGE,
                    f"frame of {n:,} bytes exceeds ENGINE_MAX_FRAME_BYTES="
                    f"{self.ingress.max_frame_bytes:,}",
                )
            try:
                body = await self.reader.readexactly(n)
            except asyncio.IncompleteReadError:
                raise ProtocolViolation(
                    ERR_BAD_FRAME, f"truncated frame (header said {n:,} bytes)"
                ) from None
            self.counts["frames_total"] += 1
            try:
                frame: ClientFrame = client_decoder.decode(body)
            except _UNDECODABLE as exc:
                if pre_auth:
                    # Before Hello only a Hello may come: an unauthenticated peer gets
                    # no answers to pile up (nor a reason to stay); it is closed.
                    raise ProtocolViolation(
                        ERR_BAD_FRAME, f"undecodable frame before Hello: {exc}"
                    ) from None
                self._count_error(ERR_BAD_FRAME)
                await self.answers.put(
                    Error(_seq_of(body), ERR_BAD_FRAME, f"undecodable frame: {exc}")
                )
            else:
                return frame

    async def _handle(self, frame: ClientFrame) -> Answer:
        """Act on one frame; returns its answer (or an awaitable of it, kept in order)."""
        eng = self.engine
        if self.ingress.users.generation != self._generation:
            self._authenticate(self._token)  # the tokens were reloaded: is ours still good?
        if refused := self._admit(frame):
            return refused
        user = self.user  # stamped on every message: never the client's claim
        try:
            if isinstance(frame, Submit):
                keys = frame.keys or None
                if frame.settled:
                    # Queued here, in frame order and under backpressure; only the
                    # wait for settlement runs beside the reader.
                    ids, marks = await eng.submit_marked(
                        frame.items,
                        raw_checked=True,
                        dedup_keys=keys,
                        user=user,
                        **send_options(frame.options),
                    )
                    self.counts["messages_total"] += len(ids)
                    return self._later(frame.seq, self._settled_ack(frame.seq, ids, marks))
                ids = await eng.submit_many(
                    frame.items,
                    raw_checked=True,
                    dedup_keys=keys,
                    user=user,
                    **send_options(frame.options),
                )
                self.counts["messages_total"] += len(ids)
                return Ack(frame.seq, ids)
            if isinstance(frame, Request):
                coro = eng.request_raw(
                    frame.recipient,
                    frame.payload,
                    timeout=frame.timeout_s,
                    cache=frame.cache,
                    cache_ttl_s=frame.cache_ttl_s,
                    user=user,
                    **send_options(frame.options),
                )
                return self._later(frame.seq, _response(frame.seq, coro))
            if isinstance(frame, Batch):
                requests = [
                    BatchRequest(
                        recipient=i.recipient,
                        payload=i.payload,
                        priority=i.priority,
                        timeout_s=i.timeout_s,
                        cache=i.cache,
                        cache_ttl_s=i.cache_ttl_s,
                    )
                    for i in frame.items
                ]
                batch = eng.run_batch(
                    requests,
                    concurrency=frame.concurrency or None,
                    user=user,
                    raw_checked=True,
                )
                return self._later(frame.seq, _batch_answer(frame.seq, batch))
            if isinstance(frame, Publish):
                ids = await eng.publish(
                    frame.topic, frame.payload, user=user, **send_options(frame.options)
                )
                self.counts["messages_total"] += len(ids)
                return Ack(frame.seq, ids)
            if isinstance(frame, Broadcast):
                ids = await eng.broadcast(frame.payload, user=user, **send_options(frame.options))
                self.counts["messages_total"] += len(ids)
                return Ack(frame.seq, ids)
            if isinstance(frame, Subscribe):
                if frame.unsubscribe:
                    eng.unsubscribe(frame.topic, frame.recipient)
                else:
                    eng.subscribe(frame.topic, frame.recipient)
                return Ack(frame.seq)
            if isinstance(frame, Register):
                if frame.unregister:
                    eng.unregister(frame.recipient)
                else:
                    eng.register(frame.recipient)
                return Ack(frame.seq)
            return self._error(0, ERR_BAD_FRAME, "Hello may only be the first frame")
        except EngineClosed as exc:
            return self._error(_frame_seq(frame), ERR_CLOSED, str(exc))
        except FieldTooLarge as exc:  # a field over its size limit: the frame is refused
            return self._error(_frame_seq(frame), ERR_BAD_FRAME, str(exc))
        except (ValueError, TypeError, EngineError) as exc:
            return self._error(_frame_seq(frame), ERR_BAD_REQUEST, str(exc))

    async def _settled_ack(
        self, seq: int, ids: list[int], marks: list[tuple[int, int, int]]
    ) -> ServerFrame:
        await self.engine.wait_settled(marks)
        return Ack(seq, ids)

    def _later(self, seq: int, coro: Awaitable[ServerFrame]) -> asyncio.Task[ServerFrame]:
        """Run a slow answer as a task; errors become Error frames for ``seq``."""

        async def guarded() -> ServerFrame:
            try:
                return await coro
            except RequestTimeout as exc:
                return self._error(seq, ERR_TIMEOUT, str(exc))
            except RequestFailed as exc:
                return self._error(seq, ERR_HANDLER, str(exc))
            except EngineClosed as exc:
                return self._error(seq, ERR_CLOSED, str(exc))
            except FieldTooLarge as exc:
                return self._error(seq, ERR_BAD_FRAME, str(exc))
            except (ValueError, TypeError, EngineError) as exc:
                return self._error(seq, ERR_BAD_REQUEST, str(exc))
            except Exception as exc:
                log.exception("request %d from %s failed", seq, self.peer)
                return self._error(seq, ERR_INTERNAL, f"{type(exc).__name__}: {exc}")

        task = asyncio.ensure_future(guarded())
        self.slow.add(task)
        task.add_done_callback(self.slow.discard)
        return task

    def _error(self, seq: int, code: str, reason: str) -> Error:
        self._count_error(code)
        return Error(seq, code, reason)

    def _count_error(self, code: str) -> None:
        self.counts["errors_total"] += 1
        if code in (ERR_BAD_FRAME, ERR_TOO_LARGE):
            self.counts["bad_frames_total"] += 1

    async def _send_answers(self) -> None:
        """Write answers in request order, several per socket write when they are ready.

        Once the client hung up, the rest are taken off the queue and counted as
        dropped (``answers_dropped_total``), so the reader never waits on them.
        """
        out = bytearray()
        while True:
            item = await self.answers.get()
            if item is None:
                return
            if self.hung_up:
                self._discard(item)
                continue
            batch = [await _settle(item)]
            while len(batch) < WRITE_BATCH and not self.answers.empty():
                nxt = self.answers.get_nowait()
                if nxt is None:
                    self._write(batch, out)
                    await self._drain()
                    return
                if self.hung_up:
                    self._discard(nxt)
                    continue
                if isinstance(nxt, asyncio.Future) and not nxt.done():
                    self._write(batch, out)  # what is ready goes out while this one waits
                    batch = []
                batch.append(await _settle(nxt))
            self._write(batch, out)
            await self._drain()

    def _write(self, frames: list[ServerFrame], out: bytearray) -> None:
        if not frames:
            return
        if self.hung_up or self.writer.is_closing():
            self._dropped(len(frames))
            return
        out.clear()
        encode_frames_into(list(frames), out)
        if not write_quietly(self.writer, bytes(out)):
            self.hung_up = True
            self._dropped(len(frames))

    async def _drain(self) -> None:
        """Wait while the socket's buffer is full; a client that hung up ends the wait."""
        if self.hung_up:
            return
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError, OSError):
            self.hung_up = True  # what was written and not yet sent is lost with the socket

    def _discard(self, answer: Answer) -> None:
        """An answer the client will never read: counted, and not waited for."""
        if isinstance(answer, asyncio.Future):
            answer.cancel()
        self._dropped(1)

    def _dropped(self, n: int) -> None:
        if n:
            self.counts["answers_dropped_total"] += n


async def _settle(answer: Answer) -> ServerFrame:
    if isinstance(answer, asyncio.Future):
        return await answer
    return answer


async def _response(seq: int, coro: Awaitable[msgspec.Raw]) -> ServerFrame:
    return Response(seq, await coro)


async def _batch_answer(seq: int, run: Awaitable[tuple[list[Outcome], BatchStats]]) -> ServerFrame:
    outcomes, stats = await run
    return BatchAnswer(
        seq,
        [
            ItemAnswer(
                o.ok,
                o.value if o.value is not None else NIL,
                o.code,
                o.reason,
                o.cached,
                o.deduplicated,
                o.duration_s,
                o.attempts,
            )
            for o in outcomes
        ],
        BatchFigures(
            stats.total_duration_s,
            stats.average_duration_s,
            stats.cache_hit_rate,
            stats.deduplication_rate,
            stats.requests,
            stats.executed,
        ),
    )


def _frame_seq(frame: ClientFrame) -> int:
    return getattr(frame, "seq", 0)


def _seq_of(body: bytes) -> int:
    """Best-effort seq of an undecodable frame (element 1 of its array), else 0."""
    try:
        raw = msgspec.msgpack.decode(body)
    except _UNDECODABLE:
        return 0
    if isinstance(raw, list) and len(raw) > 1 and type(raw[1]) is int and 0 <= raw[1] < 1 << 63:
        return raw[1]
    return 0


def write_quietly(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write ``data`` unless the client already hung up; False if it did.

    uvloop raises RuntimeError ("the handler is closed") on a closed transport and
    the socket may raise a ConnectionError: a peer that went away is normal.
    """
    if writer.is_closing():
        return False
    try:
        writer.write(data)
    except (ConnectionError, RuntimeError, OSError):
        return False
    return True


def _queued(answers: asyncio.Queue[Answer | None]) -> list[Answer | None]:
    """Empty the queue without waiting: what is still in it."""
    out: list[Answer | None] = []
    while not answers.empty():
        out.append(answers.get_nowait())
    return out


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
