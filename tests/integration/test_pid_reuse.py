"""A pid read from shared memory may belong to another process by now: it is never killed.

When the monitor dies, the engine waits for the old workers to be gone before it
starts a new monitor (one consumer per ring), and kills those still running after
10 s.  It knows them by the pids the workers wrote into their shard's slot; but
once their monitor is gone nobody of ours reaps them, and the kernel may give a pid
to any new process.  Here worker 0's slot names an unrelated live process, as if
its pid had been reused: the engine must see that it is not its worker (its start
time differs), restart at once, and leave that process alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from engine import Config, Engine
from ipc.shard import SLOT_PID

RESTART_BOUND_S = 8.0  # under the 10 s after which the engine kills the old workers


@pytest.mark.timeout(120)
def test_a_reused_worker_pid_is_not_waited_for_nor_killed() -> None:
    decoy = subprocess.Popen(["sleep", "600"])  # not ours to kill
    cfg = Config.from_env(env={}, workers=2, sink="null", stats_interval_s=0.1)
    facts: dict[str, Any] = {}

    async def main() -> None:
        async with Engine(None, cfg) as eng:
            while len(eng.stats()["workers"]) < 2:
                await asyncio.sleep(0.05)
            old = eng.monitor.pid
            eng.shards[0].slot_idx[SLOT_PID] = decoy.pid  # worker 0's pid, "reused"
            os.kill(old, signal.SIGKILL)  # its workers die with it
            t0 = time.monotonic()
            while eng.monitor.pid == old or eng.monitor_restarts < 1:
                await asyncio.sleep(0.01)
            facts["restart_s"] = time.monotonic() - t0
            await eng.submit_many([(f"r{i}", i) for i in range(100)])
            assert await eng.drain(30)
            facts["stats"] = eng.stats()

    try:
        asyncio.run(main())
        assert decoy.poll() is None, "the engine killed a process that was not its worker"
    finally:
        decoy.kill()
        decoy.wait()
    assert facts["restart_s"] < RESTART_BOUND_S, facts
    assert facts["stats"]["delivered"] == 100, facts["stats"]
