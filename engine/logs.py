"""Logging for every process: JSON or text lines, and a rate limiter for noisy events.

``ENGINE_LOG_FORMAT=json`` writes one JSON object per line (ts, level, logger,
msg, plus the fields passed as ``extra=``), which log shippers parse without
regexes; ``text`` writes the same fields as ``key=value`` after the message.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import sys
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

import msgspec

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_json = msgspec.json.Encoder(enc_hook=str)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.encode(out).decode()


class TextFormatter(logging.Formatter):
    """``ts level logger: msg key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        tb = extras.pop("traceback", "")  # a handler's traceback: on lines of its own
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line = f"{line} {fields}"
        if tb:
            line = f"{line}\n{tb}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


QUEUED_RECORDS = 10_000
"""Log records waiting for the writer thread; beyond this they are dropped and counted."""


def setup_logging(level: str, fmt: str, *, queued: bool = False) -> QueueListener | None:
    """Send every ``engine.*`` record (and aiohttp's) to stderr in the chosen format.

    ``queued`` (the service): callers only put records on a bounded queue and a
    thread writes them, so a slow or full stderr (a pipe nobody reads) never stalls
    the event loop; the caller must ``stop_logging`` the returned listener at exit,
    which writes what is still queued.  A forked child writes directly again.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not queued:
        root.handlers[:] = [handler]
        return None
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUED_RECORDS)
    front = DroppingQueueHandler(records)
    listener = QueueListener(records, handler, respect_handler_level=True)
    listener.start()
    root.handlers[:] = [front]
    if not _direct:
        os.register_at_fork(after_in_child=_write_directly)
    _direct[:] = [handler]
    return listener


def stop_logging(listener: QueueListener | None) -> None:
    """Write every queued record (and the count of any dropped), then stop the thread."""
    if listener is None:
        return
    root = logging.getLogger()
    fronts = [h for h in root.handlers if isinstance(h, DroppingQueueHandler)]
    if _direct:
        # Later lines (other threads at exit too) go straight to stderr: none is left
        # in a queue that nobody drains any more.
        root.handlers[:] = list(_direct)
    # Bounded: a full queue or a stderr nobody reads must not hang the exit (the
    # writer is a daemon thread; what it could not write by then is given up).
    with contextlib.suppress(queue.Full):
        listener.queue.put(listener._sentinel, timeout=STOP_LOGGING_S)  # type: ignore[attr-defined]
    thread = listener._thread
    if thread is not None:
        thread.join(STOP_LOGGING_S)
    listener._thread = None
    if _direct:
        for front in fronts:
            if front.dropped:
                root.warning(
                    "%d log lines were dropped: stderr did not keep up",
                    front.dropped,
                    extra={"log_lines_dropped": front.dropped},
                )


_direct: list[logging.Handler] = []  # the stderr handler behind the queue, once queued
STOP_LOGGING_S = 2.0
"""How long the exit waits for queued log lines to be written (stderr may be stuck)."""


def _write_directly() -> None:
    """In a forked child: the writer thread does not exist there, so write directly."""
    if _direct:
        root = logging.getLogger()
        kept = [h for h in root.handlers if not isinstance(h, QueueHandler)]
        root.handlers[:] = kept + _direct


class DroppingQueueHandler(QueueHandler):
    """A QueueHandler that never blocks: a full queue drops the record and counts it;
    the next record that gets through carries the count (``log_lines_dropped``)."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Resolve the message now (its arguments may change later); keep ``exc_info``
        and the extras, which the writer thread's formatter renders."""
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.dropped:
            record.log_lines_dropped = self.dropped
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return
        self.dropped = 0


class LogLimiter:
    """One line per key and interval; what it holds back is counted and told with the next line.

    A failing handler at 100k msgs/s or a fuzzing client must not flood the log
    (or block on a full stderr pipe): callers ask ``allow(key)`` before logging
    and add the suppressed count to the line they write.
    """

    def __init__(self, interval_s: float = 10.0, max_keys: int = 4096) -> None:
        if interval_s < 0 or max_keys < 1:
            raise ValueError(
                f"need interval_s >= 0 and max_keys >= 1, got {interval_s}, {max_keys}"
            )
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}
        self._evicted_held = 0  # held back for keys forgotten since: told by take_held
        self.suppressed_total = 0

    def allow(self, key: object, now: float | None = None) -> int | None:
        """None: stay quiet this time. Else how many lines for ``key`` were held back since."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            self.suppressed_total += 1
            return None
        if last is None and len(self._last) >= self.max_keys:
            self._evict(now)
        self._last[key] = now
        return self._held.pop(key, 0)

    def take_held(self) -> int:
        """Lines held back and not yet told with a later line (all keys); forgets them,
        for the caller tells them now (at a stop, say)."""
        total = sum(self._held.values()) + self._evicted_held
        self._held.clear()
        self._evicted_held = 0
        return total

    def _evict(self, now: float) -> None:
        """Forget keys quiet for a whole interval; if none is, the oldest (bounded memory)."""
        for k in [k for k, t in self._last.items() if now - t >= self.interval_s]:
            self._forget(k)
        if len(self._last) >= self.max_keys:
            self._forget(min(self._last, key=self._last.__getitem__))

    def _forget(self, key: object) -> None:
        del self._last[key]
        self._evicted_held += self._held.pop(key, 0)


def suppressed_note(count: int) -> str:
    """The tail a rate-limited line carries: empty, or how many similar lines were held back."""
    return f" ({count:,} similar suppressed)" if count else ""
