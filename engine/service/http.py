"""The HTTP side of the service (aiohttp): probes, stats, metrics and JSON ingress.

The probes answer without a token and tell only a status with reasons:
``GET /livez`` (alias ``/healthz``) is 503 only when the engine is broken (its
monitor down, the engine stopped): a liveness probe; ``GET /readyz`` is 503
while the service should get no new work (draining, a ring lane above
ENGINE_RING_WARN_RATIO, a worker down, a handler failing most attempts): a
readiness probe.  So do the
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

What a web page in a browser could reach is refused (`BrowserGuard`): a
``Host`` that is not this service's address (DNS rebinding) 421, a foreign
``Origin`` 403, a POST without ``Content-Type: application/json`` (a
cross-origin "simple" request) 415.  `HttpRunner` caps the open connections
(ENGINE_HTTP_MAX_CONNECTIONS) and ``?settled=1`` waits at most
ENGINE_HTTP_SETTLED_TIMEOUT_S (504 naming the ids, which stay queued).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, cast
from urllib.parse import urlsplit

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
    from aiohttp.web_server import Server

    from engine.config import Config
    from engine.core.engine import Engine
    from engine.service.live import Live
    from engine.service.ratelimit import UserLimits
    from engine.service.users import Users

log = logging.getLogger("engine.http")

HTTP_COUNTERS = (
    "http_requests_total",
    "http_bad_requests_total",
    "http_auth_failures_total",
    "http_refused_total",  # a foreign Host or Origin, or a POST that is not JSON
    "http_connections_rejected_total",  # over ENGINE_HTTP_MAX_CONNECTIONS
    "http_settled_timeouts_total",  # ?settled=1 answered 504
)


class Service(Protocol):
    """What the routes need of the running service (`engine.service.server.Service`).

    A protocol, so this module never imports the server that imports it.
    """

    config: Config
    engine: Engine
    counts: dict[str, int]
    addresses: dict[str, str]
    stop_requested: asyncio.Event
    users: Users
    limits: UserLimits
    live: Live

    def stats(self) -> dict[str, Any]: ...

    def liveness_problems(self) -> list[str]: ...

    def readiness_problems(self) -> list[str]: ...

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
PROBES = ("/livez", "/readyz", "/healthz")
OPEN_PATHS = (*PROBES, "/", "/v1/live")  # /v1/live checks the token at its handshake
JSON_POSTS = ("/v1/messages", "/v1/batch", "/v1/dead-letters/replay")
DEAD_LETTER_PAGE = 1000  # the most letters one GET /v1/dead-letters returns
DEAD_LETTER_DEFAULT_PAGE = 100  # ... without ?limit=
REFUSED_LINGER_S = 1.0  # a connection over ENGINE_HTTP_MAX_CONNECTIONS: time to read its 503
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # a wildcard bind: every address of the host


def _split_host(text: str, default_port: int) -> tuple[str, int] | None:
    """``host[:port]`` or ``[v6][:port]`` -> (lowercase host, port); None if malformed."""
    text = text.strip().lower()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:  # an unbracketed IPv6 literal (a bound address): no port
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        return None
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """Which ``Host`` and ``Origin`` headers name this service (against DNS rebinding
    and cross-site requests).

    A Host is this service when it is ``localhost``, ``127.0.0.1``, ``[::1]`` or
    the bound host, at any port (a forwarded port names it too); any IP literal
    when bound to a wildcard address (a rebinding attack needs a name); or a name of
    ENGINE_ALLOWED_HOSTS (``name`` for any port, ``name:port`` for one; ``*`` =
    any Host).  An Origin is allowed when it is the request's own Host (same
    origin) or a name of ENGINE_ALLOWED_HOSTS.
    """

    def __init__(self, allowed_hosts: str, bound: str) -> None:
        self.allowed = {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
        self.any = "*" in self.allowed
        host, _, port = bound.rpartition(":")
        self.bound_host = host.strip("[]").lower()
        self.bound_port = int(port) if port.isdigit() else 0

    def _listed(self, host: str, port: int) -> bool:
        name = f"[{host}]" if ":" in host else host
        return self.any or name in self.allowed or f"{name}:{port}" in self.allowed

    def host_ok(self, header: str) -> bool:
        parsed = _split_host(header, 80)
        if parsed is None:
            return self.any
        host, port = parsed
        # Any port: a forwarded one (kubectl port-forward, docker -p) names the same
        # service, and a rebinding attack needs a name of its own, not a port.
        if host in LOCAL_NAMES or host == self.bound_host:
            return True
        if self.bound_host in WILDCARDS and _is_ip(host):
            return True
        return self._listed(host, port)

    def origin_ok(self, origin: str, host_header: str) -> bool:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a sandboxed page, a file) or garbage
        if host_header and parts.netloc.lower() == host_header.strip().lower():
            return True  # same origin
        parsed = _split_host(parts.netloc, 443 if parts.scheme == "https" else 80)
        return parsed is not None and self._listed(*parsed)

    def described(self) -> str:
        names = ["localhost", "127.0.0.1", "[::1]"]
        if self.bound_host not in LOCAL_NAMES + WILDCARDS:
            names.append(self.bound_host)
        elif self.bound_host in WILDCARDS:
            names.append("any IP address")
        return ", ".join(names) + " (any port)"


T = TypeVar("T")


class _Cursor(msgspec.Struct, forbid_unknown_fields=True):
    """What a page cursor holds: the position of the last letter of the page before."""

    after: tuple[int, int]


def encode_cursor(position: tuple[int, int]) -> str:
    raw = _json.encode(_Cursor(position))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, int] | None:
    """The letter position a cursor holds; None when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cursor = msgspec.json.decode(raw, type=_Cursor)
    except (binascii.Error, ValueError, *_UNDECODABLE):
        return None
    return cursor.after


def _page(
    request: web.Request,
    items: Sequence[tuple[tuple[int, int], T]],
    newest_first: bool,
    per_run: bool = False,
) -> tuple[list[T], dict[str, str]]:
    """The page of ``items`` ((position, item), oldest first) that ``limit`` and
    ``cursor`` (or ``offset``) ask for, and the headers: X-Total-Count, and
    X-Next-Cursor with a Link rel="next" when more remain.

    A cursor is the position of the last letter of the previous page, and
    positions only grow: the next page starts after it (before it, newest first)
    whether that letter is still stored or was evicted or replayed meanwhile, so a
    walk sees every letter that stays stored exactly once, new ones included.
    With ``per_run`` a position is (run, number) and the numbers start again
    with each run of the engine: a cursor of another run is answered 410.
    """
    limit = _query_int(request, "limit", DEAD_LETTER_DEFAULT_PAGE, 1, DEAD_LETTER_PAGE)
    offset = _query_int(request, "offset", 0, 0, 1 << 62)
    ordered = list(reversed(items)) if newest_first else list(items)
    start = offset
    if "cursor" in request.query:
        if "offset" in request.query:
            _raise_bad_request("give cursor or offset, not both")
        after = decode_cursor(request.query["cursor"])
        if after is None:
            _raise_bad_request(
                "cursor is not a cursor this service gave (use X-Next-Cursor as it is)"
            )
        if per_run and items and after[0] != items[0][0][0]:
            body = _json.encode(
                {
                    "error": "cursor_gone",
                    "reason": "the service restarted since this cursor was given (its "
                    "letters are numbered afresh): list again from the start",
                }
            )
            raise web.HTTPGone(body=body, content_type="application/json")
        start = next(
            (i for i, (p, _) in enumerate(ordered) if (p < after if newest_first else p > after)),
            len(ordered),
        )
    page = ordered[start : start + limit]
    headers = {"X-Total-Count": str(len(items))}
    if page and start + limit < len(ordered):
        cursor = encode_cursor(page[-1][0])
        query = {k: v for k, v in request.query.items() if k not in ("cursor", "offset")}
        link = request.rel_url.with_query({**query, "cursor": cursor})
        headers["X-Next-Cursor"] = cursor
        headers["Link"] = f'<{link}>; rel="next"'
    return [item for _, item in page], headers


def _raise_bad_request(reason: str) -> NoReturn:
    body = _json.encode({"error": "bad_request", "reason": reason})
    raise web.HTTPBadRequest(body=body, content_type="application/json")


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
        _raise_bad_request(f"{name} must be an integer in [{low}, {high}], got {text!r}")
    return value


def make_app(service: Service) -> web.Application:
    """The aiohttp application bound to a running service."""
    counts = service.counts
    guards: list[BrowserGuard] = []  # made at the first request: the bound port is known then

    def refused_by_browser_rules(request: web.Request) -> web.Response | None:
        """421/403/415 for what a web page could send (see `BrowserGuard`); None if fine."""
        path = request.path
        if path in PROBES:
            return None  # status only; probes come with any Host (kubelet: the pod's IP)
        if not guards:
            guards.append(BrowserGuard(service.config.allowed_hosts, service.addresses["http"]))
        rules = guards[0]
        host = request.headers.get("Host", "")
        if host and not rules.host_ok(host):
            return _problem(
                421,
                "bad_host",
                f"Host {host!r} is not this service ({rules.described()}) nor in "
                "ENGINE_ALLOWED_HOSTS",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not rules.origin_ok(origin, host):
            return _problem(
                403,
                "bad_origin",
                f"Origin {origin!r} is not this service's own ({host}) nor in "
                "ENGINE_ALLOWED_HOSTS: cross-site requests are refused",
            )
        json_post = request.method == "POST" and path in JSON_POSTS
        if json_post and request.content_type != "application/json":
            given = request.headers.get("Content-Type", "")
            return _problem(
                415,
                "unsupported_media_type",
                f"POST {path} needs Content-Type: application/json, got {given or 'none'!r}",
            )
        return None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        counts["http_requests_total"] += 1
        request["user"] = ""
        path = request.path
        if refused := refused_by_browser_rules(request):
            counts["http_refused_total"] += 1
            return refused
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

    async def livez(request: web.Request) -> web.Response:
        """Alive unless broken: what a liveness probe (a restart when it fails) asks."""
        if reasons := service.liveness_problems():
            return _reply(503, {"status": "unhealthy", "reasons": reasons})
        return _reply(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Accepting work: what a readiness probe (no traffic while it fails) asks."""
        broken = service.liveness_problems()
        reasons = service.readiness_problems()
        degraded = service.degradation()
        if broken or reasons:
            status = "unhealthy" if broken else "not ready"
            return _reply(503, {"status": status, "reasons": broken + reasons + degraded})
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
        # site keeps serving /readyz (503 "shutting down"), /stats and /metrics.
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
        marks: list[tuple[int, int, int]] = []
        try:
            # Runs of messages with equal options go in as one submit_marked.
            for _, run in itertools.groupby(batch, key=HttpMessage.options):
                group = list(run)
                first = group[0]
                items = [(m.recipient, pack_payload(m.payload)) for m in group]
                queued, marked = await service.engine.submit_marked(
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
                ids += queued
                marks += marked
            if marks:
                timeout = service.config.http_settled_timeout_s
                try:
                    async with asyncio.timeout(timeout):
                        await service.engine.wait_settled(marks)
                except TimeoutError:
                    counts["http_settled_timeouts_total"] += 1
                    return _reply(
                        504,
                        {
                            "error": "settle_timeout",
                            "reason": f"not every message settled within {timeout:g}s "
                            "(ENGINE_HTTP_SETTLED_TIMEOUT_S); they are queued and will "
                            "settle (delivered, dead-lettered or expired): do not send "
                            "them again",
                            "ids": ids,
                        },
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
        filter; ``limit`` (default 100, at most 1,000) and ``cursor`` (or ``offset``)
        page.  The body stays a plain list; ``X-Total-Count`` says how many matched,
        ``X-Next-Cursor`` and ``Link: <...>; rel="next"`` where the next page is."""
        from engine.core.deadletters import view

        reason = request.query.get("reason", "")
        recipient = request.query.get("recipient", "")
        newest_first = request.query.get("newest_first", "") in ("1", "true", "yes")
        if service.engine.cluster is not None:  # the cluster's DLQ stream
            views = [
                (position, v)
                for position, v in await service.engine.cluster.dead_letters()
                if (not reason or v.reason == reason)
                and (not recipient or v.recipient == recipient)
            ]
            shown, headers = _page(request, views, newest_first)
            resp = _reply(200, shown)
            resp.headers.update(headers)
            return resp
        letters = [
            (position, dl)
            for position, dl in service.engine.positioned_dead_letters()
            if (not reason or dl.reason == reason)
            and (not recipient or dl.message.recipient == recipient)
        ]
        page, headers = _page(request, letters, newest_first, per_run=True)
        resp = _reply(200, [view(dl) for dl in page])
        resp.headers.update(headers)
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
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", livez)  # the probe's older name: liveness
    app.router.add_get("/readyz", readyz)
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


class _Counted(asyncio.Protocol):
    """An aiohttp connection handler that gives its slot back when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self.inner = inner
        self._release: Callable[[], None] | None = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release is not None:
            self._release()
            self._release = None
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection over the cap: one 503 answer, no request read, then closed.

    The answer goes out with a FIN at once; what the client sends meanwhile is
    read and dropped for up to ``REFUSED_LINGER_S`` (closing with unread data
    would be a TCP reset, which can destroy the answer before the client reads it).
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = self.transport = cast(asyncio.Transport, transport)
        tr.write(self.answer)
        if tr.can_write_eof():
            tr.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, tr.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request of a refused connection: dropped unread

    def eof_received(self) -> bool:
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _ConnectionCap:
    """The aiohttp server (its protocol factory) with at most ``limit`` connections open.

    Everything but the factory call is the wrapped server's; a connection over
    the limit gets a 503 naming ENGINE_HTTP_MAX_CONNECTIONS and is closed.
    """

    def __init__(self, server: Server, limit: int, counts: dict[str, int]) -> None:
        self._server = server
        self.limit = limit
        self.counts = counts
        self.active = 0
        body = _json.encode(
            {
                "error": "busy",
                "reason": f"the service has {limit:,} HTTP connections open "
                "(ENGINE_HTTP_MAX_CONNECTIONS): try again later",
            }
        )
        self._answer = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def __call__(self) -> asyncio.Protocol:
        if self.active >= self.limit:
            self.counts["http_connections_rejected_total"] += 1
            return _Refused(self._answer)
        self.active += 1
        return _Counted(self._server(), self._release)

    def _release(self) -> None:
        self.active -= 1


class HttpRunner(web.AppRunner):
    """`web.AppRunner` whose server accepts at most ``max_connections`` at once."""

    def __init__(
        self, app: web.Application, *, max_connections: int, counts: dict[str, int], **kw: Any
    ) -> None:
        super().__init__(app, **kw)
        self.max_connections = max_connections
        self.counts = counts
        self._cap: _ConnectionCap | None = None

    @property
    def active(self) -> int:
        """HTTP connections open now."""
        return 0 if self._cap is None else self._cap.active

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        self._cap = _ConnectionCap(server, self.max_connections, self.counts)
        return cast("Server", self._cap)
