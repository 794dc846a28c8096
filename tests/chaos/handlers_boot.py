"""A handler module whose import crashes the worker while ``$CHAOS_BOOT_FLAG`` exists.

Workers import their handler after the fork, so every (re)spawned worker runs this
module's top level: each boot attempt is logged to ``$CHAOS_BOOT_LOG`` (one line,
pid and CLOCK_MONOTONIC ns), then, while the flag file exists, the import fails --
``CHAOS_BOOT_MODE=raise`` raises (the engine sees an import error), ``exit`` kills
the process outright with exit code ``BOOT_EXIT_CODE`` (a hard crash: no Python
error to report).  Otherwise the recording handlers are re-exported.
"""

from __future__ import annotations

import os
import time

BOOT_EXIT_CODE = 13
BOOT_ERROR = "injected boot failure (CHAOS_BOOT_FLAG exists)"


def _boot() -> None:
    log = os.environ.get("CHAOS_BOOT_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"{os.getpid()} {time.monotonic_ns()}\n".encode())
        os.close(fd)
    flag = os.environ.get("CHAOS_BOOT_FLAG")
    if flag and os.path.exists(flag):
        if os.environ.get("CHAOS_BOOT_MODE") == "exit":
            os._exit(BOOT_EXIT_CODE)
        raise RuntimeError(BOOT_ERROR)


_boot()

from tests.chaos.handlers import record, record_async  # noqa: E402

__all__ = ["record", "record_async"]
