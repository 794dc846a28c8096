"""The service subcommands of ``engine``: serve, stats, send, dlq, cache.

``serve`` runs the service in this process; the others talk to a running one
(``stats`` and ``dlq`` over HTTP, ``send`` over the binary protocol), finding
it from the same ENGINE_* settings the service reads, or from ``--url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from engine.cli.flags import add_config_flags, overrides_from_args, positive_int
from engine.config import Config, resolve_config
from engine.exitcodes import ExitCode
from ipc.errors import EngineError

DEMO_AGENTS = 9
DEMO_MESSAGES = 200_000


class ServiceUnavailable(EngineError):
    """Raised by the CLI when the service cannot be reached or answers with an error."""


def add_service_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``stats``, ``send``, ``dlq`` and ``cache`` to the ``engine`` parser."""
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
    send.add_argument("--token", default=None, help="auth token (default ENGINE_AUTH_TOKEN)")
    send.set_defaults(run=_cmd_send)

    dlq = sub.add_parser(
        "dlq",
        help="list or replay a running service's dead letters",
        description="List the dead letters a running service holds, or submit them again.",
    )
    dlq.add_argument("action", choices=["list", "replay"])
    _add_http_target(dlq)
    dlq.add_argument("--json", action="store_true", help="print JSON (list)")
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
    parser.add_argument("--token", default=None, help="auth token (default ENGINE_AUTH_TOKEN)")


def _env_config() -> Config:
    return resolve_config()[0]


# -- serve ------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from engine.logs import setup_logging
    from engine.service.server import Service

    overrides: dict[str, object] = dict(overrides_from_args(args))
    config, sources = resolve_config(overrides=overrides, source_label="cli")
    if args.demo and sources["sink"] == "default" and not config.handler:
        config = resolve_config(overrides=overrides | {"sink": "mock"}, source_label="cli")[0]
    setup_logging(config.log_level, config.log_format)
    after = (lambda svc: _demo_load(svc, args.demo)) if args.demo else None
    return int(uvloop.run(Service(config).run(after)))


async def _demo_load(service: Any, n: int) -> None:
    """Send ``n`` messages through the service's own TCP ingress and print what happened."""
    from engine.client.aio import AsyncClient

    agents = [f"Agent-{i}" for i in range(1, DEMO_AGENTS + 1)]
    url = f"tcp://{service.addresses['tcp']}"
    started = time.perf_counter()
    async with AsyncClient(url, token=service.config.auth_token or None) as client:
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
        f'  curl -s -X POST http://{http}/v1/messages -d \'{{"recipient": "Agent-2", '
        f'"payload": {{"hi": 1}}}}\'\n',
        flush=True,
    )


# -- stats ------------------------------------------------------------------------------
def _http_base(args: argparse.Namespace) -> tuple[str, str]:
    config = _env_config()
    url = args.url or f"http://{config.host}:{config.http_port}"
    token = args.token if args.token is not None else config.auth_token
    return url.rstrip("/"), token


def _http(method: str, url: str, token: str) -> Any:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ServiceUnavailable(f"{method} {url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnavailable(f"cannot reach the service at {url}: {reason}") from None


def _cmd_stats(args: argparse.Namespace) -> int:
    base, token = _http_base(args)
    while True:
        stats = _http("GET", f"{base}/stats", token)
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print_stats(stats, title=f"{base}  {time.strftime('%H:%M:%S')}")
        if not args.watch:
            return ExitCode.OK
        time.sleep(args.watch)


def print_stats(stats: dict[str, Any], title: str = "") -> None:
    """The stats as rich tables: totals and latency, then one row per worker."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    totals = Table(title=title or None, show_header=True)
    for col in ("submitted", "delivered", "dead_lettered", "expired", "in_flight",
                "retried", "redelivered"):  # fmt: skip
        totals.add_column(col, justify="right")
    totals.add_row(
        *(f"{stats[c]:,}" for c in ("submitted", "delivered", "dead_lettered", "expired",
                                     "in_flight", "retried", "redelivered"))
    )  # fmt: skip
    console.print(totals)
    lat = Table(title="latency (seconds)")
    for col in ("", "p50", "p95", "p99", "max", "count"):
        lat.add_column(col, justify="right")
    for name, key in (("submit→start", "latency_start_s"), ("submit→settled", "latency_settle_s")):
        h = stats[key]
        lat.add_row(name, *(f"{h[q]:.6f}" for q in ("p50", "p95", "p99", "max")), f"{h['count']:,}")
    console.print(lat)
    workers = Table(title="workers")
    for col in ("worker", "pid", "alive", "delivered", "restarts", "recycled", "cpu %", "rss MiB"):
        workers.add_column(col, justify="right")
    for w in stats["workers"]:
        workers.add_row(
            str(w["worker"]),
            str(w["pid"]),
            "yes" if w["alive"] else "NO",
            f"{w['delivered']:,}",
            str(w["restarts"]),
            str(w.get("recycled", 0)),
            f"{w['cpu_percent']:.0f}",
            f"{w['rss_bytes'] / 2**20:.1f}",
        )
    console.print(workers)
    cluster = stats.get("cluster")
    if cluster:
        print_cluster(console, cluster)
    service = stats.get("service")
    if service:
        parts = [f"{k}={v}" for k, v in service.items() if k != "addresses"]
        console.print("service: " + "  ".join(parts))


def print_cluster(console: Any, cluster: dict[str, Any]) -> None:
    """Cluster mode: the nodes and what each owns, then every partition's backlog and pending."""
    from rich.table import Table

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
    console.print(nodes)
    parts = Table(title="partitions (backlog and pending count stream entries)")
    for col in ("partition", "owner", "epoch", "backlog", "pending", "length"):
        parts.add_column(col, justify="right")
    for row in cluster.get("partition_table", []):
        parts.add_row(
            str(row["partition"]), row["owner"] or "-", str(row["epoch"]),
            f"{row['backlog']:,}", f"{row['pending']:,}", f"{row['length']:,}",
        )  # fmt: skip
    console.print(parts)
    console.print(
        f"backlog {cluster.get('backlog', 0):,}  pending {cluster.get('pending', 0):,}  "
        f"dlq {cluster.get('dlq_length', 0):,}  unowned {cluster.get('unowned', [])}"
    )


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
    token = args.token if args.token is not None else config.auth_token
    options: dict[str, Any] = {"priority": args.priority}
    if args.ttl is not None:
        options["ttl"] = args.ttl
    with Client(url, token=token or None) as client:
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
        out = _http("POST", f"{base}/v1/dead-letters/replay", token)
        print(f"replayed {out['replayed']:,} dead letters")
        return ExitCode.OK
    letters = _http("GET", f"{base}/v1/dead-letters", token)
    if args.json:
        print(json.dumps(letters, indent=2))
        return ExitCode.OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(letters):,} dead letters")
    for col in ("id", "recipient", "reason", "attempts", "error"):
        table.add_column(col)
    for dl in letters:
        table.add_row(
            str(dl["id"]), dl["recipient"], dl["reason"], str(dl["attempts"]), dl["error"][:60]
        )
    Console().print(table)
    return ExitCode.OK


# -- cache ------------------------------------------------------------------------------
def _cmd_cache(args: argparse.Namespace) -> int:
    base, token = _http_base(args)
    out = _http("DELETE", f"{base}/v1/cache", token)
    who = f"user {out['user']!r}" if out["user"] else "the anonymous user"
    print(f"cleared {out['cleared']:,} cached responses of {who}")
    return ExitCode.OK
