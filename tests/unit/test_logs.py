"""The log rate limiter: one line per key and interval, held-back lines counted and told."""

from __future__ import annotations

import logging
import queue

from hypothesis import given
from hypothesis import strategies as st

from engine.logs import DroppingQueueHandler, LogLimiter, suppressed_note


def test_one_line_per_key_and_interval_then_the_held_back_count() -> None:
    lim = LogLimiter(interval_s=10.0)
    assert lim.allow("a", now=0.0) == 0
    assert lim.allow("a", now=1.0) is None
    assert lim.allow("a", now=9.9) is None
    assert lim.allow("b", now=2.0) == 0  # keys are apart
    assert lim.allow("a", now=10.0) == 2
    assert lim.allow("a", now=20.5) == 0
    assert lim.suppressed_total == 2
    assert suppressed_note(0) == ""
    assert suppressed_note(1234) == " (1,234 similar suppressed)"


def test_memory_stays_bounded_with_many_keys() -> None:
    lim = LogLimiter(interval_s=10.0, max_keys=8)
    for i in range(1000):
        assert lim.allow(i, now=float(i) / 1000) == 0
    assert len(lim._last) <= 8


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5)), max_size=200))
def test_every_event_is_either_written_or_counted_in_a_later_line(
    events: list[tuple[int, float]],
) -> None:
    lim = LogLimiter(interval_s=1.0)
    now = 0.0
    written = told = 0
    for key, step in events:
        now += step
        got = lim.allow(key, now=now)
        if got is not None:
            written += 1
            told += got
    held = sum(lim._held.values())
    assert written + told + held == len(events)
    assert told + held == lim.suppressed_total


@given(
    st.lists(st.tuples(st.integers(0, 30), st.floats(0, 0.5)), max_size=300),
    st.integers(1, 6),
)
def test_a_forgotten_keys_held_lines_are_still_told(
    events: list[tuple[int, float]], max_keys: int
) -> None:
    """Memory is bounded by forgetting keys; what they held back goes to take_held."""
    lim = LogLimiter(interval_s=1.0, max_keys=max_keys)
    now = 0.0
    written = told = 0
    for key, step in events:
        now += step
        got = lim.allow(key, now=now)
        if got is not None:
            written += 1
            told += got
        assert len(lim._last) <= max_keys
    assert written + told + lim.take_held() == len(events)
    assert lim.take_held() == 0


def test_take_held_tells_what_is_held_once() -> None:
    lim = LogLimiter(interval_s=10.0)
    assert lim.allow("a", now=0.0) == 0
    for i in range(3):
        assert lim.allow("a", now=1.0 + i) is None
    assert lim.take_held() == 3
    assert lim.take_held() == 0


def test_a_full_log_queue_drops_records_and_the_next_one_counts_them() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(1)
    front = DroppingQueueHandler(records)
    log = logging.getLogger("test.dropping")
    log.propagate = False
    log.addHandler(front)
    try:
        for i in range(3):
            log.warning("line %d", i)  # never blocks: the second and third are dropped
        assert front.dropped == 2
        first = records.get_nowait()
        assert first.getMessage() == "line 0" and first.args is None
        log.warning("after")
        after = records.get_nowait()
        assert after.getMessage() == "after" and after.log_lines_dropped == 2
        assert front.dropped == 0
    finally:
        log.removeHandler(front)


def test_stopping_the_log_queue_never_hangs_on_a_stuck_stderr() -> None:
    """A full queue and a writer stuck in write(): the exit gives up after its bound."""
    import logging
    import queue
    import threading
    from logging.handlers import QueueListener

    from engine import logs

    release = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            release.wait()  # a stderr pipe nobody reads

    q: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=4)
    listener = QueueListener(q, Stuck())
    listener.start()
    try:
        for i in range(5):  # one taken by the stuck writer, four fill the queue
            q.put(logging.makeLogRecord({"msg": f"line {i}"}), timeout=5)
        done = threading.Event()
        stopper = threading.Thread(target=lambda: (logs.stop_logging(listener), done.set()))
        stopper.start()
        stopper.join(4 * logs.STOP_LOGGING_S + 5)
        assert done.is_set(), "stop_logging hung on a stuck log writer"
        assert listener._thread is None
    finally:
        release.set()
