"""Errors and handler signals of the engine; all derive from the one root, EngineError."""

from __future__ import annotations

from ipc.errors import CodecError, EngineError, FrameTooLargeError, QueueFull, ShmSpaceError

__all__ = [
    "AuthenticationError",
    "CodecError",
    "ConnectionLost",
    "DrainTimeout",
    "EngineClosed",
    "EngineError",
    "EngineStartError",
    "FieldTooLarge",
    "FrameTooLargeError",
    "QueueFull",
    "RateLimited",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Retry",
    "ServiceError",
    "ShmSpaceError",
]


class Retry(EngineError):
    """Raised by a handler to ask for another attempt, after ``after`` seconds if given."""

    def __init__(self, after: float | None = None, reason: str = "") -> None:
        if after is not None and not 0 <= after <= 86_400:
            raise ValueError(f"Retry(after=) must be seconds in [0, 86400], got {after!r}")
        self.after = after
        self.reason = reason
        super().__init__(reason or (f"retry after {after}s" if after is not None else "retry"))


class Reject(EngineError):
    """Raised by a handler to dead-letter the message at once, with ``reason``."""

    def __init__(self, reason: str = "rejected") -> None:
        self.reason = reason
        super().__init__(reason)


class FieldTooLarge(EngineError, ValueError):
    """Raised when a recipient, topic, sender, tags or metadata exceed their configured
    size (ENGINE_MAX_RECIPIENT_BYTES, ENGINE_MAX_METADATA_BYTES); nothing of the call
    was queued.  The service answers it as a bad frame (binary) or a 400 (HTTP)."""


class RequestTimeout(EngineError, TimeoutError):
    """Raised when a request gets no reply within its timeout."""


class RequestFailed(EngineError):
    """Raised by ``request`` when the handler rejected the request or it was dead-lettered."""


class EngineStartError(EngineError):
    """Raised when the engine cannot start, e.g. a worker fails to import its handler."""


class EngineClosed(EngineError):
    """Raised when a message is submitted to an engine that is not running."""


class DrainTimeout(EngineError):
    """Raised on leaving ``async with Engine(...)`` / ``with Engine(...)`` when the stop
    abandoned messages (submitted, never settled): the drain ran out of time, or the
    engine was stopped fast.  ``Engine(..., abandon_ok=True)`` accepts that instead."""

    def __init__(self, abandoned: int, reason: str) -> None:
        self.abandoned = abandoned
        super().__init__(
            f"{abandoned} submitted messages were abandoned unsettled ({reason}); "
            "raise ENGINE_SHUTDOWN_TIMEOUT_S, drain before leaving, or pass "
            "Engine(..., abandon_ok=True) to accept the loss"
        )


class ServiceError(EngineError):
    """Raised by a client when the service refused a frame; ``code`` and ``reason`` say why."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class RateLimited(ServiceError):
    """Raised when the service refused a frame over the user's ENGINE_RATE_LIMIT; nothing of
    it was queued.  ``retry_after_s`` says when the same frame would be accepted."""

    def __init__(self, code: str, reason: str, retry_after_s: float = 0.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(code, reason)


class AuthenticationError(ServiceError):
    """Raised when the service rejects the client's token (missing or wrong)."""


class ConnectionLost(EngineError, ConnectionError):
    """Raised when the connection to the service dropped before a frame was answered."""
