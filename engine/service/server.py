"""``engine serve``: the engine plus its TCP/unix ingress and HTTP server, run until a signal.

Signal handlers only set flags; the main coroutine acts on them (as gunicorn's
arbiter does).  SIGTERM or SIGINT: stop accepting, drain within
ENGINE_SHUTDOWN_TIMEOUT_S, stop every process, unlink the rings, exit 0.  A
second one: fast stop (workers killed, unsettled messages abandoned and
counted in the log).  SIGHUP: a rolling restart of the workers, which
re-imports a ``module:function`` handler and loses nothing.
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
from engine.service.http import HTTP_COUNTERS
from engine.service.ingress import Ingress
from engine.service.live import Live

log = logging.getLogger("engine.service")
HTTP_SHUTDOWN_S = 2.0  # after the drain, open HTTP requests get this long to finish


def check_bind(config: Config) -> None:
    """Refuse a non-loopback bind without a token (anyone on the network could submit)."""
    if config.auth_token or _is_loopback(config.host):
        return
    raise ConfigError(
        f"ENGINE_HOST={config.host!r} is not a loopback address: set ENGINE_AUTH_TOKEN "
        "so clients must authenticate, or bind to 127.0.0.1"
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
        self.engine = Engine(handler if handler is not None else (config.handler or None), config)
        self.ingress: Ingress | None = None
        self.runner: Any = None
        self.counts: dict[str, int] = dict.fromkeys(HTTP_COUNTERS, 0)
        self.addresses: dict[str, str] = {}
        self.stop_requested = asyncio.Event()
        self.fast = asyncio.Event()
        self.reloads = 0
        self.signals = 0
        self.failures = FailureWatch(config.degraded_failure_ratio, config.stats_interval_s)
        self.live = Live(self)  # the dashboard's samples and WebSocket clients

    # -- views used by the HTTP routes ---------------------------------------------
    def service_counts(self) -> dict[str, int]:
        counts = dict(self.counts)
        if self.ingress is not None:
            counts.update(self.ingress.counts)
            counts["connections_active"] = self.ingress.active
        counts["reloads_total"] = self.reloads
        return counts

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        stats["service"] = self.service_counts() | {"addresses": self.addresses}
        return stats

    def health_problems(self) -> list[str]:
        """Why the service is unhealthy; empty when it is fine."""
        stats = self.engine.stats()
        problems = []
        if self.stop_requested.is_set():
            problems.append("shutting down")
        if not stats["monitor"]["alive"]:
            problems.append("monitor down")
        problems += [f"worker {w['worker']} down" for w in stats["workers"] if not w["alive"]]
        warn = self.config.ring_warn_ratio
        problems += [
            f"ring fill of lane {lane} is {fill:.0%} (warning at {warn:.0%})"
            for lane, fill in stats["ring_fill"].items()
            if fill >= warn
        ]
        return problems

    def degradation(self) -> list[str]:
        """Why the service is degraded though up (a handler failing most attempts); [] if not.

        Apart from `health_problems` so a liveness probe can ignore it while a
        readiness probe (and ``/healthz``) report it.
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
                token=cfg.auth_token,
                max_frame_bytes=cfg.max_frame_bytes,
                max_connections=cfg.max_connections,
                answer_linger_s=cfg.shutdown_timeout_s,
            )
            try:
                await self.ingress.start(cfg.host, cfg.port, cfg.socket)
            except OSError as exc:
                where = f"{cfg.host}:{cfg.port}" + (f" / {cfg.socket}" if cfg.socket else "")
                raise EngineStartError(f"cannot listen on {where} (ENGINE_PORT): {exc}") from exc
            self.addresses.update(self.ingress.addresses)
            self.runner = web.AppRunner(
                make_app(self),
                access_log=None,
                handle_signals=False,
                shutdown_timeout=HTTP_SHUTDOWN_S,
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
                "auth": bool(cfg.auth_token),
            },
        )

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig: int) -> None:
        self.signals += 1
        if self.stop_requested.is_set():
            log.warning("second %s: fast stop", signal.Signals(sig).name)
            self.fast.set()
        else:
            log.info("%s: draining, then stopping", signal.Signals(sig).name)
            self.stop_requested.set()

    def _on_hup(self) -> None:
        if self.stop_requested.is_set():
            return
        log.info("SIGHUP: restarting workers one at a time")
        self.reloads += 1
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
        stats = self.engine.stats()
        if fast or not drained:
            # First: HTTP handlers waiting on settlement end when the engine closes,
            # and the HTTP cleanup below would otherwise wait for them.
            await self.engine.stop(0, fast=True)
        await self._close_servers(0)
        await self.engine.stop(0)
        left = stats["in_flight"]
        fields = {"submitted": stats["submitted"], "delivered": stats["delivered"]}
        if left:
            how = "fast stop" if fast else f"drain timed out after {cfg.shutdown_timeout_s}s"
            log.error(
                "stopped with unsettled messages (%s)", how, extra=fields | {"abandoned": left}
            )
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
