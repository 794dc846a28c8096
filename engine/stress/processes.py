"""CPU and RSS of every engine process, sampled with psutil.

The dispatcher is this process (it also runs the generator, the sampler and
the progress bar), the monitor is the engine's child, the workers are the
monitor's children, named by their shard's slot (a respawned worker writes its
pid there before it delivers anything).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import psutil

ROLES = ("dispatcher", "monitor", "workers")


class ProcessSampler:
    """CPU seconds (cumulative since the run began) and RSS bytes per role.

    CPU comes from each process's own counters (user + system time), not from
    psutil's percentages: a process first seen mid-run, or alive for a single
    sample, is measured all the same.  A process born after the start counts
    from birth; one that was already running, from the moment it was first
    seen; one that died keeps what it had used.
    """

    def __init__(self, started_at: float | None = None) -> None:
        self._procs: dict[int, tuple[psutil.Process, float, str]] = {}  # pid: (proc, base, role)
        self._started_at = time.time() if started_at is None else started_at
        self._gone = dict.fromkeys(ROLES, 0.0)  # CPU seconds of processes that ended
        self._used: dict[int, float] = {}  # pid: CPU seconds used so far, as last read

    def _process(self, pid: int, role: str) -> psutil.Process | None:
        kept = self._procs.get(pid)
        if kept is not None:
            return kept[0]
        try:
            proc = psutil.Process(pid)
            born_after = proc.create_time() >= self._started_at
            times = proc.cpu_times()
        except psutil.Error:
            return None
        base = 0.0 if born_after else times.user + times.system
        self._procs[pid] = (proc, base, role)
        return proc

    def sample(
        self, monitor_pid: int | None, worker_pids: Iterable[int]
    ) -> dict[str, tuple[float, int]]:
        """``{role: (cpu_seconds, rss_bytes)}``: CPU used since the start, RSS now."""
        pids = {
            "dispatcher": [os.getpid()],
            "monitor": [monitor_pid] if monitor_pid else [],
            "workers": [p for p in worker_pids if p > 0],
        }
        out: dict[str, tuple[float, int]] = {}
        seen: set[int] = set()
        for role in ROLES:
            cpu, rss = self._gone[role], 0
            for pid in pids[role]:
                proc = self._process(pid, role)
                seen.add(pid)
                if proc is None:
                    continue
                base = self._procs[pid][1]
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss += proc.memory_info().rss
                except psutil.Error:  # it died between the report and now (chaos)
                    continue
                self._used[pid] = times.user + times.system - base
            cpu += sum(self._used.get(pid, 0.0) for pid in set(pids[role]))
            out[role] = (cpu, rss)
        for pid in set(self._procs) - seen:
            # Gone (or no longer its role's): keep what it used; a reused pid starts afresh.
            self._gone[self._procs[pid][2]] += self._used.pop(pid, 0.0)
            del self._procs[pid]
        return out
