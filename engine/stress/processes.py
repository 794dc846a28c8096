"""CPU and RSS of every engine process, sampled with psutil.

The dispatcher is this process (it also runs the generator, the sampler and
the progress bar), the monitor is the engine's child, the workers are the
monitor's children as its latest report names them.  `psutil.Process` objects
are kept per pid because ``cpu_percent`` measures since the previous call on
the same object; a respawned worker gets a new pid and starts from zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

ROLES = ("dispatcher", "monitor", "workers")


class ProcessSampler:
    """Samples CPU % (100 = one core) and RSS bytes per role: dispatcher, monitor, workers."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> tuple[psutil.Process | None, bool]:
        """The kept Process for ``pid`` (None if gone) and whether it was new, i.e. just primed.

        A new process's CPU is left out of this sample: psutil would measure it
        over the microseconds since priming and report absurd percentages.
        """
        proc = self._procs.get(pid)
        if proc is not None:
            return proc, False
        try:
            proc = psutil.Process(pid)
            proc.cpu_percent(None)  # the first call only starts the measurement
        except psutil.Error:
            return None, True
        self._procs[pid] = proc
        return proc, True

    def sample(
        self, monitor_pid: int | None, worker_pids: Iterable[int]
    ) -> dict[str, tuple[float, int]]:
        """``{role: (cpu_percent, rss_bytes)}`` summed over the role's live processes."""
        pids = {
            "dispatcher": [os.getpid()],
            "monitor": [monitor_pid] if monitor_pid else [],
            "workers": [p for p in worker_pids if p > 0],
        }
        out: dict[str, tuple[float, int]] = {}
        seen: set[int] = set()
        for role in ROLES:
            cpu, rss = 0.0, 0
            for pid in pids[role]:
                proc, new = self._process(pid)
                seen.add(pid)
                if proc is None:
                    continue
                try:
                    with proc.oneshot():
                        cpu += 0.0 if new else proc.cpu_percent(None)
                        rss += proc.memory_info().rss
                except psutil.Error:  # it died between the report and now (chaos)
                    continue
            out[role] = (cpu, rss)
        for pid in set(self._procs) - seen:
            del self._procs[pid]  # gone: forget it, a reused pid must start afresh
        return out
