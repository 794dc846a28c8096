"""The dashboard's data: a sample every stats interval, a short history, ``GET /v1/live``.

`Live` samples the engine every ENGINE_STATS_INTERVAL_S whether or not anyone
watches (it also feeds the failure watch behind ``/healthz``): rates per
second, the settle latency of that interval (p50/p95/p99 from the difference
of two cumulative histograms), in-flight.  It keeps the last ten minutes, so a
page opened late still draws its charts, and pushes to every WebSocket client
a ``stats`` message per sample and an ``event`` message per engine event
(worker died, respawned, dead letter, monitor restart ...), as they happen.

The WebSocket is authenticated at the handshake, before anything is sent: a
browser cannot set an ``Authorization`` header on a WebSocket, so the token
may also come as the subprotocol ``bearer.<base64url(token)>`` next to
``ringway.v1``.  A wrong or missing token gets 401 and no upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import WSMsgType, web

from engine.core.events import Event
from engine.core.stats import PERCENTILES
from ipc.control import Histogram

if TYPE_CHECKING:
    from engine.config import Config
    from engine.core.engine import Engine
    from engine.service.health import FailureWatch
    from engine.service.users import Users

log = logging.getLogger("engine.http")

PROTOCOL = "ringway.v1"
TOKEN_PROTOCOL_PREFIX = "bearer."
HISTORY_S = 600.0  # what a newly opened page can draw
CLIENT_QUEUE = 256  # messages waiting for one slow client before it is dropped
_json = msgspec.json.Encoder()


class LiveService(Protocol):
    """What `Live` needs of the running service (a protocol: no import of the server)."""

    config: Config
    engine: Engine
    failures: FailureWatch
    users: Users

    def stats(self) -> dict[str, Any]: ...


def interval_histogram(now: Histogram, before: Histogram | None) -> Histogram:
    """The values recorded between two cumulative histograms (``now`` alone after a reset).

    A monitor restart starts the cumulative counts over; a bucket that went down
    marks that, and then ``now`` is the whole interval.
    """
    if before is None or len(before.buckets) > len(now.buckets):
        return now
    old = before.buckets
    diff = [n - (old[i] if i < len(old) else 0) for i, n in enumerate(now.buckets)]
    if any(d < 0 for d in diff) or now.sum_ns < before.sum_ns:
        return now
    return Histogram(buckets=diff, max_ns=now.max_ns, sum_ns=now.sum_ns - before.sum_ns)


def _token_from_protocols(header: str) -> str | None:
    """The token carried as ``bearer.<base64url>`` in Sec-WebSocket-Protocol, if any."""
    for proto in (p.strip() for p in header.split(",")):
        if proto.startswith(TOKEN_PROTOCOL_PREFIX):
            raw = proto[len(TOKEN_PROTOCOL_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
    return None


class Live:
    """Samples, history, and the WebSocket clients of one service."""

    RATE_KEYS = ("submitted", "delivered", "dead_lettered", "redelivered", "failed_attempts")

    def __init__(self, service: LiveService) -> None:
        self.service = service
        interval = service.config.stats_interval_s
        self.history: deque[dict[str, Any]] = deque(maxlen=max(2, math.ceil(HISTORY_S / interval)))
        self.clients: set[asyncio.Queue[str | None]] = set()
        self._last: dict[str, Any] | None = None  # the previous sample's counters and time
        self._hist: Histogram | None = None
        self._hist_sent = -1
        self._latency: dict[str, float | None] = {name: None for name, _ in PERCENTILES}
        self._task: asyncio.Task[None] | None = None

    # -- sampling -------------------------------------------------------------------------
    def start(self) -> None:
        self.service.engine.events.subscribe(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ringway-live")

    async def stop(self) -> None:
        self.service.engine.events.unsubscribe(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for queue in list(self.clients):
            self._offer(queue, None)

    async def _run(self) -> None:
        interval = self.service.config.stats_interval_s
        while True:
            try:
                self.sample()
            except Exception:  # never let one bad sample end the dashboard (or the watch)
                log.exception("cannot take a dashboard sample")
            await asyncio.sleep(interval)

    def sample(self) -> dict[str, Any]:
        """Take one sample: rates since the previous one, this interval's latency; push it."""
        engine = self.service.engine
        report = engine.report
        self.service.failures.observe(report)
        stats = self.service.stats()
        now = time.time()
        counters = {k: stats[k] for k in self.RATE_KEYS}
        sample: dict[str, Any] = {"t": now, "in_flight": stats["in_flight"]}
        last = self._last
        for key, value in counters.items():
            if last is None or now <= last["t"]:
                sample[f"{key}_per_s"] = None
            else:
                before = last[key]
                delta = value - before if value >= before else value  # a reset starts over
                sample[f"{key}_per_s"] = delta / (now - last["t"])
        self._last = counters | {"t": now}
        if report is not None and report.sent_ns != self._hist_sent:
            h = interval_histogram(report.latency_settle, self._hist)
            # Each report is a freshly decoded object: keeping it is keeping a copy.
            self._hist, self._hist_sent = report.latency_settle, report.sent_ns
            self._latency = {
                name: (h.percentile(q) if h.count else None) for name, q in PERCENTILES
            }
        sample |= {f"{name}_s": value for name, value in self._latency.items()}
        self.history.append(sample)
        self._broadcast({"type": "stats", "sample": sample, "stats": stats})
        return sample

    # -- pushing --------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        self._broadcast({"type": "event", "event": event})

    def _broadcast(self, message: dict[str, Any]) -> None:
        if not self.clients:
            return
        text = _json.encode(message).decode()
        for queue in list(self.clients):
            self._offer(queue, text)

    def _offer(self, queue: asyncio.Queue[str | None], text: str | None) -> None:
        try:
            queue.put_nowait(text)
        except asyncio.QueueFull:
            # A client this far behind gets closed, not an unbounded queue.
            self.clients.discard(queue)
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            queue.put_nowait(None)

    # -- the WebSocket --------------------------------------------------------------------
    def authorized(self, request: web.Request) -> bool:
        users = self.service.users
        if not users.required:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        given = value if scheme.lower() == "bearer" else None
        if given is None:
            given = _token_from_protocols(request.headers.get("Sec-WebSocket-Protocol", ""))
        return given is not None and users.authenticate(given) is not None

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/live``: hello (history, recent events, stats), then samples and events."""
        if not self.authorized(request):
            body = {"error": "auth", "reason": "a bearer token is required (or is wrong)"}
            return web.Response(
                status=401,
                body=_json.encode(body),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="ringway"'},
            )
        ws = web.WebSocketResponse(protocols=(PROTOCOL,), heartbeat=30.0)
        await ws.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_QUEUE)
        hello = {
            "type": "hello",
            "interval_s": self.service.config.stats_interval_s,
            "history": list(self.history),
            "events": list(self.service.engine.events.recent),
            "stats": self.service.stats(),
        }
        await ws.send_str(_json.encode(hello).decode())
        self.clients.add(queue)
        writer = asyncio.ensure_future(self._write(ws, queue))
        try:
            async for msg in ws:  # nothing is expected from the page; this notices the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.discard(queue)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            await ws.close()
        return ws

    async def _write(self, ws: web.WebSocketResponse, queue: asyncio.Queue[str | None]) -> None:
        while (text := await queue.get()) is not None:
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError):
                break  # the page went away mid-send; the reader side ends too
        await ws.close()
