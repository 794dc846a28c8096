"""``engine bench-batch`` reproduces the design's table: the batch close to one handler time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.integration.service_proc import REPO


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    return subprocess.run(
        [sys.executable, "-m", "engine", "bench-batch", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )


def test_bench_batch_compares_sequential_and_batch() -> None:
    out = bench("--requests", "20", "--handler-ms", "100", "--json")
    assert out.returncode == 0, out.stderr
    seq, cold, warm = json.loads(out.stdout)
    assert [r["mode"] for r in (seq, cold, warm)] == ["sequential", "batch", "batch, warm cache"]
    assert seq["total_s"] >= 20 * 0.1 and seq["executed"] == 20 and not seq["estimated"]
    # 14 distinct requests, 20 at once: about one handler time, far below sequential.
    assert (cold["executed"], cold["deduplication_rate"]) == (14, 0.3)
    assert 0.1 <= cold["total_s"] < seq["total_s"] / 4
    assert (warm["executed"], warm["cache_hit_rate"]) == (0, 1.0)


def test_bench_batch_scales_the_sequential_row_beyond_its_sample() -> None:
    out = bench("--requests", "50", "--handler-ms", "20", "--sequential-max", "10")
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()
    assert table[0].startswith("| mode (handler 20 ms, concurrency 20, cache 2,000) | requests |")
    assert "(est.)" in table[2] and table[2].startswith("| sequential | 50 |")
