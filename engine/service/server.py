"""``engine serve``: the engine plus its TCP/unix ingress and HTTP server, run until a signal.

Signal handlers only set flags; the main coroutine acts on them (as gunicorn's
arbiter does).  SIGTERM or SIGINT: stop accepting, drain within
ENGINE_SHUTDOWN_TIMEOUT_S, stop every process, unlink the rings, exit 0.  A
second one: fast stop (workers killed, unsettled messages abandoned and
counted in the log), unless it comes within SAME_STOP_WINDOW_S of the first:
``timeout`` signals the process and then its group, so one stop arrives twice.
SIGHUP: a rolling restart of the workers, which re-imports a
``module:function`` handler and loses nothing.  Only this process acts on
signals: the monitor and the workers ignore the group's (engine.procutil).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from typing import Any

from engine.config import Config, ConfigError
from engine.core.engine import Engine
from engine.errors import EngineStartError
from engine.exitcodes import ExitCode
from engine.service.health import FailureWatch
from engine.service.http import HTTP_COUNTERS, HttpRunner
from engine.service.ingress import Ingress
from engine.service.live import Live
from engine.service.ratelimit import UserLimits
from engine.service.users import Users

log = logging.getLogger("engine.service")
HTTP_SHUTDOWN_S = 2.0  # after the drain, open HTTP requests get this long to finish
HTTP_KEEPALIVE_S = 15.0  # an idle HTTP connection is closed after this (aiohttp: ~1 hour)
SAME_STOP_WINDOW_S = 0.5  # a second stop signal sooner than this is the first one repeated
STOP_OUTCOMES = ("submitted", "delivered", "dead_lettered", "expired", "redelivered", "abandoned")


def check_bind(config: Config) -> None:
    """Refuse a non-loopback bind without a token (anyone on the network could submit)."""
    if config.auth_token or config.auth_token_file or config.auth_tokens_file:
        return
    if _is_loopback(config.host):
        return
    raise ConfigError(
        f"ENGINE_HOST={config.host!r} is not a loopback address: set ENGINE_AUTH_TOKEN_FILE "
        "(or ENGINE_AUTH_TOKENS_FILE) so clients must authenticate, or bind to 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class Service:
    """One running service: engine, ingress, HTTP site and the signal-driven lifecycle."""

    def __init__(self, config: Config, handler: Any = None) -> None:
        check_bind(config)
        self.config = config
        self.users = Users.from_config(config)  # a bad tokens file stops the start here
        self.limits = UserLimits(config.rate_limit, config.rate_burst)
        self.engine = Engine(handler if handler is not None else (config.handler or None), config)
        self.ingress: Ingress | None = None
        self.runner: HttpRunner | None = None
        self.counts: dict[str, int] = dict.fromkeys(HTTP_COUNTERS, 0)
        self.addresses: dict[str, str] = {}
        self.stop_requested = asyncio.Event()
        self.fast = asyncio.Event()
        self.reloads = 0
        self.signals = 0
        self._stop_signal_at = 0.0  # loop time of the first stop signal
        self.failures = FailureWatch(config.degraded_failure_ratio, config.stats_interval_s)
        self.live = Live(self)  # the dashboard's samples and WebSocket clients

    # -- views used by the HTTP routes ---------------------------------------------
    def service_counts(self) -> dict[str, int]:
        counts = dict(self.counts)
        if self.ingress is not None:
            counts.update(self.ingress.counts)
            counts["connections_active"] = self.ingress.active
        if self.runner is not None:
            counts["http_connections_active"] = self.runner.active
        counts["reloads_total"] = self.reloads
        return counts

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        stats["service"] = self.service_counts() | {"addresses": self.addresses}
        return stats

    def liveness_problems(self) -> list[str]:
        """Why the engine is broken (``/livez`` 503); empty while it is alive.

        Only what a restart of the process would mend: the monitor down for good
        (while the dispatcher is restarting it, only ``/readyz`` fails) or the
        engine closed without a stop being asked for.  Backpressure, a drain or a
        failing handler are not here: a restart would make them worse.
        """
        stats = self.engine.stats()
        problems = []
        if not stats["monitor"]["alive"] and self.engine.supervisor.gave_up:
            why = self.engine.monitor_error
            problems.append(f"monitor down: {why}" if why else "monitor down")
        dispatcher = self.engine.dispatcher
        if dispatcher is not None and dispatcher.closed and not self.stop_requested.is_set():
            problems.append("the engine stopped")
        return problems

    def readiness_problems(self) -> list[str]:
        """Why the service should get no new work now (``/readyz`` 503); empty if ready."""
        stats = self.engine.stats()
        problems = []
        if self.stop_requested.is_set():
            problems.append("shutting down")
        if not stats["monitor"]["alive"]:
            problems.append("monitor down (the dispatcher restarts it)")
        problems += [f"worker {w['worker']} down" for w in stats["workers"] if not w["alive"]]
        cluster = stats.get("cluster")
        if cluster is not None and not cluster["leases"]["connected"]:
            problems.append(f"redis unreachable: {cluster['leases']['last_error']}")
        warn = self.config.ring_warn_ratio
        problems += [
            f"ring fill of lane {lane} is {fill:.0%} (warning at {warn:.0%})"
            for lane, fill in stats["ring_fill"].items()
            if fill >= warn
        ]
        return problems

    def degradation(self) -> list[str]:
        """Why the service is degraded though up (a handler failing most attempts); [] if not.

        Apart from the other problems so the liveness probe can ignore it while
        the readiness probe reports it.
        """
        self.failures.observe(self.engine.report)
        problem = self.failures.problem()
        return [problem] if problem else []

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        from aiohttp import web

        from engine.service.http import make_app

        cfg = self.config
        await self.engine.start()
        try:
            self.live.start()
            self.ingress = Ingress(
                self.engine,
                users=self.users,
                limits=self.limits,
                max_frame_bytes=cfg.max_frame_bytes,
                max_connections=cfg.max_connections,
                answer_linger_s=cfg.shutdown_timeout_s,
                hello_timeout_s=cfg.hello_timeout_s,
                warn_interval_s=cfg.log_limit_interval_s,
            )
            try:
                await self.ingress.start(cfg.host, cfg.port, cfg.socket)
            except OSError as exc:
                where = f"{cfg.host}:{cfg.port}" + (f" / {cfg.socket}" if cfg.socket else "")
                raise EngineStartError(f"cannot listen on {where} (ENGINE_PORT): {exc}") from exc
            self.addresses.update(self.ingress.addresses)
            self.runner = HttpRunner(
                make_app(self),
                max_connections=cfg.http_max_connections,
                counts=self.counts,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=HTTP_SHUTDOWN_S,
                # Idle connections, one that never sends a request too, are closed
                # after this: they hold a slot of ENGINE_HTTP_MAX_CONNECTIONS.
                keepalive_timeout=HTTP_KEEPALIVE_S,
            )
            await self.runner.setup()
            site = web.TCPSite(self.runner, cfg.host, cfg.http_port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise EngineStartError(
                    f"cannot listen on {cfg.host}:{cfg.http_port} (ENGINE_HTTP_PORT): {exc}"
                ) from exc
            bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
            self.addresses["http"] = f"{bound[0]}:{bound[1]}"
        except BaseException:
            await self._close_servers(0)
            await self.engine.stop(0, fast=True)
            raise
        log.info(
            "serving",
            extra={
                "pid": os.getpid(),
                "workers": cfg.workers,
                "lanes": 4,
                "ring_bytes": cfg.ring_bytes,
                "handler": cfg.handler or ("<callable>" if self.engine.handler else ""),
                "sink": cfg.sink,
                "tcp": self.addresses.get("tcp", ""),
                "http": self.addresses.get("http", ""),
                "socket": self.addresses.get("socket", ""),
                "auth": self.users.required,
                "users": len(self.users.names),
                **self._cluster_fields(),
            },
        )

    def _cluster_fields(self) -> dict[str, Any]:
        """Cluster mode's part of the start-up line (nothing in embedded mode)."""
        stats = self.engine.stats().get("cluster")
        if stats is None:
            return {}
        return {
            "broker": stats["broker"],
            "node": stats["node"],
            "namespace": stats["namespace"],
            "partitions": stats["partitions"],
        }

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig: int) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        now = asyncio.get_running_loop().time()
        if not self.stop_requested.is_set():
            self._stop_signal_at = now
            log.info("%s: draining, then stopping", name)
            self.stop_requested.set()
        elif now - self._stop_signal_at < SAME_STOP_WINDOW_S:
            # `timeout` sends its signal to the service and then to the whole group.
            log.info(
                "%s again within %gs of the first: the same stop (one more later stops fast)",
                name,
                SAME_STOP_WINDOW_S,
            )
        else:
            log.warning("second %s: fast stop", name)
            self.fast.set()

    def _on_hup(self) -> None:
        if self.stop_requested.is_set():
            return
        log.info("SIGHUP: restarting workers one at a time")
        self.reloads += 1
        if self.users.path:
            try:
                users = self.users.reload()
            except ConfigError as exc:
                # The error names the file and line; a traceback would add nothing.
                log.error(  # noqa: TRY400
                    "auth tokens not reloaded; the old ones stay", extra={"error": str(exc)}
                )
            else:
                log.info("auth tokens reloaded", extra={"users": users})
        try:
            self.engine.reload()
        except Exception:
            log.exception("the reload could not start")

    async def run(self, after_start: Any = None) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        self.install_signals()
        await self.start()
        extra = None
        if after_start is not None:
            extra = asyncio.ensure_future(after_start(self))
        await self.stop_requested.wait()
        if extra is not None and not extra.done():
            extra.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await extra
        return await self.shutdown()

    async def shutdown(self) -> int:
        """Stop accepting, drain (unless a second signal asks for a fast stop), release all."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.shutdown_timeout_s
        fast_wait = asyncio.ensure_future(self.fast.wait())
        drain = asyncio.ensure_future(self._drain(deadline))
        await asyncio.wait({drain, fast_wait}, return_when=asyncio.FIRST_COMPLETED)
        fast = self.fast.is_set()
        drained = drain.done() and not drain.cancelled() and drain.result()
        for task in (drain, fast_wait):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        if fast or not drained:
            # First: HTTP handlers waiting on settlement end when the engine closes,
            # and the HTTP cleanup below would otherwise wait for them.
            await self.engine.stop(0, fast=True)
        await self._close_servers(0)
        # Cluster mode settles, acks and hands back its partitions inside stop(): give it
        # what is left of the shutdown time (the embedded engine has drained already).
        await self.engine.stop(max(0.0, deadline - loop.time()))
        # After the stop: the engine's own count of what it abandoned (Engine.stop).
        stats = self.engine.stats()
        fields = {k: stats[k] for k in STOP_OUTCOMES}
        if stats["abandoned"]:
            how = "fast stop" if fast else f"drain timed out after {cfg.shutdown_timeout_s}s"
            log.error("stopped with unsettled messages (%s)", how, extra=fields)
            return ExitCode.INTERRUPTED if fast else ExitCode.FAILURE
        log.info("stopped", extra=fields)
        return ExitCode.OK

    async def _drain(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        if self.ingress is not None:
            await self.ingress.close(max(0.0, deadline - loop.time()))
        if self.runner is not None:
            await self.runner.shutdown()  # on_shutdown hooks; the routes refuse new messages
        return await self.engine.drain(max(0.0, deadline - loop.time()))

    async def _close_servers(self, timeout: float) -> None:
        await self.live.stop()
        if self.ingress is not None:
            await self.ingress.close(timeout)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
