"""What ``engine serve`` says in its log when things go wrong: one line per failure and event.

The issue's scenario, against the real service with JSON logs: a handler failing
every message, a poison message, a SIGSTOPped and a SIGKILLed worker and a
SIGKILLed monitor.  Each must leave its line with its fields as JSON keys; the
final failure carries the traceback; a recipient failing over and over is
rate-limited.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from engine.client import Client
from tests.integration.service_proc import ServiceProc, running_service

HANDLER = "tests.integration.handlers_operate:route"
BASE = {
    "ENGINE_HANDLER": HANDLER,
    "ENGINE_WORKERS": "2",
    "ENGINE_RETRY_MAX_ATTEMPTS": "5",
    "ENGINE_RETRY_BACKOFF_BASE_S": "0.001",
    "ENGINE_RETRY_BACKOFF_MAX_S": "0.01",
    "ENGINE_STATS_INTERVAL_S": "0.2",
}


def wait_lines(svc: ServiceProc, pred: Any, what: str, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in svc.logs() if pred(line)]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no log line for {what} within {timeout}s; log:\n{svc.log_text()}")


def events(svc: ServiceProc, name: str) -> list[dict[str, Any]]:
    return [line for line in svc.logs() if line.get("event") == name]


def test_failures_deaths_and_restarts_each_leave_a_line(tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_STALL_TIMEOUT_S="1", **BASE) as svc:
        with Client(svc.url) as client:
            # 10 recipients failing every attempt: 50 attempts, 10 dead letters.
            client.submit_many([(f"bad-{i}", {"n": i}) for i in range(10)], settled=True)
            # One recipient failing 40 messages: 200 attempts, rate-limited to one line.
            client.submit_many([("bad-same", {"n": i}) for i in range(40)], settled=True)
        warned = [line for line in svc.logs() if line.get("logger") == "engine.delivery"]
        first = next(line for line in warned if line["recipient"] == "bad-0")
        assert first["level"] == "warning"
        assert first["attempt"] == 1 and first["max_attempts"] == 5
        assert first["exc_type"] == "ValueError" and "no luck" in first["error"]
        assert first["retry_in_s"] >= 0 and "message_id" in first
        assert "traceback" not in first  # at INFO: tracebacks only at DEBUG
        assert f"message {first['message_id']} to 'bad-0' failed (attempt 1/5)" in first["msg"]
        assert {line["recipient"] for line in warned} >= {f"bad-{i}" for i in range(10)}
        assert len([line for line in warned if line["recipient"] == "bad-same"]) == 1
        letters = events(svc, "dead_letter")
        assert len([d for d in letters if d["recipient"].startswith("bad-")]) >= 10
        one = next(d for d in letters if d["recipient"] == "bad-3")
        assert one["level"] == "error" and one["reason"] == "max_attempts"
        assert one["attempts"] == 5 and one["error"].startswith("ValueError: no luck")
        assert "Traceback (most recent call last)" in one["traceback"]
        assert "handlers_operate.py" in one["traceback"]
        assert len([d for d in letters if d["recipient"] == "bad-same"]) == 1  # rate-limited
        assert svc.stats()["dead_lettered"] == 50

        # A poison message: the worker dies three times, then it is quarantined.
        with Client(svc.url) as client:
            client.submit_many([("poison-1", {"x": 1})])
        wait_lines(svc, lambda x: x.get("event") == "poison_quarantined", "the quarantine")
        died = wait_lines(
            svc, lambda x: x.get("event") == "worker_died" and x.get("exit_code") == 1, "deaths"
        )
        assert "exited with code 1" in died[0]["msg"] and "held_messages" in died[0]
        crash = wait_lines(
            svc,
            lambda x: x.get("event") == "dead_letter" and x.get("reason") == "worker_crash",
            "the worker_crash dead letter",
        )
        assert crash[0]["recipient"] == "poison-1"
        wait_lines(svc, lambda x: x.get("event") == "worker_respawned", "a respawn")

        # A stalled worker (SIGSTOP): SIGTERM after the stall timeout, then SIGKILL.
        stats = svc.wait_stats(lambda s: all(w["alive"] for w in s["workers"]))
        stalled = stats["workers"][1]["pid"]
        os.kill(stalled, signal.SIGSTOP)
        stall = wait_lines(
            svc, lambda x: x.get("event") == "worker_stalled" and x.get("pid") == stalled, "stall"
        )
        assert "no heartbeat" in stall[0]["msg"] and stall[0]["level"] == "warning"
        wait_lines(
            svc,
            lambda x: x.get("event") == "worker_died" and x.get("pid") == stalled,
            "the stalled worker's death",
        )

        # A SIGKILLed worker.
        stats = svc.wait_stats(lambda s: all(w["alive"] for w in s["workers"]))
        victim = stats["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        [killed] = wait_lines(
            svc, lambda x: x.get("event") == "worker_died" and x.get("pid") == victim, "the kill"
        )
        assert "killed by SIGKILL" in killed["msg"] and killed["worker"] == 0

        # A SIGKILLed monitor: its death and its restart.
        stats = svc.wait_stats(lambda s: all(w["alive"] for w in s["workers"]))
        os.kill(stats["monitor"]["pid"], signal.SIGKILL)
        [gone] = wait_lines(svc, lambda x: x.get("event") == "monitor_died", "the monitor death")
        assert "SIGKILL" in gone["msg"] and gone["level"] == "error"
        wait_lines(svc, lambda x: x.get("event") == "monitor_restarted", "the monitor restart")
    assert svc.returncode == 0, svc.log_text()


def test_at_debug_every_reported_attempt_carries_its_traceback(tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_LOG_LEVEL="DEBUG", **BASE) as svc:
        with Client(svc.url) as client:
            client.submit_many([("bad-1", {"n": 1})], settled=True)
        [warned] = [line for line in svc.logs() if line.get("logger") == "engine.delivery"]
        assert "Traceback (most recent call last)" in warned["traceback"]
        assert "ValueError: no luck" in warned["traceback"]
