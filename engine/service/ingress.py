"""The binary ingress: TCP and unix-socket servers speaking `engine.protocol` frames.

This module accepts and limits connections; `engine.service.connection` serves each one.

One coroutine per connection reads frames and queues their messages in the
engine.  A Submit is acked as soon as its messages are in a ring; while a ring
is full the connection's reader waits in ``submit_many`` and reads nothing, so
the kernel's socket buffers fill and TCP backpressure reaches the client —
nothing is dropped.  Answers that take longer (requests, ``settled`` acks) run
as tasks; a per-connection writer sends every answer in request order.

Bad input never takes the server down: a frame that does not decode gets an
``Error`` with the reason and the connection goes on (the length prefix keeps
the stream in step); a length above ENGINE_MAX_FRAME_BYTES is refused before
anything is allocated and the connection is closed, since the stream can no
longer be trusted.  Before its Hello is accepted a connection may send only a
frame the size a Hello can need (the longest token plus 4 KiB), within
ENGINE_HELLO_TIMEOUT_S (`engine.service.connection`).  Every refusal is counted.
A client that hangs up before reading its answers is normal: they are dropped and
counted (``answers_dropped_total``).  Warnings about clients are rate-limited per
peer host and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

from engine.logs import LogLimiter, suppressed_note
from engine.protocol import ERR_BUSY, ERR_CLOSED, Error, encode_frame
from engine.service.connection import Connection, close_writer, write_quietly

if TYPE_CHECKING:
    from engine.core.engine import Engine
    from engine.service.ratelimit import UserLimits
    from engine.service.users import Users

log = logging.getLogger("engine.ingress")

COUNTERS = (
    "connections_total",
    "connections_rejected_total",
    "auth_failures_total",
    "frames_total",
    "messages_total",
    "bad_frames_total",
    "errors_total",
    "answers_dropped_total",
)


class Ingress:
    """Accepts connections and turns their frames into engine calls."""

    def __init__(
        self,
        engine: Engine,
        *,
        users: Users,
        limits: UserLimits,
        max_frame_bytes: int,
        max_connections: int,
        answer_linger_s: float,
        hello_timeout_s: float,
        warn_interval_s: float = 10.0,
    ) -> None:
        self.engine = engine
        # One warning line per (peer host, reason) and interval: a fuzzing client or a
        # connection flood must not flood the log (ENGINE_LOG_LIMIT_INTERVAL_S).
        self.warnings = LogLimiter(warn_interval_s)
        self.answer_linger_s = answer_linger_s  # how long a closing connection may owe answers
        self.users = users  # who each token is (the handshake asks)
        self.limits = limits  # per-user rate limits and counts
        self.max_frame_bytes = max_frame_bytes
        self.hello_timeout_s = hello_timeout_s  # time to Hello (and its pre-auth size limit)
        self.max_connections = max_connections
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.servers: list[asyncio.Server] = []
        self.connections: dict[asyncio.Task[None], Connection] = {}
        self.accepting = True
        self.addresses: dict[str, str] = {}

    @property
    def active(self) -> int:
        return len(self.connections)

    async def start(self, host: str, port: int, socket_path: str) -> None:
        """Listen on TCP (and the unix socket when a path is given)."""
        server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        self.servers.append(server)
        bound = server.sockets[0].getsockname()
        self.addresses["tcp"] = f"{bound[0]}:{bound[1]}"
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)  # a stale socket of an earlier run
            unix = await asyncio.start_unix_server(self._accept, socket_path)
            self.servers.append(unix)
            self.addresses["socket"] = socket_path

    def stop_accepting(self) -> None:
        """Close the listening sockets; open connections stop at their next frame."""
        self.accepting = False
        for server in self.servers:
            server.close()

    async def close(self, timeout: float) -> None:
        """Give open connections ``timeout`` seconds to finish their answers, then cut them."""
        self.stop_accepting()
        for conn in self.connections.values():
            conn.stop_reading()
        if self.connections:
            _, pending = await asyncio.wait(set(self.connections), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tell_suppressed()
        path = self.addresses.get("socket")
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def warn(self, host: str, reason: str, msg: str, *args: object) -> None:
        """A WARNING about a client, at most one per (host, reason) and interval; the line
        that gets through says how many were held back (``suppressed``)."""
        held = self.warnings.allow((host, reason))
        if held is None:
            return
        log.warning(
            msg + "%s",
            *args,
            suppressed_note(held),
            extra={"peer": host, "reason": reason, "suppressed": held},
        )

    def _tell_suppressed(self) -> None:
        """At close: the warnings still held back, so no count is lost."""
        held = self.warnings.take_held()
        if held:
            log.warning(
                "%d ingress warnings were held back by the rate limit since their last line",
                held,
                extra={"suppressed": held},
            )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.counts["connections_total"] += 1
        peer = writer.get_extra_info("peername") or "unix"
        if not self.accepting or self.active >= self.max_connections:
            self.counts["connections_rejected_total"] += 1
            reason = (
                "the service is shutting down"
                if not self.accepting
                else f"too many connections (ENGINE_MAX_CONNECTIONS={self.max_connections})"
            )
            self.warn(peer_host(peer), "refused", "refused connection from %s: %s", peer, reason)
            frame = encode_frame(Error(0, ERR_CLOSED if not self.accepting else ERR_BUSY, reason))
            if not write_quietly(writer, frame):
                self.counts["answers_dropped_total"] += 1  # it hung up first: normal
            await close_writer(writer)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, reader, writer, str(peer))
        conn.peer_host = peer_host(peer)
        self.connections[task] = conn
        try:
            await conn.run()
        finally:
            self.connections.pop(task, None)


def peer_host(peer: object) -> str:
    """The host of a peer address (its port changes with every connection): the key of
    the warnings' rate limit."""
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return str(peer)
