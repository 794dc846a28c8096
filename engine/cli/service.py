"""The service subcommands of ``engine``: serve, stats, send, dlq, cache, health.

``serve`` runs the service in this process; the others talk to a running one
(``stats``, ``dlq`` and ``health`` over HTTP, ``send`` over the binary
protocol), finding it from the same ENGINE_* settings the service reads, or
from ``--url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from engine.cli.flags import add_config_flags, overrides_from_args, positive_int
from engine.config import Config, foreign_env, resolve_config
from engine.exitcodes import ExitCode
from ipc.errors import EngineError

TOKEN_HELP = (
    "auth token (default: ENGINE_AUTH_TOKEN, or the file ENGINE_AUTH_TOKEN_FILE names); "
    "a flag is visible to other users in ps: prefer ENGINE_AUTH_TOKEN_FILE"
)
DEMO_AGENTS = 9
DEMO_MESSAGES = 200_000


class ServiceUnavailable(EngineError):
    """Raised by the CLI when the service cannot be reached or answers with an error."""


def add_service_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``stats``, ``send``, ``dlq``, ``cache`` and ``health`` to the parser."""
    serve = sub.add_parser(
        "serve",
        help="run the service: dispatcher, workers, monitor, TCP and HTTP ingress",
        description="Run Ringway as a service until SIGTERM/SIGINT (a second one, 0.5 s or "
        "more after the first, stops at once). SIGHUP restarts the workers one at a time, "
        "re-importing the handler. The handler comes from --handler module:function "
        "(ENGINE_HANDLER) or a sink from --sink mock|inbox|null (ENGINE_SINK).",
    )
    serve.add_argument(
        "--demo",
        nargs="?",
        const=DEMO_MESSAGES,
        type=positive_int,
        metavar="N",
        help=f"after start, send N messages (default {DEMO_MESSAGES:,}) to {DEMO_AGENTS} agents "
        "through the TCP ingress and print the stats; the mock sink is used unless a handler "
        "or sink is given",
    )
    add_config_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    stats = sub.add_parser(
        "stats",
        help="show a running service's stats",
        description="Fetch GET /stats from a running service and show it as tables.",
    )
    _add_http_target(stats)
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
    stats.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=_seconds,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )
    stats.set_defaults(run=_cmd_stats)

    send = sub.add_parser(
        "send",
        help="send one message to a running service",
        description="Send one message over the binary protocol; prints its id, or with "
        "--request the handler's reply as JSON.",
    )
    send.add_argument("recipient", help="who receives it")
    send.add_argument("payload", help="the payload as JSON, e.g. '{\"n\": 1}'")
    send.add_argument("--request", action="store_true", help="wait for the handler's reply")
    send.add_argument("--timeout", type=_seconds, default=30.0, help="request timeout (default 30)")
    send.add_argument("--priority", default="normal", help="critical, high, normal or low")
    send.add_argument("--ttl", type=_seconds, default=None, help="seconds until it expires")
    send.add_argument(
        "--url", default=None, help="tcp://HOST:PORT or unix:///PATH (default: ENGINE_*)"
    )
    send.add_argument("--token", default=None, help=TOKEN_HELP)
    send.set_defaults(run=_cmd_send)

    dlq = sub.add_parser(
        "dlq",
        help="list or replay a running service's dead letters",
        description="List the dead letters a running service holds, or submit them again.",
    )
    dlq.add_argument(
        "action",
        choices=["list", "show", "replay"],
        help="list them; show one with its traceback (ID); replay all, or the IDs given",
    )
    dlq.add_argument("ids", nargs="*", type=int, metavar="ID", help="message ids (show, replay)")
    _add_http_target(dlq)
    dlq.add_argument("--json", action="store_true", help="print JSON (list, show)")
    dlq.set_defaults(run=_cmd_dlq)

    cache = sub.add_parser(
        "cache",
        help="clear a running service's response cache (your user's entries)",
        description="Forget the cached responses of the user the token stands for "
        "(DELETE /v1/cache). Other users' entries stay.",
    )
    cache.add_argument("action", choices=["clear"])
    _add_http_target(cache)
    cache.set_defaults(run=_cmd_cache)

    health = sub.add_parser(
        "health",
        help="exit 0 if a running service is live and ready, 1 otherwise (one line why)",
        description="Ask a running service whether it is live and ready (for Docker "
        "HEALTHCHECK and scripts): exit 0 and print 'ok', or exit 1 and print why "
        "(unreachable, unhealthy or degraded, with the reasons).",
    )
    _add_http_target(health)
    health.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    health.set_defaults(run=_cmd_health)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be seconds in (0, 86400], got {text!r}")
    return value


def _add_http_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help="the service's HTTP base URL (default from ENGINE_*)"
    )
    parser.add_argument("--token", default=None, help=TOKEN_HELP)


def _env_config() -> Config:
    return resolve_config()[0]


# -- serve ------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvloop

    from engine.logs import setup_logging, stop_logging
    from engine.service.server import Service

    overrides: dict[str, object] = dict(overrides_from_args(args))
    config, sources = resolve_config(overrides=overrides, source_label="cli")
    if args.demo and sources["sink"] == "default" and not config.handler:
        config = resolve_config(overrides=overrides | {"sink": "mock"}, source_label="cli")[0]
    # Like gunicorn and celery: `--handler app:handle` imports app.py from here. The
    # monitor and the workers get this sys.path (fork inherits it, spawn passes it on).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from engine.core.preflight import check_handler

    check_handler(config)
    # Log lines go through a queue to a writer thread: a full stderr never stalls the loop.
    listener = setup_logging(config.log_level, config.log_format, queued=True)
    try:
        for name in foreign_env():
            logging.getLogger("engine.config").warning(
                "%s is not a setting of this engine; ignored", name, extra={"variable": name}
            )
        after = (lambda svc: _demo_load(svc, args.demo)) if args.demo else None
        return int(uvloop.run(Service(config).run(after)))
    finally:
        stop_logging(listener)  # every queued line is written before the process exits


async def _demo_load(service: Any, n: int) -> None:
    """Send ``n`` messages through the service's own TCP ingress and print what happened."""
    from engine.client.aio import AsyncClient

    agents = [f"Agent-{i}" for i in range(1, DEMO_AGENTS + 1)]
    url = f"tcp://{service.addresses['tcp']}"
    started = time.perf_counter()
    async with AsyncClient(url, token=service.config.shared_token() or None) as client:
        await client.submit_many(
            (agents[i % DEMO_AGENTS], {"n": i, "from": agents[(i + 1) % DEMO_AGENTS]})
            for i in range(n)
        )
        await client.flush()
    await service.engine.drain(service.config.shutdown_timeout_s)
    elapsed = time.perf_counter() - started
    # Latencies and per-worker counts come with the monitor's next report.
    deadline = time.monotonic() + 3 * service.config.stats_interval_s + 1
    stats = service.stats()
    while sum(w["delivered"] for w in stats["workers"]) < stats["delivered"]:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
        stats = service.stats()
    print_stats(stats, title=f"demo: {n:,} messages in {elapsed:.2f}s ({n / elapsed:,.0f} msgs/s)")
    http = service.addresses["http"]
    print(
        f"\nThe service keeps running (Ctrl-C stops it). In another terminal:\n"
        f"  engine send Agent-1 '{{\"hello\": 1}}'\n"
        f"  engine stats --watch\n"
        f"  curl -s -X POST http://{http}/v1/messages -H 'Content-Type: application/json' "
        f'-d \'{{"recipient": "Agent-2", '
        f'"payload": {{"hi": 1}}}}\'\n',
        flush=True,
    )


# -- stats ------------------------------------------------------------------------------
def _http_base(args: argparse.Namespace) -> tuple[str, str]:
    config = _env_config()
    url = args.url or f"http://{config.host}:{config.http_port}"
    token = args.token if args.token is not None else config.shared_token()
    return url.rstrip("/"), token


def _http(method: str, url: str, token: str) -> Any:
    return _http_page(method, url, token)[0]


def _http_page(method: str, url: str, token: str) -> tuple[Any, str]:
    """The decoded JSON answer and its X-Next-Cursor header ("" on the last page)."""
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        req.add_header("Content-Type", "application/json")  # the service refuses others
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read()), resp.headers.get("X-Next-Cursor", "")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ServiceUnavailable(f"{method} {url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnavailable(f"cannot reach the service at {url}: {reason}") from None


def _cmd_stats(args: argparse.Namespace) -> int:
    base, token = _http_base(args)
    stats = _http("GET", f"{base}/stats", token)
    if args.json:
        print(json.dumps(stats, indent=2))
    if not args.watch:
        if not args.json:
            print_stats(stats, title=base)
        return ExitCode.OK
    if args.json:  # one JSON document per refresh, for scripts
        while True:
            time.sleep(args.watch)
            print(json.dumps(_http("GET", f"{base}/stats", token)), flush=True)
    from rich.live import Live

    def title() -> str:
        return f"{base}  {time.strftime('%H:%M:%S')}  (Ctrl-C stops)"

    with Live(stats_view(stats, title()), auto_refresh=False) as live:
        while True:
            time.sleep(args.watch)
            live.update(stats_view(_http("GET", f"{base}/stats", token), title()), refresh=True)


def print_stats(stats: dict[str, Any], title: str = "") -> None:
    """The stats as rich tables (see `stats_view`)."""
    from rich.console import Console

    Console().print(stats_view(stats, title))


def stats_view(stats: dict[str, Any], title: str = "") -> Any:
    """Totals, latency, workers and the largest backlogs as tables that fit 80 columns.

    Names are never cut: totals are name/value pairs, latencies in milliseconds.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table(title: str, header: bool = True) -> Table:
        return Table(
            box=box.SIMPLE_HEAD,
            show_header=header,
            title=title,
            title_justify="left",
            pad_edge=False,
            collapse_padding=True,
        )

    parts: list[Any] = [Text(title, style="bold")] if title else []
    totals = table("messages", header=False)
    for _ in range(2):
        totals.add_column(no_wrap=True)
        totals.add_column(justify="right", no_wrap=True)
    pairs = [
        ("submitted", "failed_attempts"),
        ("delivered", "retried"),
        ("dead_lettered", "redelivered"),
        ("expired", "in_flight"),
        ("deferred", "deferrals"),  # long retries held out of the ring now / in all
    ]
    for left, right in pairs:
        totals.add_row(left, f"{stats.get(left, 0):,}", right, f"{stats.get(right, 0):,}")
    parts.append(totals)
    lat = table("latency (ms)")
    for col in ("", "p50", "p95", "p99", "max", "count"):
        lat.add_column(col, justify="right", no_wrap=True)
    for name, key in (("submit→start", "latency_start_s"), ("submit→settled", "latency_settle_s")):
        h = stats[key]
        ms = (f"{h[q] * 1e3:,.3f}" for q in ("p50", "p95", "p99", "max"))
        lat.add_row(name, *ms, f"{h['count']:,}")
    parts.append(lat)
    workers = table("workers")
    for col in ("worker", "pid", "up", "delivered", "restarts", "recycled", "cpu %", "rss MiB"):
        workers.add_column(col, justify="right", no_wrap=True)
    errors = []
    for w in stats["workers"]:
        workers.add_row(
            str(w["worker"]),
            str(w["pid"]),
            "yes" if w["alive"] else "NO",
            f"{w['delivered']:,}",
            str(w["restarts"]),
            str(w.get("recycled", 0)),
            f"{w['cpu_percent']:.0f}",
            f"{w['rss_bytes'] / 2**20:,.0f}",
        )
        if w.get("last_error") or w.get("error"):
            errors.append(f"worker {w['worker']}: {w.get('error') or w['last_error']}")
    parts.append(workers)
    parts += [Text(line, style="red", overflow="fold") for line in errors]
    top = stats.get("top_recipients") or []
    if top:
        backlog = table("largest backlogs")
        backlog.add_column("recipient", overflow="fold")
        backlog.add_column("held", justify="right", no_wrap=True)
        for row in top:
            backlog.add_row(row["recipient"], f"{row['held']:,}")
        parts.append(backlog)
    cluster = stats.get("cluster")
    if cluster:
        parts += cluster_view(cluster)
    service = stats.get("service")
    if service:
        fields = [f"{k}={v}" for k, v in service.items() if k != "addresses"]
        parts.append(Text("service: " + "  ".join(fields), overflow="fold"))
    return Group(*parts)


def cluster_view(cluster: dict[str, Any]) -> list[Any]:
    """Cluster mode: the nodes and what each owns, then every partition's backlog and pending."""
    from rich.table import Table
    from rich.text import Text

    where = f"{cluster['namespace']} on {cluster['broker']}"
    nodes = Table(title=f"cluster {where} (this node: {cluster['node']})")
    for col in ("node", "partitions", "accepted", "delivered", "heartbeat expires in s"):
        nodes.add_column(col, justify="right")
    for n in cluster.get("nodes", []):
        nodes.add_row(
            n["node"],
            f"{len(n['partitions'])}: {_ranges(n['partitions'])}",
            f"{n.get('accepted', 0):,}",
            f"{n.get('delivered', 0):,}",
            f"{n.get('heartbeat_expires_in_s', 0):.2f}",
        )
    parts = Table(title="partitions (backlog and pending count stream entries)")
    for col in ("partition", "owner", "epoch", "backlog", "pending", "length"):
        parts.add_column(col, justify="right")
    for row in cluster.get("partition_table", []):
        parts.add_row(
            str(row["partition"]), row["owner"] or "-", str(row["epoch"]),
            f"{row['backlog']:,}", f"{row['pending']:,}", f"{row['length']:,}",
        )  # fmt: skip
    summary = Text(
        f"backlog {cluster.get('backlog', 0):,}  pending {cluster.get('pending', 0):,}  "
        f"dlq {cluster.get('dlq_length', 0):,}  unowned {cluster.get('unowned', [])}",
        overflow="fold",
    )
    return [nodes, parts, summary]


def _ranges(ps: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for p in sorted(ps):
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


# -- send -------------------------------------------------------------------------------
def _cmd_send(args: argparse.Namespace) -> int:
    from engine.client.sync import Client

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        print(f"engine send: the payload is not JSON: {exc}", file=sys.stderr)
        return ExitCode.DATAERR
    config = _env_config()
    url = args.url or (
        f"unix://{config.socket}" if config.socket else f"tcp://{config.host}:{config.port}"
    )
    token = args.token if args.token is not None else config.shared_token()
    options: dict[str, Any] = {"priority": args.priority}
    if args.ttl is not None:
        options["ttl"] = args.ttl
    # One connection attempt: a refused connection is final for a one-shot command
    # (the client's reconnects are for long-lived producers riding out a restart).
    with Client(url, token=token or None, reconnect_attempts=1) as client:
        if args.request:
            reply = client.request(args.recipient, payload, timeout=args.timeout, **options)
            print(json.dumps(reply, default=repr))
        else:
            [mid] = client.submit_many([(args.recipient, payload)], **options)
            print(mid)
    return ExitCode.OK


# -- dlq --------------------------------------------------------------------------------
def _cmd_dlq(args: argparse.Namespace) -> int:
    base, token = _http_base(args)
    if args.action == "replay":
        query = "?" + "&".join(f"id={i}" for i in args.ids) if args.ids else ""
        out = _http("POST", f"{base}/v1/dead-letters/replay{query}", token)
        line = f"replayed {out['replayed']:,} dead letters"
        if out.get("kept"):
            why = ", ".join(f"{n:,} {reason}" for reason, n in out["kept_reasons"].items())
            line += f"; kept {out['kept']:,} that cannot be replayed ({why})"
        print(line)
        return ExitCode.OK
    if args.action == "show":
        if len(args.ids) != 1:
            print("engine dlq show: give one message id", file=sys.stderr)
            return ExitCode.USAGE
        letter = _http("GET", f"{base}/v1/dead-letters/{args.ids[0]}", token)
        if args.json:
            print(json.dumps(letter, indent=2))
            return ExitCode.OK
        for key in ("id", "recipient", "reason", "attempts", "error", "kind", "priority"):
            print(f"{key + ':':<10} {letter[key]}")
        print(f"{'payload:':<10} {json.dumps(letter['payload'], default=repr)}")
        print(letter.get("traceback") or "(no traceback: the handler raised nothing)")
        return ExitCode.OK
    letters = _all_dead_letters(base, token)
    if args.json:
        print(json.dumps(letters, indent=2))
        return ExitCode.OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(letters):,} dead letters (`engine dlq show ID` for one)")
    for col in ("id", "recipient", "reason", "attempts", "error"):
        table.add_column(col)
    for dl in letters:
        table.add_row(
            str(dl["id"]), dl["recipient"], dl["reason"], str(dl["attempts"]), dl["error"][:60]
        )
    Console().print(table)
    return ExitCode.OK


def _all_dead_letters(base: str, token: str) -> list[Any]:
    """Every dead letter, page after page (the service answers at most 1,000 at a time)."""
    letters: list[Any] = []
    url = f"{base}/v1/dead-letters?limit=1000"
    while True:
        page, cursor = _http_page("GET", url, token)
        letters += page
        if not cursor:
            return letters
        url = f"{base}/v1/dead-letters?limit=1000&cursor={urllib.parse.quote(cursor)}"


# -- cache ------------------------------------------------------------------------------
def _cmd_cache(args: argparse.Namespace) -> int:
    base, token = _http_base(args)
    out = _http("DELETE", f"{base}/v1/cache", token)
    who = f"user {out['user']!r}" if out["user"] else "the anonymous user"
    print(f"cleared {out['cleared']:,} cached responses of {who}")
    return ExitCode.OK


# -- health -----------------------------------------------------------------------------
def _cmd_health(args: argparse.Namespace) -> int:
    """``/readyz`` when the service has it, else ``/healthz``: 0 and "ok", or 1 and why."""
    base, token = _http_base(args)
    for path in ("/readyz", "/healthz"):
        req = urllib.request.Request(f"{base}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=args.timeout) as resp:
                body = json.loads(resp.read() or b"{}")
                print(f"ok: {base}{path} says {body.get('status', 'ok')}")
                return ExitCode.OK
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and path == "/readyz":
                continue  # a service without a readiness probe: ask /healthz
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            status = body.get("status", f"HTTP {exc.code}")
            reasons = "; ".join(body.get("reasons", [])) or body.get("reason", "")
            print(f"{status}: {reasons or exc.reason} ({base}{path})")
            return ExitCode.FAILURE
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            print(f"unreachable: cannot reach the service at {base}: {reason}")
            return ExitCode.FAILURE
    return ExitCode.FAILURE  # not reached: /healthz answers or fails above
