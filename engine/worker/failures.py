"""Which failed attempts a worker reports, and their tracebacks, bounded.

A handler failing every message at 100k msgs/s must not flood the log, the
return ring or the worker's CPU with tracebacks.  A worker reports a failed
attempt (an `AttemptFailed` record the dispatcher logs) at most once per
(recipient, exception type) and interval, and at most ``per_second`` times a
second over all keys; what it holds back is counted and told with the next
report.  Recipients are sharded, so one key lives in one worker: the per-key
limit holds engine-wide.  Dead letters always carry their traceback (the
dead-letter store is bounded by ENGINE_DLQ_MAX); their log line is rate-limited
by the dispatcher, which stores them.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from types import TracebackType

from engine.logs import LogLimiter

MAX_TRACEBACK_CHARS = 8192
"""A traceback longer than this keeps its end (the frames nearest the raise)."""
MAX_ERROR_CHARS = 8192
"""An exception's text longer than this keeps its start (the rest is counted, not sent)."""
FAILURE_LOG_INTERVAL_S = 10.0
FAILURE_REPORTS_PER_S = 20


FRAME_CACHE = 256
_frames: dict[tuple[tuple[object, int], ...], str] = {}


def format_traceback(exc: BaseException, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """``exc``'s formatted traceback, at most ``limit`` characters (the end kept).

    A failing handler fails the same way many times: the frames' text (source
    lines read, carets placed: about 0.1 ms) is kept per code path, and only the
    exception line is formatted each time.  Chained exceptions are formatted whole.
    """
    tb = exc.__traceback__
    if tb is None or exc.__cause__ is not None or exc.__context__ is not None:
        text = "".join(traceback.format_exception(exc))
    else:
        key = tuple((t.tb_frame.f_code, t.tb_lasti) for t in _walk(tb))
        frames = _frames.get(key)
        if frames is None:
            if len(_frames) >= FRAME_CACHE:
                _frames.clear()
            frames = _frames[key] = "".join(traceback.extract_tb(tb).format())
        text = "Traceback (most recent call last):\n" + frames
        text += "".join(traceback.format_exception_only(exc))
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"[{cut:,} characters of the traceback cut]\n" + text[cut:]


def describe(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(exc)``, bounded to ``limit`` characters, and never raising.

    A handler's exception is the user's object: its ``__str__`` may raise or return
    megabytes.  Either way the message must still be retried or dead-lettered, and
    its records must stay small enough for the return ring.
    """
    try:
        text = str(exc)
    except Exception as err:  # its __str__ raised: say so instead of failing the worker
        return f"<str() of the {type(exc).__name__} raised {type(err).__name__}>"
    return bounded(text, limit)


def bounded(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` (a string, else its description) cut to ``limit`` characters, saying so."""
    if not isinstance(text, str):
        text = f"<{type(text).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [{len(text) - limit:,} characters cut]"


def _walk(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


class FailureLog:
    """Rate limit of a worker's failed-attempt reports: per key, and a ceiling over all keys."""

    def __init__(
        self,
        interval_s: float = FAILURE_LOG_INTERVAL_S,
        per_second: int = FAILURE_REPORTS_PER_S,
    ) -> None:
        if per_second < 1:
            raise ValueError(f"per_second must be >= 1, got {per_second}")
        self.limiter = LogLimiter(interval_s)
        self.per_second = per_second
        self._second = 0.0
        self._sent = 0
        self._over = 0  # held back by the ceiling, told with the next report of any key

    def allow(self, key: object, now: float | None = None) -> int | None:
        """None: do not report this failure.  Else how many were held back before it."""
        now = time.monotonic() if now is None else now
        held = self.limiter.allow(key, now)
        if held is None:
            return None
        if now - self._second >= 1.0:
            self._second, self._sent = now, 0
        if self._sent >= self.per_second:
            self._over += held + 1
            return None
        self._sent += 1
        told, self._over = held + self._over, 0
        return told
