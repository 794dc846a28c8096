"""An engine in its own process, for the test that SIGKILLs the dispatcher.

Run as ``python -m tests.chaos.engine_child``; it starts an Engine with the recording
handler, prints one JSON line (its pid, the monitor's, the workers', the segment
prefix) once every worker is up, then streams messages until it is killed.
``$CHAOS_RECORD_DIR`` says where the handlers record.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from engine import Engine
from tests.chaos.harness import HANDLERS, Plan, all_workers_up, chaos_config


async def main() -> None:
    async with Engine(f"{HANDLERS}:record", chaos_config()) as eng:
        s = await all_workers_up(eng)
        info = {
            "pid": os.getpid(),
            "monitor": eng.monitor.pid,
            "workers": [w["pid"] for w in s["workers"]],
            "prefix": eng.shards[0].spec.lane_names[0].rsplit("w0-", 1)[0],
        }
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        plan = Plan()
        recipients = [f"r{i}" for i in range(100)]
        while True:  # until SIGKILL
            await eng.submit_many(plan.make(r) for r in recipients)
            await asyncio.sleep(0.01)


if __name__ == "__main__":
    asyncio.run(main())
