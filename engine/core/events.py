"""The engine's events: one log line each, kept for a while, and told to listeners.

Worker deaths, stall kills, respawns, boot failures, poison quarantines,
recycling, monitor restarts and dead letters happen in several processes; the
monitor sends its own over the control pipe (`ipc.control.MonitorEvent`) and
the dispatcher emits each here, in one process.  So there is one place that
writes their log lines (``extra=`` fields: the JSON format carries them as
keys), one bounded list of the recent ones and one fan-out to listeners such
as the dashboard's WebSocket.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger("engine.events")
RECENT_EVENTS = 200

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that happened: ``type`` (e.g. ``worker_died``), when, a sentence, fields."""

    type: str
    level: str
    message: str
    ts: float
    worker: int = -1
    detail: dict[str, Any] = {}


Listener = Callable[[Event], None]


class EventLog:
    """Writes each event's log line, keeps the newest ``keep``, and calls the listeners."""

    def __init__(self, keep: int = RECENT_EVENTS) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        self._listeners: list[Listener] = []

    def emit(
        self, type_: str, level: str, message: str, *, worker: int = -1, **detail: Any
    ) -> Event:
        """Log ``message`` at ``level`` with the fields as ``extra``, then tell the listeners."""
        event = Event(
            type=type_, level=level, message=message, ts=time.time(), worker=worker, detail=detail
        )
        fields = {"event": type_} | ({"worker": worker} if worker >= 0 else {})
        log.log(_LEVELS.get(level, logging.INFO), "%s", message, extra=fields | detail)
        self.recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the engine's bookkeeping
                log.exception("an event listener failed; removed")
                self.unsubscribe(listener)
        return event

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
