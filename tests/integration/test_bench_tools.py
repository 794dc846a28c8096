"""Smoke tests of the commands behind tuning.md's CPU figures, at a tiny size.

``bench/cpu_per_message.py`` runs a real engine and reads the real processes' CPU
times; ``bench/compare_trees.py`` runs it for two trees side by side.  Their
output is checked for sense (every role measured, the tree that was asked for),
never for speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,  # the tests read the exit status themselves
    )


@pytest.mark.parametrize("case", ["noop", "async_1ms"])
def test_cpu_per_message_reports_every_role_of_this_tree(case: str) -> None:
    proc = run("-m", "bench.cpu_per_message", "--case", case, "--messages", "3000")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["case"] == case and out["messages"] == 3000 and out["workers"] == 2
    assert out["engine_file"] == str(TREE / "engine" / "__init__.py")
    assert out["seconds"] > 0 and out["msgs_per_s"] == pytest.approx(3000 / out["seconds"])
    cpu = out["cpu_us_per_msg"]
    assert set(cpu) == {"dispatcher", "workers", "monitor", "total"}
    assert cpu["dispatcher"] > 0  # this process built and submitted every message
    assert all(v >= 0 for v in cpu.values())
    assert cpu["total"] == pytest.approx(cpu["dispatcher"] + cpu["workers"] + cpu["monitor"])


def test_cpu_per_message_refuses_a_tree_without_an_engine(tmp_path: Path) -> None:
    proc = run("bench/cpu_per_message.py", "--tree", str(tmp_path), "--messages", "10")
    assert proc.returncode == 2
    assert f"--tree {tmp_path} holds no engine package" in proc.stderr


def test_compare_trees_prints_both_sides_and_the_ratio() -> None:
    # This tree against itself: the machinery, not a speed-up, is under test.
    proc = run(
        "-m", "bench.compare_trees", str(TREE), "--rounds", "1", "--messages", "2000",
        "--cases", "noop", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert set(runs) == {"noop"} and set(runs["noop"]) == {"old", "new"}
    for side in ("old", "new"):
        (one,) = runs["noop"][side]
        assert one["messages"] == 2000
        assert one["engine_file"].startswith(str(TREE))
    table = run(
        "-m", "bench.compare_trees", str(TREE), "--rounds", "1", "--messages", "2000",
        "--cases", "noop",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| noop |")]
    assert [r.split("|")[2].strip() for r in rows] == ["old", "new", "new/old"]


def test_cpu_per_message_as_a_cluster_node_cleans_up_its_namespace(tmp_path: Path) -> None:
    import redis

    from tests.broker.redis_proc import running_redis

    with running_redis(tmp_path / "redis") as server:
        proc = run(
            "-m", "bench.cpu_per_message", "--case", "noop", "--messages", "3000",
            "--broker", server.url,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["cluster"] is True and out["messages"] == 3000
        assert out["cpu_us_per_msg"]["dispatcher"] > 0
        client = redis.Redis.from_url(server.url)
        try:
            assert client.keys("cpm-*") == []  # the run's namespace is gone
        finally:
            client.close()
