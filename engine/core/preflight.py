"""Checks before any process is spawned: a service that cannot deliver should not start.

``engine serve`` calls `check_handler` before it creates the rings or starts the
monitor, so a missing or broken handler is a configuration error (exit 78)
naming the setting, not a worker that fails to boot.
"""

from __future__ import annotations

import os
import sys

from engine.config import Config, ConfigError
from engine.errors import EngineStartError
from engine.worker.sinks import load_handler


def check_handler(config: Config) -> None:
    """Find a missing or broken handler before any process is spawned: a ConfigError (78).

    The handler's module is imported here once and then forgotten again (removed
    from ``sys.modules``), so the workers import it themselves, afresh, as they do
    on every SIGHUP reload.
    """
    if config.sink != "python":
        return
    if not config.handler:
        raise ConfigError(
            "no handler: give one with --handler module:function (ENGINE_HANDLER), "
            "or choose a sink with --sink mock|inbox|null (ENGINE_SINK)"
        )
    before = set(sys.modules)
    try:
        load_handler(config.handler)
    except EngineStartError as exc:
        raise ConfigError(
            f"--handler / ENGINE_HANDLER {config.handler!r}: {exc} (imported from {os.getcwd()}; "
            "or choose a sink with --sink mock|inbox|null)"
        ) from None
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
