"""Fixtures of the chaos suite: recording directory, JSON reports, leftover checks.

Each scenario fills a ``report`` dict; it is printed and written to
``$CHAOS_REPORT_DIR/<test>.json`` (default: a pytest tmp dir) whether the test passes
or not, and every report of the session is collected into ``summary.json`` there, so
the README can quote the last run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.chaos import harness
from tests.chaos.recorder import ENV_DIR

OUTCOME_KEY = pytest.StashKey[str]()
FAILURE_KEY = pytest.StashKey[str]()
_SESSION_REPORTS: dict[str, dict[str, Any]] = {}  # test name -> its report, for summary.json


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        outcome = rep.outcome
        if hasattr(rep, "wasxfail"):
            outcome = "xfailed" if rep.skipped else "xpassed"
        item.stash[OUTCOME_KEY] = outcome
        if rep.failed or outcome == "xfailed":
            item.stash[FAILURE_KEY] = rep.longreprtext[-2000:]
    return rep


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    env = os.environ.get("CHAOS_REPORT_DIR")
    d = Path(env) if env else tmp_path_factory.mktemp("chaos-reports")
    d.mkdir(parents=True, exist_ok=True)
    started = time.time()
    yield d
    if not _SESSION_REPORTS:
        return
    summary = {
        "scale": harness.SCALE,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "headlines": {name: headline(rep) for name, rep in _SESSION_REPORTS.items()},
        "scenarios": _SESSION_REPORTS,
    }
    path = d / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _SUMMARY_PATH.append(path)


_SUMMARY_PATH: list[Path] = []


def headline(rep: dict[str, Any]) -> dict[str, Any]:
    """The figures worth quoting from one scenario report."""
    out: dict[str, Any] = {"outcome": rep.get("outcome"), "test_s": rep.get("test_s")}
    chk = rep.get("checker") or rep.get("handler_calls") or rep.get("checker_healthy")
    if chk:
        for k in ("expected", "lost", "duplicated", "out_of_order", "unexpected"):
            out[k] = chk[k]
        out["p99_ms"] = chk["latency_ms"].get("p99")
    if "rss" in rep:
        out["peak_rss_mib"] = rep["rss"]["peak_mib"]["total"]
    if "recovery" in rep:
        out["recovery_first_delivery_ms_median"] = rep["recovery"]["first_delivery_ms"]["median"]
        out["recovery_90pct_ms_median"] = rep["recovery"]["to_90pct_throughput_ms"]["median"]
    shm = rep.get("dev_shm")
    if shm:
        out["dev_shm_ours_before_after"] = [shm["ours_before"], shm["ours_after"]]
    return out


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SESSION_REPORTS:
        return
    tr = terminalreporter
    tr.section("chaos reports")
    for name, rep in _SESSION_REPORTS.items():
        h = headline(rep)
        figures = " ".join(f"{k}={v}" for k, v in h.items() if k not in ("outcome", "test_s"))
        tr.write_line(f"{h['outcome']:8} {h['test_s']:>6}s {name} {figures}")
    if _SUMMARY_PATH:
        tr.write_line(f"summary: {_SUMMARY_PATH[-1]}")


@pytest.fixture(autouse=True)
def report(request: pytest.FixtureRequest, report_dir: Path) -> Iterator[dict[str, Any]]:
    """The scenario's report, and the leftover check every scenario must pass.

    After the test: no segment of ours may be left in /dev/shm and no engine process
    may be running (the listings before and after go into the report); then the report
    is printed and written as JSON, whatever the outcome.
    """
    rep: dict[str, Any] = {"scale": harness.SCALE}
    seg_before = harness.own_segments()
    all_before = harness.all_segments()
    kids_before = {p.pid for p in harness.descendants()}
    t0 = time.monotonic()
    yield rep
    rep["test_s"] = round(time.monotonic() - t0, 2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        [n for n in harness.own_segments() if n not in seg_before]
        or [p for p in harness.descendants() if p.pid not in kids_before]
    ):
        time.sleep(0.05)
    new_segments = [n for n in harness.own_segments() if n not in seg_before]
    left = [
        (p.pid, " ".join(p.cmdline())[:120])
        for p in harness.descendants()
        if p.pid not in kids_before
    ]
    rep["dev_shm"] = {
        "ours_before": len(seg_before),
        "ours_after": len(harness.own_segments()),
        "ringway_before": len(all_before),
        "ringway_after": len(harness.all_segments()),
        "ours_left": new_segments,
    }
    rep["processes_left"] = left
    rep["outcome"] = request.node.stash.get(OUTCOME_KEY, "unknown")
    if FAILURE_KEY in request.node.stash:
        rep["failure"] = request.node.stash[FAILURE_KEY]
    name = request.node.name
    text = json.dumps(rep, indent=2, default=str)
    (report_dir / f"{name}.json").write_text(text + "\n")
    _SESSION_REPORTS[name] = rep
    print(f"\n--- chaos report {name} ---\n{text}")
    assert new_segments == [], f"segments left in /dev/shm: {new_segments}"
    assert left == [], f"engine processes left: {left}"


@pytest.fixture
def record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the handlers record; the env var reaches the spawned monitor and its workers."""
    d = tmp_path / "records"
    d.mkdir()
    monkeypatch.setenv(ENV_DIR, str(d))
    return d
