"""Signals to the whole process group, to the monitor alone, and twice: one stop, no duplicate.

``timeout``, ``kill -- -PGID`` and systemd signal every process of the group, and
``timeout`` signals its child and then the group, so the service gets the signal
twice.  Only the dispatcher may act on it: the monitor and the workers ignore it
and stop when the dispatcher tells them, settling what they hold.  Each test runs
the real ``engine serve`` (or a program embedding ``Engine``) with a handler that
takes 50 ms and records every call, sends 100 messages to one recipient and
signals while they are being delivered: every message is handled exactly once,
and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.client import Client
from engine.service.server import SAME_STOP_WINDOW_S
from tests.integration.service_proc import REPO, ServiceProc, start_service

MESSAGES = 100
HANDLER_DELAY_S = 0.05
SIGNAL_AFTER = 10  # deliveries recorded before the signal: the rest are in flight
STOP_WAIT_S = 120.0  # 100 x 50 ms in a row, on a loaded machine; a bound, not a target


def slow_env(inbox: Path) -> dict[str, str]:
    return {
        "ENGINE_HANDLER": "tests.integration.handlers_lifecycle:slow_inbox",
        "ENGINE_WORKERS": "2",
        "ENGINE_SHUTDOWN_TIMEOUT_S": "60",
        "ENGINE_STATS_INTERVAL_S": "0.2",
        "HANDLER_DELAY_S": str(HANDLER_DELAY_S),
        "LIFECYCLE_INBOX": str(inbox),
    }


def handled(inbox: Path) -> Counter[int]:
    """How many times the handler ran for each message id (one line per call)."""
    path = inbox / "one.jsonl"
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


def wait_handled(inbox: Path, n: int, timeout: float = STOP_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while sum(handled(inbox).values()) < n:
        assert time.monotonic() < deadline, f"fewer than {n} deliveries after {timeout}s"
        time.sleep(0.01)


def assert_each_once(inbox: Path, ids: list[int]) -> None:
    counts = handled(inbox)
    twice = {i: c for i, c in counts.items() if c > 1}
    assert not twice, f"handled more than once: {twice}"
    assert sorted(counts) == sorted(ids), f"{len(counts)} of {len(ids)} messages handled"


def submit(svc: ServiceProc) -> list[int]:
    with Client(svc.url) as client:
        return client.submit_many([("one", i) for i in range(MESSAGES)])


def engine_pids(svc: ServiceProc) -> list[int]:
    stats = svc.wait_stats(lambda s: len(s["workers"]) == 2)
    return [stats["monitor"]["pid"], *(w["pid"] for w in stats["workers"])]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and not _zombie(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_clean_stop_line(svc: ServiceProc) -> None:
    """The stop line gives every outcome: all delivered, nothing redelivered or abandoned."""
    [line] = svc.logs("stopped")
    outcomes = {k: line.get(k) for k in ("submitted", "delivered", "dead_lettered", "expired")}
    assert outcomes == {
        "submitted": MESSAGES,
        "delivered": MESSAGES,
        "dead_lettered": 0,
        "expired": 0,
    }, line
    assert line.get("redelivered") == 0 and line.get("abandoned") == 0, line
    assert not [x for x in svc.lines if "delivers again" in str(x.get("msg"))], svc.log_text()


@pytest.mark.timeout(240)
def test_sigterm_to_the_whole_group_is_one_stop_without_duplicates(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    svc = start_service(tmp_path, **slow_env(inbox))
    try:
        pids = engine_pids(svc)
        ids = submit(svc)
        wait_handled(inbox, SIGNAL_AFTER)
        os.killpg(svc.proc.pid, signal.SIGTERM)  # the service leads its own group
        assert svc.proc.wait(STOP_WAIT_S) == 0, svc.log_text()
    finally:
        svc.stop()
    assert_each_once(inbox, ids)
    assert_clean_stop_line(svc)
    assert wait_gone(pids) == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["monitor", "worker"])
def test_sigterm_to_the_monitor_or_a_worker_alone_changes_nothing(
    tmp_path: Path, target: str
) -> None:
    """Only the dispatcher acts on SIGTERM: the others carry on, nobody is restarted."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    svc = start_service(tmp_path, **slow_env(inbox))
    try:
        monitor, *workers = engine_pids(svc)
        ids = submit(svc)
        wait_handled(inbox, SIGNAL_AFTER)
        victim = monitor if target == "monitor" else workers[0]
        os.kill(victim, signal.SIGTERM)
        os.kill(victim, signal.SIGINT)  # Ctrl-C in a terminal reaches the group too
        wait_handled(inbox, MESSAGES)
        stats = svc.wait_stats(lambda s: s["in_flight"] == 0)
        assert stats["monitor"]["pid"] == monitor and stats["monitor"]["restarts"] == 0, stats
        assert [w["restarts"] for w in stats["workers"]] == [0, 0], stats["workers"]
        assert svc.stop() == 0, svc.log_text()
    finally:
        svc.stop()
    assert_each_once(inbox, ids)
    assert_clean_stop_line(svc)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["timeout", "kill twice"])
def test_a_stop_signal_sent_twice_at_once_is_one_stop(tmp_path: Path, how: str) -> None:
    """``timeout -s TERM`` signals the service and then its group: one graceful stop, exit 0.

    The real ``timeout`` is made to fire by its own SIGALRM.  Two signals that arrive
    together may merge in the kernel, so "kill twice" sends them 50 ms apart, still
    well inside the window, to be sure the service sees two.
    """
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    wrapper = ["timeout", "-s", "TERM", "--preserve-status", "3600"] if how == "timeout" else []
    svc = start_service(tmp_path, wrapper=wrapper, **slow_env(inbox))
    try:
        pids = engine_pids(svc)
        ids = submit(svc)
        wait_handled(inbox, SIGNAL_AFTER)
        if how == "timeout":
            svc.proc.send_signal(signal.SIGALRM)  # timeout's timer: TERM to us, then the group
        else:
            os.kill(svc.pid, signal.SIGTERM)
            time.sleep(min(0.05, SAME_STOP_WINDOW_S / 4))
            os.killpg(svc.proc.pid, signal.SIGTERM)
        assert svc.proc.wait(STOP_WAIT_S) == 0, svc.log_text()
    finally:
        svc.stop()
    assert not svc.logs("second SIGTERM: fast stop"), svc.log_text()
    assert_each_once(inbox, ids)
    assert_clean_stop_line(svc)
    assert wait_gone(pids) == []


# -- the embedded engine: an application that stops it on SIGTERM ----------------------------


def run_embedded(tmp_path: Path, inbox: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "HANDLER_DELAY_S": str(HANDLER_DELAY_S),
        "LIFECYCLE_INBOX": str(inbox),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.embedded_signals", str(MESSAGES)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "embedded.log").open("w"),
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"the program did not start:\n{(tmp_path / 'embedded.log').read_text()}")
    return proc, json.loads(line)


def finish_embedded(tmp_path: Path, proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=STOP_WAIT_S)
    log = (tmp_path / "embedded.log").read_text()
    assert proc.returncode == 0, log
    stats: dict[str, Any] = json.loads(out.splitlines()[-1])
    assert "delivers again" not in log, log
    return stats


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["group", "monitor"])
def test_embedded_engine_under_a_group_or_monitor_sigterm(tmp_path: Path, target: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, pids = run_embedded(tmp_path, inbox)
    try:
        wait_handled(inbox, SIGNAL_AFTER)
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(pids["monitor"], signal.SIGTERM)
            wait_handled(inbox, MESSAGES)
            os.kill(proc.pid, signal.SIGTERM)
        stats = finish_embedded(tmp_path, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_each_once(inbox, list(range(1, MESSAGES + 1)))
    assert stats["delivered"] == MESSAGES and stats["redelivered"] == 0, stats
    assert stats["abandoned"] == 0 and stats["monitor"]["restarts"] == 0, stats
