"""Engines in two PID namespaces sharing one /dev/shm: a sweep removes only what is dead.

Containers that share /dev/shm (``docker run --ipc=shareable``, a pod's shared
memory) do not see each other's pids.  The engine here runs in a PID namespace of
its own, with a pid that does not exist out here, and a directory of ours bound
over its /dev/shm; this process sweeps that directory as a starting engine does.
While the engine lives its segments must stay (its lock is held); once its
namespace is killed they must go (the lock is free).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ipc.shm import list_segments, sweep_stale_segments
from tests.integration.service_proc import REPO


def free_pid_here() -> int:
    """A pid no process has in this namespace (nor the next few, for the engine's children)."""
    for pid in range(20_000, 30_000, 97):
        if not any(psutil.pid_exists(p) for p in range(pid, pid + 8)):
            return pid
    pytest.fail("no free pid range found")


@pytest.fixture
def namespaced(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str], dict[str, object]]]:
    """``ns_engine`` running in a new user, mount and PID namespace; its /dev/shm is ours."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is not installed")
    probe = subprocess.run([unshare, "-Urpf", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"this kernel refuses user or PID namespaces: {probe.stderr.strip()}")
    shm = tmp_path / "shm"
    shm.mkdir()
    pid = free_pid_here()
    namespaces = [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env["PYTHONPATH"] = str(REPO)
    # sh is the namespace's pid 1; the engine, its child, gets the pid we chose.
    script = (
        f"mount --bind {shm} /dev/shm && echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "
        f"{sys.executable} -m tests.integration.ns_engine"
    )
    proc = subprocess.Popen(
        [*namespaces, "sh", "-c", script],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "ns_engine.log").open("w"),
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        if not line:
            proc.wait(30)
            pytest.fail(f"the engine did not start:\n{(tmp_path / 'ns_engine.log').read_text()}")
        info = json.loads(line)
        assert info["pid"] == pid and not psutil.pid_exists(pid), info
        yield shm, proc, info
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.timeout(180)
def test_a_live_engine_in_another_pid_namespace_keeps_its_segments(
    namespaced: tuple[Path, subprocess.Popen[str], dict[str, object]], tmp_path: Path
) -> None:
    shm, proc, info = namespaced
    segments = list_segments(shm_dir=str(shm))
    assert segments == info["segments"]
    assert sweep_stale_segments(str(shm)) == []  # its pid is nobody here; its lock is held
    assert list_segments(shm_dir=str(shm)) == segments
    assert len(segments) == 2 * 6 + 1  # 2 shards of 6 segments, and the lock file
    # A new worker attaches the shard by name: it works only if the names are still there.
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.read()
    assert proc.wait(60) == 0, (tmp_path / "ns_engine.log").read_text()
    stats = json.loads(out.splitlines()[-1])
    assert stats["delivered"] == 100 and stats["workers"][0]["restarts"] == 1, stats
    assert list_segments(shm_dir=str(shm)) == []  # it cleaned up after itself


@pytest.mark.timeout(180)
def test_a_dead_engine_in_another_pid_namespace_is_swept(
    namespaced: tuple[Path, subprocess.Popen[str], dict[str, object]],
) -> None:
    shm, proc, info = namespaced
    os.killpg(proc.pid, signal.SIGKILL)  # pid 1 of the namespace: every process in it dies
    proc.wait(30)
    segments = list_segments(shm_dir=str(shm))
    assert segments == info["segments"]  # nothing cleaned up: it was killed
    # The kernel drops a dead process's locks, but its pid namespace takes a moment to go.
    for _ in range(100):
        removed = sweep_stale_segments(str(shm))
        if removed:
            break
        time.sleep(0.05)
    assert sorted(removed) == segments
    assert list_segments(shm_dir=str(shm)) == []
