"""An engine for ``test_shm_namespaces``, run inside a PID namespace of its own.

It starts an Engine (null sink, 2 workers), prints one JSON line (its pid, its
segments), then waits for a line on stdin.  On "go" it SIGKILLs worker 0, so the
monitor must start a new one that attaches the shard's segments by name, delivers
100 messages, prints ``stats()`` as a second JSON line and stops.  Exit 0 only if
all of that worked: with its segments unlinked by someone else's sweep, the new
worker cannot attach and the drain times out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from engine import Config, Engine
from ipc.shm import list_segments

DRAIN_TIMEOUT_S = 30.0


async def main() -> int:
    config = Config.from_env(env={}, workers=2, sink="null", stats_interval_s=0.1)
    async with Engine(None, config) as eng:
        print(json.dumps({"pid": os.getpid(), "segments": list_segments()}), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return 2
        while len(eng.stats()["workers"]) < 2:
            await asyncio.sleep(0.05)
        victim = eng.stats()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        while eng.stats()["workers"][0]["restarts"] < 1:
            await asyncio.sleep(0.05)
        await eng.submit_many([(f"r{i}", i) for i in range(100)])
        drained = await eng.drain(DRAIN_TIMEOUT_S)
        print(json.dumps(eng.stats()), flush=True)
        return 0 if drained else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
