"""The client's connection: connect, say Hello, write frames, read answers, reconnect.

A `Connection` drives one `Pipeline`: it writes the pipeline's queued frames
(sealing the open batches when it has nothing else to write, so what gathered
during the last write is the next batch), hands every answer back to it, and
after a drop re-queues the unanswered frames and reconnects with exponential
backoff and jitter.  Apart from the pipeline because this is all the socket
and retry state; the pipeline knows nothing of sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Final
from urllib.parse import urlsplit

import msgspec

from engine.backoff import backoff_s
from engine.client.pipeline import ANSWERED_ONCE, Pipeline, error_from_code
from engine.errors import ConnectionLost, ServiceError
from engine.protocol import (
    ERR_AUTH,
    ERR_BUSY,
    ERR_CLOSED,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    Ack,
    BatchAnswer,
    Error,
    Hello,
    Response,
    Welcome,
    encode_frame,
    frame_length,
    server_decoder,
)

__all__ = ["DEFAULT_URL", "Connection", "parse_url"]

DEFAULT_URL: Final = "tcp://127.0.0.1:7878"
DEFAULT_PORT: Final = 7878
MAX_ANSWER_BYTES: Final = 1 << 30  # a larger announced answer means a broken stream
WRITE_CHUNK: Final = 1 << 20  # bytes of frames handed to the transport per write
CLIENT_NAME: Final = "ringway-python/1"

_RETRIABLE_CODES = frozenset((ERR_BUSY, ERR_CLOSED))


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


class _Drop(Exception):
    """Ends a connection; ``error`` says why (fatal when it is not retriable)."""

    def __init__(self, error: BaseException, *, fatal: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.fatal = fatal


def _welcome(answer: Welcome | Ack | Response | Error | BatchAnswer) -> Welcome:
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


class Connection:
    """The socket behind a `Pipeline`, kept up by one task (`start`) until `stop`.

    After ``reconnect_attempts`` consecutive failures without progress every
    pending call fails with `ConnectionLost`; the task then waits for something
    to send (or a `wait_connected`) and starts a new round of attempts.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        address: tuple[str, str, int],
        token: str,
        *,
        reconnect_backoff_s: float,
        reconnect_max_s: float,
        reconnect_attempts: int,
        connect_timeout_s: float,
    ) -> None:
        self._pipeline = pipeline
        self._address = address
        self._token = token
        self.reconnect_backoff_s = reconnect_backoff_s
        self.reconnect_max_s = reconnect_max_s
        self.reconnect_attempts = reconnect_attempts
        self.connect_timeout_s = connect_timeout_s
        self.server = ""  # the service's name, from its Welcome
        self._task: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start connecting on ``loop`` (the pipeline's, once it has one)."""
        self._connected = loop.create_future()
        self._task = loop.create_task(self._supervise(), name="ringway-client")

    async def wait_connected(self) -> None:
        """Wait for a connection; after a give-up, start a new round of attempts first."""
        connected = self._connected
        work = self._pipeline._work
        assert connected is not None and work is not None
        if connected.done() and connected.exception() is not None:
            connected = self._connected = self._pipeline._future()
            work.set()  # wakes a supervisor that gave up
        await asyncio.shield(connected)

    async def stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- reconnecting ------------------------------------------------------------
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
        pipeline = self._pipeline
        work = pipeline._work
        assert work is not None
        url = pipeline.url
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
                error = ConnectionLost(f"the connection to {url} dropped")
            failures += 1
            if failures >= self.reconnect_attempts:
                self._give_up(
                    ConnectionLost(
                        f"cannot reach the service at {url} after {failures} attempts: {error}"
                    )
                )
                failures = 0
                # Try again when there is something to send, or connect() is called.
                while not (pipeline._open or pipeline._outq) and self._connected_done():
                    work.clear()
                    await work.wait()
                continue
            await asyncio.sleep(self._backoff(failures))

    def _connected_done(self) -> bool:
        """False while a connect() waits for a connection."""
        return self._connected is None or self._connected.done()

    def _give_up(self, exc: BaseException, *, fatal: bool = False) -> None:
        """Fail every pending call; connect() now raises ``exc`` until it is called again."""
        pipeline = self._pipeline
        if fatal:
            pipeline._fatal = exc
        connected = self._connected
        if connected is None or connected.done():
            connected = self._connected = pipeline._future()
        connected.set_exception(exc)
        connected.exception()
        pipeline._fail_all(exc)

    # -- one connection ----------------------------------------------------------
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
        self._pipeline.max_frame_bytes = welcome.max_frame_bytes
        self.server = welcome.server
        return reader, writer

    @staticmethod
    async def _read_answer(
        reader: asyncio.StreamReader,
    ) -> Welcome | Ack | Response | Error | BatchAnswer:
        try:
            n = frame_length(await reader.readexactly(HEADER_BYTES))
            if n > MAX_ANSWER_BYTES:
                raise _Drop(ServiceError("bad_frame", f"answer of {n} bytes announced"))
            body = await reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise EOFError("the service closed the connection") from exc
        try:
            answer: Welcome | Ack | Response | Error | BatchAnswer = server_decoder.decode(body)
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
        fatal: BaseException | None = None
        try:
            await asyncio.wait((read, write), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, write):
                task.cancel()
            for task in (read, write):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            writer.close()
            for task in (read, write):
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, _Drop) and exc.fatal:
                    fatal = exc.error
            if fatal is None:  # else every pending call fails with the fatal error itself
                self._pipeline._requeue()
        return state["progress"] if fatal is None else fatal

    async def _read_loop(self, reader: asyncio.StreamReader, state: dict[str, bool]) -> None:
        pipeline = self._pipeline
        inflight = pipeline._inflight
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
                and frame.kind not in ANSWERED_ONCE
            ):
                # The service is going away and did not take this frame: re-send it
                # (and everything after it) on the next connection.
                raise _Drop(error_from_code(answer.code, answer.reason))
            del inflight[seq]
            state["progress"] = True
            pipeline._resolve(frame, answer)
            pipeline._answered()
            if pipeline._work is not None:
                pipeline._work.set()

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        """Write queued frames; when nothing is queued, seal the open batches (what
        accumulated while the previous write drained is the next natural batch)."""
        pipeline = self._pipeline
        work = pipeline._work
        assert work is not None
        outq, inflight = pipeline._outq, pipeline._inflight
        while True:
            work.clear()
            if not outq and pipeline._open and len(inflight) < pipeline.max_inflight_frames:
                pipeline._seal_open()
            if outq and len(inflight) < pipeline.max_inflight_frames:
                chunks: list[bytes] = []
                size = 0
                while outq and size < WRITE_CHUNK and len(inflight) < pipeline.max_inflight_frames:
                    frame = outq.popleft()
                    inflight[frame.seq] = frame
                    chunks.append(frame.data)
                    size += len(frame.data)
                writer.writelines(chunks)
                await writer.drain()
                continue
            await work.wait()
