"""The built-in sinks behind real workers: mock (delay, success rate), inbox, null."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from engine import Config, Engine
from engine.worker.sinks import InboxSink


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 2, "stats_interval_s": 0.1, "retry_backoff_base_s": 0.01}
    return Config.from_env(env={}, **(base | overrides))


def _run(cfg: Config, n: int, recipients: int) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with Engine(None, cfg) as eng:
            await eng.submit_many([(f"Agent-{i % recipients}", {"seq": i}) for i in range(n)])
            assert await eng.drain(120)
        return eng.stats()  # includes the monitor's final report

    return asyncio.run(go())


def test_mock_sink_awaits_its_delay_for_every_delivery() -> None:
    s = _run(_config(sink="mock", mock_delay_s=0.02), n=200, recipients=50)
    assert s["delivered"] == 200 and s["in_flight"] == 0
    start, settle = s["latency_start_s"], s["latency_settle_s"]
    assert settle["count"] == 200
    # settle - start >= the simulated delay for each message, so the medians differ by it.
    assert settle["p50"] - start["p50"] >= 0.015


def test_mock_sink_failure_rate_feeds_retries_and_dead_letters() -> None:
    s = _run(
        _config(sink="mock", mock_success_rate=0.5, retry_max_attempts=1), n=400, recipients=40
    )
    assert s["delivered"] + s["dead_lettered"] == 400
    # Binomial(400, 0.5): outside 100..300 has probability < 1e-20.
    assert 100 < s["dead_lettered"] < 300
    assert s["failed_attempts"] == s["dead_lettered"]


def test_inbox_sink_writes_each_recipients_messages_in_order(tmp_path: Path) -> None:
    cfg = _config(sink="inbox", inbox_dir=str(tmp_path))
    s = _run(cfg, n=3000, recipients=30)
    assert s["delivered"] == 3000
    sink = InboxSink(str(tmp_path))
    for r in range(30):
        lines = Path(sink.path_for(f"Agent-{r}")).read_text().splitlines()
        seqs = [json.loads(line)["payload"]["seq"] for line in lines]
        assert seqs == list(range(r, 3000, 30))
    sink.close()


def test_inbox_path_is_safe_for_any_recipient(tmp_path: Path) -> None:
    sink = InboxSink(str(tmp_path))
    path = Path(sink.path_for("../etc/passwd"))
    assert path.parent == tmp_path
    sink.close()


def test_null_sink_settles_everything() -> None:
    s = _run(_config(sink="null"), n=5000, recipients=100)
    assert (s["submitted"], s["delivered"], s["in_flight"]) == (5000, 5000, 0)
