"""`engine stats` tables: every name whole within 80 columns, failed attempts shown."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from engine.cli.service import stats_view


def big_stats() -> dict[str, Any]:
    lat = {"p50": 0.0123, "p95": 1.5, "p99": 12.25, "max": 1234.5678, "count": 987_654_321}
    return {
        "submitted": 9_876_543_210,
        "delivered": 9_876_000_000,
        "dead_lettered": 123_456,
        "expired": 7,
        "in_flight": 420_000,
        "failed_attempts": 5_555_555,
        "retried": 4_444_444,
        "redelivered": 33_333,
        "latency_start_s": lat,
        "latency_settle_s": lat,
        "workers": [
            {
                "worker": i,
                "pid": 4_194_304 + i,
                "alive": i != 3,
                "delivered": 1_234_567_890,
                "restarts": 12,
                "recycled": 3,
                "cpu_percent": 99.7,
                "rss_bytes": 12_345 * 2**20,
                "error": "",
                "last_error": "ValueError: boom" if i == 1 else "",
            }
            for i in range(16)
        ],
        "top_recipients": [{"recipient": "Agent-" + "x" * 90, "held": 2048}],
        "service": {"connections_active": 3, "http_requests_total": 10, "addresses": {}},
    }


def test_the_tables_fit_80_columns_without_cutting_a_name() -> None:
    console = Console(width=80, record=True, color_system=None)
    console.print(stats_view(big_stats(), title="http://127.0.0.1:7879  12:00:00"))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in (
        "submitted", "delivered", "dead_lettered", "expired", "in_flight", "failed_attempts",
        "retried", "redelivered", "p50", "p95", "p99", "max", "count", "worker", "pid",
        "restarts", "recycled", "cpu %", "rss MiB", "5,555,555", "9,876,543,210",
        "1,234,567,890", "worker 1: ValueError: boom", "held",
    ):  # fmt: skip
        assert name in text, name
