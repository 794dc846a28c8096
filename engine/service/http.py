"""The HTTP side of the service (aiohttp): health, stats, metrics and JSON ingress.

``GET /healthz`` answers without a token (load balancers and orchestrators
probe it) and tells only ok/degraded/unhealthy with reasons; so do the
dashboard's page and assets (``GET /``, ``/dashboard/*``: no data in them),
and ``GET /v1/live`` checks the token itself at the WebSocket handshake
(`engine.service.live`).  Every other route needs
``Authorization: Bearer <token>`` when tokens are set (ENGINE_AUTH_TOKEN,
ENGINE_AUTH_TOKENS_FILE: `engine.service.users`), and the token's user is
stamped on what the request sends.
``POST /v1/messages`` takes one JSON message object or an array of them and
answers 202 with their ids once they are in a ring (``?settled=1``: 200 once
they are delivered or dead-lettered), for clients in languages without our
binary client.  ``POST /v1/batch`` runs many requests at once
(`engine.core.batch`), ``DELETE /v1/cache`` forgets the user's cached
answers.  Over the user's rate limit a route that sends messages answers 429
with ``Retry-After``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import web

from engine.batches import BatchRequest
from engine.core.batch import Outcome
from engine.errors import EngineClosed, EngineError
from engine.service.dashboard import add_dashboard_routes
from engine.service.metrics import CONTENT_TYPE, Snapshot, render
from engine.service.ratelimit import limited_reason
from ipc.codec import pack_payload
from ipc.control import Histogram

if TYPE_CHECKING:
    import asyncio

    from engine.config import Config
    from engine.core.engine import Engine
    from engine.service.live import Live
    from engine.service.ratelimit import UserLimits
    from engine.service.users import Users

log = logging.getLogger("engine.http")

HTTP_COUNTERS = ("http_requests_total", "http_bad_requests_total", "http_auth_failures_total")


class Service(Protocol):
    """What the routes need of the running service (`engine.service.server.Service`).

    A protocol, so this module never imports the server that imports it.
    """

    config: Config
    engine: Engine
    counts: dict[str, int]
    stop_requested: asyncio.Event
    users: Users
    limits: UserLimits
    live: Live

    def stats(self) -> dict[str, Any]: ...

    def health_problems(self) -> list[str]: ...

    def degradation(self) -> list[str]: ...

    def service_counts(self) -> dict[str, int]: ...


class HttpMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One message of a ``POST /v1/messages`` body; the fields of ``Engine.submit``."""

    recipient: str
    payload: Any = None
    priority: str | int = "normal"
    ttl: float | None = None
    kind: str | int = "direct"
    sender: str = ""
    reply_to: str = ""
    tags: list[str] = []
    metadata: dict[str, str] = {}
    dedup_key: str = ""

    def options(self) -> tuple[Any, ...]:
        return (
            self.priority,
            self.ttl,
            self.kind,
            self.sender,
            self.reply_to,
            tuple(self.tags),
            tuple(sorted(self.metadata.items())),
            self.dedup_key,
        )


class HttpBatch(msgspec.Struct, forbid_unknown_fields=True):
    """A ``POST /v1/batch`` body: the requests (`BatchRequest` fields) and the concurrency."""

    requests: list[BatchRequest]
    concurrency: int | None = None


_body_decoder = msgspec.json.Decoder(HttpMessage | list[HttpMessage])
_batch_decoder = msgspec.json.Decoder(HttpBatch)
_json = msgspec.json.Encoder()
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)


def _reply(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=_json.encode(body), content_type="application/json")


def _problem(status: int, code: str, reason: str) -> web.Response:
    return _reply(status, {"error": code, "reason": reason})


def _item(o: Outcome) -> dict[str, Any]:
    """One answer of ``POST /v1/batch``: the value decoded from msgpack to become JSON."""
    out: dict[str, Any] = {"ok": o.ok}
    if o.ok:
        out["value"] = None if o.value is None else msgspec.msgpack.decode(o.value)
    else:
        out["error"] = {"code": o.code, "reason": o.reason}
    out |= {
        "cached": o.cached,
        "deduplicated": o.deduplicated,
        "duration_s": o.duration_s,
        "attempts": o.attempts,
    }
    return out


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = ("/healthz", "/", "/v1/live")  # /v1/live checks the token at its handshake
DEAD_LETTER_PAGE = 1000  # the most letters one GET /v1/dead-letters returns when paged


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A query parameter as an int within [low, high]; HTTP 400 naming it otherwise."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        body = _json.encode(
            {"error": "bad_request", "reason": f"{name} must be an integer in [{low}, {high}]"}
        )
        raise web.HTTPBadRequest(body=body, content_type="application/json")
    return value


def make_app(service: Service) -> web.Application:
    """The aiohttp application bound to a running service."""
    counts = service.counts

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        counts["http_requests_total"] += 1
        request["user"] = ""
        path = request.path
        if service.users.required and path not in OPEN_PATHS and not path.startswith("/dashboard/"):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            user = service.users.authenticate(value) if scheme.lower() == "bearer" else None
            if user is None:
                counts["http_auth_failures_total"] += 1
                reason = "a bearer token is required" if not given else "the token is wrong"
                resp = _problem(401, "auth", reason)
                resp.headers["WWW-Authenticate"] = 'Bearer realm="ringway"'
                return resp
            request["user"] = user  # stamped on every message: never the client's claim
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                counts["http_bad_requests_total"] += 1
            raise

    async def healthz(request: web.Request) -> web.Response:
        reasons = service.health_problems()
        degraded = service.degradation()
        if reasons:
            return _reply(503, {"status": "unhealthy", "reasons": reasons + degraded})
        if degraded:
            return _reply(503, {"status": "degraded", "reasons": degraded})
        return _reply(200, {"status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        if service.engine.cluster is not None:
            await service.engine.cluster.refresh_stats()  # the cluster as Redis has it now
        return _reply(200, service.stats())

    async def metrics(request: web.Request) -> web.Response:
        body = render(lambda: _snapshot(service))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def over_limit(request: web.Request, n: int) -> web.Response | None:
        """429 with Retry-After when ``n`` messages would put the user over the rate limit."""
        user = request["user"]
        wait = service.limits.admit(user, n)
        if not wait:
            return None
        resp = _reply(
            429,
            {
                "error": "rate_limited",
                "reason": limited_reason(user, wait, service.limits.rate),
                "retry_after_s": wait,
            },
        )
        resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))  # whole seconds (RFC 9110)
        return resp

    def refuse_if_stopping() -> web.Response | None:
        # Like the binary ingress, take no new messages once a stop signal came: the
        # site keeps serving /healthz (503 "shutting down"), /stats and /metrics.
        if service.stop_requested.is_set():
            return _problem(503, "closed", "the service is shutting down")
        return None

    async def messages(request: web.Request) -> web.Response:
        if refused := refuse_if_stopping():
            return refused
        settled = request.query.get("settled", "") in ("1", "true", "yes")
        try:
            decoded = _body_decoder.decode(await request.read())
        except (
            msgspec.DecodeError,
            msgspec.ValidationError,
            RecursionError,
            UnicodeDecodeError,
        ) as exc:  # msgspec reports invalid UTF-8 as UnicodeDecodeError
            counts["http_bad_requests_total"] += 1
            return _problem(400, "bad_request", f"body is not a message or a list of them: {exc}")
        batch = decoded if isinstance(decoded, list) else [decoded]
        if limited := over_limit(request, len(batch)):
            return limited
        ids: list[int] = []
        try:
            # Runs of messages with equal options go in as one submit_many.
            for _, run in itertools.groupby(batch, key=HttpMessage.options):
                group = list(run)
                first = group[0]
                items = [(m.recipient, pack_payload(m.payload)) for m in group]
                ids += await service.engine.submit_many(
                    items,
                    settled=settled,
                    priority=first.priority,
                    ttl=first.ttl,
                    kind=first.kind,
                    sender=first.sender,
                    reply_to=first.reply_to,
                    tags=first.tags,
                    metadata=first.metadata or None,
                    dedup_key=first.dedup_key,
                    user=request["user"],
                )
        except EngineClosed as exc:
            return _problem(503, "closed", str(exc))
        except (ValueError, TypeError, EngineError) as exc:
            counts["http_bad_requests_total"] += 1
            done = f" ({len(ids)} earlier messages of this body were queued)" if ids else ""
            return _problem(400, "bad_request", f"{exc}{done}")
        return _reply(200 if settled else 202, {"ids": ids})

    async def batch(request: web.Request) -> web.Response:
        if refused := refuse_if_stopping():
            return refused
        try:
            body = _batch_decoder.decode(await request.read())
        except _UNDECODABLE as exc:
            counts["http_bad_requests_total"] += 1
            return _problem(400, "bad_request", f"body is not a batch: {exc}")
        if limited := over_limit(request, len(body.requests)):
            return limited
        try:
            outcomes, stats = await service.engine.run_batch(
                body.requests, concurrency=body.concurrency, user=request["user"]
            )
        except EngineClosed as exc:
            return _problem(503, "closed", str(exc))
        except (ValueError, TypeError, EngineError) as exc:
            counts["http_bad_requests_total"] += 1
            return _problem(400, "bad_request", str(exc))
        return _reply(
            200,
            {"responses": [_item(o) for o in outcomes], "stats": msgspec.to_builtins(stats)},
        )

    async def clear_cache(request: web.Request) -> web.Response:
        user = request["user"]
        return _reply(200, {"cleared": service.engine.cache.clear(user), "user": user})

    async def dead_letters(request: web.Request) -> web.Response:
        """Oldest first (``?newest_first=1``: newest first); ``reason`` and ``recipient``
        filter, ``offset``/``limit`` page.  The body stays a plain list;
        ``X-Total-Count`` says how many matched."""
        from engine.core.deadletters import view

        if service.engine.cluster is not None:  # the cluster's DLQ stream
            return _reply(200, await service.engine.cluster.dead_letters())
        reason = request.query.get("reason", "")
        recipient = request.query.get("recipient", "")
        letters = [
            dl
            for dl in service.engine.dead_letters()
            if (not reason or dl.reason == reason)
            and (not recipient or dl.message.recipient == recipient)
        ]
        total = len(letters)
        if request.query.get("newest_first", "") in ("1", "true", "yes"):
            letters.reverse()
        offset = _query_int(request, "offset", 0, 0, 1 << 62)
        paged = "limit" in request.query or offset
        limit = _query_int(request, "limit", DEAD_LETTER_PAGE, 1, DEAD_LETTER_PAGE)
        if paged:
            letters = letters[offset : offset + limit]
        resp = _reply(200, [view(dl) for dl in letters])
        resp.headers["X-Total-Count"] = str(total)
        return resp

    async def dead_letter(request: web.Request) -> web.Response:
        from engine.core.deadletters import view

        try:
            message_id = int(request.match_info["id"])
        except ValueError:
            return _problem(400, "bad_request", "the id must be an integer")
        found = [dl for dl in service.engine.dead_letters() if dl.message.id == message_id]
        if not found:
            return _problem(404, "not_found", f"no dead letter of message {message_id}")
        return _reply(200, view(found[0]))

    async def replay(request: web.Request) -> web.Response:
        """Replay every dead letter, or only those of ``?id=N`` (repeatable)."""
        if refused := refuse_if_stopping():
            return refused
        ids: list[int] | None = None
        if "id" in request.query:
            try:
                ids = [int(v) for v in request.query.getall("id")]
            except ValueError:
                return _problem(400, "bad_request", "id must be an integer message id")
        try:
            report = await service.engine.replay_dead_letters(ids)
        except EngineClosed as exc:
            return _problem(503, "closed", str(exc))
        # {"replayed": n, "kept": k, "kept_reasons": {reason: count}}: a letter that cannot
        # be replayed stays stored (its ``replay_error`` says why), never a 500.
        return _reply(200, report)

    app = web.Application(middlewares=[guard], client_max_size=service.config.max_frame_bytes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/batch", batch)
    app.router.add_delete("/v1/cache", clear_cache)
    app.router.add_get("/v1/dead-letters", dead_letters)
    app.router.add_get("/v1/dead-letters/{id}", dead_letter)
    app.router.add_post("/v1/dead-letters/replay", replay)
    add_dashboard_routes(app)
    app.router.add_get("/v1/live", service.live.websocket)
    return app


def _snapshot(service: Service) -> Snapshot:
    report = service.engine.report
    return Snapshot(
        stats=service.engine.stats(),
        latency_start=report.latency_start if report else Histogram(),
        latency_settle=report.latency_settle if report else Histogram(),
        service=service.service_counts(),
        users=service.limits.counts(),
    )
