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
from ipc.records import MAX_ERROR_CHARS, clip

MAX_TRACEBACK_CHARS = 8192
"""A traceback longer than this keeps its end (the frames nearest the raise)."""
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
        text += _exception_line(exc)
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"[{cut:,} characters of the traceback cut]\n" + text[cut:]


def _str_of(exc: BaseException) -> str:
    """``str(exc)`` (no copy for the usual one-string exception), or what made it fail."""
    try:
        return str(exc)
    except Exception as err:  # the handler's exception must still settle its message
        return f"<str() of {type(exc).__name__} raised {type(err).__name__}>"


def exc_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(exc)``, at most ``limit`` characters; a ``__str__`` that raises is said, not raised.

    Cut before anything is copied: a handler raising with a 10 MB message costs one
    slice, not a 10 MB f-string (nor a dead letter too big for the return ring).
    """
    text = _str_of(exc)
    return clip(text[:limit], limit, len(text))


def describe(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """``"Type: message"`` of ``exc``, at most ``limit`` characters (see `exc_text`)."""
    text = _str_of(exc)
    head = f"{type(exc).__name__}: "
    return clip(head + text[:limit], limit, len(head) + len(text))


def _exception_line(exc: BaseException) -> str:
    """The traceback's last line(s), bounded: a huge message must not push the frames out."""
    if len(_str_of(exc)) <= MAX_ERROR_CHARS:
        return "".join(traceback.format_exception_only(exc))
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    return f"{name}: {exc_text(exc)}\n"


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
