"""A program that embeds an Engine and stops it on SIGTERM, as an application would.

Run by ``test_group_signals`` with ``LIFECYCLE_INBOX`` and ``HANDLER_DELAY_S`` set:
it submits ``argv[1]`` messages to one recipient through the recording handler
(``handlers_lifecycle:slow_inbox``), prints one JSON line with the pids of its
monitor and workers, waits for SIGTERM, leaves ``async with`` (which drains) and
prints the final ``stats()`` as a second JSON line.  Exit 0 only after a clean stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from engine import Config, Engine

HANDLER = "tests.integration.handlers_lifecycle:slow_inbox"


async def main(messages: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    config = Config.from_env(workers=2, shutdown_timeout_s=60.0, stats_interval_s=0.2)
    eng = Engine(HANDLER, config)
    async with eng:
        await eng.submit_many([("one", i) for i in range(messages)])
        print(json.dumps({"dispatcher": os.getpid(), "monitor": eng.monitor.pid}), flush=True)
        await stop.wait()
    print(json.dumps(eng.stats()), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
