"""Failure reports: bounded tracebacks, the worker's rate limit, tracebacks in both formats."""

from __future__ import annotations

import json
import logging

from engine.logs import JsonFormatter, TextFormatter
from engine.worker.failures import FailureLog, format_traceback


def fail(message: str) -> None:
    raise ValueError(message)


def raised(message: str) -> BaseException:
    try:
        fail(message)
    except ValueError as exc:
        return exc
    raise AssertionError("fail() returned")


def test_a_traceback_is_kept_whole_or_its_end_within_the_bound() -> None:
    short = format_traceback(raised("deep down"))
    assert short.startswith("Traceback (most recent call last):")
    assert short.endswith("ValueError: deep down")
    long = format_traceback(raised("x" * 3000 + " the end"), limit=2000)
    first, rest = long.split("\n", 1)
    assert len(rest) == 2000 and first.endswith("characters of the traceback cut]")
    assert long.endswith("x the end")  # the end, nearest the raise, is kept
    # A huge message is cut itself (at its end), so the frames stay in the traceback.
    huge = format_traceback(raised("y" * 1_000_000))
    assert huge.startswith("Traceback (most recent call last):") and len(huge) < 8192
    assert huge.endswith("[truncated, 1,000,000 chars]") and "ValueError: yyy" in huge


def test_one_report_per_key_and_interval_and_a_ceiling_over_all_keys() -> None:
    log = FailureLog(interval_s=10.0, per_second=3)
    assert log.allow(("a", "ValueError"), now=0.0) == 0
    assert log.allow(("a", "ValueError"), now=0.1) is None  # same key: held back
    assert log.allow(("a", "KeyError"), now=0.2) == 0  # another exception type: its own key
    assert log.allow(("b", "ValueError"), now=0.3) == 0
    assert log.allow(("c", "ValueError"), now=0.4) is None  # the ceiling: 3 a second
    assert log.allow(("d", "ValueError"), now=0.5) is None
    # The next second: the ceiling's 2 and the key's own held-back one are told.
    assert log.allow(("a", "ValueError"), now=10.5) == 1 + 2
    assert log.allow(("e", "ValueError"), now=10.6) == 0


def record_with_traceback() -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "engine.events",
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": "message 7 to 'a' dead-lettered",
            "recipient": "a",
            "traceback": "Traceback (most recent call last):\n  ...\nValueError: x",
        }
    )


def test_the_text_format_puts_a_traceback_on_lines_of_its_own() -> None:
    text = TextFormatter().format(record_with_traceback())
    first, *rest = text.splitlines()
    assert first.endswith("message 7 to 'a' dead-lettered recipient=a")
    assert rest == ["Traceback (most recent call last):", "  ...", "ValueError: x"]


def test_the_json_format_carries_the_traceback_as_a_key() -> None:
    line = json.loads(JsonFormatter().format(record_with_traceback()))
    assert line["recipient"] == "a" and line["traceback"].endswith("ValueError: x")


def test_a_cached_traceback_reads_exactly_like_a_fresh_one() -> None:
    import traceback

    first, second = raised("one"), raised("two")  # the same code path: the cache is used
    for exc in (first, second):
        assert format_traceback(exc) == "".join(traceback.format_exception(exc)).rstrip("\n")
    try:
        try:
            fail("inner")
        except ValueError as inner:
            raise KeyError("outer") from inner
    except KeyError as chained:
        whole = "".join(traceback.format_exception(chained)).rstrip("\n")
        assert format_traceback(chained) == whole  # chained: formatted whole
        assert "direct cause" in whole
